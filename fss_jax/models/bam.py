"""BAM (Lang et al., CVPR 2022, "Learning What Not to Segment"): stage 2, the meta learner.

reference_msanet.md §1.2, §3–4, §7–9; chunbolang/BAM ``model/BAM.py``. One batch of episodes:
  query (B,H,W,3), supports (B,K,H,W,3), support labels (B,K,H,W) in {0,1,255}
  → the stage-1 PSPNet's backbone, frozen, BN on running statistics (the reference's fix_bn):
    layer0..4 on the query; layer0..3 on each shot, layer4 on each shot's layer3 · m (m = the
    support mask resized, bilinear align_corners, to the layer3 size)
  → down_query / down_supp on concat[layer3, layer2] (1x1 conv → ReLU → Dropout2d(0.5))
  → per-shot prototype (Weighted_GAP), PFENet's prior per shot, and the adjustment factor ψ_k =
    ‖G(query layer2) − G(shot layer2)‖_F / C (G = channel-cosine Gram matrix, eps 1e-7)
  → k-shot weights w = softmax(kshot_rw(ψ sorted ascending)), un-sorted (K = 1: w = 1); the
    prototype, the prior and ψ are w-weighted sums over shots
  → init_merge on [query feature, prototype tiled, prior] (513 ch) → ASPP_meta → res1_meta →
    res2_meta (residual) → cls_meta → meta logits (B,h,w,2)
  → the frozen base learner (``pspnet.BaseLearner``: PPM + classifier, its Dropout2d still active
    in training as in the reference) on the query's layer4 → base logits (B,h,w,C)
  → ensemble: p_m = softmax(meta), p_b = softmax(base); base_fg = Σ p_b over the base classes
    (in training without the episode's own class ``base_class``); bg' = a0·p_m0 + a1·ψ, fg' =
    a0·p_m1 + a1·ψ (``gram_merge``); bg = b0·bg' + b1·base_fg (``cls_merge``); final = [bg, fg']
  → final, meta and base bilinearly (align_corners) to (H−1)//8·8+1.
Loss: CE(final) + aux_weight1 · CE(meta) (query episode mask) + aux_weight2 · CE(base, the
query's base-class label); the base term has no gradient (frozen branch).

Options for the family (BAM → MSANet, reference §15): ``kshot_unsort`` 'bam' (gather by rank,
BAM's current code) or 'msanet' (MSANet's identity gather: the sorted-order weights applied to
the shots in input order); ``prior_support_masked`` (BAM: layer4 of layer3 · m; MSANet: the
unmasked layer4); ``vgg_gram_resized`` (BAM's VGG Gram feature: layer2 resized to layer3's size).

Parameter names mirror the official module paths ('.' → '_'): ``down_query_0``,
``ASPP_meta/layer6_2_0``, ``cls_meta_3``, ``gram_merge``, ``kshot_rw_0``; the frozen parts are
``backbone`` and ``learner_base`` (``learner_base/0/features_0_1`` = ``learner_base.0.features.0.1``).
"""
import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fss_jax.models import backbones
from fss_jax.models import fem as fem_lib
from fss_jax.models import losses
from fss_jax.models import ops
from fss_jax.models import prior as prior_lib
from fss_jax.models import pspnet
from fss_jax.models import resnet

GRAM_EPS = 1e-7
KSHOT_UNSORT = ("bam", "msanet")


def gram_matrix(feat: jax.Array, eps: float = GRAM_EPS) -> jax.Array:
  """(B,h,w,C) → (B,C,C): G_ij = ⟨f_i, f_j⟩ / (‖f_i‖·‖f_j‖ + eps) over the h·w positions
  (``get_gram_matrix``; eps on the product of norms)."""
  b, c = feat.shape[0], feat.shape[-1]
  f = feat.reshape((b, -1, c))
  hi = jax.lax.Precision.HIGHEST
  dots = jnp.einsum("bpi,bpj->bij", f, f, precision=hi)
  norm = jnp.sqrt(jnp.sum(jnp.square(f), axis=1))  # (B, C)
  return dots / (norm[:, :, None] * norm[:, None, :] + eps)


