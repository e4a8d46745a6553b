"""Helpers shared by the config files in ``configs/`` (ml_collections ConfigDicts).

A config file defines ``get_config(arg=None)``; ``arg`` is the text after ``:`` in
``--config=configs/pascal_asgnet.py:fold=0,shot=5,backbone=resnet101`` and is parsed by
``parse_arg`` into typed values. Every field can then be overridden with
``--config.train.lr=0.01`` (ml_collections ``config_flags``); unknown fields are rejected there.

The field layout is the one of ``base_config(model_name)``: data and train fields shared by every
model, the backbone fields every model has, and the model's own fields (its ``model_config()``,
``fss_jax/models/registry.py``); config files only change values.
"""
import importlib.util
import json
import os
from typing import Any, Dict, Mapping, Optional

import ml_collections

from fss_jax.models import backbones
from fss_jax.models import registry
from fss_jax.train import protocols

# arg value of `backbone` -> (model.backbone family, model.depth)
BACKBONES = {
    "resnet50": ("resnet", 50),
    "resnet101": ("resnet", 101),
    "resnet_small": ("resnet_small", 50),
    "vgg16_bn": ("vgg16_bn", 50),  # depth unused
}
RESNET_DEPTHS = (50, 101)
# The small backbone trained from scratch on the procedural dataset: planes 16·(1,2,4,8), one
# bottleneck per stage (layer2 128 + layer3 256 channels into the head).
SMALL_WIDTH = 16
SMALL_BLOCKS = (1, 1, 1, 1)
COMMON_ARGS = {"fold": 0, "shot": 1, "backbone": "", "depth": 0}
# config.eval.num_images: episodes drawn as TensorBoard images at each in-training evaluation.
DEFAULT_NUM_IMAGES = 4

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


