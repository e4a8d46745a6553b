"""Tests for fss_jax.train.checkpoint (Orbax manager wrapper, Grain iterator state, NaN guard)."""
import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fss_jax.train import checkpoint as ckpt


def _state(offset=0.0):
  params = {"head": {"kernel": jnp.arange(6.0).reshape(2, 3) + offset, "bias": jnp.ones(3)}}
  tx = optax.sgd(0.1, momentum=0.9)
  return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(offset)}


def _iterator():
  return iter(grain.MapDataset.range(50).shuffle(seed=7).batch(2).to_iter_dataset())


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_state_iterator_metadata(tmp_path):
  state = _state(3.0)
  it = _iterator()
  for _ in range(3):
    next(it)
  with ckpt.CheckpointManager(str(tmp_path), max_to_keep=2) as mgr:
    assert mgr.latest_step() is None
    assert mgr.save(3, state, it, metrics={"loss": np.float32(0.25)},
                    extra_metadata={"epoch": 1})
    expected_next = [next(it) for _ in range(4)]  # moves on while the save may be in flight
    mgr.wait()
    fresh = _iterator()
    restored = mgr.restore(state_template=_state(), data_iterator=fresh)
  assert restored.step == 3
  _assert_trees_equal(restored.state, state)
  assert isinstance(restored.state["opt_state"][0], optax.TraceState)
  assert restored.metadata["metrics"] == {"loss": 0.25} and restored.metadata["epoch"] == 1
  for e in expected_next:
    np.testing.assert_array_equal(next(fresh), e)
  # The iterator state is a per-process JSON file written by Grain's handler.
  files = os.listdir(tmp_path / "checkpoints" / "3" / "data_iter")
  assert "process_0-of-1.json" in files


def test_max_to_keep_and_restore_latest_with_new_instance(tmp_path):
  mgr = ckpt.CheckpointManager(str(tmp_path), max_to_keep=2, async_save=False)
  for step in (10, 20, 30, 40):
    mgr.save(step, _state(step))
  mgr.wait()
  assert mgr.all_steps() == [30, 40]
  assert mgr.best_step() is None
  mgr.close()
  again = ckpt.CheckpointManager(str(tmp_path), max_to_keep=2)
  assert again.latest_step() == 40
  restored = again.restore(state_template=_state())
  _assert_trees_equal(restored.state, _state(40))
  # Without a template the saved structure comes back as arrays.
  raw = again.restore(30)
  np.testing.assert_array_equal(raw.state["params"]["head"]["kernel"],
                                np.asarray(_state(30)["params"]["head"]["kernel"]))
  with pytest.raises(FileNotFoundError, match="step 10"):
    again.restore(10)
  with pytest.raises(FileNotFoundError, match="no data-iterator state"):
    again.restore(40, data_iterator=_iterator())
  again.close()


@pytest.mark.parametrize("mode,values,best", [
    ("max", [0.1, 0.9, 0.2, float("nan"), 0.4, 0.5], 2),
    ("min", [0.5, 0.05, 0.4, 0.3, float("inf"), 0.2], 2),
])
def test_keeps_last_n_plus_best(tmp_path, mode, values, best):
  mgr = ckpt.CheckpointManager(str(tmp_path), max_to_keep=2, keep_best=True,
                               best_metric="val/miou", best_mode=mode)
  for step, v in enumerate(values, start=1):
    mgr.save(step, _state(step), metrics={"val/miou": v, "loss": 1.0})
  mgr.save(7, _state(7))  # no metrics: kept as one of the last N, never "best"
  mgr.wait()
  assert mgr.all_steps() == [best, 6, 7]
  assert mgr.best_step() == best
  assert mgr.read_metadata(best)["metrics"]["val/miou"] == values[best - 1]
  _assert_trees_equal(mgr.restore(best, _state()).state, _state(best))
  with pytest.raises(KeyError, match="best_metric"):
    mgr.save(8, _state(8), metrics={"loss": 1.0})
  mgr.close()
  reopened = ckpt.CheckpointManager(str(tmp_path), max_to_keep=2, keep_best=True,
                                    best_mode=mode)
  assert reopened.best_step() == best
  reopened.close()


