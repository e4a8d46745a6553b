"""PANet (Wang et al., ICCV 2019): prototypes by masked average pooling, cosine scores, and the
prototype alignment regularisation (PAR). The official code is kaixin96/PANet
(``models/fewshot.py`` ``FewShotSeg``, ``models/vgg.py`` ``Encoder``); reference_panet.md §5–7.

One batch of N-way K-shot episodes (one query each) flows as:
  query (B,H,W,3), supports (B,N·K,H,W,3) way-major (support i: way i // K, shot i % K),
  support labels (B,N·K,H,W) relative to the support's own way (1 fg, 0 bg, 255 void, 254
  neither; the N-way batch contract)
  → the encoder once on every image (``vgg16_panet``'s layer4 = the official ``Encoder``
    output, 512 ch, stride 8), trained as a whole
  → per (way, shot): fg / bg vectors = masked average of the features bilinearly upsampled
    (align_corners=False) to the mask size, Σ F↑·M / (Σ M + 1e-5) (``getFeatures``), with
    fg = (label == 1), bg = (label == 0) | (label == 255) (``getMask``: void is background;
    254 is neither)
  → prototypes: fg of way w = mean over its shots; bg = mean over ways of the mean over shots
  → scores (B,h,w,1+N) = scaler · cos(query feature, [bg, fg_1..fg_N]) at feature resolution
  → logits (B,H,W,1+N): the scores upsampled bilinearly (align_corners=False).
  In training with ``align``: PAR (``alignLoss``, ``_par``) from the argmax of the scores.

Exactness notes (what differs from the official code in how, never in what, it computes):
  * The upsampled support features (N·K maps of H×W×512) are never built: bilinear upsampling
    is linear, so Σ_x F↑(x)·M(x) = Σ_q F(q)·(Uₕᵀ M U_w)(q) with Uₕ (H,h), U_w (W,w) the
    align_corners=False interpolation matrices (``ops.bilinear_matrix``); the same value up to
    float rounding (reference §5), contracted at Precision.HIGHEST.
  * The cosine is current PyTorch's ``F.cosine_similarity`` (each norm clamped to ≥ 1e-8; the
    official PyTorch 1.0.1 clamped the product of the squared norms at 1e-16): the two differ
    only for vectors of norm < 1e-8; both give 0 for the zero prototype of an empty mask.
  * PAR's per-(way, shot) cross-entropy is 0 when every support pixel is ignored (a support of
    254 pixels only): the official ``F.cross_entropy`` gives NaN there
    (``losses.cross_entropy_ignore``).
  * Skipped ways (no query pixel predicted as theirs) are computed and masked out with
    ``jnp.where`` (fixed shapes, jit-friendly) instead of being skipped by a Python ``if``; their
    terms and gradients are exactly 0, as in the official code, and they still count in 1/N.
  * One query per episode (the official code takes N_q; every released setting uses 1).

The "blog" variant (``variant='blog'``; ``configs/pascal_panet.py:backbone=resnet50``) is the
PyTorch PANet of a 2023 write-up this project started from (reference_panet.md §15, right
column), 1-way only; its oracle is tests/torch_panet_blog_ref.py. Per batch of 1-way K-shot
episodes:
  → encoder: the deep-stem ResNet-50 (``backbone='resnet'``, depth 50, ImageNet
    ``resnet50_v2.pth``) layer0..layer3 (layer4 never runs), layer3 dilated 2, stride 8, the last
    block of layer3 without its final ReLU (``resnet.ResNet(layer3_last_relu=False)``), 1024 ch;
    the layers in ``frozen_layers`` (layer0, layer1) run without gradient (stop_gradient on
    layer1's output; the optimiser leaves their parameters as they are,
    ``optim.make_optimizer``), layer2 and layer3 train. BN follows ``model.bn_mode``.
  → masked average pooling with the MASK resized to the feature size (bilinear,
    align_corners=True): p = Σ f·m / (Σ m + 1e-5), fg = (label == 1), bg = (label == 0) (255
    and 254 are neither, unlike ``getMask``)
  → prototypes: fg and bg each the mean over shots
  → scores = scaler · cos(query feature, [bg, fg]) (scaler 10 in its configs), logits bilinear
    (align_corners=True) to the input size.
  PAR (``blog_par``, computed in ``loss`` from the returned ``query_feat`` / ``supp_feat`` and
  the batch's labels, so the model's inputs stay the same): query prototypes from the query's
  ground-truth mask (== 1 / == 0, resized as the support masks), each support scored against
  them (scaler · cos, upsampled align_corners=True). The write-up does not show the loss on
  these scores; fss_jax's choice: CE against the support label (fg 1, bg 0, 255 and 254
  ignored), each support's mean over its counted pixels, averaged over shots and episodes,
  weighted by ``align_weight``; only when ``align``. The query loss is the official one.

Parameters: only the encoder's (``backbone``; 14,714,688 with ``vgg16_panet``), named in
PyTorch as the official model's ``encoder.backbone.features.{block}.{index}.{weight,bias}``
(``torch_backbone_prefix``; the official snapshots add ``module.``, which the importer strips and
``scripts/export_torch.py --reference_wrapping`` writes).
"""
import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fss_jax.models import backbones
from fss_jax.models import losses
from fss_jax.models import ops
from fss_jax.models import resnet
from fss_jax.models import vgg