def base_config(model_name: str = "asgnet") -> ml_collections.ConfigDict:
  """Every field, with the reference's PASCAL-5i settings (ASGNet's and PFENet's yaml files and
  training scripts agree on them), and ``model_name``'s own model fields."""
  c = ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "pascal5i"          # 'pascal5i' | 'coco20i' | 'synthetic' (converted dir)
  c.data.data_dir = ""                 # directory with manifest.json + TFRecord shards
  c.data.fold = 0
  c.data.shot = 1                      # training episodes (and evaluation unless eval_shot)
  # N-way episodes (PANet): N distinct classes per episode, K shots each; supports way-major
  # (fss_jax/data/pipeline.py). 1 for every model but PANet.
  c.data.way = 1
  # 'fss': PFENet/ASGNet's augmentation (scale, rotate, blur, flip, crop) and aspect-keeping
  # evaluation resize; 'panet': PANet's (resize to image_size x image_size, flip; evaluation
  # resize without padding). fss_jax/data/transforms.py.
  c.data.transform = "fss"
  # Evaluation supports: 'dense' masks, or PANet's weak supports 'box' (the largest own-class
  # instance's box; datasets converted with instance maps) or 'scribble' (the records' scribble
  # maps, else generated per episode; fss_jax/data/weak.py). Training always uses dense masks.
  c.data.support_annotation = "dense"
  c.data.scribble_dilation = 0         # PANet's DilateScribble window (0: none, its default)
  c.data.eval_shot = 0                 # > 0: evaluation shots (PFENet: 1-shot model at 5 shots)
  c.data.image_size = 473              # 8k+1; train crop and evaluation canvas
  c.data.train_batch_size = 4          # global (over all processes)
  c.data.eval_batch_size = 1           # global; the metric is per episode, any size is exact
  c.data.num_workers = 4               # Grain mp_prefetch workers per process (0: in-process)
  c.data.read_threads = 1              # with num_workers=0: threads building batches
  c.data.train_split = "train"
  c.data.eval_split = "val"
  c.data.eval_episodes = 1000          # in-training evaluation; final too with eval.protocol=custom
  c.data.eval_seeds = (321,)           # eval.protocol=custom: several seeds → mean ± std
  c.data.seed = 321                    # training stream and the in-training evaluation's seed
  c.data.scale = (0.9, 1.1)            # random scale range (transforms.TrainAugConfig.scale)
  c.data.rotate = (-10.0, 10.0)        # degrees
  # > 0: resize each training image so its longer side is this many pixels, before the
  # reference augmentation (transforms.TrainAugConfig.resize_longer); 0 = off, the reference
  # (PASCAL/COCO images are already ~image_size). For photos much larger than image_size.
  c.data.train_resize_longer = 0
  # True: an unreadable training record (CRC, undecodable image/label, missing feature) is
  # logged and its episode replaced deterministically (pipeline.TrainBatchFn); False: stop
  # with the shard file, record and image id.
  c.data.skip_bad_records = False
  c.data.min_class_pixels = 2 * 32 * 32
  # Stage 2 of BAM/MSANet: train on BAM's image lists, which drop every training image with a
  # novel-class pixel (True), instead of PFENet/ASGNet's relabelling of them as background.
  c.data.exclude_novel_images = False
  # Per-image models (PSPNet, the stage-1 base learner): validation images (0: the whole split).
  c.data.eval_images = 0
  # The reference yaml sets ori_resize: True (score against the original-size label);
  # False scores at image_size (cheaper; what most re-implementations report).
  c.data.original_label_eval = False

  # The reported evaluation (final_metrics.json, scripts/evaluate.py): 'custom' = the data.eval_*
  # fields above; a preset fixes episodes, seeds and label mode as the named paper's test code
  # ('asgnet', 'pfenet', 'bam', 'hsnet', 'panet'; fss_jax/train/protocols.py). In-training
  # evaluation always uses data.eval_episodes, data.seed and data.original_label_eval.
  c.eval = ml_collections.ConfigDict()
  c.eval.protocol = protocols.DEFAULT_PROTOCOL
  # Episodes drawn as TensorBoard images at every in-training evaluation (tags eval/episode_i:
  # supports with mask | query truth | query prediction, IoU in the title): the first ones of the
  # selection episodes (process 0's share with several processes), so the same episodes at
  # every evaluation; 0 = none. Display only (harmless to change on resume).
  c.eval.num_images = DEFAULT_NUM_IMAGES

  c.model = ml_collections.ConfigDict()
  c.model.name = model_name            # a key of fss_jax.models.registry.MODELS
  c.model.backbone = "resnet"          # 'resnet' (deep-stem dilated v2) | 'resnet_small' | 'vgg16_bn'
  c.model.depth = 50                   # 50 | 101 (ResNet)
  c.model.bn_mode = "frozen"           # 'frozen' | 'batch_stats' (the reference's train-mode quirk)
  c.model.backbone_dtype = "float32"   # 'float32' | 'bfloat16'
  c.model.backbone_width = 64          # 64 = ResNet-50/101; resnet_small: 16
  c.model.backbone_blocks = ()         # () = from depth; resnet_small: (1, 1, 1, 1)
  c.model.backbone_weights = ""        # ImageNet .pth (PyTorch) or .msgpack; '' = random init
  # A whole model to start training from (reference .pth/.safetensors or our .msgpack, e.g. an
  # ASGNet seeding an ASGNet + prior: scripts/import_checkpoint.py --from_asgnet); '' = none.
  c.model.init_weights = ""
  c.model.update(registry.model_config(model_name))

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 200
  c.train.total_steps = 0              # > 0 overrides epochs × steps_per_epoch
  c.train.lr = 0.025                   # effective: base_lr 0.0025 × 10 (poly_learning_rate)
  c.train.momentum = 0.9
  c.train.weight_decay = 1e-4
  c.train.poly_power = 0.9
  c.train.poly_step_offset = 1         # the reference's 1-based iteration counter
  # 'poly' (PFENet/ASGNet) or 'multistep' (PANet: lr × gamma at each of milestones, in updates)
  c.train.schedule = "poly"
  c.train.milestones = ()
  c.train.gamma = 0.1
  c.train.aux_weight = 1.0             # the FEM models' auxiliary-loss weight (BAM: meta loss)
  # The backbone's rate as a fraction of train.lr (BAM's stage 1: 0.1, encoder at base_lr and
  # PPM/classifier at 10 x base_lr); 1.0 everywhere else.
  c.train.backbone_lr_scale = 1.0
  c.train.frozen_keys = ("backbone",)  # top-level params without gradient / optimiser state
  c.train.log_every = 50               # steps
  c.train.eval_every = 0               # steps; 0: use eval_every_epochs
  c.train.eval_every_epochs = 2        # reference: every 2nd epoch when epochs > 50, else every
  c.train.checkpoint_every = 0         # steps; 0: at each evaluation and at the end
  c.train.keep_checkpoints = 3
  # Resume from a damaged newest checkpoint: True moves it to <workdir>/damaged_checkpoints/
  # (kept, logged) and resumes from the previous intact one; False stops with an error naming it.
  c.train.restore_fallback = True
  # Divergence guard before every save / "best" ranking (checkpoint.DivergenceGuard): loss and
  # parameters finite, and the global L2 norm of the trainable parameters <= this ratio x
  # max(its norm at the start of the run or at resume, 1). 0: no norm check (finiteness only).
  c.train.max_param_norm_ratio = 1e3
  c.train.select_on = "novel"          # 'novel' (reference) | 'base_heldout'
  c.train.eval_at_start = False        # evaluate the initial model too (the untrained baseline)
  c.train.seed = 321
  # Workdir guards (fss_jax/train/workdir.py): take over the lock of a run on another host (or
  # an unreadable one), and the changes from the workdir's saved config.json accepted on
  # resume (comma-separated dotted keys or groups, e.g. 'train.total_steps,train.epochs').
  c.train.break_lock = False
  c.train.accept_changes = ""
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
    if depth not in RESNET_DEPTHS:
      raise ValueError(f"Config argument depth={depth}; allowed: 50, 101.")
    if config.model.backbone == "vgg16_bn":
      raise ValueError(f"Config argument depth={depth} has no meaning with the VGG backbone.")
    config.model.depth = depth
  return config


