"""train_and_evaluate in-process on the tiny config: signals, NaN stop, base-class selection,
TensorBoard episode images."""
import json
import os
import runpy
import signal

import jax
import numpy as np
import pytest

import datagen
from fss_jax import configs_lib
from fss_jax.convert import torch_export
from fss_jax.convert import torch_import
from fss_jax import weights
from fss_jax.models import registry
from fss_jax.train import checkpoint as ckpt_lib
from fss_jax.train import evaluator
from fss_jax.train import logging as logging_lib
from fss_jax.train import protocols
from fss_jax.train import sharding
from fss_jax.train import trainer
from test_logging import read_images


@pytest.fixture
def data_dir(tiny_data_dir):
  return tiny_data_dir


_config = datagen.tiny_config


def test_sigterm_saves_and_the_next_run_resumes(data_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  config = _config(data_dir, total_steps=4, select_on="base_heldout", checkpoint_every=100)
  # The final evaluation follows config.eval.protocol (a preset cut to 3 episodes x 2 seeds
  # here); the in-training selection keeps data.eval_episodes of data.seed.
  monkeypatch.setitem(protocols.PRESETS, "hsnet", protocols._Preset(3, 3, (0, 7), False, ""))
  config.eval.protocol = "hsnet"

  def hook(step, state, batch):
    assert batch["query"].shape[0] == config.data.train_batch_size
    if step == 1:
      os.kill(os.getpid(), signal.SIGTERM)

  out = trainer.train_and_evaluate(config, workdir, step_hook=hook)
  assert out == {"step": 1, "stopped": True}
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed again
  mgr = ckpt_lib.CheckpointManager(workdir)
  assert mgr.all_steps() == [1]
  mgr.close()

  steps = []
  out = trainer.train_and_evaluate(config, workdir,
                                   step_hook=lambda s, *_: steps.append(s))
  assert steps == [2, 3, 4] and out["step"] == 4 and not out["stopped"]
  rows = logging_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  selections = [r for r in rows if ckpt_lib.BEST_METRIC in r]
  assert [r["step"] for r in selections] == [2, 4]
  # Selection ran on held-out base classes: no novel-class keys were logged with it.
  assert not any("val/miou" in r for r in selections)
  final = json.load(open(os.path.join(workdir, "final_metrics.json")))
  best = max(selections, key=lambda r: r[ckpt_lib.BEST_METRIC])["step"]
  assert final["checkpoint_step"] == best

  # The run directory exports to PyTorch with the config it saved (scripts/export_torch.py).
  export = runpy.run_path("scripts/export_torch.py", run_name="script")["main"]
  path = str(tmp_path / "run.safetensors")
  export(["--input", workdir, "--step", "latest", "--output", path])
  variables, _ = ckpt_lib.load_model_variables(workdir, "latest")
  want = weights.model_state_dict(variables, config)
  got = torch_import.load_state_dict(path)
  assert list(got) == list(want) and "corr_conv.0.0.weight" in want
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  assert set(final["per_seed"][0]["per_class"]) == {"1", "2", "3", "4", "5"}  # fold 0 novel
  assert {k: final[k] for k in (
      "protocol", "episodes", "seeds", "original_label", "metric")} == {
      "protocol": "hsnet", "episodes": 3, "seeds": [0, 7], "original_label": False,
      "metric": "fss"}
  assert [(r["seed"], r["episodes"]) for r in final["per_seed"]] == [(0, 3), (7, 3)]
  assert final["miou"]["mean"] == pytest.approx(out["final"]["miou"]["mean"])

  # Each evaluation logged eval.num_images (default 4, all 4 selection episodes here) episode
  # pictures to TensorBoard: the same episodes at steps 2 and 4 (supports and truth pixel for
  # pixel), and at step 4 exactly what prediction_rows draws for the step-4 checkpoint on the
  # selection seed (size, panels, prediction and IoU title).
  images = read_images(workdir)
  n = configs_lib.num_images(config)
  assert n == 4 and sorted(images) == sorted(
      (f"eval/episode_{i}", s) for i in range(n) for s in (2, 4))
  fixed = slice(0, 2 * 160 + 4)  # support 1 | gap | query truth (visualize.episode_row cells)
  for i in range(n):
    np.testing.assert_array_equal(images[(f"eval/episode_{i}", 2)][:, fixed],
                                  images[(f"eval/episode_{i}", 4)][:, fixed], err_msg=str(i))
  assert not np.array_equal(images[("eval/episode_0", 4)][:, fixed],
                            images[("eval/episode_1", 4)][:, fixed])
  mesh = sharding.make_mesh()
  model = registry.build_model(config)
  ev = evaluator.from_config(config, model, mesh, trainer.dataset_dir_lib.prepare(config),
                             "base", protocol=evaluator.selection_settings(config))
  variables, _ = ckpt_lib.load_model_variables(workdir, 4)
  rows = ev.prediction_rows(jax.device_put(variables, sharding.replicated(mesh)),
                            config.data.seed, n)
  assert len(rows) == n and rows[0].shape == (160, 3 * 160 + 2 * 4, 3)
  for i, row in enumerate(rows):
    np.testing.assert_array_equal(images[(f"eval/episode_{i}", 4)], row, err_msg=str(i))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
  workdir = str(tmp_path / "nan")
  config = _config(data_dir, total_steps=6, lr=1e30, checkpoint_every=1, eval_every=0)
  # The first update makes the parameters huge while step 1's loss is still finite: the
  # divergence guard (a NonFiniteLossError) stops the run before that state is saved (before
  # issue 16 step 1 was checkpointed with ~1e28 parameters and the run stopped at step 2).
  with pytest.raises(ckpt_lib.NonFiniteLossError, match="step 1: .*parameter norm"):
    trainer.train_and_evaluate(config, workdir)
  with pytest.raises(FileNotFoundError, match="No checkpoint"):
    ckpt_lib.load_model_variables(workdir, "latest")
  rows = logging_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_wrong_synthetic_settings_are_an_error(data_dir, tmp_path):
  config = _config(data_dir)
  trainer.dataset_dir_lib.prepare(config)  # generated (or reused) with the tiny settings
  config.data.synthetic.num_train = 25
  with pytest.raises(ValueError, match="generated with"):
    trainer.dataset_dir_lib.prepare(config)


def test_missing_dataset_names_the_folder(tmp_path):
  config = configs_lib.load_config("configs/pascal_asgnet.py")
  config.data.data_dir = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere.*data_prep/pascal5i.py"):
    trainer.dataset_dir_lib.prepare(config)


def test_evaluate_loads_an_exported_torch_file(tmp_path):
  config = configs_lib.load_config("configs/tiny_asgnet.py")
  model = registry.build_model(config)
  variables = registry.init_variables(model, config.data.image_size, 1, jax.random.key(0))
  path = str(tmp_path / "model.safetensors")
  torch_export.save_state_dict(weights.model_state_dict(variables, config), path)
  loaded, source = evaluator.load_variables(model, config, checkpoint=path)
  assert source == path
  flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v)
                    for k, v in jax.tree_util.tree_leaves_with_path(t)}
  want, got = flat(variables), flat(loaded)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_init_weights_start_the_run(data_dir, tmp_path):
  """``model.init_weights``: the run starts from a whole-model file (here a PyTorch export of
  other random weights); with lr 0 the checkpointed parameters are exactly the file's."""
  config = _config(data_dir, total_steps=1, eval_every=0, lr=0.0)
  model = registry.build_model(config)
  start = registry.init_variables(model, config.data.image_size, 1, jax.random.key(42))
  path = str(tmp_path / "start.pth")
  torch_export.save_state_dict(weights.model_state_dict(start, config), path)
  config.model.init_weights = path
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir)
  variables, step = ckpt_lib.load_model_variables(workdir, "latest")
  assert step == 1
  flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v)
                    for k, v in jax.tree_util.tree_leaves_with_path(t)}
  want, got = flat(start["params"]), flat(variables["params"])
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
