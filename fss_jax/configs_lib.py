"""Helpers shared by the config files in ``configs/`` (ml_collections ConfigDicts).

A config file defines ``get_config(arg=None)``; ``arg`` is the text after ``:`` in
``--config=configs/pascal_asgnet.py:fold=0,shot=5,backbone=resnet101`` and is parsed by
``parse_arg`` into typed values. Every field can then be overridden with
``--config.train.lr=0.01`` (ml_collections ``config_flags``); unknown fields are rejected there.

The field layout is the one of ``asgnet_base_config``; config files only change values.
"""
import importlib.util
import os
from typing import Any, Dict, Mapping, Optional

import ml_collections

# arg value of `backbone` -> (model.backbone family, model.depth)
BACKBONES = {
    "resnet50": ("resnet", 50),
    "resnet101": ("resnet", 101),
    "resnet_small": ("resnet_small", 50),
}
# The small backbone trained from scratch on the procedural dataset: planes 16·(1,2,4,8), one
# bottleneck per stage (layer2 128 + layer3 256 channels into the head).
SMALL_WIDTH = 16
SMALL_BLOCKS = (1, 1, 1, 1)
COMMON_ARGS = {"fold": 0, "shot": 1, "backbone": "", "depth": 0}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_arg(arg: Optional[str], defaults: Mapping[str, Any]) -> Dict[str, Any]:
  """Parses ``"key=value,key=value"`` against ``defaults`` (which also give the value types).

  Args:
    arg: the config argument, or None / "" for the defaults.
    defaults: allowed keys and their default values (bool, int, float or str).

  Returns:
    A new dict: the defaults updated with the parsed values.

  Raises:
    ValueError: unknown key (the message lists the allowed ones), a malformed item, a repeated
      key, or a value that does not parse as the default's type.
  """
  out = dict(defaults)
  if not arg:
    return out
  seen = set()
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key:
      raise ValueError(f"Config argument item {item!r} is not of the form key=value "
                       f"(allowed keys: {', '.join(sorted(defaults))}).")
    if key not in defaults:
      raise ValueError(f"Unknown config argument key {key!r} in {arg!r}; allowed keys: "
                       f"{', '.join(sorted(defaults))}.")
    if key in seen:
      raise ValueError(f"Config argument key {key!r} given twice in {arg!r}.")
    seen.add(key)
    out[key] = _cast(key, value, defaults[key])
  return out


def _cast(key: str, value: str, default: Any) -> Any:
  try:
    if isinstance(default, bool):
      low = value.lower()
      if low in _TRUE:
        return True
      if low in _FALSE:
        return False
      raise ValueError(value)
    if isinstance(default, int):
      return int(value)
    if isinstance(default, float):
      return float(value)
  except ValueError as e:
    raise ValueError(f"Config argument {key}={value!r}: expected a "
                     f"{type(default).__name__}.") from e
  return value


def asgnet_base_config() -> ml_collections.ConfigDict:
  """ASGNet on PASCAL-5i as in the reference (``data/config/pascal/*.yaml``, ``tool/train.py``)."""
  c = ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "pascal5i"          # 'pascal5i' | 'coco20i' | 'synthetic' (converted dir)
  c.data.data_dir = ""                 # directory with manifest.json + TFRecord shards
  c.data.fold = 0
  c.data.shot = 1
  c.data.image_size = 473              # 8k+1; train crop and evaluation canvas
  c.data.train_batch_size = 4          # global (over all processes)
  c.data.eval_batch_size = 1           # global; the metric is per episode, any size is exact
  c.data.num_workers = 4               # Grain mp_prefetch workers per process (0: in-process)
  c.data.read_threads = 1              # with num_workers=0: threads building batches
  c.data.train_split = "train"
  c.data.eval_split = "val"
  c.data.eval_episodes = 1000
  c.data.eval_seeds = (321,)           # several seeds → mean ± std (other papers' protocol)
  c.data.seed = 321
  c.data.scale = (0.9, 1.1)            # random scale range (transforms.TrainAugConfig.scale)
  c.data.rotate = (-10.0, 10.0)        # degrees
  c.data.min_class_pixels = 2 * 32 * 32
  # The reference yaml sets ori_resize: True (score against the original-size label);
  # False scores at image_size (cheaper; what most re-implementations report).
  c.data.original_label_eval = False

  c.model = ml_collections.ConfigDict()
  c.model.name = "asgnet"
  c.model.backbone = "resnet"          # 'resnet' (deep-stem dilated v2) | 'resnet_small'
  c.model.depth = 50                   # 50 | 101
  c.model.bins = (60, 30, 15, 8)       # FEM bins: ints absolute, floats <= 1 relative
  c.model.reduce_dim = 256
  c.model.train_iters = 10             # SGC iterations
  c.model.eval_iters = 5
  c.model.max_sp = 5
  c.model.bn_mode = "frozen"           # 'frozen' | 'batch_stats' (the reference's train-mode quirk)
  c.model.backbone_dtype = "float32"   # 'float32' | 'bfloat16'
  c.model.backbone_width = 64          # 64 = ResNet-50/101; resnet_small: 16
  c.model.backbone_blocks = ()         # () = from depth; resnet_small: (1, 1, 1, 1)
  c.model.backbone_weights = ""        # ImageNet .pth (PyTorch) or .msgpack; '' = random init

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 200
  c.train.total_steps = 0              # > 0 overrides epochs × steps_per_epoch
  c.train.lr = 0.025                   # effective: base_lr 0.0025 × 10 (poly_learning_rate)
  c.train.momentum = 0.9
  c.train.weight_decay = 1e-4
  c.train.poly_power = 0.9
  c.train.poly_step_offset = 1         # the reference's 1-based iteration counter
  c.train.aux_weight = 1.0
  c.train.frozen_keys = ("backbone",)  # top-level params without gradient / optimiser state
  c.train.log_every = 50               # steps
  c.train.eval_every = 0               # steps; 0: use eval_every_epochs
  c.train.eval_every_epochs = 2        # reference: every 2nd epoch when epochs > 50, else every
  c.train.checkpoint_every = 0         # steps; 0: at each evaluation and at the end
  c.train.keep_checkpoints = 3
  c.train.select_on = "novel"          # 'novel' (reference) | 'base_heldout'
  c.train.eval_at_start = False        # evaluate the initial model too (the untrained baseline)
  c.train.seed = 321
  return c


