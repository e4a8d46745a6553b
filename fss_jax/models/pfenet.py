"""PFENet (Tian et al., TPAMI 2020): training-free prior mask + Feature Enrichment Module.

One episode batch flows as (reference_pfenet.md §1–5, the official ``model/PFENet.py``):
  query (B,H,W,3), supports (B,K,H,W,3), support labels (B,K,H,W) in {0,1,255}
  → frozen backbone layer0..layer3 on the query and every shot
  → layer4 on the query's layer3 and on each shot's layer3 · m (m: the support mask resized
    to the layer3 size) → prior mask (B,h,w,1) (``prior.py``, no gradient)
  → concat[layer3, layer2] → ``down_query_0`` / ``down_supp_0`` (two 1x1 convs, ReLU, Dropout2d)
  → prototype = mean over shots of the masked average of the support feature (with gradient)
  → FEM on [query feature, tiled prototype, prior] (``init_merge``) → logits (B,h,w,2)
  → bilinear (align_corners) to (B,H,W,2).

Parameter names mirror the official module paths ('.' → '_'), with the backbone under
``backbone``; ``torch_order`` is the official registration order, so exported state_dicts have
its keys in its order (``fss_jax/weights.py``).
"""
import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fss_jax.models import backbones
from fss_jax.models import fem as fem_lib
from fss_jax.models import losses
from fss_jax.models import ops
from fss_jax.models import prior as prior_lib
from fss_jax.models import resnet

PASCAL_BINS = (60, 30, 15, 8)
COCO_BINS = (1.0, 0.5, 0.25, 0.125)


