"""Checkpoints: train state + data-iterator state + metadata, via one Orbax CheckpointManager.

Layout: ``<workdir>/checkpoints/<step>/{state, data_iter, metadata}``
  * ``state``: the train-state pytree (``StandardSave``; jax arrays keep their sharding on restore
    when a template is given);
  * ``data_iter``: the Grain iterator state through Grain's own Orbax handler
    (``grain.checkpoint.CheckpointHandler``: one ``process_<i>-of-<n>.json`` per process). Other
    iterators with JSON-serialisable ``get_state()``/``set_state()`` go through the same handler
    behind a small adapter;
  * ``metadata``: JSON ``{"step", "wall_time", "metrics", ...extra}``.

Retention is "the last ``max_to_keep`` plus the best one by ``best_metric``": a single manager with
``AnyPreservationPolicy([LatestN(max_to_keep), BestN(n=1)])``, so the best checkpoint survives
after it falls out of the last N (Orbax's plain ``best_fn`` + ``max_to_keep`` would instead keep
the best N). Checkpoints saved without metrics are never "best". A metric that is missing or
not finite ranks worst.
"""
import json
import math
import os
import time
from typing import Any, Mapping, NamedTuple, Optional

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

# The trainer's selection metric: novel (or held-out base) mIoU of the periodic evaluation.
BEST_METRIC = "select/miou"
STATE = "state"
DATA_ITER = "data_iter"
METADATA = "metadata"


class NonFiniteLossError(FloatingPointError):
  """Raised when the training loss (or another watched value) is NaN or infinite."""


def check_finite(value: Any, step: int, name: str = "loss") -> float:
  """Returns ``float(value)``; raises ``NonFiniteLossError`` when it is NaN or ±inf.

  Calling it forces a device→host sync of ``value``; call it at logging steps only.
  """
  v = float(value)
  if not math.isfinite(v):
    raise NonFiniteLossError(
        f"Non-finite {name} ({v}) at step {step}. The last saved checkpoint is intact; lower the "
        f"learning rate or inspect the batch of this step before resuming.")
  return v


class Restored(NamedTuple):
  step: int
  state: Any
  metadata: dict


class _JsonStateIterator:
  """Lets Grain's handler save any iterator whose ``get_state()`` is JSON-serialisable."""

  def __init__(self, iterator):
    self.iterator = iterator

  def get_state(self) -> bytes:
    return json.dumps(self.iterator.get_state()).encode()

  def set_state(self, state: bytes) -> None:
    self.iterator.set_state(json.loads(state.decode()))

  def start_prefetch(self) -> None:
    if hasattr(self.iterator, "start_prefetch"):
      self.iterator.start_prefetch()


def _iterator_item(iterator):
  if isinstance(iterator, (grain.DatasetIterator, grain.DataLoaderIterator)):
    return iterator
  if not (hasattr(iterator, "get_state") and hasattr(iterator, "set_state")):
    raise TypeError(f"data_iterator of type {type(iterator).__name__} has no get_state/set_state; "
                    "cannot checkpoint it.")
  return _JsonStateIterator(iterator)


def _to_json_metrics(metrics: Optional[Mapping[str, Any]]) -> Optional[dict]:
  if metrics is None:
    return None
  out = {}
  for k, v in metrics.items():
    try:
      out[str(k)] = float(v)
    except (TypeError, ValueError) as e:
      raise TypeError(f"checkpoint metrics[{k!r}] = {v!r} is not a scalar number.") from e
  return out