# This model takes N-way episodes (config.data.way > 1; configs_lib.validate_config).
N_WAY = True
VARIANTS = ("official", "blog")
MAP_EPS = 1e-5  # getFeatures' and alignLoss' pooling denominators: Σ M + 1e-5
COS_EPS = 1e-8  # F.cosine_similarity's default eps
_HIGHEST = jax.lax.Precision.HIGHEST


class PANet(nn.Module):
  """PANet: N-way K-shot prototype matching with prototype alignment (module docstring).

  Attributes:
    backbone: the encoder (``fss_jax.models.backbones``); its ``layer4`` is the feature map.
      Default (and official) ``vgg.VGG16PANet``.
    way: N, the number of ways of every episode (``config.data.way``); the supports hold N·K
      images, way-major.
    scaler: the cosine's scale (20, ``calDist``).
    align: PAR in training (``model.align``; True for the paper's PANet, False for its "w/o PAR"
      ablation). Never in evaluation.
    align_weight: PAR's weight in ``loss`` (``align_loss_scaler``, 1).
    train_backbone: gradients reach the encoder (default True: PANet trains its whole encoder;
      from a config, True unless ``train.frozen_keys`` holds 'backbone'). False leaves nothing to
      train.
    bn_batch_stats: for a backbone with BatchNorm (not PANet's VGG): in training, BN uses batch
      statistics, the supports and the query as two BN batches. Default False: frozen BN.
    variant: 'official' (kaixin96/PANet) or 'blog' (the deep-stem ResNet-50 PANet of
      reference_panet.md §15; module docstring): 1-way, a ``resnet.ResNet`` backbone with
      ``layer3_last_relu=False``, PAR in ``loss``.
    frozen_layers: 'blog' only: the leading backbone layers run without gradient (a prefix of
      layer0..layer3, e.g. ('layer0', 'layer1')); () in the official variant.
  """
  # The model-family contract (fss_jax/models/registry.py).
  inputs = ("query", "supp_images", "supp_labels")
  targets = ("query_label",)
  # The official module tree above the encoder: FewShotSeg.encoder = Sequential(backbone=Encoder).
  # PANet has no head modules.
  torch_order = ("encoder", "backbone")
  # The backbone's 'model'-scheme names (features.6.2) sit under this in the official state_dict
  # (fss_jax/weights.py); the official snapshots are DataParallel's state_dict as it is: 'module.'
  # + key, no {'state_dict': ...} wrapper (scripts/export_torch.py --reference_wrapping).
  torch_backbone_prefix = "encoder.backbone."
  torch_reference_wrapping = "module"

  backbone: nn.Module = dataclasses.field(default_factory=vgg.VGG16PANet)
  way: int = 1
  scaler: float = 20.0
  align: bool = True
  align_weight: float = 1.0
  train_backbone: bool = True
  bn_batch_stats: bool = False
  variant: str = "official"
  frozen_layers: tuple = ()

  @nn.compact
  def __call__(self, query: jax.Array, supp_images: jax.Array, supp_labels: jax.Array, *,
               train: bool, deterministic: Optional[bool] = None) -> dict:
    """Forward pass of a batch of N-way K-shot episodes.

    Args:
      query: (B,H,W,3) normalised query images, H = W = 8k+1.
      supp_images: (B,N·K,H,W,3) normalised support images, way-major.
      supp_labels: (B,N·K,H,W) support labels relative to their way: 1 fg, 0 background, 255
        void (background here, as the official ``getMask``), 254 neither.
      train: training mode: PAR runs when ``align``.
      deterministic: unused (PANet has no dropout); accepted for the model contract.
    Returns:
      dict with ``logits`` (B,H,W,1+N) (channel 0 background, channel j way j−1),
      ``align_loss`` (scalar; 0 unless PAR ran), and for inspection: ``scores`` (B,h,w,1+N) the
      feature-resolution scores, ``fg_prototypes`` (B,N,C), ``bg_prototype`` (B,C),
      ``supp_fg`` / ``supp_bg`` (B,N,K,C) the per-shot masked averages, ``query_feat``
      (B,h,w,C), ``supp_feat`` (B,N,K,h,w,C); when PAR runs also ``qry_prototypes``
      (B,1+N,C) (channel order as the logits), ``par_skipped`` (B,N) bool (the way has no
      predicted query pixel) and ``par_ce`` (B,N,K) the support cross-entropies (0 for a
      skipped way, as the official code records none).
    """
    del deterministic
    b, big_h, big_w, _ = query.shape
    ops.check_episode_inputs(query, supp_images, supp_labels)
    check_variant(self.variant, self.way, self.frozen_layers, self.backbone)
    if self.variant == "blog":
      return self._blog(query, supp_images, supp_labels, train)
    nk = supp_images.shape[1]
    n = int(self.way)
    if n < 1 or nk % n:
      raise ValueError(f"PANet with way = {n}: supp_images holds {nk} supports per episode, "
                       f"which is not a positive multiple of the way (N·K supports, way-major)")
    k = nk // n

    # ---- Encoder: one call on every support and the query (the official concatenation) ----
    batch_stats = train and self.bn_batch_stats
    supp_flat = supp_images.reshape((b * nk,) + supp_images.shape[2:])
    outs = backbones.run(self.backbone, [supp_flat, query], batch_stats=batch_stats,
                         upto="layer4")
    feats = [o["layer4"] for o in outs]
    dtype = jnp.promote_types(feats[0].dtype, jnp.float32)  # the head in at least float32
    feats = [f.astype(dtype) for f in feats]
    if not self.train_backbone:
      feats = [jax.lax.stop_gradient(f) for f in feats]
    supp_feat, query_feat = feats
    h, w, c = query_feat.shape[1:]
    supp_feat = supp_feat.reshape((b, n, k, h, w, c))

    # ---- Masked average pooling of the (virtually) upsampled features, per way and shot ----
    labels = supp_labels.reshape((b, n, k, big_h, big_w))
    fg = (labels == 1).astype(dtype)
    bg = ((labels == 0) | (labels == losses.IGNORE_INDEX)).astype(dtype)
    supp_fg = upsampled_masked_average(supp_feat, fg)  # (B,N,K,C)
    supp_bg = upsampled_masked_average(supp_feat, bg)

    # ---- Prototypes (getPrototype) and scores (calDist) ----
    fg_prototypes = jnp.sum(supp_fg, axis=2) / k  # (B,N,C)
    bg_prototype = jnp.sum(jnp.sum(supp_bg, axis=2) / k, axis=1) / n  # (B,C)
    prototypes = jnp.concatenate([bg_prototype[:, None], fg_prototypes], axis=1)  # (B,1+N,C)
    scores = self.scaler * jnp.einsum("bhwc,bjc->bhwj", _unit(query_feat), _unit(prototypes),
                                      precision=_HIGHEST)
    out = {
        "logits": ops.resize_bilinear(scores, (big_h, big_w)),
        "scores": scores,
        "fg_prototypes": fg_prototypes,
        "bg_prototype": bg_prototype,
        "supp_fg": supp_fg,
        "supp_bg": supp_bg,
        "query_feat": query_feat,
        "supp_feat": supp_feat,
        "align_loss": jnp.zeros((), dtype),
    }
    if train and self.align:
      out.update(self._par(scores, query_feat, supp_feat, labels))
    return out

  def _par(self, scores, query_feat, supp_feat, labels) -> dict:
    """The official ``alignLoss`` for every episode, averaged over the batch (reference §6)."""
    b, n, k, h, w, c = supp_feat.shape
    big_h, big_w = labels.shape[-2:]
    # Query masks from the argmax of the feature-resolution scores (ties: the first channel, as
    # torch.argmax); constants.
    pred = jax.nn.one_hot(jnp.argmax(scores, axis=-1), 1 + n, dtype=scores.dtype)  # (B,h,w,1+N)
    pred = jax.lax.stop_gradient(pred)
    count = jnp.sum(pred, axis=(1, 2))  # (B,1+N)
    skipped = count[:, 1:] == 0  # (B,N): no query pixel predicted as the way
    qry_prototypes = jnp.einsum("bhwc,bhwj->bjc", query_feat, pred, precision=_HIGHEST)
    qry_prototypes = qry_prototypes / (count[..., None] + MAP_EPS)  # (B,1+N,C)

    # Each support against [q_bg, q_fg of its own way]: binary logits at feature resolution.
    unit_q = _unit(qry_prototypes)
    unit_s = _unit(supp_feat)
    cos_bg = jnp.einsum("bnkhwc,bc->bnkhw", unit_s, unit_q[:, 0], precision=_HIGHEST)
    cos_fg = jnp.einsum("bnkhwc,bnc->bnkhw", unit_s, unit_q[:, 1:], precision=_HIGHEST)
    supp_pred = self.scaler * jnp.stack([cos_bg, cos_fg], axis=-1)  # (B,N,K,h,w,2)
    supp_pred = ops.resize_bilinear(supp_pred.reshape((b * n * k, h, w, 2)), (big_h, big_w))
    # Support target: 255, then 1 on the fg mask, then 0 on the bg mask (void included).
    fg = labels == 1
    bg = (labels == 0) | (labels == losses.IGNORE_INDEX)
    target = jnp.where(bg, 0, jnp.where(fg, 1, losses.IGNORE_INDEX)).astype(jnp.int32)
    ce = jax.vmap(lambda x, y: losses.cross_entropy_ignore(x[None], y[None]))(
        supp_pred, target.reshape((b * n * k, big_h, big_w))).reshape((b, n, k))
    ce = jnp.where(skipped[..., None], jnp.zeros_like(ce), ce)
    per_episode = jnp.sum(ce / k / n, axis=(1, 2))
    return {"align_loss": jnp.sum(per_episode) / b, "qry_prototypes": qry_prototypes,
            "par_skipped": skipped, "par_ce": ce}

  def _blog(self, query, supp_images, supp_labels, train: bool) -> dict:
    """The blog variant's forward (module docstring); PAR is in ``loss`` (``blog_par``)."""
    b, big_h, big_w, _ = query.shape
    k = supp_images.shape[1]
    batch_stats = train and self.bn_batch_stats
    supp_flat = supp_images.reshape((b * k,) + supp_images.shape[2:])
    groups = [supp_flat, query]
    if self.frozen_layers:
      last = self.frozen_layers[-1]
      outs = backbones.run(self.backbone, groups, batch_stats=batch_stats, upto=last)
      groups = [jax.lax.stop_gradient(o[last]) for o in outs]
      start = resnet.LAYERS[len(self.frozen_layers)]
    else:
      start = "layer0"
    outs = backbones.run(self.backbone, groups, batch_stats=batch_stats, start=start,
                         upto="layer3")
    feats = [o["layer3"] for o in outs]
    dtype = jnp.promote_types(feats[0].dtype, jnp.float32)
    feats = [f.astype(dtype) for f in feats]
    if not self.train_backbone:
      feats = [jax.lax.stop_gradient(f) for f in feats]
    supp_feat, query_feat = feats
    h, w, c = query_feat.shape[1:]
    supp_feat = supp_feat.reshape((b, k, h, w, c))
    supp_fg = resized_mask_average(supp_feat, supp_labels == 1)  # (B,K,C)
    supp_bg = resized_mask_average(supp_feat, supp_labels == 0)
    fg_prototype = jnp.sum(supp_fg, axis=1) / k  # (B,C)
    bg_prototype = jnp.sum(supp_bg, axis=1) / k
    prototypes = jnp.stack([bg_prototype, fg_prototype], axis=1)  # (B,2,C)
    scores = self.scaler * jnp.einsum("bhwc,bjc->bhwj", _unit(query_feat), _unit(prototypes),
                                      precision=_HIGHEST)
    return {
        "logits": ops.resize_bilinear_ac(scores, (big_h, big_w)),
        "scores": scores,
        "fg_prototypes": fg_prototype[:, None],
        "bg_prototype": bg_prototype,
        "supp_fg": supp_fg[:, None],
        "supp_bg": supp_bg[:, None],
        "query_feat": query_feat,
        "supp_feat": supp_feat[:, None],
    }

  def loss(self, out: dict, batch: dict) -> tuple[jax.Array, dict]:
    """The official training loss: CE(logits, query label; ignore 255, mean over the batch's
    non-ignored pixels) + align_weight · PAR. Returns (total, {'query_loss', 'align_loss'}).
    The blog variant: the same query CE, PAR from ``blog_par`` (0 unless ``align``)."""
    query_loss = losses.cross_entropy_ignore(out["logits"], batch["query_label"])
    if self.variant == "blog":
      align_loss = (blog_par(out["query_feat"], out["supp_feat"][:, 0], batch["query_label"],
                             batch["supp_labels"], self.scaler)["align_loss"]
                    if self.align else jnp.zeros((), query_loss.dtype))
    else:
      align_loss = out["align_loss"]
    return query_loss + self.align_weight * align_loss, {"query_loss": query_loss,
                                                         "align_loss": align_loss}