def adjustment_factor(query_low: jax.Array, supp_low: jax.Array) -> jax.Array:
  """ψ per shot: (B,h,w,C), (B,K,h,w,C) → (B,K) = ‖G(q) − G(s_k)‖_F / ‖1_{C×C}‖_F."""
  k, c = supp_low.shape[1], supp_low.shape[-1]
  gq = gram_matrix(query_low)
  vals = [jnp.sqrt(jnp.sum(jnp.square(gq - gram_matrix(supp_low[:, i])), axis=(1, 2)))
          for i in range(k)]
  return jnp.stack(vals, axis=1) / float(c)


def unsort_weights(weight_sorted: jax.Array, order: jax.Array, mode: str) -> jax.Array:
  """Maps the MLP outputs (one per ψ rank, ascending) back to the shots.

  'bam': ``weight.gather(1, idx2)`` with idx2 = the rank of each shot (BAM after 958e58a):
  shot k gets the output of its own rank. 'msanet': MSANet keeps the pre-fix line, a gather
  with idx1.gather(idx2), always the identity: shot k gets the output of rank k.
  weight_sorted, order (= argsort of ψ): (B,K) → (B,K).
  """
  if mode == "msanet":
    return weight_sorted
  if mode != "bam":
    raise ValueError(f"kshot_unsort must be one of {KSHOT_UNSORT}, got {mode!r}")
  ranks = jnp.argsort(order, axis=1)
  return jnp.take_along_axis(weight_sorted, ranks, axis=1)


# ----------------------------------------------------------------------------- MSANet's parts

CORR_EPS = 1e-5  # model/correlation.py: each vector divided by (its norm + 1e-5)


def hyper_groups(num_blocks: Sequence[int], vgg: bool) -> tuple[int, int, int, int]:
  """MSANet's hyper-feature layout: (index of the first feature used, then the sizes of the l2,
  l3, l4 groups). ResNet: the pre-ReLU sums from layer1's last block on (``feat_ids`` 3..16 for
  R50, 3..33 for R101; layer1's map is computed and discarded), groups = layer2, layer3, layer4
  blocks. VGG: [conv4_1..3, conv5_1..3, layer4 output] (7), groups 3, 3, 1."""
  if vgg:
    return 0, 3, 3, 1
  b1, b2, b3, b4 = (int(b) for b in num_blocks)
  return b1 - 1, b2, b3, b4


def chained_masks(fg: jax.Array, sizes: Sequence[tuple[int, int]]) -> list:
  """``mask_feature``'s mask for each hyper-feature: (N,H,W) → [(N,h_i,w_i)], by the official
  chain: first to 2·w_0 square, then, walking the features, resized (bilinear, align_corners)
  whenever its width differs from the feature's (ResNet 473: 238 → 119 → 60; VGG 120 → 60 →
  30). Not equal to a direct resize (reference_msanet.md §5.1)."""
  m = ops.resize_bilinear_ac(fg[..., None], (2 * sizes[0][1], 2 * sizes[0][1]))
  out = []
  for size in sizes:
    if m.shape[2] != size[1]:
      m = ops.resize_bilinear_ac(m, size)
    out.append(m[..., 0])
  return out


def similarity_map(query: jax.Array, supp: jax.Array, mask: jax.Array) -> jax.Array:
  """One multi-similarity map (``mask_feature`` + ``Correlation.multilayer_correlation``):
  (B,h,w,C) query and support features, (B,h,w) chained support mask → (B,h,w).

  Support pixels kept: those whose mask is ≥ the mean of the mask's positive values (none when
  the mask is empty: the reference's zero vector gives a zero map); each kept feature is scaled
  by its mask value. Per query pixel p: mean over kept j of relu(⟨q̂_p, ŝ_j⟩), with v̂ = v /
  (‖v‖ + 1e-5). Written with a fixed-size 0/1 selection over every support pixel, so it jits.
  """
  b, h, w, c = query.shape
  m = mask.reshape((b, -1))
  pos = m > 0
  count = jnp.sum(pos, axis=1, keepdims=True)
  mean = jnp.sum(jnp.where(pos, m, 0.0), axis=1, keepdims=True) / jnp.maximum(count, 1)
  sel = ((m >= mean) & (count > 0)).astype(query.dtype)  # (B, hw)
  s = supp.reshape((b, -1, c)) * m[..., None].astype(supp.dtype)
  q = query.reshape((b, -1, c))
  norm = lambda v: v / (jnp.sqrt(jnp.sum(jnp.square(v), axis=-1, keepdims=True)) + CORR_EPS)
  corr = jnp.einsum("bpc,bjc->bpj", norm(q), norm(s), precision=jax.lax.Precision.HIGHEST)
  total = jnp.einsum("bpj,bj->bp", nn.relu(corr), sel, precision=jax.lax.Precision.HIGHEST)
  return (total / jnp.maximum(jnp.sum(sel, axis=1, keepdims=True), 1.0)).reshape((b, h, w))