def apply_common_args(config: ml_collections.ConfigDict, args: Mapping[str, Any],
                      allowed_backbones=("resnet50", "resnet101")) -> ml_collections.ConfigDict:
  """Applies parsed ``fold``, ``shot``, ``backbone`` / ``depth`` to ``config`` (in place)."""
  if "fold" in args:
    config.data.fold = int(args["fold"])
  if "shot" in args:
    config.data.shot = int(args["shot"])
  backbone = args.get("backbone", "")
  depth = int(args.get("depth", 0) or 0)
  if backbone:
    if backbone not in allowed_backbones:
      raise ValueError(f"Config argument backbone={backbone!r}; allowed: "
                       f"{', '.join(allowed_backbones)}.")
    family, bdepth = BACKBONES[backbone]
    if depth and family == "resnet" and depth != bdepth:
      raise ValueError(f"Config arguments backbone={backbone} and depth={depth} disagree.")
    set_backbone(config, family, bdepth)
  if depth:
    if depth not in (50, 101):
      raise ValueError(f"Config argument depth={depth}; allowed: 50, 101.")
    config.model.depth = depth
  return config


def set_backbone(config: ml_collections.ConfigDict, family: str,
                 depth: int = 50) -> ml_collections.ConfigDict:
  """Sets ``model.backbone`` / ``depth`` / ``backbone_width`` / ``backbone_blocks`` together."""
  if family not in ("resnet", "resnet_small"):
    raise ValueError(f"Unknown backbone family {family!r}; allowed: resnet, resnet_small.")
  config.model.backbone = family
  config.model.depth = int(depth)
  small = family == "resnet_small"
  config.model.backbone_width = SMALL_WIDTH if small else 64
  config.model.backbone_blocks = SMALL_BLOCKS if small else ()
  return config


def validate_config(config: ml_collections.ConfigDict, num_folds: int = 4) -> None:
  """Checks value ranges (call again after command-line overrides)."""
  def bad(field, value, why):
    raise ValueError(f"config.{field} = {value!r}: {why}.")

  d, m, t = config.data, config.model, config.train
  if d.image_size < 9 or (d.image_size - 1) % 8:
    bad("data.image_size", d.image_size, "must be 8k+1 (e.g. 473, 641)")
  if not 0 <= d.fold < num_folds:
    bad("data.fold", d.fold, f"must be in [0, {num_folds})")
  if d.shot < 1:
    bad("data.shot", d.shot, "must be >= 1")
  for f in ("train_batch_size", "eval_batch_size", "eval_episodes"):
    if d[f] < 1:
      bad(f"data.{f}", d[f], "must be >= 1")
  if not d.eval_seeds:
    bad("data.eval_seeds", d.eval_seeds, "needs at least one seed")
  if m.depth not in (50, 101):
    bad("model.depth", m.depth, "must be 50 or 101")
  if m.bn_mode not in ("frozen", "batch_stats"):
    bad("model.bn_mode", m.bn_mode, "must be 'frozen' or 'batch_stats'")
  if m.backbone not in ("resnet", "resnet_small"):
    bad("model.backbone", m.backbone, "must be 'resnet' or 'resnet_small'")
  if m.backbone_width < 1 or m.backbone_width % 4:
    bad("model.backbone_width", m.backbone_width, "must be a positive multiple of 4")
  if len(m.backbone_blocks) not in (0, 4) or any(int(b) < 1 for b in m.backbone_blocks):
    bad("model.backbone_blocks", m.backbone_blocks, "must be () or four counts >= 1")
  if m.backbone_dtype not in ("float32", "bfloat16"):
    bad("model.backbone_dtype", m.backbone_dtype, "must be 'float32' or 'bfloat16'")
  if t.select_on not in ("novel", "base_heldout"):
    bad("train.select_on", t.select_on, "must be 'novel' or 'base_heldout'")
  if t.total_steps <= 0 and t.epochs <= 0:
    bad("train.total_steps", t.total_steps, "set total_steps > 0 or epochs > 0")
  if t.keep_checkpoints < 1:
    bad("train.keep_checkpoints", t.keep_checkpoints, "must be >= 1")


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads ``"path/to/config.py[:arg]"`` the way ``config_flags`` does (for scripts and tests)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Config file {path!r} not found.")
  name = "fss_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"Config file {path!r} defines no get_config().")
  return module.get_config(arg) if arg else module.get_config()
