"""Tests for configs/*.py and fss_jax.configs_lib (arg parsing, validation, absl overrides)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from fss_jax import configs_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ["pascal_asgnet", "coco_asgnet", "synthetic_asgnet", "tiny_asgnet",
           "pascal_pfenet", "coco_pfenet", "synthetic_pfenet", "tiny_pfenet"]
# PFENet's reference protocol: `shot` is the evaluation's, training stays 1-shot (train_shot).
EVAL_SHOT_ONLY = ("pascal_pfenet", "coco_pfenet")


def _load(name, arg=None):
  path = os.path.join(REPO, "configs", f"{name}.py")
  return configs_lib.load_config(f"{path}:{arg}" if arg else path)


def _flat_keys(config, prefix=""):
  keys = set()
  for k, v in config.items():
    if hasattr(v, "items"):
      keys |= _flat_keys(v, f"{prefix}{k}.")
    else:
      keys.add(f"{prefix}{k}")
  return keys


@pytest.mark.parametrize("name", CONFIGS)
def test_each_config_loads_with_and_without_args(name):
  default = _load(name)
  assert default.model.name == name.split("_")[1]
  assert (default.data.image_size - 1) % 8 == 0
  assert default.data.fold == 0 and default.data.shot == 1
  args = _load(name, "fold=3,shot=5,backbone=resnet101")
  assert (args.data.fold, args.model.backbone, args.model.depth) == (3, "resnet", 101)
  if name in EVAL_SHOT_ONLY:
    assert (args.data.shot, args.data.eval_shot) == (1, 5)
    assert _load(name, "shot=5,train_shot=5").data.shot == 5
  else:
    assert args.data.shot == 5 and args.data.eval_shot in (0, 5)
  # Every file keeps its model's base layout; the synthetic ones only add generator settings.
  base = _flat_keys(configs_lib.base_config(default.model.name))
  extra = _flat_keys(default) - base
  assert base <= _flat_keys(default)
  assert extra <= {"data.synthetic.num_train", "data.synthetic.num_val",
                   "data.synthetic.source_size", "data.synthetic.seed",
                   "data.synthetic.instances"}
  json.loads(default.to_json_best_effort())


PANET_CONFIGS = ["pascal_panet", "coco_panet", "synthetic_panet", "tiny_panet"]


@pytest.mark.parametrize("name", PANET_CONFIGS)
def test_panet_configs(name):
  """PANet's configs: the base layout, its arguments, its transform; the official recipe in
  pascal/coco (kaixin96/PANet config.py, train.py; reference_panet.md §8-9)."""
  default = _load(name)
  assert default.model.name == "panet" and default.data.way == 1 and default.model.align
  assert default.data.transform == "panet"
  assert _flat_keys(default) - _flat_keys(configs_lib.base_config("panet")) <= {
      "data.synthetic.num_train", "data.synthetic.num_val", "data.synthetic.source_size",
      "data.synthetic.seed", "data.synthetic.instances"}
  args = _load(name, "fold=3,shot=5,way=2,align=false")
  assert (args.data.fold, args.data.shot, args.data.way, args.model.align) == (3, 5, 2, False)
  if name in ("pascal_panet", "coco_panet"):
    d, t = default.data, default.train
    assert (d.image_size, d.train_batch_size, d.seed, d.min_class_pixels) == (417, 1, 1234, 1)
    assert default.model.backbone == "vgg16_panet" and tuple(t.frozen_keys) == ()
    assert (t.lr, t.momentum, t.weight_decay, t.total_steps) == (1e-3, 0.9, 5e-4, 30000)
    assert (t.schedule, tuple(t.milestones), t.gamma) == ("multistep", (10000, 20000, 30000),
                                                          0.1)
    assert default.eval.protocol == "panet" and default.model.scaler == 20.0
  if name not in ("pascal_panet", "coco_panet"):
    with pytest.raises(ValueError, match="recipe configs .pascal_panet, coco_panet. only"):
      _load(name, "backbone=resnet50")
    return
  assert _load(name, "backbone=vgg16").to_dict() == default.to_dict()
  assert default.model.variant == "official" and tuple(default.model.frozen_layers) == ()
  # backbone=resnet50: the "blog" variant (reference_panet.md §15); the rest of the recipe kept.
  blog = _load(name, "backbone=resnet50,shot=5")
  m = blog.model
  assert (m.backbone, m.depth, m.backbone_width, tuple(m.backbone_blocks)) == ("resnet", 50,
                                                                              64, ())
  assert (m.variant, tuple(m.frozen_layers), m.scaler, m.bn_mode) == (
      "blog", ("layer0", "layer1"), 10.0, "frozen")
  assert (blog.data.image_size, blog.data.shot, blog.data.way) == (473, 5, 1)
  assert tuple(blog.train.frozen_keys) == () and blog.train.lr == t.lr
  assert _flat_keys(blog) == _flat_keys(default)
  with pytest.raises(ValueError, match="'blog' is 1-way"):
    _load(name, "backbone=resnet50,way=2")
  with pytest.raises(ValueError, match="backbone='resnet101'; allowed: vgg16, resnet50"):
    _load(name, "backbone=resnet101")
  blog.model.backbone = "vgg16_panet"
  with pytest.raises(ValueError, match="'blog' runs the deep-stem ResNet"):
    configs_lib.validate_config(blog)


def test_nway_needs_an_nway_model():
  config = _load("tiny_asgnet")
  config.data.way = 2
  with pytest.raises(ValueError, match="model 'asgnet' is 1-way"):
    configs_lib.validate_config(config)
  config = _load("tiny_panet")
  config.data.original_label_eval = True
  with pytest.raises(ValueError, match="data.transform = 'panet'.*resized labels"):
    configs_lib.validate_config(config)


def test_reference_values():
  pascal = _load("pascal_asgnet")
  assert pascal.data.dataset == "pascal5i" and pascal.data.image_size == 473
  assert pascal.data.train_batch_size == 4 and pascal.data.eval_episodes == 1000
  assert pascal.data.scale == (0.9, 1.1) and pascal.data.seed == 321
  assert pascal.model.bins == (60, 30, 15, 8) and pascal.model.backbone == "resnet"
  assert pascal.train.lr == pytest.approx(0.0025 * 10) and pascal.train.epochs == 200
  assert pascal.train.momentum == 0.9 and pascal.train.weight_decay == 1e-4
  assert pascal.train.frozen_keys == ("backbone",)
  coco = _load("coco_asgnet")
  assert coco.data.image_size == 641 and coco.data.train_batch_size == 8
  assert coco.train.lr == pytest.approx(0.005 * 10) and coco.train.epochs == 50
  assert coco.data.scale == (0.8, 1.25) and coco.model.bins == (1.0, 0.5, 0.25, 0.125)
  assert coco.data.eval_episodes == 20000
  synthetic = _load("synthetic_asgnet")
  assert synthetic.model.backbone == "resnet_small" and synthetic.train.total_steps > 0
  assert _load("synthetic_asgnet", "backbone=resnet101").model.backbone == "resnet"
  tiny = _load("tiny_asgnet")
  assert tiny.data.image_size == 65 and tiny.data.train_batch_size == 2
  assert tiny.train.total_steps <= 10


def test_pfenet_reference_values():
  """reference_pfenet.md §5 and §7 (yaml files and test.py of the official code)."""
  pascal = _load("pascal_pfenet")
  assert pascal.model.name == "pfenet" and pascal.model.backbone == "resnet"
  assert pascal.data.image_size == 473 and pascal.data.train_batch_size == 4
  assert pascal.train.lr == pytest.approx(0.0025 * 10) and pascal.train.epochs == 200
  assert pascal.data.eval_episodes == 5000 and pascal.model.bins == (60, 30, 15, 8)
  assert pascal.data.seed == 321 and pascal.train.frozen_keys == ("backbone",)
  vgg = _load("pascal_pfenet", "backbone=vgg16_bn,shot=5")
  assert vgg.model.backbone == "vgg16_bn" and (vgg.data.shot, vgg.data.eval_shot) == (1, 5)
  with pytest.raises(ValueError, match="no meaning"):
    _load("pascal_pfenet", "backbone=vgg16_bn,depth=101")
  coco = _load("coco_pfenet")
  assert coco.model.backbone == "vgg16_bn" and coco.data.image_size == 641
  assert coco.train.lr == pytest.approx(0.02 * 10) and coco.data.train_batch_size == 32
  assert coco.model.bins == (1.0, 0.5, 0.25, 0.125) and coco.data.eval_episodes == 20000
  assert coco.train.epochs == 50 and coco.data.scale == (0.8, 1.25)


def test_backbone_arg():
  c = _load("pascal_asgnet", "backbone=resnet101")
  assert (c.model.backbone, c.model.depth) == ("resnet", 101)
  with pytest.raises(ValueError, match="disagree"):
    _load("pascal_asgnet", "backbone=resnet50,depth=101")
  with pytest.raises(ValueError, match="allowed: resnet50, resnet101"):
    _load("pascal_asgnet", "backbone=resnet_small")
  with pytest.raises(ValueError, match="depth=34"):
    _load("coco_asgnet", "depth=34")


@pytest.mark.parametrize("name", CONFIGS)
def test_bad_arg_key_lists_allowed_keys(name):
  keys = ("amm, backbone, depth, fold, prior, shot" if "asgnet" in name
          else "backbone, depth, fold, shot")
  with pytest.raises(ValueError, match=r"Unknown config argument key 'folds'.*allowed keys: "
                                       + keys):
    _load(name, "folds=1")


def test_parse_arg():
  defaults = {"fold": 0, "lr": 0.1, "flag": False, "name": "x"}
  assert configs_lib.parse_arg(None, defaults) == defaults
  assert configs_lib.parse_arg("", defaults) == defaults
  got = configs_lib.parse_arg(" fold=2, lr=1e-3,flag=true,name=abc ,", defaults)
  assert got == {"fold": 2, "lr": 1e-3, "flag": True, "name": "abc"}
  assert isinstance(got["fold"], int) and isinstance(got["lr"], float)
  with pytest.raises(ValueError, match="key=value"):
    configs_lib.parse_arg("fold", defaults)
  with pytest.raises(ValueError, match=r"fold='two': expected a int"):
    configs_lib.parse_arg("fold=two", defaults)
  with pytest.raises(ValueError, match="flag='maybe'"):
    configs_lib.parse_arg("flag=maybe", defaults)
  with pytest.raises(ValueError, match="given twice"):
    configs_lib.parse_arg("fold=1,fold=2", defaults)


def test_validation():
  with pytest.raises(ValueError, match=r"config.data.fold = 4"):
    _load("pascal_asgnet", "fold=4")
  with pytest.raises(ValueError, match="data.shot"):
    _load("pascal_asgnet", "shot=0")
  c = _load("pascal_asgnet")
  c.data.image_size = 472
  with pytest.raises(ValueError, match="8k\\+1"):
    configs_lib.validate_config(c)
  c = _load("pascal_asgnet")
  c.model.bn_mode = "train"
  with pytest.raises(ValueError, match="bn_mode"):
    configs_lib.validate_config(c)
  with pytest.raises(FileNotFoundError, match="nope.py"):
    configs_lib.load_config("configs/nope.py")


_ABSL_SCRIPT = textwrap.dedent("""
    from absl import app
    from ml_collections import config_flags
    _CONFIG = config_flags.DEFINE_config_file("config")

    def main(argv):
      print("CONFIG_JSON=" + _CONFIG.value.to_json_best_effort())

    if __name__ == "__main__":
      app.run(main)