def _unit(x: jax.Array) -> jax.Array:
  """x / max(‖x‖, 1e-8) along the last axis, with PyTorch's gradient (``ops.normalize_l2``):
  the dot product of two such vectors is current PyTorch's ``F.cosine_similarity``."""
  return ops.normalize_l2(x, axis=-1, eps=COS_EPS)


def upsampled_masked_average(feat: jax.Array, mask: jax.Array,
                             eps: float = MAP_EPS) -> jax.Array:
  """The official ``getFeatures``: features bilinearly upsampled (align_corners=False) to the
  mask size, then Σ F↑·M / (Σ M + eps), without building the upsampled features.

  Args:
    feat: (..., h, w, C) features.
    mask: (..., H, W) masks (same leading shape).
  Returns:
    (..., C). Computed as Σ_q F(q)·(Uₕᵀ M U_w)(q) / (Σ M + eps), Uₕ (H,h) and U_w (W,w) the
    interpolation matrices: the same linear map, up to float rounding.
  """
  h, w = feat.shape[-3:-1]
  big_h, big_w = mask.shape[-2:]
  if feat.shape[:-3] != mask.shape[:-2]:
    raise ValueError(f"upsampled_masked_average: feat {feat.shape} and mask {mask.shape} must "
                     "share their leading shape")
  mask = mask.astype(feat.dtype)
  uh = jnp.asarray(ops.bilinear_matrix(h, big_h), feat.dtype)  # (H,h)
  uw = jnp.asarray(ops.bilinear_matrix(w, big_w), feat.dtype)  # (W,w)
  weight = jnp.einsum("...HW,Ww->...Hw", mask, uw, precision=_HIGHEST)
  weight = jnp.einsum("...Hw,Hh->...hw", weight, uh, precision=_HIGHEST)
  total = jnp.einsum("...hwc,...hw->...c", feat, weight, precision=_HIGHEST)
  return total / (jnp.sum(mask, axis=(-2, -1))[..., None] + eps)


