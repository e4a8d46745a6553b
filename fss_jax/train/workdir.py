"""One run per workdir, and no silent config change on resume (``train_and_evaluate`` calls
``claim`` before anything else).

Lock: ``<workdir>/train.lock`` is created atomically (``O_CREAT | O_EXCL``) and holds JSON with
the holder's ``host``, ``pid``, ``start_time``, ``command`` and, on Linux, ``process`` (the
machine's boot id and the process's start time in clock ticks, ``/proc``), which tells the
holder from a later process that got the same PID. It is held for the whole run and
removed at the end, also when the run raises; a SIGKILL (or a lost machine) leaves it behind:

* a lock of a live process on this host: refused (``WorkdirLockedError`` naming host and PID);
* a lock of a dead PID on this host, or of a PID now used by another process (its ``process``
  identity differs: the machine rebooted or the PID was reused): stale, taken over with a
  message;
* a lock of another host (whose processes cannot be checked from here), or an unreadable lock:
  refused unless ``config.train.break_lock=True`` (``--config.train.break_lock=True``), which
  takes over any lock; make sure the other run is really gone first.

Only process 0 takes the lock; in multi-process runs the outcome is agreed on by all processes.

Config check: when the workdir holds a saved ``config.json`` and checkpoints, the new config is
compared with the saved one, field by field. Any change outside ``HARMLESS`` (fields that change
logging, evaluation cadence, checkpoint retention, data-loading parallelism, the final
protocol or damage handling, never the trained model) is refused (``ConfigChangedError``) with the differing keys,
old → new. ``config.train.accept_changes`` (comma-separated dotted keys, or groups such as
``data.synthetic``) accepts the listed changes, and only those, e.g.
``--config.train.accept_changes=train.total_steps,train.epochs``. Accepted changes are appended
to ``<workdir>/config_changes.jsonl`` before the trainer overwrites ``config.json``.
"""
import contextlib
import datetime
import errno
import json
import os
import socket
import sys
import threading
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import jax
import numpy as np

LOCK_NAME = "train.lock"
CONFIG_NAME = "config.json"
CHANGES_NAME = "config_changes.jsonl"
CHECKPOINT_SUBDIR = "checkpoints"

# Fields that may change between a run and its resumption without being listed in
# config.train.accept_changes: they change what is logged / evaluated in passing / kept on disk,
# how fast data is loaded, or the final evaluation protocol, never the trained model.
HARMLESS = (
    "train.log_every",
    "train.eval_every",
    "train.eval_every_epochs",
    "train.eval_at_start",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.break_lock",
    "train.accept_changes",
    "data.num_workers",
    "data.read_threads",
    "data.eval_batch_size",
    "eval.protocol",
    "eval.num_images",               # TensorBoard pictures at each evaluation (display only)
    "train.restore_fallback",        # what to do with a damaged checkpoint (checkpoint.py)
    "train.max_param_norm_ratio",    # the divergence guard's threshold (it only stops a run)
)

_MISSING = "<absent>"
_held = set()  # workdirs locked by this process (a second trainer in-process is refused too)
_held_guard = threading.Lock()


class WorkdirError(RuntimeError):
  """The workdir cannot be used by this run (scripts/train.py: one message, no traceback)."""
  exit_code = 2


class WorkdirLockedError(WorkdirError):
  """Another run holds the workdir's lock."""
  exit_code = 3


class ConfigChangedError(WorkdirError, ValueError):
  """Resuming with a config that differs from the saved one in fields that alter the run."""
  exit_code = 2


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- lock


def _pid_alive(pid: int) -> bool:
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, another user's
    return True
  except OSError as e:
    return e.errno != errno.ESRCH
  # A zombie (exited, not yet reaped) still answers kill(0): it holds nothing any more.
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except (OSError, IndexError):
    return True


def process_identity(pid: int) -> Optional[str]:
  """``"<boot id>:<start time in clock ticks>"`` of a process (Linux ``/proc``), or None where it
  cannot be read. A PID reused after its process ended, or after a reboot, gives another value."""
  try:
    with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as f:
      boot = f.read().strip()
    with open(f"/proc/{int(pid)}/stat", encoding="utf-8") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return f"{boot}:{int(fields[19])}"  # field 22 of stat: starttime (fields[0] is field 3)
  except (OSError, IndexError, ValueError):
    return None


def lock_info() -> dict:
  info = {"host": socket.gethostname(), "pid": os.getpid(),
          "start_time": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds"),
          "command": " ".join([sys.executable] + sys.argv)}
  identity = process_identity(os.getpid())
  if identity is not None:
    info["process"] = identity
  return info


