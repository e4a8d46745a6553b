"""Guided prototype allocation (GPA) of ASGNet.

Every query pixel is compared (cosine similarity) with every valid prototype of its episode;
the sum of the cosine maps is the probability map, and the pixel takes the prototype with the
largest cosine (first index on ties) as its guide feature. Padded prototype slots are masked
out, so the reference's 1-shot single-prototype special case is the same formula.
"""
import jax
import jax.numpy as jnp

from fss_jax.models import ops


def allocate(query_feat: jax.Array, protos: jax.Array,
             valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Allocates prototypes to query pixels.

  Cosines follow PyTorch 2.x ``F.cosine_similarity`` (each vector divided by max(||v||, 1e-7)),
  computed as one matmul of normalised vectors. Gradients reach ``query_feat`` through the
  cosines (prob_map); the guide feature is a gathered prototype (no gradient to the query, as
  argmax has none). Prototypes are differentiable here; ``sgc.sgc_prototypes`` already makes
  them constants, as in the reference.

  Args:
    query_feat: (B, h, w, C) query features.
    protos: (B, P, C) prototypes (all shots' slots concatenated in shot order).
    valid: (B, P) bool; invalid slots take no part in the sum or the argmax.

  Returns:
    guide: (B, h, w, C) the allocated prototype of each pixel.
    prob_map: (B, h, w, 1) sum over valid prototypes of the cosine similarity.
    guide_index: (B, h, w) int32 index into P of the allocated prototype.
    With no valid slot in an example (never the case for ASGNet) all three are zeros.
  """
  if query_feat.ndim != 4 or protos.ndim != 3 or protos.shape[0] != query_feat.shape[0] or (
      protos.shape[2] != query_feat.shape[3]):
    raise ValueError(f"allocate: expected query_feat (B, h, w, C) and protos (B, P, C), got "
                     f"{query_feat.shape} and {protos.shape}.")
  if valid.shape != protos.shape[:2]:
    raise ValueError(f"allocate: expected valid (B, P) = {protos.shape[:2]}, got {valid.shape}.")
  valid = valid.astype(bool)
  cos = jnp.einsum("bhwc,bpc->bhwp", ops.normalize_l2(query_feat), ops.normalize_l2(protos),
                   precision=jax.lax.Precision.HIGHEST)
  mask = valid[:, None, None, :]
  prob_map = jnp.sum(jnp.where(mask, cos, 0.0), axis=-1, keepdims=True)
  guide_index = jnp.argmax(jnp.where(mask, cos, -jnp.inf), axis=-1).astype(jnp.int32)
  any_valid = jnp.any(valid, axis=-1)[:, None, None]
  guide_index = jnp.where(any_valid, guide_index, 0)
  guide = jnp.take_along_axis(
      protos[:, None, None, :, :], guide_index[..., None, None], axis=3)[:, :, :, 0, :]
  guide = jnp.where(any_valid[..., None], guide, 0.0)
  return guide, prob_map, guide_index