class CheckpointManager:
  """Saves and restores {state, data iterator, metadata}; keeps the last N plus the best."""

  def __init__(self, workdir: str, max_to_keep: int = 3, keep_best: bool = False,
               best_metric: str = "val/miou", best_mode: str = "max", async_save: bool = True,
               subdir: str = "checkpoints"):
    """Args:
      workdir: run directory; checkpoints go to ``<workdir>/<subdir>``.
      max_to_keep: number of most recent checkpoints to keep (>= 1).
      keep_best: also keep the single best checkpoint by ``best_metric``.
      best_metric: key in the ``metrics`` passed to ``save``.
      best_mode: 'max' or 'min'.
      async_save: write in a background thread (device→host copy happens in ``save``).
      subdir: checkpoint folder name inside ``workdir``.
    """
    if max_to_keep < 1:
      raise ValueError(f"CheckpointManager: max_to_keep must be >= 1, got {max_to_keep}.")
    if best_mode not in ("max", "min"):
      raise ValueError(f"CheckpointManager: best_mode must be 'max' or 'min', got {best_mode!r}.")
    self.directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), subdir)
    self.keep_best = keep_best
    self.best_metric = best_metric
    self.best_mode = best_mode
    policies = [ocp_managers.LatestN(n=max_to_keep)]
    best_fn = None
    if keep_best:
      best_fn = self._metric_value
      policies.append(ocp_managers.BestN(
          get_metric_fn=best_fn, reverse=(best_mode == "min"), n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode=best_mode,
        preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       DATA_ITER: grain.checkpoint.CheckpointHandler(),
                       METADATA: ocp.JsonCheckpointHandler()})

  def _metric_value(self, metrics: Mapping[str, Any]) -> float:
    worst = -math.inf if self.best_mode == "max" else math.inf
    try:
      v = float(metrics[self.best_metric])
    except (KeyError, TypeError, ValueError):
      return worst
    return v if math.isfinite(v) else worst

  # ---- saving ----
  def save(self, step: int, state: Any, data_iterator: Any = None,
           metrics: Optional[Mapping[str, Any]] = None, force: bool = False,
           extra_metadata: Optional[Mapping[str, Any]] = None) -> bool:
    """Saves a checkpoint at ``step``; returns whether a save was started.

    Args:
      step: training step (the number of updates applied to ``state``).
      state: the train-state pytree.
      data_iterator: Grain iterator (or any iterator with JSON get_state/set_state) positioned at
        the next batch to consume; its state is captured now, before this call returns.
      metrics: flat dict of scalar metrics (used for "best" when ``keep_best``).
      force: save even if Orbax's save policy would skip this step.
      extra_metadata: more JSON-serialisable fields for the metadata item.
    """
    metrics = _to_json_metrics(metrics)
    if self.keep_best and metrics is not None and self.best_metric not in metrics:
      raise KeyError(f"CheckpointManager.save: metrics {sorted(metrics)} lack best_metric "
                     f"{self.best_metric!r}.")
    meta = {"step": int(step), "wall_time": time.time(), "metrics": metrics,
            **dict(extra_metadata or {})}
    items = {STATE: ocp.args.StandardSave(state), METADATA: ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items[DATA_ITER] = grain.checkpoint.CheckpointSave(_iterator_item(data_iterator))
    return self._manager.save(int(step), args=ocp.args.Composite(**items),
                              metrics=metrics, force=force)

  # ---- restoring ----
  def restore(self, step: Optional[int] = None, state_template: Any = None,
              data_iterator: Any = None) -> Restored:
    """Restores ``step`` (default: latest).

    Args:
      step: checkpoint step; None for the latest.
      state_template: pytree with the state's structure (concrete arrays or
        ``jax.ShapeDtypeStruct`` with shardings); None restores the saved structure (nested
        dicts) with every array on this process's first device, whatever the topology it was
        saved from.
      data_iterator: if given, its state is set in place from the checkpoint.

    Returns:
      ``Restored(step, state, metadata)``.
    """
    self.wait()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"No checkpoint to restore in {self.directory}.")
    if step not in self.all_steps():
      raise FileNotFoundError(
          f"No checkpoint for step {step} in {self.directory} (have {self.all_steps()}).")
    if state_template is None:
      state_template = self._local_template(step)
    items = {STATE: ocp.args.StandardRestore(state_template), METADATA: ocp.args.JsonRestore()}
    if data_iterator is not None:
      if not os.path.isdir(os.path.join(self.directory, str(step), DATA_ITER)):
        raise FileNotFoundError(
            f"Checkpoint {self.directory}/{step} holds no data-iterator state; pass "
            "data_iterator=None to restore the model state alone.")
      items[DATA_ITER] = grain.checkpoint.CheckpointRestore(_iterator_item(data_iterator))
    out = self._manager.restore(step, args=ocp.args.Composite(**items))
    return Restored(int(step), out[STATE], dict(out[METADATA]))

  def _local_template(self, step: int) -> Any:
    """The saved state's structure, every array placed on this process's first device.

    Lets a checkpoint written on another topology (8 devices, several hosts) be read here.
    """
    tree = self._manager.item_metadata(step)[STATE]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    is_array = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
    to_struct = lambda x: (jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=device)
                           if is_array(x) else x)
    return jax.tree.map(to_struct, dict(tree), is_leaf=is_array)

  def read_metadata(self, step: int) -> dict:
    """The metadata item of ``step`` (no state is read)."""
    path = os.path.join(self.directory, str(step), METADATA, "metadata")
    try:
      with open(path) as f:
        return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise FileNotFoundError(f"Cannot read checkpoint metadata {path}: {e}") from e

  # ---- queries / lifecycle ----
  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def best_step(self) -> Optional[int]:
    """Step of the best kept checkpoint (``keep_best`` only), else None."""
    if not self.keep_best:
      return None
    self.wait()
    candidates = [s for s in self.all_steps() if self._manager.metrics(s) is not None]
    if not candidates:
      return None
    key = lambda s: self._metric_value(self._manager.metrics(s))
    return max(candidates, key=key) if self.best_mode == "max" else min(candidates, key=key)

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def load_model_variables(workdir: str, step: Any = "best") -> tuple:
  """Model variables {'params', 'batch_stats'} of a training run's checkpoint, on the host.

  Args:
    workdir: the run directory given to ``train.py`` (holding ``checkpoints/``).
    step: an int, 'latest', or 'best' (the best by ``BEST_METRIC``; the latest when no
      checkpoint carries metrics).

  Returns:
    (variables as nested dicts of numpy arrays, the step read).
  """
  mgr = CheckpointManager(workdir, keep_best=True, best_metric=BEST_METRIC, async_save=False)
  try:
    steps = mgr.all_steps()
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {mgr.directory}.")
    if step == "latest":
      step = mgr.latest_step()
    elif step == "best":
      step = mgr.best_step() or mgr.latest_step()
    else:
      try:
        step = int(step)
      except (TypeError, ValueError) as e:
        raise ValueError(f"step must be an int, 'latest' or 'best', got {step!r}.") from e
    state = mgr.restore(step).state
  finally:
    mgr.close()
  state = jax.device_get(state)
  variables = {"params": {**state["frozen"], **state["trainable"]}}
  if state.get("batch_stats"):
    variables["batch_stats"] = state["batch_stats"]
  return variables, int(step)
