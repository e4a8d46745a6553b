"""ASGNet (Li et al., CVPR 2021): SGC prototypes + GPA allocation + PFENet's FEM.

One episode batch flows as:
  query (B,H,W,3), supports (B,K,H,W,3), support labels (B,K,H,W) in {0,1,255}
  → frozen backbone layer2/layer3 (query and shots in one batched call) → ``down_conv_0``
  → seeds (maskSLIC, on device) + SGC per shot → up to K·max_sp prototypes per episode
  → GPA (cosine, argmax allocation) → guide feature (B,h,w,512) + prob map (B,h,w,1)
  → FEM → logits (B,h,w,2) → bilinear (align_corners) ×8 to (B,H,W,2).

Parameter names mirror the reference's PyTorch module paths ('.' → '_'), with the backbone
under ``backbone`` (see ``fss_jax/models/resnet.py``), so weights move both ways by rule.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fss_jax.models import fem as fem_lib
from fss_jax.models import gpa
from fss_jax.models import ops
from fss_jax.models import resnet
from fss_jax.models import sgc

PASCAL_BINS = (60, 30, 15, 8)
COCO_BINS = (1.0, 0.5, 0.25, 0.125)


class ASGNet(nn.Module):
  """ASGNet with the FEM context module.

  Attributes:
    depth: backbone depth, 50 or 101.
    bins: FEM pyramid bins (ints > 1 absolute, floats <= 1 relative to the feature size).
    reduce_dim: head width (256 in the reference).
    num_classes: 2 (background, foreground).
    max_sp: maximum number of superpixel seeds per shot (5).
    train_iters / eval_iters: SGC iterations in training (10) and evaluation (5).
    bn_batch_stats: the reference's quirk: in training, the backbone's BatchNorm uses batch
      statistics (per query / per shot call, as the reference's separate calls do) and updates
      its running statistics. Default False: backbone BN frozen (running statistics).
    backbone_dtype: compute dtype of the backbone (e.g. jnp.bfloat16); the head stays float32.
    backbone_width / backbone_blocks: a narrower / shallower backbone (see ``ResNet``), e.g. for
      training from scratch on the procedural dataset.
    train_backbone: let gradients reach the backbone (default False: frozen, as the reference).
  """
  depth: int = 50
  bins: Sequence[Any] = PASCAL_BINS
  reduce_dim: int = 256
  num_classes: int = 2
  max_sp: int = 5
  train_iters: int = 10
  eval_iters: int = 5
  bn_batch_stats: bool = False
  backbone_dtype: Any = jnp.float32
  backbone_width: int = 64
  backbone_blocks: Optional[Sequence[int]] = None
  train_backbone: bool = False

  @nn.compact
  def __call__(self, query: jax.Array, supp_images: jax.Array, supp_labels: jax.Array, *,
               train: bool, deterministic: Optional[bool] = None) -> dict:
    """Forward pass of a batch of episodes.

    Args:
      query: (B,H,W,3) normalised query images, H = W = 8k+1.
      supp_images: (B,K,H,W,3) normalised support images.
      supp_labels: (B,K,H,W) support labels in {0, 1, 255} (255 = ignore, counts as 0).
      train: training mode: SGC runs ``train_iters`` iterations, dropout is on (unless
        ``deterministic`` says otherwise) and, with ``bn_batch_stats``, backbone BN uses batch
        statistics (then call apply with ``mutable=['batch_stats']``).
      deterministic: overrides dropout (default: ``not train``), e.g. for gradient parity checks.
    Returns:
      dict with ``logits`` (B,H,W,2), ``aux_logits`` (list of 4 × (B,H,W,2)), and intermediates
      for debugging/visualisation: ``query_feat`` (B,h,w,256), ``supp_feat`` (B,K,h,w,256),
      ``supp_mask`` (B,K,h,w) soft mask, ``seeds`` (B,K,max_sp,2), ``prototypes``
      (B,K·max_sp,256), ``proto_valid`` (B,K·max_sp), ``prob_map`` (B,h,w,1), ``guide_index``
      (B,h,w) (index of the allocated prototype slot), ``guide_feat`` (B,h,w,512).
    """
    b, big_h, big_w, _ = query.shape
    k = supp_images.shape[1]
    _check_inputs(query, supp_images, supp_labels)
    deterministic = (not train) if deterministic is None else deterministic

    # ---- Backbone (frozen by default: no gradient, as the reference's torch.no_grad) ----
    backbone = resnet.ResNet(
        depth=self.depth, dtype=self.backbone_dtype, width=self.backbone_width,
        blocks=None if self.backbone_blocks is None else tuple(self.backbone_blocks),
        name="backbone")
    use_running = not (train and self.bn_batch_stats)
    if self.is_initializing():
      # layer4 is never run by ASGNet but lives in the reference checkpoints; create it.
      backbone(query, use_running_average=True, upto="layer4")
    if use_running:
      images = jnp.concatenate([query[:, None], supp_images], axis=1)
      feats = backbone(images.reshape((b * (1 + k), big_h, big_w, 3)),
                       use_running_average=True, upto="layer3")
      feats = jnp.concatenate([feats["layer3"], feats["layer2"]], axis=-1)
      feats = feats.reshape((b, 1 + k) + feats.shape[1:])
    else:
      # Batch statistics: one call per query / shot, as the reference does.
      groups = [query] + [supp_images[:, i] for i in range(k)]
      outs = [backbone(g, use_running_average=False, upto="layer3") for g in groups]
      feats = jnp.stack([jnp.concatenate([o["layer3"], o["layer2"]], -1) for o in outs], axis=1)
    feats = feats.astype(jnp.float32)  # (B,1+K,h,w,1536)
    if not self.train_backbone:
      feats = jax.lax.stop_gradient(feats)
    h, w = feats.shape[2:4]

    # ---- Shared reduction: down_conv.0 (1x1, no bias) + Dropout2d(0.5), no ReLU ----
    feats = fem_lib.conv(self.reduce_dim, 1, "down_conv_0")(feats)
    feats = ops.Dropout2d(0.5)(feats.reshape((-1, h, w, self.reduce_dim)),
                               deterministic=deterministic)
    feats = feats.reshape((b, 1 + k, h, w, self.reduce_dim))
    query_feat, supp_feat = feats[:, 0], feats[:, 1:]

    # ---- Prototypes: seeds + SGC per shot (no gradient) ----
    fg = (supp_labels == 1).astype(jnp.float32).reshape((b * k, big_h, big_w))
    soft_mask = ops.resize_bilinear_ac(fg[..., None], (h, w))[..., 0]  # (B·K,h,w)
    seeds, _ = sgc.place_seeds(fg, max_sp=self.max_sp)
    protos, valid = sgc.sgc_prototypes(
        supp_feat.reshape((b * k, h, w, self.reduce_dim)), soft_mask, seeds,
        n_iter=self.train_iters if train else self.eval_iters)
    protos = protos.reshape((b, k * self.max_sp, self.reduce_dim))
    valid = valid.reshape((b, k * self.max_sp))

    # ---- GPA: allocate a prototype to every query pixel ----
    guide, prob_map, guide_index = gpa.allocate(query_feat, protos, valid)
    guide_feat = jnp.concatenate([query_feat, guide], axis=-1)

    # ---- FEM and classifier ----
    logits, aux = fem_lib.fem(guide_feat, prob_map, self.bins, reduce_dim=self.reduce_dim,
                              num_classes=self.num_classes, deterministic=deterministic)
    up = lambda x: ops.resize_bilinear_ac(x, (big_h, big_w))
    return {
        "logits": up(logits),
        "aux_logits": [up(a) for a in aux],
        "query_feat": query_feat,
        "supp_feat": supp_feat,
        "supp_mask": soft_mask.reshape((b, k, h, w)),
        "seeds": seeds.reshape((b, k, self.max_sp, 2)),
        "prototypes": protos,
        "proto_valid": valid,
        "prob_map": prob_map,
        "guide_index": guide_index,
        "guide_feat": guide_feat,
    }


def _check_inputs(query, supp_images, supp_labels):
  b, hh, ww, c = query.shape
  if hh != ww or (hh - 1) % 8 != 0 or c != 3:
    raise ValueError(f"query must be (B,H,H,3) with H = 8k+1 (e.g. 473); got {query.shape}")
  if supp_images.ndim != 5 or supp_images.shape[0] != b or supp_images.shape[2:] != (hh, ww, 3):
    raise ValueError(f"supp_images must be (B,K,{hh},{ww},3) for query {query.shape}; "
                     f"got {supp_images.shape}")
  if supp_labels.shape != supp_images.shape[:4]:
    raise ValueError(f"supp_labels must be {supp_images.shape[:4]}; got {supp_labels.shape}")


def head_param_count(params) -> int:
  """Number of learnable head parameters (everything outside the backbone)."""
  return sum(x.size for name, sub in params.items() if name != "backbone"
             for x in jax.tree.leaves(sub))