def resized_mask_average(feat: jax.Array, mask: jax.Array, eps: float = MAP_EPS) -> jax.Array:
  """The blog variant's masked average pooling: the mask resized to the feature size (bilinear,
  align_corners=True), then Σ f·m / (Σ m + eps) over the feature map.

  Args:
    feat: (..., h, w, C) features.
    mask: (..., H, W) bool or 0/1 masks (same leading shape).
  Returns:
    (..., C).
  """
  lead, (h, w, c) = feat.shape[:-3], feat.shape[-3:]
  if mask.shape[:-2] != lead:
    raise ValueError(f"resized_mask_average: feat {feat.shape} and mask {mask.shape} must "
                     "share their leading shape")
  m = mask.astype(feat.dtype).reshape((-1,) + mask.shape[-2:] + (1,))
  m = ops.resize_bilinear_ac(m, (h, w)).reshape(lead + (h, w))
  total = jnp.einsum("...hwc,...hw->...c", feat, m, precision=_HIGHEST)
  return total / (jnp.sum(m, axis=(-2, -1))[..., None] + eps)


def blog_par(query_feat: jax.Array, supp_feat: jax.Array, query_label: jax.Array,
             supp_labels: jax.Array, scaler: float) -> dict:
  """The blog variant's PAR (module docstring).

  Args:
    query_feat: (B,h,w,C); supp_feat: (B,K,h,w,C); query_label: (B,H,W) (1 fg, 0 bg, other
      values neither); supp_labels: (B,K,H,W) (1 fg, 0 bg, 255 / 254 ignored).
  Returns:
    ``align_loss`` (scalar: the per-support CE averaged over shots, then episodes),
    ``qry_prototypes`` (B,2,C) [bg, fg] from the query's ground truth, ``par_ce`` (B,K).
  """
  b, k, h, w, c = supp_feat.shape
  big_h, big_w = supp_labels.shape[-2:]
  qry_prototypes = jnp.stack([resized_mask_average(query_feat, query_label == 0),
                              resized_mask_average(query_feat, query_label == 1)], axis=1)
  supp_pred = scaler * jnp.einsum("bkhwc,bjc->bkhwj", _unit(supp_feat), _unit(qry_prototypes),
                                  precision=_HIGHEST)  # (B,K,h,w,2)
  supp_pred = ops.resize_bilinear_ac(supp_pred.reshape((b * k, h, w, 2)), (big_h, big_w))
  target = jnp.where(supp_labels == 1, 1,
                     jnp.where(supp_labels == 0, 0, losses.IGNORE_INDEX)).astype(jnp.int32)
  ce = jax.vmap(lambda x, y: losses.cross_entropy_ignore(x[None], y[None]))(
      supp_pred, target.reshape((b * k, big_h, big_w))).reshape((b, k))
  return {"align_loss": jnp.sum(jnp.sum(ce, axis=1) / k) / b, "qry_prototypes": qry_prototypes,
          "par_ce": ce}