class Attention(nn.Module):
  """MSANet's ``Attention`` (attribute ``gam``): a channel gate from the masked support feature.

  v = mean over all positions of m ⊙ F (m: the full-size mask resized with PyTorch's legacy
  nearest rule); g = sigmoid(Dropout(0.5)(conv(relu(conv(v))))) (1x1 convs with bias; the
  dropout sits before the sigmoid); returns g ⊙ F. F (B,h,w,C), fg (B,H,W) → (B,h,w,C).
  """

  @nn.compact
  def __call__(self, feat: jax.Array, fg: jax.Array, deterministic: bool) -> jax.Array:
    c = feat.shape[-1]
    m = ops.resize_nearest_torch(fg, feat.shape[1:3])[..., None].astype(feat.dtype)
    v = jnp.mean(m * feat, axis=(1, 2), keepdims=True)
    g = nn.relu(nn.Conv(c, (1, 1), name="gate_0")(v))
    g = nn.Conv(c, (1, 1), name="gate_2")(g)
    g = nn.Dropout(0.5)(g, deterministic=deterministic)
    return jax.nn.sigmoid(g) * feat


class ASPP(nn.Module):
  """``model/ASPP.py`` on (B,h,w,C) → (B,h,w,5C): [global, 1x1, 3x3 d6, d12, d18], each conv
  with bias → ReLU; the global branch is the map mean, broadcast (no interpolation). Weights
  kaiming-normal (fan_in) as the reference initialises them."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

    def conv(name, k, d):
      return nn.Conv(c, (k, k), padding=((d * (k // 2),) * 2,) * 2, kernel_dilation=(d, d),
                     use_bias=True, kernel_init=init, name=name)

    g = jnp.mean(x, axis=(1, 2), keepdims=True)
    g = nn.relu(conv("layer6_0_0", 1, 1)(g))
    g = jnp.broadcast_to(g, x.shape[:3] + (c,))
    branches = [g, nn.relu(conv("layer6_1_0", 1, 1)(x))]
    for i, d in ((2, 6), (3, 12), (4, 18)):
      branches.append(nn.relu(conv(f"layer6_{i}_0", 3, d)(x)))
    return jnp.concatenate(branches, axis=-1)


def _weighted(x: jax.Array, w: jax.Array) -> jax.Array:
  """Σ_k w[b,k] · x[b,k,...]: (B,K,...), (B,K) → (B,...)."""
  w = w.reshape(w.shape + (1,) * (x.ndim - 2)).astype(x.dtype)
  return jnp.sum(w * x, axis=1)


def _merge_init(values):
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.asarray(np.array(values, np.float32).reshape(shape), dtype)
  return init


class BAM(nn.Module):
  """BAM's meta learner with the frozen stage-1 backbone and base learner.

  Attributes:
    backbone: the stage-1 PSPNet's backbone (``fss_jax.models.backbones``), frozen.
    base_classes: C − 1 (PASCAL 15, COCO 60); the base learner has C outputs.
    shot: K (the k-shot weights ``kshot_rw`` exist for K > 1; parameters depend on K).
    reduce_dim: 256.
    kshot_trans_dim: the k-shot MLP's hidden width (2, all configs); 0: one K→K conv without
      bias, initialised to 1/K (the reference's alternative).
    kshot_unsort: 'bam' | 'msanet' (``unsort_weights``).
    prior_support_masked: layer4 of each shot runs on its masked layer3 (BAM, PFENet); False:
      on the unmasked layer3 (MSANet).
    vgg_gram_resized: with VGG, the Gram feature is layer2 resized to the layer3 size (BAM);
      False: the raw layer2 (MSANet).
    base_dropout: the base learner's Dropout2d(0.1) runs in training (the reference: its
      fix_bn touches only BatchNorm); False: the base learner is deterministic.
    aux_weight1, aux_weight2: the meta and base losses' weights (1.0, 1.0; configs:
      ``train.aux_weight``, ``model.base_loss_weight``).
    msanet: MSANet's meta learner (``fss_jax/models/msanet.py``): the hyper-feature
      multi-similarity (64 ch) and the attention module (256 ch) join the merge (833 ch).
  """
  # The model-family contract (fss_jax/models/registry.py); base_class: the episode class's
  # index in the fold's base list + 1 (0 for a novel class), used by the training ensemble.
  inputs = ("query", "supp_images", "supp_labels", "base_class")
  targets = ("query_label", "query_base_label")
  # model/ASPP.py names its branches layer6_0..layer6_4 (nn.Sequential each).
  torch_module_names = {f"ASPP_meta/layer6_{i}_0": f"ASPP_meta.layer6_{i}.0" for i in range(5)}
  torch_order = ("learner_base", "down_query", "down_supp", "init_merge", "ASPP_meta",
                 "res1_meta", "res2_meta", "cls_meta", "gram_merge", "cls_merge", "kshot_rw",
                 "gam", "hyper_final")

  backbone: nn.Module = dataclasses.field(default_factory=resnet.ResNet)
  base_classes: int = 15
  shot: int = 1
  reduce_dim: int = 256
  bins: Sequence[int] = pspnet.BINS
  cls_dim: int = pspnet.CLS_DIM
  kshot_trans_dim: int = 2
  kshot_unsort: str = "bam"
  prior_support_masked: bool = True
  vgg_gram_resized: bool = True
  base_dropout: bool = True
  aux_weight1: float = 1.0
  aux_weight2: float = 1.0
  msanet: bool = False

  @nn.compact
  def __call__(self, query: jax.Array, supp_images: jax.Array, supp_labels: jax.Array,
               base_class: Optional[jax.Array] = None, *, train: bool,
               deterministic: Optional[bool] = None) -> dict:
    """Forward pass of a batch of episodes.

    Args:
      query: (B,H,W,3) normalised, H = W = 8k+1.
      supp_images: (B,K,H,W,3); supp_labels: (B,K,H,W) in {0, 1, 255} (255 counts as 0).
      base_class: (B,) int, the episode class's base index + 1; read only in training (the
        ensemble leaves that class out of the base learner's foreground). None: not excluded.
      train: training mode: dropout on unless ``deterministic``; BN is frozen regardless.
    Returns:
      dict with ``logits`` (the final ensemble, B,H',W',2), ``meta_logits`` (B,H',W',2),
      ``base_logits`` (B,H',W',C), H' = (H−1)//8·8+1; and, at feature size: ``final_small``,
      ``meta_small``, ``base_small``, ``prior`` (B,h,w,1), ``shot_priors`` (B,K,h,w),
      ``prototype`` (B,256), ``shot_prototypes`` (B,K,256), ``psi`` (B,), ``shot_psi``
      (B,K), ``shot_weights`` (B,K), ``query_feat``, ``supp_feat``, ``supp_mask`` (B,K,h,w).
    """
    b, big_h, big_w, _ = query.shape
    k = supp_images.shape[1]
    if k != self.shot:
      raise ValueError(f"BAM built for {self.shot}-shot episodes (its k-shot weights depend "
                       f"on K) got {k} supports")
    ops.check_episode_inputs(query, supp_images, supp_labels)
    deterministic = (not train) if deterministic is None else deterministic
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    sg = jax.lax.stop_gradient

    # ---- Frozen backbone (no gradient, running BN statistics) ----
    # MSANet: one pass to layer4 recording the hyper-features (its extract_feats).
    images = [query] + [supp_images[:, i] for i in range(k)]
    if self.msanet:
      outs = backbones.run(self.backbone, images, batch_stats=False, upto="layer4", hyper=True)
    else:
      outs = backbones.run(self.backbone, images, batch_stats=False, upto="layer3")
    cast = lambda v: sg(v.astype(dtype))
    outs = [{n: [cast(x) for x in v] if isinstance(v, list) else cast(v)
             for n, v in o.items()} for o in outs]
    h, w = outs[0]["layer3"].shape[1:3]
    fg = (supp_labels == 1).astype(dtype)  # (B,K,H,W)
    mask = ops.resize_bilinear_ac(fg.reshape((b * k, big_h, big_w, 1)), (h, w))
    mask = mask.reshape((b, k, h, w, 1))
    if self.msanet and not self.prior_support_masked:
      query_l4 = outs[0]["layer4"]
      supp_l4 = jnp.stack([o["layer4"] for o in outs[1:]], axis=1)
    else:
      l4_in = [outs[0]["layer3"]] + [
          outs[1 + i]["layer3"] * (mask[:, i] if self.prior_support_masked else 1.0)
          for i in range(k)]
      l4 = backbones.run(self.backbone, l4_in, batch_stats=False, start="layer4",
                         upto="layer4")
      query_l4 = sg(l4[0]["layer4"].astype(dtype))
      supp_l4 = jnp.stack([sg(o["layer4"].astype(dtype)) for o in l4[1:]], axis=1)

    # ---- Meta features and per-shot prototypes (with gradient) ----
    mid = [backbones.mid_level(o) for o in outs]
    down = lambda name, x: fem_lib.down_conv(x, name, self.reduce_dim, deterministic)
    query_feat = down("down_query_0", mid[0])
    supp_feat = down("down_supp_0", jnp.concatenate(mid[1:], axis=0))
    supp_feat = supp_feat.reshape((k, b, h, w, self.reduce_dim)).transpose(1, 0, 2, 3, 4)
    shot_protos = ops.masked_average_pool(supp_feat.reshape((b * k, h, w, self.reduce_dim)),
                                          mask.reshape((b * k, h, w)))
    shot_protos = shot_protos.reshape((b, k, self.reduce_dim))

    # ---- Adjustment factor ψ per shot and the k-shot weights ----
    low = [o["layer2"] for o in outs]
    if self.vgg_gram_resized and low[0].shape[1:3] != (h, w):
      low = [ops.resize_bilinear_ac(x, (h, w)) for x in low]
    shot_psi = sg(adjustment_factor(low[0], jnp.stack(low[1:], axis=1)))  # (B,K)
    weights = self._kshot_weights(shot_psi)  # (B,K)
    psi = jnp.sum(weights * shot_psi, axis=1)

    # ---- Prior (no gradient), weighted over shots ----
    shot_priors = prior_lib.shot_priors(query_l4, supp_l4, fg, (h, w))  # (B,K,h,w)
    prior = _weighted(shot_priors, weights)[..., None]
    prototype = _weighted(shot_protos, weights)

    # ---- Meta learner (MSANet: with the multi-similarity and attention features) ----
    parts = [query_feat, jnp.broadcast_to(prototype[:, None, None, :], query_feat.shape)]
    extra = {}
    if self.msanet:
      extra = self._msanet_features(outs, fg, supp_feat, deterministic)
      parts.append(extra["hyper_final"])
    parts.append(prior.astype(query_feat.dtype))
    if self.msanet:
      parts.append(extra["gam"])
    merge = jnp.concatenate(parts, axis=-1)
    x = nn.relu(fem_lib.conv(self.reduce_dim, 1, "init_merge_0")(merge))
    x = ASPP(name="ASPP_meta")(x)
    x = nn.relu(fem_lib.conv(self.reduce_dim, 1, "res1_meta_0")(x))
    y = nn.relu(fem_lib.conv(self.reduce_dim, 3, "res2_meta_0")(x))
    x = nn.relu(fem_lib.conv(self.reduce_dim, 3, "res2_meta_2")(y)) + x
    x = nn.relu(fem_lib.conv(self.reduce_dim, 3, "cls_meta_0")(x))
    x = ops.Dropout2d(0.1)(x, deterministic=deterministic)
    meta = fem_lib.conv(2, 1, "cls_meta_3", bias=True)(x)

    # ---- Frozen base learner (its dropout follows ``base_dropout`` in training) ----
    base = pspnet.BaseLearner(self.base_classes + 1, tuple(self.bins), self.cls_dim,
                              name="learner_base")(
        query_l4, use_running_average=True,
        deterministic=deterministic or not self.base_dropout)
    base = sg(base)

    # ---- Ensemble ----
    p_m = jax.nn.softmax(meta, axis=-1)
    p_b = jax.nn.softmax(base, axis=-1)
    fg_classes = jnp.arange(self.base_classes + 1) != 0
    if train and base_class is not None:
      keep = fg_classes[None, :] & (jnp.arange(self.base_classes + 1)[None, :]
                                    != jnp.asarray(base_class).reshape((b, 1)))
    else:
      keep = jnp.broadcast_to(fg_classes[None, :], (b, self.base_classes + 1))
    base_fg = jnp.sum(p_b * keep[:, None, None, :].astype(p_b.dtype), axis=-1, keepdims=True)
    psi_map = jnp.broadcast_to(psi[:, None, None, None].astype(p_m.dtype), base_fg.shape)
    gram_merge = nn.Conv(1, (1, 1), use_bias=False, kernel_init=_merge_init([1.0, 0.0]),
                         name="gram_merge")
    bg = gram_merge(jnp.concatenate([p_m[..., :1], psi_map], axis=-1))
    fg_out = gram_merge(jnp.concatenate([p_m[..., 1:], psi_map], axis=-1))
    cls_merge = nn.Conv(1, (1, 1), use_bias=False, kernel_init=_merge_init([1.0, 0.0]),
                        name="cls_merge")
    final = jnp.concatenate([cls_merge(jnp.concatenate([bg, base_fg], axis=-1)), fg_out],
                            axis=-1)

    out_hw = (pspnet.output_size(big_h), pspnet.output_size(big_w))
    up = lambda t: ops.resize_bilinear_ac(t, out_hw)
    return {
        "logits": up(final), "meta_logits": up(meta), "base_logits": up(base),
        "final_small": final, "meta_small": meta, "base_small": base,
        "prior": prior, "shot_priors": shot_priors, "prototype": prototype,
        "shot_prototypes": shot_protos, "psi": psi, "shot_psi": shot_psi,
        "shot_weights": weights, "query_feat": query_feat, "supp_feat": supp_feat,
        "supp_mask": mask[..., 0], **extra,
    }

  def _msanet_features(self, outs, fg, supp_feat, deterministic) -> dict:
    """MSANet's hyper path and attention (reference_msanet.md §2, §5, §6): per shot, the
    similarity maps of the hyper-features (chained masks, ≥-mean selection), grouped l2 | l3 |
    l4 and averaged over shots (VGG: l2 from the last shot only, resized to l3's size), then
    ``hyper_final`` (1x1 conv with bias → BN, frozen → ReLU, 64 ch); GAM per shot, averaged.
    Returns {'hyper' (B,h,w,C_h), 'hyper_final' (B,h,w,64), 'gam' (B,h,w,256)}."""
    from fss_jax.models import vgg  # pylint: disable=g-import-not-at-top
    is_vgg = isinstance(self.backbone, vgg.VGG16BN)
    blocks = () if is_vgg else (self.backbone.blocks or resnet.BLOCKS[self.backbone.depth])
    first, n2, n3, n4 = hyper_groups(blocks, is_vgg)
    k = len(outs) - 1
    query_h = outs[0]["hyper"][first:]
    sizes = [x.shape[1:3] for x in query_h]
    n = len(query_h)
    groups = {"l2": [], "l3": [], "l4": []}
    for i in range(k):
      masks = chained_masks(fg[:, i], sizes)
      supp_h = outs[1 + i]["hyper"][first:]
      maps = [similarity_map(query_h[j], supp_h[j], masks[j]) for j in range(n - n2 - n3 - n4, n)]
      groups["l2"].append(jnp.stack(maps[:n2], axis=-1))
      groups["l3"].append(jnp.stack(maps[n2:n2 + n3], axis=-1))
      groups["l4"].append(jnp.stack(maps[n2 + n3:], axis=-1))
    mean = lambda xs: sum(xs[1:], xs[0]) / k
    l3, l4 = mean(groups["l3"]), mean(groups["l4"])
    if is_vgg:  # the official code resizes the last shot's l2 group (variable ``corr``)
      l2 = ops.resize_bilinear_ac(groups["l2"][-1], l3.shape[1:3])
    else:
      l2 = mean(groups["l2"])
    hyper = jnp.concatenate([l2, l3, l4], axis=-1)
    x = nn.Conv(64, (1, 1), name="hyper_final_0")(hyper)
    x = resnet.TorchBatchNorm(dtype=x.dtype, name="hyper_final_1")(x, True)
    hyper_final = nn.relu(x)
    gam_mod = Attention(name="gam")
    gam = sum(gam_mod(supp_feat[:, i], fg[:, i], deterministic) for i in range(k)) / k
    return {"hyper": hyper, "hyper_final": hyper_final, "gam": gam}

  def _kshot_weights(self, shot_psi: jax.Array) -> jax.Array:
    """(B,K) ψ → (B,K) softmax weights (all ones for K = 1, as the reference)."""
    b, k = shot_psi.shape
    if k == 1:
      return jnp.ones_like(shot_psi)
    order = jnp.argsort(shot_psi, axis=1)
    val = jnp.take_along_axis(shot_psi, order, axis=1).reshape((b, 1, 1, k))
    if self.kshot_trans_dim == 0:
      init = lambda key, shape, dtype=jnp.float32: jnp.full(shape, 1.0 / k, dtype)
      out = nn.Conv(k, (1, 1), use_bias=False, kernel_init=init, name="kshot_rw")(val)
    else:
      out = nn.relu(nn.Conv(self.kshot_trans_dim, (1, 1), name="kshot_rw_0")(val))
      out = nn.Conv(k, (1, 1), name="kshot_rw_2")(out)
    out = unsort_weights(out.reshape((b, k)), order, self.kshot_unsort)
    return jax.nn.softmax(out, axis=1)

  def loss(self, out: dict, batch: dict) -> tuple[jax.Array, dict]:
    """CE(final) + aux_weight1 · CE(meta) + aux_weight2 · CE(base, the base-class label)
    (ignore 255) → (total, {'main_loss', 'meta_loss', 'base_loss'})."""
    main = losses.cross_entropy_ignore(out["logits"], batch["query_label"])
    meta = losses.cross_entropy_ignore(out["meta_logits"], batch["query_label"])
    base = losses.cross_entropy_ignore(out["base_logits"], batch["query_base_label"])
    total = main + self.aux_weight1 * meta + self.aux_weight2 * base
    return total, {"main_loss": main, "meta_loss": meta, "base_loss": base}


# ----------------------------------------------------------------------------- config


def model_config() -> ml_collections.ConfigDict:
  """BAM's own ``config.model`` fields (besides the backbone fields every model has)."""
  return ml_collections.ConfigDict(dict(
      # The stage-1 base learner (scripts/train.py with configs/*_bam_base.py): its workdir,
      # or a checkpoint file (BAM's released best.pth, ours .msgpack/.safetensors). Required
      # to train; the trainer refuses to start without it.
      base_weights="",
      classes=16,               # the base learner's outputs: 1 + base classes (PASCAL 16, COCO 61)
      ppm_bins=pspnet.BINS,     # the base learner's PPM bins
      cls_dim=pspnet.CLS_DIM,
      reduce_dim=256,
      kshot_trans_dim=2,
      kshot_unsort="bam",       # 'bam' | 'msanet' (MSANet's identity gather)
      prior_support_masked=True,
      vgg_gram_resized=True,
      base_dropout=True,        # the reference's active base-learner dropout in training
      base_loss_weight=1.0,     # aux_weight2 (the base learner's CE; no gradient)
  ))


def from_config(config) -> BAM:
  """The BAM of ``config.model`` with ``config.data.shot`` shots."""
  m = config.model
  fields = backbones.model_fields(config)
  if m.kshot_unsort not in KSHOT_UNSORT:
    raise ValueError(f"config.model.kshot_unsort = {m.kshot_unsort!r}: must be one of "
                     f"{KSHOT_UNSORT}.")
  return BAM(backbone=fields["backbone"], base_classes=int(m.classes) - 1,
             shot=int(config.data.shot), reduce_dim=int(m.reduce_dim),
             bins=tuple(int(x) for x in m.ppm_bins), cls_dim=int(m.cls_dim),
             kshot_trans_dim=int(m.kshot_trans_dim), kshot_unsort=str(m.kshot_unsort),
             prior_support_masked=bool(m.prior_support_masked),
             vgg_gram_resized=bool(m.vgg_gram_resized), base_dropout=bool(m.base_dropout),
             aux_weight1=float(config.train.aux_weight),
             aux_weight2=float(m.base_loss_weight))