class PFENet(nn.Module):
  """PFENet with a ResNet or VGG16-bn backbone.

  Attributes:
    backbone: the backbone module (``fss_jax.models.backbones``), default the deep-stem
      ResNet-50; ``vgg.VGG16BN()`` gives the VGG head at stride 16.
    bins: FEM pyramid bins (ints > 1 absolute, floats <= 1 relative to the feature size). A bin
      larger than the feature map up-samples by replication, as AdaptiveAvgPool2d does (VGG
      with the PASCAL bins: 60 on a 30x30 map).
    reduce_dim: head width (256).
    num_classes: 2 (background, foreground).
    bn_batch_stats: the reference's quirk: in training the backbone's BatchNorm (layer4
      included) uses batch statistics per call (the query; each shot; each shot's masked
      layer3 in layer4) and updates its running statistics. Default False: frozen BN.
    train_backbone: let gradients reach the backbone's layer0..layer3 (layer4 only feeds the
      prior, which never has a gradient). Default False: frozen, as the reference.
    aux_weight: weight of the mean auxiliary loss in ``loss`` (1.0).
  """
  # The model-family contract (fss_jax/models/registry.py).
  inputs = ("query", "supp_images", "supp_labels")
  targets = ("query_label",)
  torch_order = ("cls", "down_query", "down_supp", "init_merge", "beta_conv", "inner_cls",
                 "res1", "res2", "alpha_conv")

  backbone: nn.Module = dataclasses.field(default_factory=resnet.ResNet)
  bins: Sequence[Any] = PASCAL_BINS
  reduce_dim: int = 256
  num_classes: int = 2
  bn_batch_stats: bool = False
  train_backbone: bool = False
  aux_weight: float = 1.0

  @nn.compact
  def __call__(self, query: jax.Array, supp_images: jax.Array, supp_labels: jax.Array, *,
               train: bool, deterministic: Optional[bool] = None) -> dict:
    """Forward pass of a batch of episodes.

    Args:
      query: (B,H,W,3) normalised query images, H = W = 8k+1.
      supp_images: (B,K,H,W,3) normalised support images.
      supp_labels: (B,K,H,W) support labels in {0, 1, 255} (255 = ignore, counts as 0).
      train: training mode: dropout on (unless ``deterministic`` says otherwise) and, with
        ``bn_batch_stats``, backbone BN in batch-statistics mode (call apply with
        ``mutable=['batch_stats']``).
      deterministic: overrides dropout (default: ``not train``).
    Returns:
      dict with ``logits`` (B,H,W,2), ``aux_logits`` (list of len(bins) × (B,H,W,2)) and, for
      inspection: ``prior`` (B,h,w,1), ``prototype`` (B,256) (mean over shots),
      ``shot_prototypes`` (B,K,256), ``query_feat`` (B,h,w,256), ``supp_feat`` (B,K,h,w,256),
      ``supp_mask`` (B,K,h,w) (the support masks at feature size); h = the layer3 size.
    """
    b, big_h, big_w, _ = query.shape
    k = supp_images.shape[1]
    ops.check_episode_inputs(query, supp_images, supp_labels)
    deterministic = (not train) if deterministic is None else deterministic
    batch_stats = train and self.bn_batch_stats

    # ---- Backbone: layer0..3 on the query and each shot (no gradient unless trained) ----
    groups = [query] + [supp_images[:, i] for i in range(k)]
    outs = backbones.run(self.backbone, groups, batch_stats=batch_stats, upto="layer3")
    h, w = outs[0]["layer3"].shape[1:3]
    fg = (supp_labels == 1).astype(jnp.promote_types(query.dtype, jnp.float32))  # (B,K,H,W)
    mask = ops.resize_bilinear_ac(fg.reshape((b * k, big_h, big_w, 1)), (h, w))
    mask = mask.reshape((b, k, h, w, 1))

    # ---- Prior: layer4 of the query and of each shot's masked layer3 (never a gradient) ----
    l3 = [jax.lax.stop_gradient(o["layer3"]) for o in outs]
    l4 = backbones.run(self.backbone, [l3[0]] + [l3[1 + i] * mask[:, i] for i in range(k)],
                       batch_stats=batch_stats, start="layer4", upto="layer4")
    prior = prior_lib.prior_mask(l4[0]["layer4"],
                                 jnp.stack([o["layer4"] for o in l4[1:]], axis=1), fg, (h, w))

    # ---- Features: down_query / down_supp, 1x1 conv → ReLU → Dropout2d(0.5) each ----
    mid = [backbones.mid_level(o) for o in outs]
    if not self.train_backbone:
      mid = [jax.lax.stop_gradient(x) for x in mid]
    down = lambda name, x: fem_lib.down_conv(x, name, self.reduce_dim, deterministic)
    query_feat = down("down_query_0", mid[0])
    supp_feat = down("down_supp_0", jnp.concatenate(mid[1:], axis=0))
    supp_feat = supp_feat.reshape((k, b, h, w, self.reduce_dim)).transpose(1, 0, 2, 3, 4)

    # ---- Prototype: Weighted_GAP per shot (with gradient), mean over shots ----
    shot_protos = ops.masked_average_pool(supp_feat.reshape((b * k, h, w, self.reduce_dim)),
                                          mask.reshape((b * k, h, w)))
    shot_protos = shot_protos.reshape((b, k, self.reduce_dim))
    prototype = jnp.mean(shot_protos, axis=1)

    # ---- FEM on [query feature, prototype, prior] and the classifier ----
    logits, aux = fem_lib.fem(query_feat, prior, self.bins, vector=prototype, merge="init_merge",
                              reduce_dim=self.reduce_dim, num_classes=self.num_classes,
                              deterministic=deterministic)
    out_hw = ((big_h - 1) // 8 * 8 + 1, (big_w - 1) // 8 * 8 + 1)
    up = lambda x: ops.resize_bilinear_ac(x, out_hw)
    return {
        "logits": up(logits),
        "aux_logits": [up(a) for a in aux],
        "prior": prior,
        "prototype": prototype,
        "shot_prototypes": shot_protos,
        "query_feat": query_feat,
        "supp_feat": supp_feat,
        "supp_mask": mask[..., 0],
    }

  def loss(self, out: dict, batch: dict) -> tuple[jax.Array, dict]:
    """The reference's training loss: main CE + aux_weight · mean of the FEM CEs (ignore 255).
    Returns (total, {'main_loss', 'aux_loss'})."""
    return losses.fem_model_loss(out, batch, self.aux_weight)


# ----------------------------------------------------------------------------- config


def model_config() -> ml_collections.ConfigDict:
  """PFENet's own ``config.model`` fields (besides the backbone fields every model has)."""
  return ml_collections.ConfigDict(dict(
      bins=PASCAL_BINS,        # FEM bins: ints absolute, floats <= 1 relative
      reduce_dim=256,
  ))


def from_config(config) -> PFENet:
  """The PFENet of ``config.model`` (backbone frozen unless ``train.frozen_keys`` lacks it)."""
  m = config.model
  return PFENet(**backbones.model_fields(config), bins=tuple(m.bins),
                reduce_dim=int(m.reduce_dim), aux_weight=float(config.train.aux_weight))
