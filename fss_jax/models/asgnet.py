"""ASGNet (Li et al., CVPR 2021): SGC prototypes + GPA allocation + PFENet's FEM.

One episode batch flows as:
  query (B,H,W,3), supports (B,K,H,W,3), support labels (B,K,H,W) in {0,1,255}
  → frozen backbone layer2/layer3 (query and shots in one batched call) → ``down_conv_0``
  → seeds (maskSLIC, on device) + SGC per shot → up to K·max_sp prototypes per episode
  → GPA (cosine, argmax allocation) → guide feature (B,h,w,512) + prob map (B,h,w,1)
  → FEM → logits (B,h,w,2) → bilinear (align_corners) ×8 to (B,H,W,2).

Two variants of the family are options of this module (reference_pfenet.md §9–10):

* ``prior=True`` — "ASGNet + prior": layer4 also runs, on the query's layer3 and on each shot's
  layer3 · m (m: the support mask at the layer3 size; ``prior_mask_support=False`` leaves the
  support unmasked), PFENet's training-free prior mask (``prior.py``, the code PFENet uses) is
  computed from them, and each FEM level's ``corr_conv`` sees it appended last:
  concat[pooled guide feature (512), prob map (1), prior (1)] = 514 channels. Keys are ASGNet's;
  only ``corr_conv.{i}.0.weight`` is [256, 514, 1, 1] (head parameters 10,424,842 at 256 wide).
  ``seed_prior_from_asgnet`` turns an ASGNet checkpoint into a starting point.
* ``amm=True`` — the attention modulation module (``amm.py``) on the reduced features. Where the
  report inserted it is not given; here one shared AMM modulates the output of ``down_conv`` (after
  its Dropout2d), for the query and for each shot in separate calls (so its μ, σ and BatchNorm
  statistics are per call, as the reference's per-call ``down_conv``). That is CBAM's own
  placement (on a block's output features), and it is the one point whose features feed both
  halves of ASGNet: SGC builds the prototypes from the modulated support features and GPA compares
  them with the modulated query features, so the cosine matching compares like with like (gating
  only the query would compare modulated pixels with unmodulated prototypes). AMM's parameters
  learn through the query path (the prototypes carry no gradient in ASGNet). Keys:
  ``amm.ChannelAMM.conv.{1,3}.*``, ``amm.SpatialAMM.conv.{conv,bn}.*`` (+ 8,564 parameters at
  256 wide).

Parameter names mirror the reference's PyTorch module paths ('.' → '_'), with the backbone
under ``backbone`` (see ``fss_jax/models/resnet.py``), so weights move both ways by rule
(``fss_jax/weights.py``).
"""
import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fss_jax.models import amm as amm_lib
from fss_jax.models import backbones
from fss_jax.models import fem as fem_lib
from fss_jax.models import gpa
from fss_jax.models import losses
from fss_jax.models import ops
from fss_jax.models import prior as prior_lib
from fss_jax.models import resnet
from fss_jax.models import sgc

PASCAL_BINS = (60, 30, 15, 8)
COCO_BINS = (1.0, 0.5, 0.25, 0.125)


