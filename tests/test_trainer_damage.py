"""Issue 16 through train_and_evaluate on the tiny config: a damaged newest checkpoint, a failed
checkpoint write and a diverging run (fss_jax.train.checkpoint's damage handling)."""
import errno
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import datagen
from fss_jax import configs_lib
from fss_jax.train import checkpoint as ckpt_lib
from fss_jax.train import logging as logging_lib
from fss_jax.train import step as step_lib
from fss_jax.train import trainer


@pytest.fixture
def data_dir(tiny_data_dir):
  return tiny_data_dir


_config = datagen.tiny_config


def _steps(workdir):
  mgr = ckpt_lib.CheckpointManager(workdir, keep_best=True, best_metric=ckpt_lib.BEST_METRIC)
  try:
    return mgr.all_steps(), mgr.best_step()
  finally:
    mgr.close()


def test_damaged_newest_checkpoint_refuses_or_resumes_from_the_previous(data_dir, tmp_path,
                                                                         capsys):
  workdir = str(tmp_path / "run")
  config = _config(data_dir, total_steps=4, checkpoint_every=1, eval_every=0)
  batches = {}

  def hook(step, state, batch):
    batches[step] = batch["query"].copy()
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  assert trainer.train_and_evaluate(config, workdir, step_hook=hook)["stopped"]
  assert _steps(workdir)[0] == [2, 3]
  data = os.path.join(workdir, "checkpoints", "3", "state", "d")
  damaged = os.path.join(data, sorted(os.listdir(data))[0])
  os.truncate(damaged, os.path.getsize(damaged) // 2)

  # restore_fallback=False: one error naming the checkpoint and the file; nothing moved.
  config.train.restore_fallback = False
  config.train.accept_changes = "train.restore_fallback"  # the workdir's config-change check
  with pytest.raises(ckpt_lib.CheckpointRestoreError) as info:
    trainer.train_and_evaluate(config, workdir)
  assert info.value.step == 3 and info.value.file == damaged
  assert "step 3" in str(info.value) and damaged in str(info.value)
  assert _steps(workdir)[0] == [2, 3]

  # Default: step 3 moved aside (said in one line), the run resumes from step 2 with exactly the
  # batches it would have seen.
  config.train.restore_fallback = True
  capsys.readouterr()
  seen = {}
  out = trainer.train_and_evaluate(
      config, workdir, step_hook=lambda s, st, b: seen.setdefault(s, b["query"].copy()))
  assert sorted(seen) == [3, 4] and out["step"] == 4 and not out["stopped"]
  np.testing.assert_array_equal(seen[3], batches[3])
  moved = os.path.join(workdir, "damaged_checkpoints", "3")
  assert os.path.isfile(os.path.join(moved, os.path.relpath(damaged, os.path.join(
      workdir, "checkpoints", "3"))))
  lines = [l for l in capsys.readouterr().out.splitlines() if "cannot be read" in l]
  assert len(lines) == 1 and damaged in lines[0] and moved in lines[0] and "step 2" in lines[0]
  assert _steps(workdir)[0] == [3, 4]


def test_checkpoint_write_failure_stops_the_run_cleanly(data_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / "full")
  config = _config(data_dir, total_steps=4, checkpoint_every=1, eval_every=0)
  original = ocp.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access

  async def no_space_at_step_3(self, x, directory):  # the disk fills up at the 3rd save
    if x.get("step") == 3:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
    return await original(self, x, directory)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", no_space_at_step_3)
  seen = []
  with pytest.raises(ckpt_lib.CheckpointWriteError) as info:
    trainer.train_and_evaluate(config, workdir, step_hook=lambda s, *_: seen.append(s))
  e = info.value
  assert seen == [1, 2, 3]  # stopped at the save that failed
  assert e.errno == errno.ENOSPC and e.step == 3
  assert workdir in str(e) and "No space left on device" in str(e) and "Free disk space" in str(e)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert not [n for n in os.listdir(ckpt_dir) if "tmp" in n]
  assert _steps(workdir)[0] == [1, 2]
  monkeypatch.undo()
  variables, step = ckpt_lib.load_model_variables(workdir, "latest")  # intact
  assert step == 2 and jax.tree.leaves(variables)


def test_divergence_guard_stops_before_saving_or_ranking(data_dir, tmp_path, monkeypatch):
  """Parameters blow up (x 1e6 after the 4th update) while the loss is still finite: the run
  stops at step 4 (an evaluation step) before scoring or saving it."""
  workdir = str(tmp_path / "diverge")
  config = _config(data_dir, total_steps=6, checkpoint_every=1, eval_every=2,
                   max_param_norm_ratio=100.0)
  original = step_lib.train_step

  def exploding(state, batch, rng, **kw):
    state, metrics = original(state, batch, rng, **kw)
    scale = jnp.where(state.step >= 4, 1e6, 1.0)
    return state.replace(trainable=jax.tree.map(lambda x: x * scale, state.trainable)), metrics

  monkeypatch.setattr(step_lib, "train_step", exploding)
  with pytest.raises(ckpt_lib.DivergenceError, match="step 4.*parameter norm") as info:
    trainer.train_and_evaluate(config, workdir)
  assert isinstance(info.value, ckpt_lib.NonFiniteLossError)
  steps, best = _steps(workdir)
  assert steps == [2, 3] and best == 2
  rows = logging_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows if ckpt_lib.BEST_METRIC in r] == [2]  # step 4 not scored
  assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)  # the loss stayed finite


def test_divergence_guard_checks():
  guard = ckpt_lib.DivergenceGuard(10.0)
  params = {"head": {"w": jnp.full((3,), 2.0)}}
  assert guard.reset(params) == pytest.approx(np.sqrt(12.0))
  assert guard.check(5, {"head": {"w": jnp.full((3,), 15.0)}}) == pytest.approx(np.sqrt(675))
  with pytest.raises(ckpt_lib.DivergenceError, match="step 6.*parameter norm"):
    guard.check(6, {"head": {"w": jnp.full((3,), 30.0)}})
  with pytest.raises(ckpt_lib.DivergenceError, match=r"step 7.*non-finite.*\['bn'\]"):
    guard.check(7, params, {"bn": jnp.array([1.0, jnp.nan])})
  with pytest.raises(ckpt_lib.DivergenceError, match="step 8.*loss"):
    guard.check(8, params, loss_finite=False)
  off = ckpt_lib.DivergenceGuard(0.0)
  off.reset(params)
  off.check(1, {"head": {"w": jnp.full((3,), 1e20)}})  # no norm check
  with pytest.raises(ckpt_lib.DivergenceError, match="non-finite"):
    off.check(2, {"head": {"w": jnp.full((3,), jnp.inf)}})
  with pytest.raises(ValueError, match="max_param_norm_ratio"):
    configs_lib.validate_config(_config("/tmp/x", max_param_norm_ratio=-1.0))


def test_unwritable_workdir_stops_before_set_up(data_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / "ro")

  def read_only(path):
    raise ckpt_lib.CheckpointWriteError(f"The run directory {path} is not writable", path)

  monkeypatch.setattr(ckpt_lib, "check_workdir_writable", read_only)
  monkeypatch.setattr(trainer.dataset_dir_lib, "prepare", lambda c: pytest.fail("set-up ran"))
  with pytest.raises(ckpt_lib.CheckpointWriteError, match="not writable"):
    trainer.train_and_evaluate(_config(data_dir), workdir)
