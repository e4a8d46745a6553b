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

Damage (see ``restore``, ``restore_latest``, ``save``, ``wait``):
  * a checkpoint that cannot be read raises ``CheckpointRestoreError`` naming its step, folder
    and (when it can be told) the damaged file; ``restore_latest(fallback=True)`` moves such a
    checkpoint to ``<workdir>/damaged_checkpoints/<step>`` (never deleted), says so in one line
    and restores the previous one;
  * a failed write (full disk, permissions, read-only file system) raises
    ``CheckpointWriteError`` from ``save``/``wait``, naming the step, folder and errno, after
    removing the partial ``<step>.orbax-checkpoint-tmp*`` folder; Orbax's own error logs of
    that failure (tracebacks from its background save threads) are held back while our save is
    in flight (``_SaveErrorLogFilter``), so the error is one message (its ``__cause__`` keeps
    the original exception and traceback);
  * ``DivergenceGuard`` checks a state before it is saved (finite loss and parameters, bounded
    parameter norm); ``check_finite_variables`` refuses NaN/inf weights for evaluation/export.
"""
import errno as errno_lib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from typing import Any, Mapping, NamedTuple, Optional

import grain
import jax
import jax.numpy as jnp
import numpy as np
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


class DivergenceError(NonFiniteLossError):
  """Raised when the parameters are not finite or their norm exploded (``DivergenceGuard``)."""


class CheckpointRestoreError(RuntimeError):
  """A checkpoint could not be read. ``step``, ``directory`` and ``file`` (None when unknown)."""

  def __init__(self, message: str, step: Optional[int] = None, directory: Optional[str] = None,
               file: Optional[str] = None, damaged: bool = True):
    super().__init__(message)
    self.step, self.directory, self.file = step, directory, file
    self.damaged = damaged  # False: the checkpoint reads, but not into the requested structure


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written (``errno``: e.g. ``errno.ENOSPC``; None when unknown)."""

  def __init__(self, message: str, step: Optional[int] = None, directory: Optional[str] = None,
               errno: Optional[int] = None):
    super().__init__(message)
    self.step, self.directory, self.errno = step, directory, errno


class NonFiniteWeightsError(ValueError):
  """Model variables hold NaN or ±inf (``check_finite_variables``)."""


def _exception_chain(exc: BaseException) -> list:
  out, seen = [], set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    out.append(exc)
    exc = exc.__cause__ or exc.__context__
  return out


def _short(exc: BaseException, limit: int = 300) -> str:
  text = " ".join(str(exc).split())
  return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


_ERRNO_TEXT = (("No space left on device", errno_lib.ENOSPC),
               ("Disk quota exceeded", errno_lib.EDQUOT),
               ("Read-only file system", errno_lib.EROFS),
               ("Permission denied", errno_lib.EACCES),
               ("Operation not permitted", errno_lib.EPERM))


def _find_errno(exc: BaseException) -> Optional[int]:
  """The errno of the first OSError in the chain, else one recognised in a message (TensorStore
  reports its own file errors as ValueError text)."""
  chain = _exception_chain(exc)
  for e in chain:
    if isinstance(e, OSError) and e.errno:
      return e.errno
  for e in chain:
    for text, code in _ERRNO_TEXT:
      if text in str(e):
        return code
  return None


class _SaveErrorLogFilter(logging.Filter):
  """Holds back Orbax's ERROR records with a traceback while one of our saves is in flight.

  A failed asynchronous save is logged by Orbax three times with full tracebacks (the handler's
  thread, the commit thread, ``wait_until_finished``) before it is raised to the caller, where
  ``CheckpointManager`` turns it into one ``CheckpointWriteError``. Records outside a save, of
  other libraries, or without a traceback pass. ``held`` counts what was held back.
  """

  def __init__(self):
    super().__init__()
    self._lock = threading.Lock()
    self._active = 0
    self.held = 0

  def begin(self) -> None:
    with self._lock:
      self._active += 1

  def end(self) -> None:
    with self._lock:
      self._active = max(0, self._active - 1)

  def filter(self, record: logging.LogRecord) -> bool:
    if (self._active and record.levelno >= logging.ERROR and record.exc_info
        and f"{os.sep}orbax{os.sep}" in (record.pathname or "")):
      with self._lock:
        self.held += 1
      return False
    return True


_SAVE_LOG_FILTER = _SaveErrorLogFilter()
logging.getLogger("absl").addFilter(_SAVE_LOG_FILTER)  # Orbax logs through absl's logger