class ASGNet(nn.Module):
  """ASGNet with the FEM context module.

  Attributes:
    backbone: the backbone module (``fss_jax.models.backbones``; output stride 8: the seeds'
      grid is the reference's (H-1)/8+1), default the deep-stem ResNet-50.
    bins: FEM pyramid bins (ints > 1 absolute, floats <= 1 relative to the feature size).
    reduce_dim: head width (256 in the reference).
    num_classes: 2 (background, foreground).
    max_sp: maximum number of superpixel seeds per shot (5).
    avg_sp_area: feature-grid pixels per superpixel when placing seeds (100, the reference's
      ``place_seed_points`` default; a shot gets round(area / avg_sp_area) seeds, at most
      ``max_sp``). Smaller values cluster small masks (the float64 parity tests use 65x65 inputs).
    train_iters / eval_iters: SGC iterations in training (10) and evaluation (5).
    bn_batch_stats: the reference's quirk: in training, the backbone's BatchNorm uses batch
      statistics (per query / per shot call, as the reference's separate calls do) and updates
      its running statistics. Default False: backbone BN frozen (running statistics).
    train_backbone: let gradients reach the backbone (default False: frozen, as the reference).
    aux_weight: weight of the mean auxiliary loss in ``loss`` (1.0).
    prior: ASGNet + prior (module docstring): layer4 + PFENet's prior appended to ``corr_conv``.
    prior_mask_support: with ``prior``, layer4 of the support runs on its masked layer3 (as
      PFENet; default True) or on the unmasked layer3 (False).
    amm: the attention modulation module on the reduced features (module docstring).
    amm_reduction: the AMM channel MLP's reduction (16).
  """
  # The model-family contract (fss_jax/models/registry.py).
  inputs = ("query", "supp_images", "supp_labels")
  targets = ("query_label",)
  # ``amm`` and its children (registered last) are ordered too; absent names are ignored.
  torch_order = ("cls", "down_conv", "corr_conv", "beta_conv", "inner_cls", "alpha_conv",
                 "res1", "res2", "amm") + amm_lib.TORCH_ORDER

  backbone: nn.Module = dataclasses.field(default_factory=resnet.ResNet)
  bins: Sequence[Any] = PASCAL_BINS
  reduce_dim: int = 256
  num_classes: int = 2
  max_sp: int = 5
  avg_sp_area: int = 100
  train_iters: int = 10
  eval_iters: int = 5
  bn_batch_stats: bool = False
  train_backbone: bool = False
  aux_weight: float = 1.0
  prior: bool = False
  prior_mask_support: bool = True
  amm: bool = False
  amm_reduction: int = 16

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
      (B,h,w) (index of the allocated prototype slot), ``guide_feat`` (B,h,w,512); with
      ``prior``, ``prior`` (B,h,w,1).
    """
    b, big_h, big_w, _ = query.shape
    k = supp_images.shape[1]
    ops.check_episode_inputs(query, supp_images, supp_labels)
    deterministic = (not train) if deterministic is None else deterministic

    # ---- Backbone (frozen by default: no gradient, as the reference's torch.no_grad) ----
    if self.is_initializing():
      # layer4 is never run by ASGNet but lives in the reference checkpoints; create it.
      self.backbone(query, use_running_average=True, upto="layer4")
    groups = [query] + [supp_images[:, i] for i in range(k)]
    batch_stats = train and self.bn_batch_stats
    outs = backbones.run(self.backbone, groups, batch_stats=batch_stats, upto="layer3")
    feats = jnp.stack([backbones.mid_level(o) for o in outs], axis=1)  # (B,1+K,h,w,C3+C2)
    if not self.train_backbone:
      feats = jax.lax.stop_gradient(feats)
    h, w = feats.shape[2:4]
    if (h, w) != ((big_h - 1) // 8 + 1, (big_w - 1) // 8 + 1):
      raise ValueError(f"ASGNet needs an output-stride-8 backbone (its seeds are placed on the "
                       f"(H-1)/8+1 grid); got {h}x{w} features for {big_h}x{big_w} inputs.")

    fg = (supp_labels == 1).astype(jnp.promote_types(query.dtype, jnp.float32))
    fg = fg.reshape((b * k, big_h, big_w))
    soft_mask = ops.resize_bilinear_ac(fg[..., None], (h, w))[..., 0]  # (B·K,h,w)

    # ---- ASGNet + prior: layer4 of the query and of each shot's masked layer3 ----
    prior = None
    if self.prior:
      l3 = [jax.lax.stop_gradient(o["layer3"]) for o in outs]
      m3 = soft_mask.reshape((b, k, h, w, 1)).astype(l3[0].dtype)
      supp_l3 = [l3[1 + i] * m3[:, i] if self.prior_mask_support else l3[1 + i]
                 for i in range(k)]
      l4 = backbones.run(self.backbone, [l3[0]] + supp_l3, batch_stats=batch_stats,
                         start="layer4", upto="layer4")
      prior = prior_lib.prior_mask(l4[0]["layer4"],
                                   jnp.stack([o["layer4"] for o in l4[1:]], axis=1),
                                   fg.reshape((b, k, big_h, big_w)), (h, w))

    # ---- Shared reduction: down_conv.0 (1x1, no bias) + Dropout2d(0.5), no ReLU ----
    feats = fem_lib.conv(self.reduce_dim, 1, "down_conv_0")(feats)
    feats = ops.Dropout2d(0.5)(feats.reshape((-1, h, w, self.reduce_dim)),
                               deterministic=deterministic)
    feats = feats.reshape((b, 1 + k, h, w, self.reduce_dim))
    if self.amm:  # one module, one call per group (query, each shot): per-call μ, σ and BN
      gate = amm_lib.AMM(self.amm_reduction, name="amm")
      feats = jnp.stack([gate(feats[:, i], train=train) for i in range(1 + k)], axis=1)
    query_feat, supp_feat = feats[:, 0], feats[:, 1:]

    # ---- Prototypes: seeds + SGC per shot (no gradient) ----
    seeds, _ = sgc.place_seeds(fg, max_sp=self.max_sp, avg_sp_area=self.avg_sp_area)
    protos, valid = sgc.sgc_prototypes(
        supp_feat.reshape((b * k, h, w, self.reduce_dim)), soft_mask, seeds,
        n_iter=self.train_iters if train else self.eval_iters)
    protos = protos.reshape((b, k * self.max_sp, self.reduce_dim))
    valid = valid.reshape((b, k * self.max_sp))

    # ---- GPA: allocate a prototype to every query pixel ----
    guide, prob_map, guide_index = gpa.allocate(query_feat, protos, valid)
    guide_feat = jnp.concatenate([query_feat, guide], axis=-1)

    # ---- FEM and classifier ----
    maps = prob_map if prior is None else jnp.concatenate([prob_map, prior.astype(
        prob_map.dtype)], axis=-1)  # the prior last (514 = 512 + prob map + prior)
    logits, aux = fem_lib.fem(guide_feat, maps, self.bins, reduce_dim=self.reduce_dim,
                              num_classes=self.num_classes, deterministic=deterministic)
    up = lambda x: ops.resize_bilinear_ac(x, (big_h, big_w))
    extra = {} if prior is None else {"prior": prior}
    return {
        **extra,
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

  def loss(self, out: dict, batch: dict) -> tuple[jax.Array, dict]:
    """The reference's training loss: main CE + aux_weight · mean of the 4 FEM CEs (ignore 255).
    Returns (total, {'main_loss', 'aux_loss'})."""
    return losses.fem_model_loss(out, batch, self.aux_weight)


# ----------------------------------------------------------------------------- config


def model_config() -> ml_collections.ConfigDict:
  """ASGNet's own ``config.model`` fields (besides the backbone fields every model has)."""
  return ml_collections.ConfigDict(dict(
      bins=PASCAL_BINS,        # FEM bins: ints absolute, floats <= 1 relative
      reduce_dim=256,
      train_iters=10,          # SGC iterations
      eval_iters=5,
      max_sp=5,
      avg_sp_area=100,         # seeds: feature-grid pixels per superpixel
      prior=False,             # ASGNet + prior (PFENet's prior appended to corr_conv: 514 ch)
      prior_mask_support=True,  # with prior: layer4 of the support on its masked layer3
      amm=False,               # attention modulation module on the reduced features
      amm_reduction=16,
  ))


