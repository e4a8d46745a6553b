"""PSPNet, BAM's stage-1 base learner (reference_msanet.md §1.1; chunbolang/BAM ``model/PSPNet.py``).

Ordinary semantic segmentation on a fold's base classes (not episodic):
  image (B,H,W,3) → backbone layer0..layer4 (the deep-stem dilated ResNet or the VGG16-bn cut)
  → PPM: for each bin in (1, 2, 3, 6): adaptive average pool → 1x1 conv (fea_dim → fea_dim/4, no
    bias) → BN → ReLU → bilinear (align_corners) back; concat [x, p1, p2, p3, p6] (2·fea_dim)
  → cls: 3x3 conv (2·fea_dim → 512, no bias) → BN → ReLU → Dropout2d(0.1) → 1x1 conv (→ C, bias)
  → bilinear (align_corners) to (H−1)/8·8+1.
C = 1 + number of base classes (PASCAL 16, COCO 61): label c = the c-th base class (ascending
ids), 0 background and novel classes (``fss_jax/data/pipeline.py``, the per-image batches).
The whole network trains, BN included (batch statistics over the global batch, as the
reference's SyncBN); the reference's optimiser gives the backbone a tenth of the head's rate
(``train.backbone_lr_scale``).

The PPM and classifier are shared with BAM/MSANet, which keep them frozen as ``learner_base``
(an ``nn.Sequential(ppm, cls)``: ``BaseLearner``). Parameter names mirror the official module
paths: ``ppm/features_0_1`` is ``ppm.features.0.1``, ``cls_4`` is ``cls.4``;
``learner_base/0/features_0_1`` and ``learner_base/1_4`` are BAM's.

The official checkpoint holds every backbone tensor twice, as ``layerN.*`` and as
``encoder.N.*`` (the same modules registered again in an ``nn.Sequential``): ``torch_aliases``
says so, and the checkpoint reader checks that both copies agree; export writes both.
"""
import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fss_jax.models import backbones
from fss_jax.models import fem as fem_lib
from fss_jax.models import losses
from fss_jax.models import ops
from fss_jax.models import resnet

BINS = (1, 2, 3, 6)
CLS_DIM = 512
# Official checkpoint: encoder.i is the same module as layer{i}.
ENCODER_ALIASES = tuple((f"encoder.{i}.", f"layer{i}.") for i in range(5))


class PPM(nn.Module):
  """Pyramid pooling (``model/PPM.py``): (B,h,w,C) → (B,h,w,C + len(bins)·reduction_dim).

  Adaptive pooling follows PyTorch's overlapping-window rule when h is not a multiple of a bin
  (``ops.adaptive_avg_pool``).
  """
  reduction_dim: int
  bins: Sequence[int] = BINS

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    h, w = x.shape[1:3]
    out = [x]
    for i, b in enumerate(self.bins):
      y = ops.adaptive_avg_pool(x, (int(b), int(b)))
      y = fem_lib.conv(self.reduction_dim, 1, f"features_{i}_1")(y)
      y = resnet.TorchBatchNorm(dtype=y.dtype, name=f"features_{i}_2")(y, use_running_average)
      out.append(ops.resize_bilinear_ac(nn.relu(y), (h, w)))
    return jnp.concatenate(out, axis=-1)


def classifier(x: jax.Array, prefix: str, classes: int, hidden: int, *,
               use_running_average: bool, deterministic: bool) -> jax.Array:
  """PSPNet's ``cls``: (B,h,w,C) → (B,h,w,classes). Modules ``{prefix}_0`` (3x3 conv),
  ``{prefix}_1`` (BN), ``{prefix}_4`` (1x1 conv with bias), created in the caller's scope."""
  x = fem_lib.conv(hidden, 3, f"{prefix}_0")(x)
  x = resnet.TorchBatchNorm(dtype=x.dtype, name=f"{prefix}_1")(x, use_running_average)
  x = ops.Dropout2d(0.1)(nn.relu(x), deterministic=deterministic)
  return fem_lib.conv(classes, 1, f"{prefix}_4", bias=True)(x)