class _CustomIterator:
  """Not a Grain iterator: state is a JSON dict."""

  def __init__(self):
    self.pos = 0

  def __next__(self):
    self.pos += 1
    return self.pos

  def get_state(self):
    return {"pos": self.pos}

  def set_state(self, state):
    self.pos = state["pos"]


def test_custom_iterator_state(tmp_path):
  it = _CustomIterator()
  for _ in range(5):
    next(it)
  with ckpt.CheckpointManager(str(tmp_path)) as mgr:
    mgr.save(1, _state(), it)
    mgr.wait()
    fresh = _CustomIterator()
    mgr.restore(1, _state(), fresh)
  assert fresh.pos == 5
  data = json.loads((tmp_path / "checkpoints" / "1" / "data_iter" /
                     "process_0-of-1.json").read_text())
  assert data == {"pos": 5}
  with pytest.raises(TypeError, match="get_state"):
    ckpt._iterator_item(object())  # pylint: disable=protected-access


def test_check_finite():
  assert ckpt.check_finite(jnp.float32(1.5), 3) == 1.5
  with pytest.raises(ckpt.NonFiniteLossError, match="step 12"):
    ckpt.check_finite(jnp.float32(jnp.nan), 12)
  with pytest.raises(ckpt.NonFiniteLossError, match=r"grad_norm \(inf\)"):
    ckpt.check_finite(np.inf, 1, name="grad_norm")


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep"):
    ckpt.CheckpointManager(str(tmp_path), max_to_keep=0)
  with pytest.raises(ValueError, match="best_mode"):
    ckpt.CheckpointManager(str(tmp_path), best_mode="up")
  with ckpt.CheckpointManager(str(tmp_path)) as mgr:
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
      mgr.restore()
    with pytest.raises(TypeError, match="not a scalar"):
      mgr.save(1, _state(), metrics={"x": [1, 2]})


# ---------------------------------------------------------------- damage (issue 16)


def _two_checkpoints(tmp_path):
  """Steps 1 and 2, each with the iterator state; returns the batches expected after step 1."""
  it = _iterator()
  with ckpt.CheckpointManager(str(tmp_path), max_to_keep=3) as mgr:
    next(it)
    mgr.save(1, _state(1), it)
    mgr.wait()
    after_1 = [next(it) for _ in range(3)]
    mgr.save(2, _state(2), it)
  return after_1


