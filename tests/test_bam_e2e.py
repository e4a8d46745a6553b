"""BAM's (and MSANet's) two stages end to end on the tiny procedural dataset.

Stage 1 (``configs/tiny_bam_base.py``: the per-image PSPNet) resumes exactly after SIGKILL, as
the episodic trainer does; stage 2 (``configs/tiny_bam.py``) trains on the stage-1 run and
refuses to start without it, or on a stage-1 run of another fold, with a message naming the
stage-1 command.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fss_jax import configs_lib
from fss_jax.train import checkpoint as ckpt_lib
from fss_jax.train import trainer
import test_train_e2e as e2e

pytestmark = pytest.mark.slow

ROOT = e2e.ROOT
STEPS = 4


def _stage1_cmd(workdir, data_dir, *extra):
  return [sys.executable, e2e.TRAIN, f"--config={ROOT}/configs/tiny_bam_base.py",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
          f"--config.train.total_steps={STEPS}", "--config.train.checkpoint_every=2",
          "--config.train.eval_every=0", "--config.train.log_every=1", *extra]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tiny_bam_data") / "synthetic")


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, data_dir):
  """An uninterrupted stage-1 run (also generates the dataset)."""
  workdir = str(tmp_path_factory.mktemp("stage1"))
  out = e2e._run(_stage1_cmd(workdir, data_dir))  # pylint: disable=protected-access
  assert "per-image base-class segmentation" in out.stdout
  assert "final: base-class mIoU" in out.stdout
  return workdir


def _trainable(workdir):
  mgr = ckpt_lib.CheckpointManager(workdir)
  try:
    assert mgr.latest_step() == STEPS
    return e2e._flat(mgr.restore(STEPS).state["trainable"])  # pylint: disable=protected-access
  finally:
    mgr.close()


def test_stage1_sigkill_resume_gives_the_uninterrupted_parameters(stage1, data_dir, tmp_path):
  workdir = str(tmp_path / "killed")
  cmd = _stage1_cmd(workdir, data_dir)
  proc = subprocess.Popen(cmd, env=e2e._env(), stdout=subprocess.DEVNULL,  # pylint: disable=protected-access
                          stderr=subprocess.PIPE, text=True)
  first = os.path.join(workdir, "checkpoints", "2")
  deadline = time.monotonic() + e2e.TIMEOUT
  while not os.path.isdir(first) and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL, f"run ended before it was killed:\n{err[-3000:]}"
  out = e2e._run(cmd)  # pylint: disable=protected-access
  assert "resumed from" in out.stdout
  want, got = _trainable(stage1), _trainable(workdir)
  assert want.keys() == got.keys() and any(k.startswith("/backbone") for k in want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  ref_losses, losses = e2e._losses(stage1), e2e._losses(workdir)  # pylint: disable=protected-access
  assert [losses[s] for s in range(3, STEPS + 1)] == [ref_losses[s] for s in range(3, STEPS + 1)]


def _stage2_config(data_dir, base_weights, fold=0):
  config = configs_lib.load_config(f"configs/tiny_bam.py:fold={fold}")
  config.data.data_dir = data_dir
  config.model.base_weights = base_weights
  config.train.total_steps = 2
  config.train.eval_every = 2
  config.train.checkpoint_every = 2
  return config


def test_stage2_trains_on_stage1_and_refuses_without_it(stage1, data_dir, tmp_path):
  with pytest.raises(ValueError,
                     match=r"base_weights is empty.*configs/synthetic_bam_base\.py:fold=0"):
    trainer.train_and_evaluate(_stage2_config(data_dir, ""), str(tmp_path / "none"))
  with pytest.raises(ValueError, match=r"fold 0, not the stage-1 PSPNet of synthetic fold 1"):
    trainer.train_and_evaluate(_stage2_config(data_dir, stage1, fold=1), str(tmp_path / "f1"))

  workdir = str(tmp_path / "stage2")
  result = trainer.train_and_evaluate(_stage2_config(data_dir, stage1), workdir)
  assert result["step"] == 2 and "final" in result
  mgr = ckpt_lib.CheckpointManager(workdir)
  try:
    state = mgr.restore(2).state
  finally:
    mgr.close()
  # The frozen parts are the stage-1 network's; the meta learner trained.
  frozen = e2e._flat(state["frozen"])  # pylint: disable=protected-access
  base = _trainable(stage1)
  assert frozen["/backbone/layer0/conv1/kernel"].tobytes() == (
      base["/backbone/layer0/conv1/kernel"].tobytes())
  np.testing.assert_array_equal(frozen["/learner_base/1_4/kernel"], base["/cls_4/kernel"])
  assert set(state["trainable"]) >= {"init_merge_0", "ASPP_meta", "cls_meta_3", "gram_merge"}
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    assert "miou" in json.load(f)


def test_msanet_trains_on_the_same_stage1(stage1, data_dir, tmp_path):
  """MSANet's stage 2 on BAM's stage 1: its frozen network is the stage-1 run's; its own parts
  (the attention gate, hyper_final) train."""
  config = configs_lib.load_config("configs/tiny_msanet.py")
  config.data.data_dir = data_dir
  config.model.base_weights = stage1
  config.train.total_steps = 2
  config.train.eval_every = 2
  config.train.checkpoint_every = 2
  workdir = str(tmp_path / "msanet")
  result = trainer.train_and_evaluate(config, workdir)
  assert result["step"] == 2 and "final" in result
  mgr = ckpt_lib.CheckpointManager(workdir)
  try:
    state = mgr.restore(2).state
  finally:
    mgr.close()
  assert {"gam", "hyper_final_0", "hyper_final_1", "init_merge_0"} <= set(state["trainable"])
  # [query, prototype, hyper_final (64), prior, attention] with reduce_dim 16: 833 at 256
  assert state["trainable"]["init_merge_0"]["kernel"].shape[2] == 16 + 16 + 64 + 1 + 16
  frozen = e2e._flat(state["frozen"])  # pylint: disable=protected-access
  np.testing.assert_array_equal(frozen["/learner_base/1_4/kernel"],
                                _trainable(stage1)["/cls_4/kernel"])