def check_variant(variant: str, way: int, frozen_layers, backbone=None) -> None:
  """Raises ValueError for an unknown variant or a combination the variant does not define."""
  if variant not in VARIANTS:
    raise ValueError(f"PANet variant {variant!r}: must be one of {VARIANTS}")
  frozen_layers = tuple(frozen_layers)
  if variant == "official":
    if frozen_layers:
      raise ValueError(f"PANet variant 'official' trains its whole encoder; frozen_layers = "
                       f"{frozen_layers} is for variant 'blog' (use train.frozen_keys)")
    return
  if way != 1:
    raise ValueError(f"PANet variant 'blog' is 1-way (reference_panet.md §15 defines no N-way "
                     f"background); got way = {way}")
  if frozen_layers != resnet.LAYERS[:len(frozen_layers)] or len(frozen_layers) > 3:
    raise ValueError(f"PANet variant 'blog': frozen_layers = {frozen_layers} must be a prefix "
                     "of layer0, layer1, layer2 (its encoder is layer0..layer3)")
  if backbone is not None and (not isinstance(backbone, resnet.ResNet)
                               or backbone.layer3_last_relu):
    raise ValueError("PANet variant 'blog' needs the deep-stem ResNet (model.backbone 'resnet' "
                     "or 'resnet_small') with layer3_last_relu=False (panet.from_config sets it)")