def _same_process(holder: dict) -> bool:
  """Whether the live PID of ``holder`` (this host) is still the process that wrote the lock:
  True unless both identities are known and differ (an older lock without one is trusted)."""
  recorded = holder.get("process")
  if not recorded:
    return True
  now = process_identity(holder["pid"])
  return now is None or now == recorded


def read_lock(path: str) -> Optional[dict]:
  """The holder recorded in a lock file; None when it cannot be read as one."""
  try:
    with open(path, encoding="utf-8") as f:
      info = json.load(f)
    if isinstance(info, dict) and "host" in info and "pid" in info:
      info["pid"] = int(info["pid"])
      return info
  except (OSError, ValueError, TypeError):
    pass
  return None


def _describe(info: dict) -> str:
  return (f"host {info.get('host')}, PID {info.get('pid')}, started "
          f"{info.get('start_time', '?')}: {info.get('command', '?')}")


class RunLock:
  """``<workdir>/train.lock``, held by this process until ``release()``."""

  def __init__(self, workdir: str, info: dict):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self.info = info

  def release(self) -> None:
    """Removes the lock file if it is still ours (a forced takeover may have replaced it)."""
    with _held_guard:
      _held.discard(self.workdir)
    current = read_lock(self.path)
    if current is not None and (current.get("host"), current.get("pid"),
                                current.get("start_time")) != (
                                    self.info["host"], self.info["pid"],
                                    self.info["start_time"]):
      _log(f"WARNING: {self.path} now names another holder ({_describe(current)}); left in "
           "place.")
      return
    try:
      os.remove(self.path)
    except FileNotFoundError:
      pass