def set_backbone(config: ml_collections.ConfigDict, family: str,
                 depth: int = 50) -> ml_collections.ConfigDict:
  """Sets ``model.backbone`` / ``depth`` / ``backbone_width`` / ``backbone_blocks`` together."""
  backbones.get(family)  # raises for an unknown family
  config.model.backbone = family
  config.model.depth = int(depth)
  small = family == "resnet_small"
  config.model.backbone_width = SMALL_WIDTH if small else 64
  config.model.backbone_blocks = SMALL_BLOCKS if small else ()
  return config


PANET_ARGS = {"fold": 0, "shot": 1, "way": 1, "align": True, "backbone": "vgg16"}
# PANet's ``backbone`` argument (the recipe configs pascal_panet / coco_panet only): 'vgg16' the
# official PANet, 'resnet50' the "blog" variant (reference_panet.md §15; ``panet_settings``).
PANET_BACKBONES = ("vgg16", "resnet50")


def panet_task(config: ml_collections.ConfigDict, args: Mapping[str, Any],
               recipe: bool = False) -> ml_collections.ConfigDict:
  """PANet's arguments (``PANET_ARGS``: fold, shot, way, align) and its transform, in place.
  ``backbone`` is applied by ``panet_settings`` (``recipe``) only: elsewhere anything but the
  default raises."""
  backbone = args.get("backbone", "vgg16")
  if backbone not in PANET_BACKBONES:
    raise ValueError(f"Config argument backbone={backbone!r}; allowed: "
                     f"{', '.join(PANET_BACKBONES)}.")
  if backbone != "vgg16" and not recipe:
    raise ValueError(f"Config argument backbone={backbone} selects PANet's blog variant in the "
                     "recipe configs (pascal_panet, coco_panet) only; this config keeps its "
                     "own backbone.")
  config.data.fold = int(args["fold"])
  config.data.shot = int(args["shot"])
  config.data.way = int(args["way"])
  config.data.transform = "panet"
  config.model.align = bool(args["align"])
  return config