def _truncate(path, size=None):
  os.truncate(path, os.path.getsize(path) // 2 if size is None else size)


def _state_data_files(tmp_path, step):
  """The array-data files Orbax (OCDBT) wrote for ``step``: ``state/d/*``."""
  d = tmp_path / "checkpoints" / str(step) / "state" / "d"
  files = sorted(str(p) for p in d.iterdir())
  assert files
  return files


@pytest.mark.parametrize("damage", ["array_file", "empty_json", "invalid_json", "state_meta"])
def test_damaged_latest_falls_back_or_refuses(tmp_path, damage):
  after_1 = _two_checkpoints(tmp_path)
  step2 = tmp_path / "checkpoints" / "2"
  if damage == "array_file":
    target = _state_data_files(tmp_path, 2)[0]
    _truncate(target)
  elif damage == "state_meta":
    target = str(step2 / "state" / "_METADATA")
    _truncate(target)
  else:
    target = str(step2 / "data_iter" / "process_0-of-1.json")
    with open(target, "w") as f:
      f.write("" if damage == "empty_json" else "{not json")

  mgr = ckpt.CheckpointManager(str(tmp_path), max_to_keep=3)
  # Refusing: one error naming the step, folder and file; the original exception chained.
  with pytest.raises(ckpt.CheckpointRestoreError) as info:
    mgr.restore_latest(_state(), _iterator(), fallback=False)
  e = info.value
  assert e.step == 2 and e.file == target and e.directory == str(step2)
  assert f"step 2 in {tmp_path}" in str(e) and target in str(e)
  assert "restore_fallback=False" in str(e) and e.__cause__ is not None
  assert "Traceback" not in str(e) and len(str(e)) < 1200
  assert mgr.all_steps() == [1, 2] and step2.is_dir()  # nothing moved when refusing

  # Falling back: one log line, the damaged checkpoint moved aside (kept), step 1 restored
  # with the iterator continuing exactly after step 1.
  lines = []
  fresh = _iterator()
  restored = mgr.restore_latest(_state(), fresh, fallback=True, log=lines.append)
  assert restored.step == 1
  _assert_trees_equal(restored.state, _state(1))
  for b in after_1:
    np.testing.assert_array_equal(next(fresh), b)
  moved = tmp_path / "damaged_checkpoints" / "2"
  assert len(lines) == 1 and "\n" not in lines[0]
  assert "step 2" in lines[0] and target in lines[0] and str(moved) in lines[0]
  assert "step 1" in lines[0]
  assert moved.is_dir() and not step2.exists() and mgr.all_steps() == [1]
  # The next save of step 2 goes to a fresh folder.
  mgr.save(2, _state(2), fresh)
  mgr.close()


@pytest.mark.parametrize("other", ["damaged", "mismatch"])
def test_damage_seen_by_another_process_only_is_agreed_on(tmp_path, monkeypatch, other):
  """Each process reads its own data-iterator file: when only another process's file is damaged,
  this process (whose own read succeeds) falls back with it instead of training on alone; when
  another process finds a mismatch, this one raises too. The exchange is replaced by the largest
  code of [this process, the other]."""
  _two_checkpoints(tmp_path)
  code = {"damaged": 1, "mismatch": 2}[other]
  monkeypatch.setattr(ckpt, "_agreed_outcome", lambda mine: max(mine, code))
  mgr = ckpt.CheckpointManager(str(tmp_path), max_to_keep=3)
  lines = []
  if other == "mismatch":
    with pytest.raises(ckpt.CheckpointRestoreError, match="another process") as info:
      mgr.restore_latest(_state(), _iterator(), fallback=True, log=lines.append)
    assert not info.value.damaged and mgr.all_steps() == [1, 2] and not lines
    return
  # Step 2 reads here, but "another process" finds it damaged: all fall back to step 1.
  calls = []
  monkeypatch.setattr(ckpt, "_agreed_outcome",
                      lambda mine: calls.append(mine) or max(mine, code if len(calls) == 1 else 0))
  fresh = _iterator()
  restored = mgr.restore_latest(_state(), fresh, fallback=True, log=lines.append)
  # Step 2: the data-iterator files' check (here fine, elsewhere not) decides before Orbax's
  # restore runs; step 1: the check, then the restore.
  assert calls == [0, 0, 0] and restored.step == 1
  _assert_trees_equal(restored.state, _state(1))
  assert len(lines) == 1 and "step 2" in lines[0] and "another process" in lines[0]
  assert (tmp_path / "damaged_checkpoints" / "2").is_dir() and mgr.all_steps() == [1]
  mgr.close()


def test_damaged_only_checkpoint_is_an_error_and_load_model_variables_names_the_file(tmp_path):
  state = {"frozen": {"a": jnp.ones(3)}, "trainable": {"b": jnp.zeros(2)}, "batch_stats": {}}
  with ckpt.CheckpointManager(str(tmp_path)) as mgr:
    mgr.save(5, state)
  target = str(tmp_path / "checkpoints" / "5" / "state" / "d" /
                os.listdir(tmp_path / "checkpoints" / "5" / "state" / "d")[0])
  _truncate(target)
  with pytest.raises(ckpt.CheckpointRestoreError, match="step 5.*" + target) as info:
    ckpt.load_model_variables(str(tmp_path), "latest")
  assert info.value.file == target
  mgr = ckpt.CheckpointManager(str(tmp_path))
  with pytest.raises(ckpt.CheckpointRestoreError, match="No older checkpoint"):
    mgr.restore_latest(fallback=True, log=lambda _: None)
  assert mgr.all_steps() == [5]  # not moved: nothing to fall back to
  mgr.close()


def test_nan_weights_are_refused_for_evaluation(tmp_path):
  state = {"frozen": {"backbone": {"w": jnp.ones(3)}},
           "trainable": {"head": {"kernel": jnp.array([1.0, jnp.nan])}}, "batch_stats": {}}
  with ckpt.CheckpointManager(str(tmp_path)) as mgr:
    mgr.save(3, state)
  with pytest.raises(ckpt.NonFiniteWeightsError, match=r"\['params'\]\['head'\]\['kernel'\]"):
    ckpt.load_model_variables(str(tmp_path), "latest")
  variables, _ = ckpt.load_model_variables(str(tmp_path), "latest", check_finite=False)
  assert np.isnan(variables["params"]["head"]["kernel"][1])


def _enospc_on_step(monkeypatch, bad_step):
  """Makes the metadata write of ``bad_step`` fail with ENOSPC inside Orbax's async save."""
  import errno  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  original = ocp.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access

  async def failing(self, x, directory):
    if x.get("step") == bad_step:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
    return await original(self, x, directory)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", failing)


def test_write_failure_is_one_clear_error_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch,
                                                                          caplog):
  import errno  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  _enospc_on_step(monkeypatch, 2)
  mgr = ckpt.CheckpointManager(str(tmp_path), max_to_keep=3)
  mgr.save(1, _state(1))
  mgr.wait()
  held = ckpt._SAVE_LOG_FILTER.held  # pylint: disable=protected-access
  with caplog.at_level(logging.DEBUG):
    mgr.save(2, _state(2))
    with pytest.raises(ckpt.CheckpointWriteError) as info:
      mgr.wait()
  # One message: Orbax's own tracebacks of the failure (three ERROR records) are held back.
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
  assert ckpt._SAVE_LOG_FILTER.held > held  # pylint: disable=protected-access
  e = info.value
  assert e.errno == errno.ENOSPC and e.step == 2
  assert "step 2" in str(e) and str(tmp_path) in str(e) and "No space left" in str(e)
  assert "Free disk space" in str(e) and isinstance(e.__cause__, OSError)
  assert not [n for n in os.listdir(tmp_path / "checkpoints") if "tmp" in n]
  assert mgr.all_steps() == [1]
  mgr.wait()  # reported once
  mgr.close()
  _assert_trees_equal(ckpt.CheckpointManager(str(tmp_path)).restore(1, _state()).state, _state(1))


