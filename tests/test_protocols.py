"""Evaluation protocol presets (``config.eval.protocol``): resolution, wiring, exact counts."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from fss_jax import configs_lib
from fss_jax import weights
from fss_jax.convert import torch_export
from fss_jax.data import dataset_dir as dataset_dir_lib
from fss_jax.models import registry
from fss_jax.train import evaluator as E
from fss_jax.train import protocols
from fss_jax.train import sharding
import numerics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 41
BAM_SEEDS = [510, 365, 382, 322, 988]
PANET_SEEDS = [1234, 1235, 1236, 1237, 1238]

# protocol -> dataset -> (episodes, seeds, original labels); see fss_jax/train/protocols.py.
WANT = {
    "asgnet": {"pascal5i": (1001, [321], True), "coco20i": (20001, [321], True)},
    "pfenet": {"pascal5i": (5001, [321], True), "coco20i": (20001, [321], True)},
    "bam": {"pascal5i": (1000, BAM_SEEDS, True), "coco20i": (1000, BAM_SEEDS, True)},
    "hsnet": {"pascal5i": (1000, [0], False), "coco20i": (1000, [0], False)},
    "panet": {"pascal5i": (1000, PANET_SEEDS, False), "coco20i": (1000, PANET_SEEDS, False)},
}
# protocol -> (metric, sampler, split); '' = data.eval_split
WANT_EPISODES = {"panet": ("panet", "class_balanced", "train")}
CASES = [(name, dataset) for name in WANT for dataset in ("pascal5i", "coco20i", "synthetic")]


def _config(protocol="custom", dataset="pascal5i"):
  config = configs_lib.load_config("configs/tiny_asgnet.py")
  config.data.dataset = dataset
  config.eval.protocol = protocol
  return config


@pytest.mark.parametrize("name,dataset", CASES)
def test_preset_resolves_per_dataset(name, dataset):
  config = _config(name, dataset)
  # A preset ignores the custom fields.
  config.data.eval_episodes, config.data.eval_seeds = 3, (9, 8)
  config.data.original_label_eval = not WANT[name]["pascal5i"][2]
  configs_lib.validate_config(config)
  p = E.protocol_settings(config)
  episodes, seeds, original = WANT[name]["coco20i" if dataset == "coco20i" else "pascal5i"]
  assert (p.name, p.episodes, list(p.seeds), p.original_label) == (name, episodes, seeds,
                                                                   original)
  metric, sampler, split = WANT_EPISODES.get(name, ("fss", "walk", ""))
  assert p.header() == {"protocol": name, "episodes": episodes, "seeds": seeds,
                        "original_label": original, "metric": metric, "sampler": sampler,
                        "split": split}
  assert ("PASCAL-5i count" in p.note) == (dataset == "synthetic")
  with pytest.raises(dataclasses.FrozenInstanceError):
    p.episodes = 1


def test_custom_is_the_data_fields_and_the_default():
  config = _config(dataset="coco20i")
  assert configs_lib.base_config().eval.protocol == "custom"
  config.data.eval_episodes, config.data.eval_seeds = 7, (1, 2)
  config.data.original_label_eval = True
  p = E.protocol_settings(config)
  assert (p.name, p.episodes, p.seeds, p.original_label) == ("custom", 7, (1, 2), True)
  # A run's config.json written before the eval section existed reads as 'custom'.
  old = ml_collections.ConfigDict(json.loads(config.to_json_best_effort()))
  del old["eval"]
  assert E.protocol_settings(old) == p
  configs_lib.validate_config(old)


def test_selection_ignores_the_protocol():
  config = _config("bam")
  config.data.eval_episodes, config.data.seed = 11, 5
  s = E.selection_settings(config)
  assert (s.name, s.episodes, s.seeds, s.original_label) == (
      "selection", 11, (5,), config.data.original_label_eval)


def test_unknown_protocol_lists_the_valid_names():
  config = _config("OSLSM")
  msg = r"config.eval.protocol = 'OSLSM'.*valid: custom, asgnet, pfenet, bam, hsnet, panet"
  with pytest.raises(ValueError, match=msg):
    E.protocol_settings(config)
  with pytest.raises(ValueError, match=msg):
    configs_lib.validate_config(config)
  assert E.PROTOCOL_NAMES == ("custom", "asgnet", "pfenet", "bam", "hsnet", "panet")


def _random_variables(model, seed=0):
  """He-normal kernels, zero biases, unit BN: random variables without compiling the model's
  init (which takes ~15 s on 2 cores; the protocol does not care how the model scores)."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = jax.tree_util.keystr(path).split("'")[-2]
    if name == "kernel":
      return (rng.normal(size=x.shape) * np.sqrt(2 / np.prod(x.shape[:-1]))).astype(x.dtype)
    return (np.ones if name in ("scale", "var") else np.zeros)(x.shape, x.dtype)

  return jax.tree_util.tree_map_with_path(leaf, registry.variables_template(model, SIZE, 1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(config, dataset dir, model, variables, exported .safetensors) of configs/tiny_asgnet.py
  at SIZE, on its procedural dataset (12 validation images)."""
  tmp = tmp_path_factory.mktemp("protocols")
  config = _config(dataset="synthetic")
  config.data.data_dir = str(tmp / "synthetic")
  config.data.image_size, config.data.eval_batch_size = SIZE, 32
  data = dataset_dir_lib.prepare(config)
  model = registry.build_model(config)
  variables = _random_variables(model)
  path = str(tmp / "model.safetensors")
  torch_export.save_state_dict(weights.model_state_dict(variables, config), path)
  return config, data, model, variables, path


@pytest.mark.parametrize("name", protocols.PROTOCOL_NAMES)
def test_from_config_takes_episodes_and_labels_from_the_protocol(tiny, name):
  config, data, model, _, _ = tiny
  config = config.copy_and_resolve_references()
  config.eval.protocol = name
  p = E.protocol_settings(config)
  ev = E.from_config(config, model, sharding.make_mesh(), data)
  assert (ev.num_episodes, ev.original_label, ev.protocol) == (p.episodes, p.original_label, p)
  sel = E.from_config(config, model, sharding.make_mesh(), data, "base",
                      protocol=E.selection_settings(config))
  assert (sel.num_episodes, sel.which) == (config.data.eval_episodes, "base")


def test_panet_preset_evaluates_class_balanced_training_episodes(tiny):
  """The 'panet' preset reaches the evaluator: the training split, the class-balanced sampler,
  PANet's metric rule and, with data.transform='panet', its resize; a run (4 episodes instead
  of 1000, for speed) scores with that rule."""
  config, data, model, variables, _ = tiny
  config = config.copy_and_resolve_references()
  config.eval.protocol, config.data.transform = "panet", "panet"
  ev = E.from_config(config, model, sharding.make_mesh(), data)
  assert (ev.split, ev.sampler, ev.metric, ev.resize, ev.num_episodes) == (
      config.data.train_split, "class_balanced", "panet", "stretch", 1000)
  assert ev.protocol.seeds == tuple(PANET_SEEDS)
  ev.num_episodes = 4
  r = ev.run(jax.device_put(variables, sharding.replicated(ev.mesh)), 1234)
  assert r.meter.rule == "panet" and r.meter.num_episodes == 4


def test_bam_runs_each_preset_seed_with_exactly_n_episodes(tiny):
  """The preset's seeds and label mode, with the per-seed count cut from 1000 to 6 (speed)."""
  config, data, model, variables, _ = tiny
  config = config.copy_and_resolve_references()
  config.eval.protocol, config.data.eval_batch_size = "bam", 6
  p = dataclasses.replace(E.protocol_settings(config), episodes=6)
  ev = E.from_config(config, model, sharding.make_mesh(), data, protocol=p)
  assert ev.original_label
  out = ev.run_protocol(variables)
  assert [r.seed for r in out["runs"]] == BAM_SEEDS
  assert [r.meter.num_episodes for r in out["runs"]] == [6] * 5
  assert out["miou"]["n"] == 5
  doc = E.results_json(out, **p.header())
  assert list(doc)[:4] == ["protocol", "episodes", "seeds", "original_label"]
  assert (doc["protocol"], doc["episodes"], doc["seeds"]) == ("bam", 6, BAM_SEEDS)
  assert [s["episodes"] for s in doc["per_seed"]] == [6] * 5


def test_evaluate_script_asgnet_preset_scores_1001_episodes(tiny, tmp_path):
  """scripts/evaluate.py --config.eval.protocol=asgnet on an exported checkpoint: seed 321,
  exactly 1001 episodes on original labels (about 15 s on 2 cores)."""
  config, data, _, _, path = tiny
  out = str(tmp_path / "out.json")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=numerics.child_xla_flags())
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"),
         f"--config={os.path.join(ROOT, 'configs', 'tiny_asgnet.py')}",
         f"--config.data.data_dir={data}", f"--config.data.image_size={SIZE}",
         f"--config.data.eval_batch_size={config.data.eval_batch_size}",
         "--config.eval.protocol=asgnet", f"--checkpoint={path}", f"--output={out}",
         "--progress=false"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "protocol asgnet: 1001 episodes x 1 seed [321], original labels" in proc.stdout
  doc = json.load(open(out))
  assert {k: doc[k] for k in (
      "protocol", "episodes", "seeds", "original_label", "metric")} == {
      "protocol": "asgnet", "episodes": 1001, "seeds": [321], "original_label": True,
      "metric": "fss"}
  (run,) = doc["per_seed"]
  assert run["seed"] == 321 and run["episodes"] == 1001
  assert sum(c["episodes"] for c in run["per_class"].values()) == 1001