def panet_settings(config: ml_collections.ConfigDict,
                   args: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """PANet's official recipe (kaixin96/PANet ``config.py``, ``train.py``; reference_panet.md
  §2, §8, §9), in place, with the parsed ``fold``, ``shot``, ``way``, ``align`` arguments:
  its VGG-16 trained whole, 417² resize + flip, batch 1 episode, SGD lr 1e-3 momentum 0.9 weight
  decay 5e-4 (biases too), ×0.1 at 10k and 20k updates (MultiStepLR), 30k updates, seed 1234,
  PAR weight 1 (``align=false``: the "w/o PAR" ablation), the 'panet' evaluation protocol.

  Class lists: PANet's per-class image lists hold every image with the class, so
  ``data.min_class_pixels`` is 1 (fss_jax's default 2048 is PFENet's). The in-training
  evaluation (every 10k updates, at PANet's snapshot steps) scores ``data.eval_episodes``
  episodes of the validation split; PANet reports its last snapshot, so ``train.select_on``
  does not matter for the final step but does pick the "best" checkpoint that
  ``scripts/evaluate.py --workdir`` reads by default (pass ``--step=latest`` for PANet's).

  ``backbone=resnet50``: the "blog" PANet (reference_panet.md §15; ``fss_jax.models.panet``):
  ``model.variant='blog'``, the deep-stem ResNet-50 (``model.backbone='resnet'``, depth 50;
  ImageNet ``resnet50_v2.pth`` as ``model.backbone_weights``, as for ASGNet) run to layer3 with
  its last ReLU dropped, layer0/layer1 frozen (``model.frozen_layers``), layer2/layer3 trained,
  BN per ``model.bn_mode`` (frozen), cosine ×10, 473² images, 1-way only. §15 shows no
  optimiser, schedule, batch size, augmentation or evaluation: those stay the official recipe's
  above (fss_jax's choice), as do PAR's weight (1) and its loss (see the model)."""
  panet_task(config, args, recipe=True)
  config.data.image_size = 417
  config.data.train_batch_size = 1
  config.data.eval_batch_size = 1
  config.data.min_class_pixels = 1
  config.data.seed = 1234
  config.train.seed = 1234
  config.eval.protocol = "panet"
  config.model.backbone = "vgg16_panet"
  config.train.frozen_keys = ()
  config.train.epochs = 0
  config.train.total_steps = 30000
  config.train.lr = 1e-3
  config.train.momentum = 0.9
  config.train.weight_decay = 5e-4
  config.train.schedule = "multistep"
  config.train.milestones = (10000, 20000, 30000)
  config.train.gamma = 0.1
  config.train.eval_every = 10000
  config.train.eval_every_epochs = 0
  config.train.checkpoint_every = 10000
  if args.get("backbone", "vgg16") == "resnet50":
    set_backbone(config, "resnet", 50)
    config.model.variant = "blog"
    config.model.frozen_layers = ("layer0", "layer1")
    config.model.scaler = 10.0
    config.data.image_size = 473
  return config


BAM_ARGS = {"fold": 0, "shot": 1, "backbone": "resnet50"}
BAM_BACKBONES = ("resnet50", "resnet101", "vgg16_bn")
# 1 + base classes of a fold (the base learner's outputs).
BAM_CLASSES = {"pascal5i": 16, "coco20i": 61, "synthetic": 16}


def parse_bam_arg(arg, defaults=BAM_ARGS) -> Dict[str, Any]:
  """``parse_arg`` for the BAM configs, with ``backbone`` checked against ``BAM_BACKBONES``."""
  args = parse_arg(arg, defaults)
  if args["backbone"] not in BAM_BACKBONES:
    raise ValueError(f"Config argument backbone={args['backbone']!r}; allowed: "
                     f"{', '.join(BAM_BACKBONES)}.")
  return args


def bam_base_settings(config: ml_collections.ConfigDict, dataset: str,
                      args: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Stage 1 of BAM/MSANet (chunbolang/BAM ``train_base.py``, ``config/*/*_base.yaml``;
  reference_msanet.md §1.1), in place: PSPNet on the fold's base classes (per-image batches),
  417² crops, RandScale [0.5, 2.0], rotation ±10°, blur, flip; the whole network trained, BN
  in batch-statistics mode (the reference's SyncBN: statistics over the global batch of 12);
  SGD momentum 0.9, weight decay 1e-4, poly 0.9 per iteration, base_lr 2.5e-4 with the
  PPM/classifier at 10× (``train.lr`` = 2.5e-3 is that effective rate): PASCAL
  ``index_split: 0`` puts the encoder at base_lr (``train.backbone_lr_scale`` 0.1), COCO's
  ``index_split: -1`` puts everything at 10× (scale 1.0); 100 epochs (PASCAL) / 20 (COCO),
  validation every epoch on the whole validation split (base-class mIoU, resized labels,
  ``fss_jax/train/semantic.py``), seed 321. ``model.backbone_weights``: the ImageNet file
  (``resnet50_v2.pth``, ``vgg16_bn``), as the reference starts from it."""
  config.data.dataset = dataset
  config.data.fold = int(args["fold"])
  family, depth = BACKBONES[args["backbone"]]
  set_backbone(config, family, depth)
  config.model.classes = BAM_CLASSES[dataset]
  config.model.bn_mode = "batch_stats"
  config.data.image_size = 417
  config.data.train_batch_size = 12
  config.data.eval_batch_size = 12
  config.data.scale = (0.5, 2.0)
  config.train.frozen_keys = ()
  config.train.lr = 2.5e-3
  config.train.backbone_lr_scale = 0.1 if dataset == "pascal5i" else 1.0
  config.train.weight_decay = 1e-4
  config.train.epochs = 100 if dataset == "pascal5i" else 20
  config.train.eval_every_epochs = 1
  return config


def bam_settings(config: ml_collections.ConfigDict, dataset: str,
                 args: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Stage 2 of BAM (chunbolang/BAM ``train.py``, ``config/*/*_split*_{resnet50,vgg}.yaml``;
  reference_msanet.md §11), in place: the frozen stage-1 PSPNet (``model.base_weights``: its
  workdir or BAM's released best.pth; required), BN frozen everywhere (fix_bn), BAM's training
  lists (images with a novel-class pixel dropped: ``data.exclude_novel_images``); batch 8,
  SGD momentum 0.9, weight decay 1e-4, base_lr 0.005 with every group at 10× (``index_split:
  -1``: ``train.lr`` 0.05), poly 0.9; PASCAL 473², scale 0.9–1.1, 200 epochs; COCO 641², scale
  0.8–1.25, 50 epochs; rotation ±10°; validation every epoch on 1000 episodes (seed 321,
  original labels); the reported evaluation is the 'bam' protocol (5 seeds × 1000 episodes)."""
  config.data.dataset = dataset
  config.data.fold = int(args["fold"])
  config.data.shot = int(args["shot"])
  family, depth = BACKBONES[args["backbone"]]
  set_backbone(config, family, depth)
  config.model.classes = BAM_CLASSES[dataset]
  config.model.bn_mode = "frozen"
  config.data.exclude_novel_images = True
  config.data.train_batch_size = 8
  config.data.eval_batch_size = 1
  config.data.eval_episodes = 1000
  config.data.original_label_eval = True
  config.eval.protocol = "bam"
  config.train.frozen_keys = ("backbone", "learner_base")
  config.train.lr = 0.05
  config.train.weight_decay = 1e-4
  config.train.eval_every_epochs = 1
  if dataset == "coco20i":
    config.data.image_size = 641
    config.data.scale = (0.8, 1.25)
    config.train.epochs = 50
  else:
    config.data.image_size = 473
    config.data.scale = (0.9, 1.1)
    config.train.epochs = 200
  return config


def synthetic_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The procedural-dataset default run (in place): 97² episodes generated on first use, a small
  ResNet trained from scratch with the head (BN in batch-statistics mode), relative FEM bins,
  1500 steps of batch 8 with frequent novel-class evaluation; trains on a 2-core CPU in minutes."""
  config.data.dataset = "synthetic"
  config.data.data_dir = "~/.cache/fss_jax/synthetic"  # expanded and generated by the trainer
  config.data.image_size = 97
  config.data.train_batch_size = 8
  config.data.eval_batch_size = 8
  config.data.num_workers = 0
  config.data.eval_episodes = 200
  config.data.min_class_pixels = 64
  config.data.synthetic = ml_collections.ConfigDict(dict(
      num_train=2000, num_val=500, source_size=128, seed=0,
      instances=False))  # True: instance maps too (box supports; another cache)
  set_backbone(config, "resnet_small")
  if "bins" in config.model:  # the FEM models' head
    config.model.bins = (1.0, 0.5, 0.25, 0.125)
    config.model.reduce_dim = 64
  config.model.bn_mode = "batch_stats"
  config.train.epochs = 0
  config.train.total_steps = 1500
  config.train.lr = 0.05
  config.train.frozen_keys = ()
  config.train.log_every = 25
  config.train.eval_every = 250
  config.train.eval_at_start = True  # logs the untrained model's score as the baseline
  config.train.eval_every_epochs = 0
  config.train.checkpoint_every = 500
  return config


def synthetic_bam_settings(config: ml_collections.ConfigDict,
                           stage: int) -> ml_collections.ConfigDict:
  """BAM's two stages on the procedural dataset (after ``synthetic_settings`` or
  ``tiny_settings``), in place. Stage 1: the PSPNet trained from scratch, whole, BN in
  batch-statistics mode, one rate for all of it (a tenth for a random backbone would only slow
  it down), a light classifier (``model.cls_dim`` 128). Stage 2: BAM on that frozen network,
  BN frozen, BAM's training lists, the same schedule as the other synthetic runs."""
  config.model.classes = BAM_CLASSES["synthetic"]
  config.model.cls_dim = 128
  if stage == 1:
    config.model.bn_mode = "batch_stats"
    config.train.frozen_keys = ()
    config.train.backbone_lr_scale = 1.0
    config.train.select_on = "novel"  # unused: per-image runs select on base-class mIoU
  else:
    config.model.bn_mode = "frozen"
    config.model.reduce_dim = 64 if config.data.image_size > 65 else 16
    config.data.exclude_novel_images = True
    config.train.frozen_keys = ("backbone", "learner_base")
  return config


def tiny_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The smallest end-to-end run (in place; tests and smoke runs): 4 steps on a tiny procedural
  dataset at 65², generated into ``data.data_dir`` (set it to a temporary directory)."""
  config.data.dataset = "synthetic"
  config.data.data_dir = ""
  config.data.image_size = 65
  config.data.train_batch_size = 2
  config.data.eval_batch_size = 2
  config.data.num_workers = 0
  config.data.eval_episodes = 4
  config.data.min_class_pixels = 16
  config.data.synthetic = ml_collections.ConfigDict(dict(
      num_train=24, num_val=12, source_size=80, seed=0, instances=False))
  set_backbone(config, "resnet_small")
  if "bins" in config.model:  # the FEM models' head
    config.model.bins = (1.0, 0.5)
    config.model.reduce_dim = 16
  config.model.bn_mode = "batch_stats"
  config.train.epochs = 0
  config.train.total_steps = 4
  config.train.lr = 0.01
  config.train.frozen_keys = ()
  config.train.log_every = 1
  config.train.eval_every = 2
  config.train.eval_every_epochs = 0
  config.train.checkpoint_every = 2
  config.train.keep_checkpoints = 2
  return config


def num_images(config) -> int:
  """``config.eval.num_images``; its default for configs saved before the field existed."""
  section = config.get("eval") if hasattr(config, "get") else None
  if section is None:
    return DEFAULT_NUM_IMAGES
  return int(section.get("num_images", DEFAULT_NUM_IMAGES))


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
  if d.eval_shot < 0:
    bad("data.eval_shot", d.eval_shot, "must be >= 1, or 0 for data.shot")
  for f in ("train_batch_size", "eval_batch_size", "eval_episodes"):
    if d[f] < 1:
      bad(f"data.{f}", d[f], "must be >= 1")
  if not d.eval_seeds:
    bad("data.eval_seeds", d.eval_seeds, "needs at least one seed")
  protocols.protocol_name(config)  # raises for an unknown config.eval.protocol
  if num_images(config) < 0:
    bad("eval.num_images", num_images(config), "must be >= 0 (0: no images)")
  registry.get(m.name)  # raises for an unknown model
  backbones.get(m.backbone)  # raises for an unknown backbone
  if m.backbone in ("resnet", "resnet_small") and m.depth not in RESNET_DEPTHS:
    bad("model.depth", m.depth, "must be 50 or 101")
  if m.bn_mode not in ("frozen", "batch_stats"):
    bad("model.bn_mode", m.bn_mode, "must be 'frozen' or 'batch_stats'")
  if m.backbone_width < 1 or m.backbone_width % 4:
    bad("model.backbone_width", m.backbone_width, "must be a positive multiple of 4")
  if len(m.backbone_blocks) not in (0, 4) or any(int(b) < 1 for b in m.backbone_blocks):
    bad("model.backbone_blocks", m.backbone_blocks, "must be () or four counts >= 1")
  if m.backbone_dtype not in backbones.DTYPES:
    bad("model.backbone_dtype", m.backbone_dtype, f"must be one of {sorted(backbones.DTYPES)}")
  if d.get("way", 1) < 1:
    bad("data.way", d.way, "must be >= 1")
  if d.get("way", 1) > 1 and not getattr(registry.get(m.name), "N_WAY", False):
    bad("data.way", d.way, f"model {m.name!r} is 1-way (N-way episodes: model.name='panet')")
  if m.name == "panet":
    from fss_jax.models import panet  # pylint: disable=g-import-not-at-top
    try:
      panet.check_variant(m.variant, d.get("way", 1), m.frozen_layers)
    except ValueError as e:
      bad("model.variant", m.variant, str(e))
    if m.variant == "blog" and m.backbone not in ("resnet", "resnet_small"):
      bad("model.backbone", m.backbone, "PANet variant 'blog' runs the deep-stem ResNet "
          "('resnet' or 'resnet_small')")
  if d.get("support_annotation", "dense") not in ("dense", "box", "scribble"):
    bad("data.support_annotation", d.support_annotation, "must be 'dense', 'box' or 'scribble'")
  transform = d.get("transform", "fss")
  if transform not in ("fss", "panet"):
    bad("data.transform", transform, "must be 'fss' or 'panet'")
  if transform == "panet" and (d.original_label_eval
                               or protocols.protocol_settings(config).original_label):
    bad("data.transform", transform, "scores resized labels only (its resize does not keep "
        "the aspect); set data.original_label_eval=False and a resized-label protocol")
  if t.get("schedule", "poly") not in ("poly", "multistep"):
    bad("train.schedule", t.schedule, "must be 'poly' or 'multistep'")
  if t.select_on not in ("novel", "base_heldout"):
    bad("train.select_on", t.select_on, "must be 'novel' or 'base_heldout'")
  if t.total_steps <= 0 and t.epochs <= 0:
    bad("train.total_steps", t.total_steps, "set total_steps > 0 or epochs > 0")
  if t.keep_checkpoints < 1:
    bad("train.keep_checkpoints", t.keep_checkpoints, "must be >= 1")
  if not t.get("max_param_norm_ratio", 0) >= 0:
    bad("train.max_param_norm_ratio", t.max_param_norm_ratio, "must be >= 0 (0: no norm check)")


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


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a ``train.py`` run saved in ``workdir/config.json``."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir} has no config.json (is it a train.py run directory?)")
  with open(path, encoding="utf-8") as f:
    try:
      saved = json.load(f)
    except ValueError as e:
      raise ValueError(f"{path}: not a valid JSON config: {e}") from e
  if not isinstance(saved, dict):
    raise ValueError(f"{path}: not a config (a JSON object expected)")
  name = (saved.get("model") or {}).get("name", "asgnet")
  try:
    config = base_config(name)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from e
  _overlay(config, saved)
  return config


def _overlay(config: ml_collections.ConfigDict, saved: dict) -> None:
  """Sets ``saved``'s values into ``config`` recursively. Fields a run saved before they existed
  keep their defaults (the value an older run had in effect: a new field's default is the old
  behaviour, the same rule as ``train/workdir.py``'s resume check); saved fields unknown here
  are kept as saved."""
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
      _overlay(config[key], value)
      continue
    try:
      config[key] = value
    except (TypeError, KeyError):  # another type than the default's (e.g. None): as saved
      with config.unlocked():
        if key in config:
          del config[key]
        config[key] = value
