"""PFENet's training-free prior mask (reference_pfenet.md §3), shared by every model that uses it.

For each shot, every query pixel's high-level (layer4) feature is compared with every pixel of
the masked support's layer4 feature; its prior is the best cosine, min–max normalised over the
query pixels of its episode; the shots' maps are averaged. No gradient flows through it.
"""
import jax
import jax.numpy as jnp

from fss_jax.models import ops

COSINE_EPS = 1e-7


def _shot_prior(query_l4: jax.Array, supp_l4: jax.Array, eps: float) -> jax.Array:
  """One shot's normalised prior: (B,hq,wq,C), (B,hs,ws,C) → (B,hq·wq).

  c_jp = ⟨S_j, Q_p⟩ / (‖S_j‖·‖Q_p‖ + eps) (eps on the product of norms, not per vector), max
  over support pixels j, then (x − min) / (max − min + eps) over the query pixels p.
  """
  b, c = query_l4.shape[0], query_l4.shape[-1]
  q = query_l4.reshape((b, -1, c))
  s = supp_l4.reshape((b, -1, c))
  hi = jax.lax.Precision.HIGHEST
  dots = jnp.einsum("bjc,bpc->bjp", s, q, precision=hi)
  norms = (jnp.sqrt(jnp.sum(jnp.square(s), -1))[:, :, None]
           * jnp.sqrt(jnp.sum(jnp.square(q), -1))[:, None, :])
  sim = jnp.max(dots / (norms + eps), axis=1)  # (B, hq·wq)
  lo = jnp.min(sim, axis=1, keepdims=True)
  hi_ = jnp.max(sim, axis=1, keepdims=True)
  return (sim - lo) / (hi_ - lo + eps)


def shot_priors(query_l4: jax.Array, supp_l4: jax.Array, supp_fg: jax.Array,
                out_hw: tuple[int, int], eps: float = COSINE_EPS) -> jax.Array:
  """Each shot's normalised prior map (no gradient): (B,K,out_h,out_w).

  Args:
    query_l4: (B,h,w,C) query layer4 features (h = w: the reference reshapes to a square).
    supp_l4: (B,K,h',w',C) layer4 features of each shot (PFENet, BAM: of its *masked* layer3,
      layer4(layer3 · m); MSANet: of the unmasked layer3).
    supp_fg: (B,K,H,W) float foreground masks at full resolution ((label == 1), 255 → 0); each
      is resized (bilinear, align_corners) to (h', h') and multiplies its shot's features.
    out_hw: the query layer3 size: each shot's map is resized (bilinear, align_corners) to it.
  Returns:
    (B, K, out_h, out_w) in [0, 1). An empty support mask gives exactly 0 for its shot
    (0 / (0 + eps)).
  """
  b, h, w, _ = query_l4.shape
  k, hs = supp_l4.shape[1], supp_l4.shape[2]
  if h != w:
    raise ValueError(f"prior_mask: the reference assumes a square query map, got {h}x{w}")
  if supp_fg.shape[:2] != (b, k):
    raise ValueError(f"prior_mask: supp_fg {supp_fg.shape} does not match supp_l4 "
                     f"{supp_l4.shape}")
  dtype = jnp.promote_types(query_l4.dtype, jnp.float32)
  query_l4 = jax.lax.stop_gradient(query_l4.astype(dtype))
  supp_l4 = jax.lax.stop_gradient(supp_l4.astype(dtype))
  big_h, big_w = supp_fg.shape[2:]
  # The reference resizes to (size(2), size(2)): square, like its query reshape.
  m4 = ops.resize_bilinear_ac(supp_fg.reshape((b * k, big_h, big_w, 1)).astype(dtype),
                              (hs, hs)).reshape((b, k, hs, hs, 1))
  supp_l4 = supp_l4 * m4
  maps = [ops.resize_bilinear_ac(_shot_prior(query_l4, supp_l4[:, i], eps).reshape((b, h, w, 1)),
                                 out_hw)[..., 0] for i in range(k)]
  return jax.lax.stop_gradient(jnp.stack(maps, axis=1))


def prior_mask(query_l4: jax.Array, supp_l4: jax.Array, supp_fg: jax.Array,
               out_hw: tuple[int, int], eps: float = COSINE_EPS) -> jax.Array:
  """PFENet's prior mask of a batch of episodes (no gradient): the mean over shots of
  ``shot_priors`` (same arguments), (B, out_h, out_w, 1) in [0, 1). (The reference resizes the
  mean once more, to the reduced query feature's size, which is the same size.)"""
  return jnp.mean(shot_priors(query_l4, supp_l4, supp_fg, out_hw, eps), axis=1)[..., None]