def acquire_lock(workdir: str, break_lock: bool = False,
                 log: Callable[[str], None] = _log) -> RunLock:
  """Takes ``<workdir>/train.lock`` (see the module docstring for stale and foreign locks).

  Raises:
    WorkdirLockedError: another live run holds it, or it cannot be judged without
      ``break_lock``.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  path = os.path.join(workdir, LOCK_NAME)
  with _held_guard:
    if workdir in _held:
      raise WorkdirLockedError(
          f"{workdir} is in use by another run in this process (PID {os.getpid()}).")
    _held.add(workdir)
  try:
    info = lock_info()
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise WorkdirError(f"Cannot create the run directory {workdir} ({e.strerror or e}); "
                         "choose another --workdir.") from e
    for _ in range(3):  # create; on a stale lock remove it and create again (a race loses)
      try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        _judge_existing(path, workdir, break_lock, log)
        continue
      except OSError as e:
        raise WorkdirError(
            f"The run directory {workdir} is not writable ({e.strerror or e}): cannot create "
            f"{LOCK_NAME}. Free disk space, fix its permissions or choose another "
            "--workdir.") from e
      try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
          json.dump(info, f)
          f.write("\n")
          f.flush()
          os.fsync(f.fileno())
      except OSError as e:
        os.remove(path)
        raise WorkdirError(f"Cannot write {path} ({e.strerror or e}): the run directory is not "
                           "writable (full disk?).") from e
      return RunLock(workdir, info)
    raise WorkdirLockedError(f"{path}: could not take the lock (another run keeps taking it).")
  except BaseException:
    with _held_guard:
      _held.discard(workdir)
    raise


def _judge_existing(path: str, workdir: str, break_lock: bool, log) -> None:
  """Removes a stale (or, with ``break_lock``, any) lock at ``path``; else raises."""
  holder = read_lock(path)
  if holder is None and not os.path.exists(path):
    return  # released meanwhile
  here = socket.gethostname()
  if break_lock:
    who = _describe(holder) if holder else "unreadable lock file"
    log(f"WARNING: breaking the lock {path} ({who}) as asked by config.train.break_lock.")
  elif holder is None:
    raise WorkdirLockedError(
        f"{path} exists but cannot be read (a run starting right now, or a damaged file). If "
        "no other run uses this workdir, pass --config.train.break_lock=True.")
  elif (holder["host"] == here and holder["pid"] != os.getpid() and _pid_alive(holder["pid"])
        and _same_process(holder)):
    raise WorkdirLockedError(
        f"{workdir} is in use by another run: {_describe(holder)}. Wait for it, stop it "
        f"(kill {holder['pid']}), or use another --workdir.")
  elif holder["host"] != here:
    raise WorkdirLockedError(
        f"{workdir} is locked by a run on another host: {_describe(holder)}. This host "
        f"({here}) cannot check that process; if it is gone, pass "
        "--config.train.break_lock=True.")
  elif holder["pid"] != os.getpid() and _pid_alive(holder["pid"]):  # same PID, other process
    log(f"Taking over the stale lock {path}: PID {holder['pid']} on {here} now belongs to "
        "another process (the run that wrote the lock has ended; its PID was reused or the "
        "machine rebooted).")
  else:  # this host, the PID is gone (or is this process: a previous life of the PID)
    log(f"Taking over the stale lock {path}: PID {holder['pid']} on {here} is not running "
        "any more (that run was killed).")
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


# ----------------------------------------------------------------------------- config check


def flatten(tree, prefix: str = "") -> Dict[str, object]:
  """Dotted keys → JSON values (tuples as lists) of a config or its JSON dict."""
  if hasattr(tree, "to_json_best_effort"):
    tree = json.loads(tree.to_json_best_effort())
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_diff(old: dict, new: dict) -> List[Tuple[str, object, object]]:
  """``(key, old, new)`` for every dotted key whose value differs (``<absent>`` when missing)."""
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k, _MISSING), new.get(k, _MISSING)
    if a != b:
      out.append((k, a, b))
  return out


def _listed(key: str, names) -> bool:
  return any(key == n or key.startswith(n + ".") for n in names)


def parse_accept(value) -> List[str]:
  if isinstance(value, str):
    value = value.split(",")
  return [v.strip() for v in value or () if v.strip()]


def _has_checkpoints(workdir: str) -> bool:
  folder = os.path.join(workdir, CHECKPOINT_SUBDIR)
  try:
    return any(n.isdigit() for n in os.listdir(folder))
  except OSError:
    return False


def check_resume_config(config, workdir: str,
                        log: Callable[[str], None] = _log) -> List[Tuple[str, object, object]]:
  """Compares ``config`` with ``<workdir>/config.json`` when the workdir holds checkpoints.

  Returns the differences let through (harmless or accepted; accepted ones are appended to
  ``config_changes.jsonl``).

  Raises:
    ConfigChangedError: listing every other difference, old → new.
  """
  path = os.path.join(workdir, CONFIG_NAME)
  if not (os.path.isfile(path) and _has_checkpoints(workdir)):
    return []
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigChangedError(
        f"{path} cannot be read ({e}); the resumed run cannot be checked against the config "
        "it was started with. Restore the file or use another --workdir.") from e
  diff = config_diff(flatten(saved), flatten(config))
  # A field the saved config lacks (it predates the field) is unchanged when the new value is
  # the field's default: a new field's default keeps the old behaviour.
  from fss_jax import configs_lib  # pylint: disable=g-import-not-at-top
  defaults = flatten(configs_lib.base_config(config.model.name))
  diff = [(k, a, b) for k, a, b in diff
          if not (a == _MISSING and k in defaults and defaults[k] == b)]
  accept = parse_accept(config.train.get("accept_changes", ""))
  refused = [d for d in diff if not _listed(d[0], HARMLESS) and not _listed(d[0], accept)]
  if refused:
    lines = "\n".join(f"  {k}: {a!r} → {b!r}" for k, a, b in refused)
    keys = ",".join(k for k, _, _ in refused)
    raise ConfigChangedError(
        f"{workdir} holds checkpoints of a run with another config; resuming it with these "
        f"changes would mix two runs:\n{lines}\nUse another --workdir, restore the settings, "
        f"or accept exactly these changes with --config.train.accept_changes={keys}")
  accepted = [d for d in diff if not _listed(d[0], HARMLESS)]
  if diff:
    log("resuming with config changes: " + "; ".join(
        f"{k}: {a!r} → {b!r}{'' if (k, a, b) in accepted else ' (harmless)'}"
        for k, a, b in diff))
  if accepted:
    with open(os.path.join(workdir, CHANGES_NAME), "a", encoding="utf-8") as f:
      f.write(json.dumps({
          "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "changes": {k: [a, b] for k, a, b in accepted}}) + "\n")
  unused = [n for n in accept if not any(_listed(k, [n]) for k, _, _ in diff)]
  if unused:
    log(f"note: config.train.accept_changes lists {', '.join(unused)}, which did not change.")
  return diff


# ----------------------------------------------------------------------------- both


def _agree(ok: bool) -> bool:
  """All processes learn whether process 0 succeeded (a no-op with one process)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


@contextlib.contextmanager
def claim(config, workdir: str, log: Callable[[str], None] = _log) -> Iterator[None]:
  """Holds the workdir's lock (process 0) for the ``with`` block, after checking a resumed
  run's config against the saved one; the lock is removed on leaving, also on exceptions."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = acquire_lock(workdir, bool(config.train.get("break_lock", False)), log=log)
      check_resume_config(config, workdir, log=log)
    except Exception as e:  # pylint: disable=broad-except
      error = e
      if lock is not None:
        lock.release()
        lock = None
  if not _agree(error is None):
    if error is not None:
      raise error
    raise WorkdirError(f"process 0 refused {workdir} (see its output).")
  try:
    yield
  finally:
    if lock is not None:
      lock.release()