""")


def _run_absl(tmp_path, *flags):
  script = tmp_path / "show_config.py"
  script.write_text(_ABSL_SCRIPT)
  return subprocess.run([sys.executable, str(script), *flags], cwd=REPO, capture_output=True,
                        text=True, timeout=120, check=False)


def _config_json(out):
  assert out.returncode == 0, out.stderr[-3000:]
  line = [l for l in out.stdout.splitlines() if l.startswith("CONFIG_JSON=")][0]
  return json.loads(line[len("CONFIG_JSON="):])


def test_absl_config_flags_overrides(tmp_path):
  out = _run_absl(tmp_path, "--config=configs/pascal_asgnet.py:fold=1,shot=5,backbone=resnet101",
                  "--config.train.lr=0.01", "--config.data.scale=(0.8,1.2)",
                  "--config.data.data_dir=/tmp/voc", "--config.model.bn_mode=batch_stats",
                  "--config.eval.protocol=bam")
  c = _config_json(out)
  assert c["eval"]["protocol"] == "bam"
  assert (c["data"]["fold"], c["data"]["shot"], c["model"]["depth"]) == (1, 5, 101)
  assert c["train"]["lr"] == 0.01 and c["data"]["scale"] == [0.8, 1.2]
  assert c["data"]["data_dir"] == "/tmp/voc" and c["model"]["bn_mode"] == "batch_stats"
  assert c["train"]["weight_decay"] == 1e-4  # untouched


def test_absl_rejects_unknown_override_and_bad_arg(tmp_path):
  out = _run_absl(tmp_path, "--config=configs/tiny_asgnet.py", "--config.train.learning_rate=1")
  assert out.returncode != 0
  assert "learning_rate" in out.stderr
  out = _run_absl(tmp_path, "--config=configs/tiny_asgnet.py", "--config.data.fold=abc")
  assert out.returncode != 0 and "fold" in out.stderr
  out = _run_absl(tmp_path, "--config=configs/coco_asgnet.py:split=1")
  assert out.returncode != 0
  assert "Unknown config argument key 'split'" in out.stderr
  assert "allowed keys: amm, backbone, depth, fold, prior, shot" in out.stderr


def test_run_config_of_an_older_run_gets_the_new_fields_defaults(tmp_path):
  """A run saved before a field existed (here model.avg_sp_area, eval.num_images) loads with
  that field at its default (predict.py / the demo on an older run); saved values win, and
  saved fields unknown today are kept."""
  saved = configs_lib.base_config("asgnet").to_dict()
  default = configs_lib.base_config("asgnet")
  del saved["model"]["avg_sp_area"]
  del saved["eval"]["num_images"]
  saved["data"]["fold"] = 2
  saved["model"]["shot_weights"] = None  # another type than any default, unknown today
  saved["train"]["lr"] = default.train.lr * 3
  with open(tmp_path / "config.json", "w") as f:
    json.dump(saved, f)
  config = configs_lib.load_run_config(str(tmp_path))
  assert config.model.avg_sp_area == default.model.avg_sp_area
  assert config.eval.num_images == default.eval.num_images
  assert config.data.fold == 2 and config.train.lr == default.train.lr * 3
  assert config.model.shot_weights is None
  assert config.model.name == "asgnet"
  with open(tmp_path / "config.json", "w") as f:
    f.write("[1, 2]")
  with pytest.raises(ValueError, match="config.json"):
    configs_lib.load_run_config(str(tmp_path))


def test_bam_configs():
  """BAM's recipes (chunbolang/BAM config/*/*_base.yaml, *_split0_*.yaml; train_base.py,
  train.py): stage 1 PSPNet, stage 2 BAM on the frozen stage-1 network."""
  p1 = _load("pascal_bam_base", "fold=2,backbone=vgg16_bn")
  assert (p1.model.name, p1.model.backbone, p1.data.fold, p1.model.classes) == (
      "pspnet", "vgg16_bn", 2, 16)
  assert (p1.data.image_size, p1.data.train_batch_size, p1.data.scale) == (417, 12, (0.5, 2.0))
  assert (p1.train.lr, p1.train.backbone_lr_scale, p1.train.epochs) == (2.5e-3, 0.1, 100)
  assert p1.train.frozen_keys == () and p1.model.bn_mode == "batch_stats"
  c1 = _load("coco_bam_base")
  assert (c1.model.classes, c1.train.backbone_lr_scale, c1.train.epochs) == (61, 1.0, 20)
  p2 = _load("pascal_bam", "fold=1,shot=5,backbone=resnet101")
  assert (p2.model.name, p2.model.depth, p2.data.shot, p2.model.classes) == ("bam", 101, 5, 16)
  assert (p2.data.image_size, p2.data.train_batch_size, p2.train.lr, p2.train.epochs) == (
      473, 8, 0.05, 200)
  assert p2.data.exclude_novel_images and p2.eval.protocol == "bam"
  assert tuple(p2.train.frozen_keys) == ("backbone", "learner_base")
  assert p2.model.base_weights == "" and p2.model.bn_mode == "frozen"
  c2 = _load("coco_bam")
  assert (c2.data.image_size, c2.data.scale, c2.train.epochs, c2.model.classes) == (
      641, (0.8, 1.25), 50, 61)
  for name in ("synthetic_bam_base", "synthetic_bam", "tiny_bam_base", "tiny_bam",
               "synthetic_msanet", "tiny_msanet"):
    assert _load(name).model.name in ("pspnet", "bam", "msanet")
  m = _load("pascal_msanet", "fold=3,shot=5,backbone=vgg16_bn")
  assert (m.model.name, m.model.kshot_unsort, m.model.prior_support_masked) == (
      "msanet", "msanet", False)
  assert (m.data.fold, m.data.shot, m.train.lr, m.train.epochs) == (3, 5, 0.05, 200)
  assert tuple(m.train.frozen_keys) == ("backbone", "learner_base")
  assert _load("coco_msanet").data.image_size == 641
  with pytest.raises(ValueError, match="allowed: resnet50, resnet101, vgg16_bn"):
    _load("pascal_bam", "backbone=resnet_small")