def _quiet_closed_loop_after_failed_save() -> None:
  """After a failed save, a late TensorStore callback of Orbax's (already closed) event loop can
  print a bare ``RuntimeError: Event loop is closed`` traceback through ``sys.unraisablehook``
  (seen in about one run in five). Installed once, at the first failed write: that exact
  unraisable error, with no object, is dropped; everything else reaches the previous hook."""
  import sys  # pylint: disable=g-import-not-at-top
  previous = sys.unraisablehook
  if getattr(previous, "_fss_jax_quiet", False):
    return

  def hook(args):
    if (args.object is None and isinstance(args.exc_value, RuntimeError)
        and str(args.exc_value) == "Event loop is closed"):
      return
    previous(args)

  hook._fss_jax_quiet = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def _agreed_outcome(code: int) -> int:
  """The largest ``code`` over all processes (this process's own with one process)."""
  if jax.process_count() == 1:
    return int(code)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.max(multihost_utils.process_allgather(np.asarray(code, np.int32))))


def check_workdir_writable(workdir: str) -> None:
  """Creates ``workdir`` if needed and writes + removes a probe file there (and in its
  ``checkpoints/`` when that exists); raises ``CheckpointWriteError`` with the reason."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  folders = [workdir] + [p for p in [os.path.join(workdir, "checkpoints")] if os.path.isdir(p)]
  for folder in folders:
    probe = os.path.join(folder, f".write_probe.{os.getpid()}")
    try:
      os.makedirs(folder, exist_ok=True)
      with open(probe, "wb") as f:
        f.write(b"\0" * 4096)
        f.flush()
        os.fsync(f.fileno())
      os.remove(probe)
    except OSError as e:
      code = e.errno
      reason = os.strerror(code) if code else str(e)
      raise CheckpointWriteError(
          f"The run directory {folder} is not writable ({reason}"
          f"{', errno ' + errno_lib.errorcode.get(code, str(code)) if code else ''}): checkpoints "
          "and logs cannot be saved. Free disk space, fix its permissions or choose another "
          "--workdir.", directory=folder, errno=code) from e


def check_finite_variables(variables: Any, source: str = "variables") -> None:
  """Raises ``NonFiniteWeightsError`` naming the first parameter path holding NaN or ±inf."""
  bad = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    x = np.asarray(leaf)
    if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)):
      bad.append((jax.tree_util.keystr(path), int(np.sum(~np.isfinite(x))), x.size))
  if bad:
    path, n, size = bad[0]
    more = f" (and {len(bad) - 1} more parameter(s))" if len(bad) > 1 else ""
    raise NonFiniteWeightsError(
        f"{source}: parameter {path} holds {n} of {size} non-finite values (NaN/inf){more}; "
        "these weights come from a diverged run and cannot be evaluated or exported. Use an "
        "earlier checkpoint (--step).")


class DivergenceGuard:
  """The checks a training state passes before it is saved or ranked as "best".

  1. the training loss of the steps since the last check is finite;
  2. every trainable parameter and batch statistic is finite;
  3. the global L2 norm of the trainable parameters stays at most
     ``max_norm_ratio × max(reference, 1)``, the reference being that norm at the start of the
     run or at resume (``reset``). ``max_norm_ratio = 0`` switches check 3 off.

  A failed check raises ``DivergenceError`` (a ``NonFiniteLossError``) naming the step and the
  check; nothing is saved.
  """

  def __init__(self, max_norm_ratio: float = 1e3):
    if not max_norm_ratio >= 0:
      raise ValueError(f"max_norm_ratio must be >= 0, got {max_norm_ratio}.")
    self.max_norm_ratio = float(max_norm_ratio)
    self.reference = None

    def stats(params, others):
      leaves = jax.tree_util.tree_leaves_with_path((params, others))
      finite = [jnp.all(jnp.isfinite(x)) for _, x in leaves
                if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
      xs = [x.astype(jnp.float32) for x in jax.tree.leaves(params)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
      if not xs:
        return finite, jnp.float32(0)
      # Scaled by the largest |x| so that huge (finite) parameters do not overflow to inf.
      big = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0.0) for x in xs]))
      scale = jnp.where(big > 0, big, 1.0)
      norm = scale * jnp.sqrt(sum(jnp.sum(jnp.square(x / scale)) for x in xs))
      return finite, norm

    self._stats = jax.jit(stats)

  def _paths(self, params, others):
    return [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path((params, others))
            if np.issubdtype(np.dtype(x.dtype), np.inexact)]

  def reset(self, params, others=None) -> float:
    """Sets the reference norm from ``params`` (the run's start or resume); returns it."""
    _, norm = jax.device_get(self._stats(params, others or {}))
    self.reference = float(norm)
    return self.reference

  def check(self, step: int, params, others=None, loss_finite: bool = True) -> float:
    """Raises ``DivergenceError`` when a check fails; returns the parameter norm."""
    if not loss_finite:
      raise DivergenceError(
          f"Divergence at step {step}: the training loss is not finite (check 1, loss); the "
          "state is not saved and the last checkpoint is kept. Lower config.train.lr or inspect "
          "the batches before resuming.")
    finite, norm = jax.device_get(self._stats(params, others or {}))
    norm = float(norm)
    if not all(bool(f) for f in finite):
      paths = [p for p, f in zip(self._paths(params, others or {}), finite) if not f]
      raise DivergenceError(
          f"Divergence at step {step}: non-finite parameters (check 2, parameters finite), "
          f"e.g. {paths[0]} ({len(paths)} array(s)); the state is not saved and the last "
          "checkpoint is kept. Lower config.train.lr before resuming.")
    if self.reference is None:
      self.reference = norm
    limit = self.max_norm_ratio * max(self.reference, 1.0)
    if self.max_norm_ratio and not norm <= limit:
      raise DivergenceError(
          f"Divergence at step {step}: the trainable-parameter norm {norm:.4g} exceeds "
          f"train.max_param_norm_ratio ({self.max_norm_ratio:g}) x its value at the start/resume "
          f"({self.reference:.4g}) (check 3, parameter norm); the state is not saved and the last "
          "checkpoint is kept. Lower config.train.lr (or raise max_param_norm_ratio if this "
          "growth is expected).")
    return norm


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
    self._pending_step = None  # the step of a save not yet checked by wait()

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
    self.wait()  # a failure of the previous (asynchronous) save surfaces before this one
    self._pending_step = int(step)
    _SAVE_LOG_FILTER.begin()  # ended by wait()
    try:
      return self._manager.save(int(step), args=ocp.args.Composite(**items),
                                metrics=metrics, force=force)
    except Exception as e:  # pylint: disable=broad-except
      self._pending_step = None
      try:
        raise self._write_error(int(step), e) from e
      finally:
        _SAVE_LOG_FILTER.end()

  def _write_error(self, step: int, exc: BaseException) -> CheckpointWriteError:
    """Removes the partial ``<step>.orbax-checkpoint-tmp*`` folder; the error to raise."""
    _quiet_closed_loop_after_failed_save()
    removed = []
    if jax.process_index() == 0:
      # Writes of the other items may still be in flight (and recreate folders): remove until
      # the folder stays gone for a moment.
      quiet = 0
      for _ in range(60):
        names = [n for n in (os.listdir(self.directory) if os.path.isdir(self.directory) else [])
                 if n.startswith(f"{step}.orbax-checkpoint-tmp")]
        if not names:
          quiet += 1
          if quiet >= 3:
            break
        for name in names:
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
          if name not in removed:
            removed.append(name)
        time.sleep(0.1 if not names else 0.2)
    try:
      self._manager.reload()
      kept = self.all_steps()
    except Exception:  # pylint: disable=broad-except
      kept = "unknown"
    code = _find_errno(exc)
    if code is not None:
      reason = f"{os.strerror(code)} (errno {errno_lib.errorcode.get(code, code)})"
    else:
      reason = _short(exc)
    if code in (errno_lib.ENOSPC, errno_lib.EDQUOT):
      advice = "Free disk space (or move --workdir to a larger disk)"
    elif code in (errno_lib.EACCES, errno_lib.EPERM, errno_lib.EROFS):
      advice = "Make the folder writable (or choose another --workdir)"
    else:
      advice = "Fix the cause"
    return CheckpointWriteError(
        f"Could not write checkpoint step {step} to {self.directory}: {reason}. The run stops "
        f"here; {'the partial checkpoint ' + ', '.join(removed) + ' was removed; ' if removed else ''}"
        f"the checkpoints kept are {kept}. {advice}, then run the same command again to resume "
        "from the last checkpoint.", step=step, directory=self.directory, errno=code)

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
    if data_iterator is not None:
      if not os.path.isdir(os.path.join(self.directory, str(step), DATA_ITER)):
        raise FileNotFoundError(
            f"Checkpoint {self.directory}/{step} holds no data-iterator state; pass "
            "data_iterator=None to restore the model state alone.")
    try:
      if state_template is None:
        state_template = self._local_template(step)
      items = {STATE: ocp.args.StandardRestore(state_template),
               METADATA: ocp.args.JsonRestore()}
      if data_iterator is not None:
        items[DATA_ITER] = grain.checkpoint.CheckpointRestore(_iterator_item(data_iterator))
      out = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      raise self._restore_error(int(step), e) from e
    return Restored(int(step), out[STATE], dict(out[METADATA]))

  def _iterator_file_error(self, step: int,
                           data_iterator: Any) -> Optional[CheckpointRestoreError]:
    """The error of the first data-iterator file of ``step`` (Grain's
    ``process_<i>-of-<n>.json``, one per process; all of them are read here, so that every
    process names the same damaged file) that is empty or not JSON; None when they read, or
    when no iterator is restored."""
    if data_iterator is None:
      return None
    folder = os.path.join(self.directory, str(step), DATA_ITER)
    for i in range(jax.process_count()):
      path = os.path.join(folder, f"process_{i}-of-{jax.process_count()}.json")
      if not os.path.isfile(path):
        continue  # another topology, or not visible from here: Orbax's restore decides
      try:
        with open(path, encoding="utf-8") as f:
          json.load(f)
      except (OSError, ValueError) as e:
        err = CheckpointRestoreError(
            f"Checkpoint step {step} in {self.directory} cannot be read: file {path} is "
            f"damaged or truncated ({_short(e)}).", step=step,
            directory=os.path.join(self.directory, str(step)), file=path)
        err.__cause__ = e
        return err
    return None

  def _damaged_file(self, step: int, exc: BaseException) -> Optional[str]:
    """The file of checkpoint ``step`` that failed to read, when it can be told: a path of the
    step's folder named in the error chain (TensorStore names them), else a JSON file of the
    step that does not parse, else an empty file."""
    step_dir = os.path.join(self.directory, str(step))
    pattern = re.compile(re.escape(step_dir + os.sep) + r"[^\s\"',:;()\[\]]+")
    named = [m.group(0) for e in _exception_chain(exc) for m in pattern.finditer(str(e))]
    named = [p for p in named if os.path.isfile(p)]
    if named:
      return named[-1]
    empty = None
    for root, _, files in sorted(os.walk(step_dir)):
      for name in sorted(files):
        path = os.path.join(root, name)
        if name == "commit_success.txt":
          continue
        if empty is None and os.path.getsize(path) == 0:
          empty = path
        if (name.endswith(".json") or name in (METADATA, "_METADATA", "_CHECKPOINT_METADATA")
            or os.path.basename(root) == "array_metadatas"):
          try:
            with open(path) as f:
              json.load(f)
          except (OSError, ValueError):
            return path
    return empty

  def _readable(self, step: int) -> bool:
    """Whether checkpoint ``step`` reads as saved (its own structure, no data iterator)."""
    try:
      self._manager.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.StandardRestore(self._local_template(step)),
          METADATA: ocp.args.JsonRestore()}))
      return True
    except Exception:  # pylint: disable=broad-except
      return False

  def _restore_error(self, step: int, exc: BaseException) -> CheckpointRestoreError:
    file = self._damaged_file(step, exc)
    step_dir = os.path.join(self.directory, str(step))
    if file is None and self._readable(step):  # e.g. a template of another model: not damage
      return CheckpointRestoreError(
          f"Checkpoint step {step} in {self.directory} is readable but does not restore into "
          f"this run's state (another model or config?): {_short(exc)}", step=step,
          directory=step_dir, damaged=False)
    where = f"file {file}" if file else "a file of it (not identified)"
    return CheckpointRestoreError(
        f"Checkpoint step {step} in {self.directory} cannot be read: {where} is damaged or "
        f"truncated ({_short(exc)}).", step=step, directory=step_dir, file=file)

  def restore_latest(self, state_template: Any = None, data_iterator: Any = None,
                     fallback: bool = True, log=print) -> Optional[Restored]:
    """Restores the newest readable checkpoint; None when there is none.

    A checkpoint that cannot be read raises ``CheckpointRestoreError`` when ``fallback`` is
    False, or when no older checkpoint is left to try. With ``fallback`` it is moved (never
    deleted) to ``<workdir>/damaged_checkpoints/<step>``, one line says so through ``log``, and
    the previous checkpoint is tried (the data iterator is set again from that one). A
    checkpoint that reads but does not fit ``state_template`` (``damaged=False``: another
    model?) is never moved: its error is raised.
    """
    while True:
      step = self.latest_step()
      if step is None:
        return None
      # Every process restores its own data-iterator file: agree on the outcome (0 read,
      # 1 damaged, 2 does not fit the template), or a damage seen by one process only would
      # leave the others training while it falls back. Those files are checked first, without
      # Orbax (whose restore has collectives of its own that a process leaving early would
      # mismatch); then the restore itself, by all processes together.
      restored, err = None, self._iterator_file_error(step, data_iterator)
      outcome = _agreed_outcome(0 if err is None else 1)
      if outcome == 0:
        try:
          restored = self.restore(step, state_template, data_iterator)
        except CheckpointRestoreError as e:
          err = e
        outcome = _agreed_outcome(0 if err is None else (1 if err.damaged else 2))
      if outcome == 0:
        return restored
      if err is None:
        err = CheckpointRestoreError(
            f"Checkpoint step {step} in {self.directory} cannot be read by another process "
            f"(its own error names the file).", step=step,
            directory=os.path.join(self.directory, str(step)), damaged=outcome == 1)
      elif outcome == 2 and err.damaged:
        err = CheckpointRestoreError(
            f"{err} (Another process found that this checkpoint does not fit the run's state.)",
            err.step, err.directory, err.file, damaged=False)
      older = [s for s in self.all_steps() if s < step]
      if not err.damaged:
        raise err
      if not fallback:
        raise CheckpointRestoreError(
            f"{err} Not falling back to an older checkpoint (train.restore_fallback=False; "
            f"older: {older or 'none'}): move {err.directory} aside or repair it.",
            err.step, err.directory, err.file) from err.__cause__
      if not older:
        raise CheckpointRestoreError(
            f"{err} No older checkpoint to fall back to: move {err.directory} aside to start "
            "from step 0.", err.step, err.directory, err.file) from err.__cause__
      moved = self.move_aside(step)
      log(f"WARNING: {err} Moved it to {moved} (kept for inspection) and falling back to the "
          f"previous checkpoint, step {older[-1]}.")

  def move_aside(self, step: int) -> str:
    """Moves checkpoint ``step`` to ``<workdir>/damaged_checkpoints/<step>[.n]``; its new path."""
    src = os.path.join(self.directory, str(step))
    parent = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")
    dest, n = os.path.join(parent, str(step)), 1
    while os.path.exists(dest):
      dest, n = os.path.join(parent, f"{step}.{n}"), n + 1
    if jax.process_index() == 0:
      os.makedirs(parent, exist_ok=True)
      shutil.move(src, dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"fss_jax_move_aside_{step}")
    self._manager.reload()
    return dest

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
    """Blocks until pending asynchronous saves are written; a failed write raises
    ``CheckpointWriteError`` (once) after removing the partial checkpoint."""
    if self._pending_step is None:
      return
    step = self._pending_step
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(step, e) from e
    finally:
      self._pending_step = None
      _SAVE_LOG_FILTER.end()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        pass  # a failed save was reported by wait(); Orbax re-raises it on close

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def load_model_variables(workdir: str, step: Any = "best", check_finite: bool = True) -> tuple:
  """Model variables {'params', 'batch_stats'} of a training run's checkpoint, on the host.

  Args:
    workdir: the run directory given to ``train.py`` (holding ``checkpoints/``).
    step: an int, 'latest', or 'best' (the best by ``BEST_METRIC``; the latest when no
      checkpoint carries metrics).
    check_finite: raise ``NonFiniteWeightsError`` (naming the parameter) for NaN/inf weights.

  A damaged checkpoint raises ``CheckpointRestoreError`` naming its step, folder and file.

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
    try:
      state = mgr.restore(step).state
    except CheckpointRestoreError as e:
      others = [s for s in steps if s != step]
      raise CheckpointRestoreError(
          f"{e} Other checkpoints of this run: {others or 'none'} (pass one as the step).",
          e.step, e.directory, e.file, e.damaged) from e.__cause__
  finally:
    mgr.close()
  state = jax.device_get(state)
  variables = {"params": {**state["frozen"], **state["trainable"]}}
  if state.get("batch_stats"):
    variables["batch_stats"] = state["batch_stats"]
  if check_finite:
    check_finite_variables(variables, f"checkpoint step {step} in {mgr.directory}")
  return variables, int(step)