class BaseLearner(nn.Module):
  """BAM's ``learner_base = nn.Sequential(ppm, cls)``: layer4 (B,h,w,C) → (B,h,w,classes)
  logits. Children ``0`` (the PPM) and ``1_0``, ``1_1``, ``1_4`` (the classifier)."""
  classes: int
  bins: Sequence[int] = BINS
  hidden: int = CLS_DIM

  @nn.compact
  def __call__(self, feat: jax.Array, *, use_running_average: bool,
               deterministic: bool) -> jax.Array:
    x = PPM(feat.shape[-1] // len(self.bins), tuple(self.bins), name="0")(
        feat, use_running_average)
    return classifier(x, "1", self.classes, self.hidden,
                      use_running_average=use_running_average, deterministic=deterministic)


def output_size(size: int) -> int:
  """The reference's output side for an input side: (size − 1) // 8 · 8 + 1 (zoom 8)."""
  return (size - 1) // 8 * 8 + 1


class PSPNet(nn.Module):
  """PSPNet on a backbone (per-image semantic segmentation; the stage-1 base learner).

  Attributes:
    backbone: the backbone module (``fss_jax.models.backbones``): the deep-stem ResNet or
      VGG16-bn.
    classes: C = 1 + base classes (PASCAL-5i 16, COCO-20i 61).
    bins: PPM bins.
    hidden: the classifier's width (512).
    bn_batch_stats: BN (backbone, PPM, classifier) in batch-statistics mode in training, as
      the reference trains it (SyncBN: statistics over the global batch). False: frozen BN.
    train_backbone: gradients reach the backbone (the reference fine-tunes it all).
  """
  # The model-family contract (fss_jax/models/registry.py): per-image batches.
  inputs = ("image",)
  targets = ("label",)
  torch_order = ("encoder", "ppm", "cls")
  torch_aliases = ENCODER_ALIASES
  task = "semantic"

  backbone: nn.Module = dataclasses.field(default_factory=resnet.ResNet)
  classes: int = 16
  bins: Sequence[int] = BINS
  hidden: int = CLS_DIM
  bn_batch_stats: bool = True
  train_backbone: bool = True

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool,
               deterministic: Optional[bool] = None) -> dict:
    """image (B,H,W,3) normalised, H = W = 8k+1 → {'logits' (B,H',W',C) at H' = (H−1)//8·8+1,
    'base_logits' (B,h,w,C) before the upsampling, 'feat' (B,h,w,fea_dim) layer4, 'ppm'
    (B,h,w,2·fea_dim)}."""
    deterministic = (not train) if deterministic is None else deterministic
    running = not (train and self.bn_batch_stats)
    feat = self.backbone(image, use_running_average=running, upto="layer4")["layer4"]
    feat = feat.astype(jnp.promote_types(feat.dtype, jnp.float32))
    if not self.train_backbone:
      feat = jax.lax.stop_gradient(feat)
    x = PPM(feat.shape[-1] // len(self.bins), tuple(self.bins), name="ppm")(feat, running)
    logits = classifier(x, "cls", self.classes, self.hidden, use_running_average=running,
                        deterministic=deterministic)
    out_hw = (output_size(image.shape[1]), output_size(image.shape[2]))
    return {"logits": ops.resize_bilinear_ac(logits, out_hw), "base_logits": logits,
            "feat": feat, "ppm": x}

  def loss(self, out: dict, batch: dict) -> tuple[jax.Array, dict]:
    """The reference's loss: CE (ignore 255) of the upsampled logits → (total, {'main_loss'})."""
    main = losses.cross_entropy_ignore(out["logits"], batch["label"])
    return main, {"main_loss": main}


# ----------------------------------------------------------------------------- config


def model_config() -> ml_collections.ConfigDict:
  """PSPNet's own ``config.model`` fields (besides the backbone fields every model has)."""
  return ml_collections.ConfigDict(dict(
      classes=16,        # 1 + base classes: PASCAL-5i 16, COCO-20i 61 (checked against the data)
      ppm_bins=BINS,     # PPM bins
      cls_dim=CLS_DIM,   # the classifier's hidden width
  ))


def from_config(config) -> PSPNet:
  """The PSPNet of ``config.model``; it trains its backbone unless ``train.frozen_keys`` has
  'backbone', with batch-statistics BN when ``model.bn_mode == 'batch_stats'``."""
  m = config.model
  return PSPNet(**backbones.model_fields(config), classes=int(m.classes),
                bins=tuple(int(b) for b in m.ppm_bins), hidden=int(m.cls_dim))