def from_config(config) -> ASGNet:
  """The ASGNet of ``config.model`` (backbone frozen unless ``train.frozen_keys`` lacks it)."""
  m = config.model
  return ASGNet(
      **backbones.model_fields(config), bins=tuple(m.bins), reduce_dim=int(m.reduce_dim),
      max_sp=int(m.max_sp), avg_sp_area=int(m.avg_sp_area), train_iters=int(m.train_iters),
      eval_iters=int(m.eval_iters), aux_weight=float(config.train.aux_weight),
      prior=bool(m.prior), prior_mask_support=bool(m.prior_mask_support), amm=bool(m.amm),
      amm_reduction=int(m.amm_reduction))


# ----------------------------------------------------------------------------- weights


def seed_prior_from_asgnet(variables: dict, num_bins: Optional[int] = None) -> dict:
  """An ASGNet's variables as the start of an ASGNet + prior (a port convenience, not from the
  report): each ``corr_conv_{i}_0`` kernel (1,1,513,D) gets a zero input row for the prior,
  (1,1,514,D), so the seeded model computes exactly what the ASGNet did until training moves
  the new column. Every other variable is copied unchanged.

  Args:
    variables: {'params': ..., 'batch_stats': ...} of a plain ASGNet (e.g. from
      ``weights.read_model`` with a config whose ``model.prior`` is False).
    num_bins: expected number of pyramid levels (checked when given).
  Returns:
    variables for ``ASGNet(prior=True)`` with the same other settings.
  """
  params = dict(variables["params"])
  names = sorted(n for n in params if n.startswith("corr_conv_"))
  if not names or (num_bins is not None and len(names) != num_bins):
    raise ValueError(f"seed_prior_from_asgnet: expected {num_bins or 'some'} corr_conv levels, "
                     f"found {names}")
  for n in names:
    kernel = params[n]["kernel"]
    d = kernel.shape[-1]
    if kernel.shape[:3] != (1, 1, 2 * d + 1):
      raise ValueError(f"seed_prior_from_asgnet: {n} kernel {kernel.shape} is not a plain "
                       f"ASGNet's (1, 1, {2 * d + 1}, {d}) (already seeded?)")
    zero = jnp.zeros((1, 1, 1, d), kernel.dtype)
    params[n] = {**params[n], "kernel": jnp.concatenate([jnp.asarray(kernel), zero], axis=2)}
  return {**variables, "params": params}