# ----------------------------------------------------------------------------- config


def model_config() -> ml_collections.ConfigDict:
  """PANet's own ``config.model`` fields (besides the backbone fields every model has; PANet's
  configs set ``model.backbone = 'vgg16_panet'`` and ``train.frozen_keys = ()``). The way is
  ``config.data.way``."""
  return ml_collections.ConfigDict(dict(
      scaler=20.0,        # cosine scale (calDist; the blog variant's configs: 10)
      align=True,         # PAR in training (False: the paper's "w/o PAR")
      align_weight=1.0,   # PAR's weight in the loss (align_loss_scaler)
      variant="official",  # 'official' (kaixin96/PANet) | 'blog' (reference_panet.md §15)
      # 'blog' only: leading backbone layers run without gradient and left unchanged by the
      # optimiser (its configs: ('layer0', 'layer1')); () for 'official'
      frozen_layers=(),
  ))


def from_config(config) -> PANet:
  """The PANet of ``config.model`` with ``config.data.way`` ways; the encoder trains unless
  ``train.frozen_keys`` holds 'backbone'."""
  m = config.model
  fields = backbones.model_fields(config)
  variant = str(m.get("variant", "official"))
  frozen_layers = tuple(m.get("frozen_layers", ()))
  way = int(config.data.get("way", 1))
  check_variant(variant, way, frozen_layers)
  if variant == "blog":
    if m.backbone not in ("resnet", "resnet_small"):
      raise ValueError(f"PANet variant 'blog' runs the deep-stem ResNet: model.backbone must be "
                       f"'resnet' (or 'resnet_small'), got {m.backbone!r}")
    fields["backbone"] = fields["backbone"].clone(layer3_last_relu=False)
  return PANet(**fields, way=way, scaler=float(m.scaler), align=bool(m.align),
               align_weight=float(m.align_weight), variant=variant,
               frozen_layers=frozen_layers)