def test_save_log_filter_passes_records_outside_a_save():
  import logging  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  try:
    raise OSError("boom")
  except OSError:
    exc_info = sys.exc_info()
  orbax_file = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "x.py")
  record = lambda path, level=logging.ERROR, info=exc_info: logging.LogRecord(
      "absl", level, path, 1, "failed", None, info)
  f = ckpt._SaveErrorLogFilter()  # pylint: disable=protected-access
  assert f.filter(record(orbax_file))  # no save in flight: passes
  f.begin()
  assert not f.filter(record(orbax_file))  # Orbax's traceback during our save: held back
  assert f.filter(record("/elsewhere/train.py"))  # another library's error: passes
  assert f.filter(record(orbax_file, info=None))  # no traceback: passes
  assert f.filter(record(orbax_file, level=logging.WARNING))
  f.end()
  assert f.filter(record(orbax_file)) and f.held == 1


def test_unwritable_workdir_is_reported_before_the_run(tmp_path, monkeypatch):
  import builtins  # pylint: disable=g-import-not-at-top
  import errno  # pylint: disable=g-import-not-at-top
  ckpt.check_workdir_writable(str(tmp_path / "new"))  # creates it
  real_open = builtins.open

  def read_only(path, mode="r", *a, **k):
    if "w" in mode and ".write_probe" in str(path):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    return real_open(path, mode, *a, **k)

  monkeypatch.setattr(builtins, "open", read_only)
  with pytest.raises(ckpt.CheckpointWriteError, match="Read-only file system.*EROFS"):
    ckpt.check_workdir_writable(str(tmp_path / "new"))


def test_a_mismatched_template_is_not_damage_and_moves_nothing(tmp_path):
  _two_checkpoints(tmp_path)
  mgr = ckpt.CheckpointManager(str(tmp_path), max_to_keep=3)
  other = {"params": {"other": jnp.ones(5)}, "step": jnp.int32(0)}
  with pytest.raises(ckpt.CheckpointRestoreError, match="readable but does not restore") as info:
    mgr.restore_latest(other, fallback=True, log=lambda _: pytest.fail("fell back"))
  assert not info.value.damaged and info.value.step == 2
  assert mgr.all_steps() == [1, 2] and not (tmp_path / "damaged_checkpoints").exists()
  mgr.close()
