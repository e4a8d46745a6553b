"""Device mesh, batch sharding and (opt-in) multi-host initialisation.

One 1-D mesh axis ``"data"`` over every device of every process. Each process loads its own
slice of the global batch (``local_batch_size``) and ``host_batch_to_global`` assembles the
global ``jax.Array`` sharded along the leading (batch) axis; parameters and optimiser state are
replicated. ``jax.pmap`` is not used.
"""
import os
from typing import Any, Mapping, Optional

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA_AXIS = "data"
ENV_FLAG = "FSS_JAX_DISTRIBUTED"
# JAX itself reads JAX_COORDINATOR_ADDRESS; the process count / id variables are the common
# convention for launchers without cluster auto-detection (SLURM, Open MPI, TPU are auto-detected).
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"


def _env_true(name: str) -> bool:
  return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def should_initialize_distributed(flag: Optional[bool] = None) -> bool:
  """The decision of ``maybe_initialize_distributed`` (no side effects)."""
  if flag is not None:
    return bool(flag)
  return _env_true(ENV_FLAG) or bool(os.environ.get(COORDINATOR_ENV))


def maybe_initialize_distributed(flag: Optional[bool] = None) -> bool:
  """Calls ``jax.distributed.initialize()`` only when asked; returns whether it did.

  Asked = ``flag`` is True, or ``flag`` is None and either ``FSS_JAX_DISTRIBUTED=1`` or
  ``JAX_COORDINATOR_ADDRESS`` is set. ``flag=False`` never initialises. Must run before anything
  touches a JAX device. ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` are passed on when set;
  otherwise JAX auto-detects the cluster (SLURM, Open MPI, TPU pods, ...).
  """
  if not should_initialize_distributed(flag):
    return False
  if jax.distributed.is_initialized():
    return False
  kwargs = {}
  for env, key in ((NUM_PROCESSES_ENV, "num_processes"), (PROCESS_ID_ENV, "process_id")):
    if os.environ.get(env):
      try:
        kwargs[key] = int(os.environ[env])
      except ValueError as e:
        raise ValueError(f"{env}={os.environ[env]!r} is not an integer.") from e
  jax.distributed.initialize(**kwargs)
  return True


def script_setup(argv, distributed_flag: Optional[bool]) -> None:
  """Common start of ``scripts/train.py`` / ``evaluate.py`` under ``absl.app``.

  Rejects stray positional arguments, keeps Orbax's per-save INFO lines out of the output
  unless ``--verbosity`` was given, and initialises ``jax.distributed`` when asked.
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  maybe_initialize_distributed(distributed_flag)


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """1-D mesh with axis ``"data"`` over all devices (or the given ones)."""
  # Auto axis: shardings of intermediates are left to the compiler (jit + in/out shardings),
  # not carried in the types as with Explicit axes.
  auto = (jax.sharding.AxisType.Auto,)
  if devices is None:
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=auto)
  devices = list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), devices=devices, axis_types=auto)


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``"data"``; other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Every device holds the whole value (parameters, optimiser state, scalars)."""
  return NamedSharding(mesh, P())


def local_batch_size(global_batch: int, mesh: Optional[jax.sharding.Mesh] = None) -> int:
  """Per-process batch size; the global batch must split evenly over processes and devices."""
  n_proc = jax.process_count()
  n_dev = mesh.devices.size if mesh is not None else jax.device_count()
  if global_batch <= 0:
    raise ValueError(f"Global batch size must be positive, got {global_batch}.")
  if global_batch % n_dev:
    raise ValueError(
        f"Global batch size {global_batch} is not divisible by the number of devices ({n_dev}); "
        f"use a multiple of {n_dev}.")
  if global_batch % n_proc:
    raise ValueError(
        f"Global batch size {global_batch} is not divisible by the number of processes "
        f"({n_proc}).")
  return global_batch // n_proc


def host_batch_to_global(batch: Mapping[str, Any], mesh: jax.sharding.Mesh) -> dict:
  """Builds global arrays, sharded on the batch axis, from this process's part of the batch.

  Args:
    batch: (nested) dict of host arrays, each with leading axis = local batch size (the same for
      every entry and every process, divisible by the local device count).
    mesh: the ``"data"`` mesh.

  Returns:
    The same structure of ``jax.Array`` with global leading axis = local × process count.
  """
  sharding = data_sharding(mesh)
  n_local = len(mesh.local_devices)

  def to_global(path, x):
    x = np.asarray(x)
    name = jax.tree_util.keystr(path)
    if x.ndim == 0:
      raise ValueError(f"batch{name} is a scalar; every batch entry needs a leading batch axis.")
    if x.shape[0] % n_local:
      raise ValueError(
          f"batch{name} has local batch size {x.shape[0]}, not divisible by the "
          f"{n_local} local devices.")
    return jax.make_array_from_process_local_data(sharding, x)

  sizes = {np.shape(x)[0] for x in jax.tree.leaves(batch) if np.ndim(x)}
  if len(sizes) > 1:
    raise ValueError(f"batch entries have different leading sizes {sorted(sizes)}.")
  return jax.tree_util.tree_map_with_path(to_global, dict(batch))


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in local batch order."""
  if jax.process_count() == 1:
    return np.asarray(x)
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  rows, seen = [], set()
  for s in shards:
    start = s.index[0].start or 0
    if start not in seen:  # replicated shards over other axes would repeat rows
      seen.add(start)
      rows.append(np.asarray(s.data))
  return np.concatenate(rows)
