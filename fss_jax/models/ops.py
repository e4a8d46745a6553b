"""Small tensor ops with PyTorch semantics, NHWC.

The reference model is written in PyTorch; these ops reproduce the exact PyTorch behaviour that
`jax.image` and Flax do not: bilinear resizing with ``align_corners=True`` (and, for PANet, with
``align_corners=False`` as exact constant matrices), ``AdaptiveAvgPool2d`` bins, ``Weighted_GAP``
masked pooling, ``F.cosine_similarity`` and ``nn.Dropout2d``.

Resizing and adaptive pooling are separable linear maps, so they are applied as two einsums with
small constant matrices built in numpy at trace time: exact weights, cheap on every backend, and
differentiable without scatter-adds.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Interpolation weights are exact fractions; keep the contraction from dropping to TF32/bf16 on
# accelerators. The matrices are tiny, so the cost is negligible.
_PRECISION = jax.lax.Precision.HIGHEST


def _check_nhwc(x, name):
  if x.ndim != 4:
    raise ValueError(f"{name}: expected an NHWC array (B, H, W, C), got shape {x.shape}.")


def check_episode_inputs(query: jax.Array, supp_images: jax.Array,
                         supp_labels: jax.Array) -> None:
  """Raises ValueError unless query (B,H,H,3) with H = 8k+1, supp_images (B,K,H,H,3) and
  supp_labels (B,K,H,H): the inputs every episodic model takes."""
  b, hh, ww, c = query.shape
  if hh != ww or (hh - 1) % 8 != 0 or c != 3:
    raise ValueError(f"query must be (B,H,H,3) with H = 8k+1 (e.g. 473); got {query.shape}")
  if supp_images.ndim != 5 or supp_images.shape[0] != b or supp_images.shape[2:] != (hh, ww, 3):
    raise ValueError(f"supp_images must be (B,K,{hh},{ww},3) for query {query.shape}; "
                     f"got {supp_images.shape}")
  if supp_labels.shape != supp_images.shape[:4]:
    raise ValueError(f"supp_labels must be {supp_images.shape[:4]}; got {supp_labels.shape}")


def _check_out_hw(out_hw, name):
  out_hw = tuple(int(s) for s in out_hw)
  if len(out_hw) != 2 or min(out_hw) < 1:
    raise ValueError(f"{name}: out_hw must be two positive ints, got {out_hw}.")
  return out_hw


def _frozen(m):
  # The matrices are cached and shared; make accidental in-place edits fail loudly. They stay
  # float64 here and are cast to the compute dtype where used.
  m.setflags(write=False)
  return m


@functools.lru_cache(maxsize=256)
def _bilinear_ac_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) float64 matrix of 1-D linear interpolation with align_corners=True.

  Output i samples source coordinate i * (in - 1) / (out - 1) (0 when out == 1), blending the two
  neighbouring source pixels as PyTorch's upsample_bilinear2d does.
  """
  scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
  return _two_tap_matrix(np.arange(out_size, dtype=np.float64) * scale, in_size)


@functools.lru_cache(maxsize=256)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) float64 matrix of 1-D linear interpolation with align_corners=False (read-only).

  PyTorch's ``upsample_bilinear2d`` without a scale factor: output i samples source coordinate
  max((i + 0.5) · in / out − 0.5, 0), blending pixels i0 = floor(src) and min(i0 + 1, in − 1)
  (the top index is clamped, so an edge row takes all its weight from the last pixel). No
  antialiasing: a downsampling matrix is the same two-tap rule, as ``F.interpolate`` does.
  Upsampling equals ``jax.image.resize(method='linear')``.
  """
  src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5,
                   0.0)
  return _two_tap_matrix(src, in_size)


def _two_tap_matrix(src: np.ndarray, in_size: int) -> np.ndarray:
  """(out, in) read-only matrix: row i blends source pixels floor(src[i]) and the next one
  (clamped to in - 1) with weights 1 - frac and frac."""
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  frac = src - i0
  m = np.zeros((len(src), in_size), np.float64)
  rows = np.arange(len(src))
  np.add.at(m, (rows, i0), 1.0 - frac)
  np.add.at(m, (rows, i1), frac)
  return _frozen(m)


@functools.lru_cache(maxsize=256)
def _adaptive_avg_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) float64 matrix of PyTorch AdaptiveAvgPool 1-D bins.

  Bin i averages [floor(i * in / out), ceil((i + 1) * in / out)): bins overlap when the sizes do
  not divide and a source pixel is replicated when out > in.
  """
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # Integer ceil; no float rounding.
    m[i, start:end] = 1.0 / (end - start)
  return _frozen(m)


def _apply_separable(x, mh, mw):
  """Applies (h, H) along axis 1 and (w, W) along axis 2 of x (B, H, W, C)."""
  dtype = x.dtype
  # Promote to at least float32 so low-precision inputs keep exact interpolation weights.
  compute = jnp.promote_types(dtype, jnp.float32)
  x = x.astype(compute)
  if mh is not None:
    x = jnp.einsum("hH,bHWc->bhWc", jnp.asarray(mh, compute), x, precision=_PRECISION)
  if mw is not None:
    x = jnp.einsum("wW,bhWc->bhwc", jnp.asarray(mw, compute), x, precision=_PRECISION)
  return x.astype(dtype)


def resize_bilinear_ac(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Bilinear resize with PyTorch ``F.interpolate(mode='bilinear', align_corners=True)``.

  Args:
    x: (B, H, W, C) floating array.
    out_hw: static output size (h, w); up- and down-sampling both allowed.

  Returns:
    (B, h, w, C) array of x's dtype; x itself when (h, w) == (H, W).
  """
  return _resize_by_matrices(x, out_hw, _bilinear_ac_matrix, "resize_bilinear_ac")


def torch_nearest_indices(n_in: int, n_out: int) -> np.ndarray:
  """Source index of each output pixel of PyTorch's legacy ``F.interpolate(mode='nearest',
  size=...)``: min(floor(dst · (n_in / n_out)), n_in − 1) with the scale and product in float32,
  as its kernel computes them (473 → 60 picks 0, 7, 15, ...): (n_out,) int64."""
  scale = np.float32(n_in) / np.float32(n_out)
  src = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(src, n_in - 1)


def resize_nearest_torch(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """(B,H,W,...) → (B,oh,ow,...) by ``torch_nearest_indices`` on each spatial axis."""
  rows = torch_nearest_indices(x.shape[1], out_hw[0])
  cols = torch_nearest_indices(x.shape[2], out_hw[1])
  return x[:, rows][:, :, cols]


def resize_bilinear(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Bilinear resize with PyTorch ``F.interpolate(mode='bilinear', align_corners=False)``.

  Args:
    x: (B, H, W, C) floating array (computed in at least float32).
    out_hw: static output size (h, w); up- and down-sampling both allowed (no antialiasing).

  Returns:
    (B, h, w, C) array of x's dtype; x itself when (h, w) == (H, W).
  """
  return _resize_by_matrices(x, out_hw, bilinear_matrix, "resize_bilinear")


def _resize_by_matrices(x: jax.Array, out_hw, matrix, name: str) -> jax.Array:
  """x (B, H, W, C) resized to out_hw by ``matrix(in, out)`` along each axis whose size changes."""
  _check_nhwc(x, name)
  out_h, out_w = _check_out_hw(out_hw, name)
  in_h, in_w = x.shape[1], x.shape[2]
  if (out_h, out_w) == (in_h, in_w):
    return x
  mh = None if out_h == in_h else matrix(in_h, out_h)
  mw = None if out_w == in_w else matrix(in_w, out_w)
  return _apply_separable(x, mh, mw)


def adaptive_avg_pool(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """PyTorch ``nn.AdaptiveAvgPool2d(out_hw)`` on NHWC.

  Args:
    x: (B, H, W, C) floating array.
    out_hw: static output size (oh, ow); may exceed (H, W) (replication).

  Returns:
    (B, oh, ow, C) array of x's dtype; x itself when (oh, ow) == (H, W).
  """
  _check_nhwc(x, "adaptive_avg_pool")
  out_h, out_w = _check_out_hw(out_hw, "adaptive_avg_pool")
  in_h, in_w = x.shape[1], x.shape[2]
  if (out_h, out_w) == (in_h, in_w):
    return x
  mh = None if out_h == in_h else _adaptive_avg_matrix(in_h, out_h)
  mw = None if out_w == in_w else _adaptive_avg_matrix(in_w, out_w)
  return _apply_separable(x, mh, mw)


MASKED_POOL_EPS = 0.0005  # the reference's Weighted_GAP: area + 0.0005


def masked_average_pool(feat: jax.Array, mask: jax.Array,
                        eps: float = MASKED_POOL_EPS) -> jax.Array:
  """Soft-masked global average of features (the reference's ``Weighted_GAP``).

  Args:
    feat: (B, h, w, C) features.
    mask: (B, h, w) soft mask (e.g. a bilinearly resized binary mask).
    eps: added to the mask area so an empty mask gives zeros instead of NaN.

  Returns:
    (B, C): sum(feat * mask) / (sum(mask) + eps) over h, w.
  """
  if feat.ndim != 4 or mask.shape != feat.shape[:3]:
    raise ValueError(
        f"masked_average_pool: expected feat (B, h, w, C) and mask (B, h, w), got "
        f"{feat.shape} and {mask.shape}.")
  mask = mask.astype(feat.dtype)
  # A contraction, not a broadcast product: no (B,h,w,C) temporary (several times faster on CPU).
  total = jnp.einsum("bhwc,bhw->bc", feat, mask, precision=jax.lax.Precision.HIGHEST)
  area = jnp.sum(mask, axis=(1, 2))[:, None]
  return total / (area + eps)


def _safe_norm(x, axis):
  """L2 norm along axis (keepdims) whose gradient is 0 at the zero vector, as in PyTorch."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def normalize_l2(x: jax.Array, axis: int = -1, eps: float = 1e-7) -> jax.Array:
  """x / max(||x||, eps) along axis, with PyTorch ``F.cosine_similarity``'s gradient.

  PyTorch clamps the norm in place under no_grad, so the gradient flows through the unclamped
  norm even when the clamp is active; the straight-through term below reproduces that. The zero
  vector maps to zero with a finite gradient.

  Args:
    x: array of any shape.
    axis: the vector axis.
    eps: lower bound on the norm in the denominator.

  Returns:
    Array of x's shape.
  """
  norm = _safe_norm(x, axis)
  denom = norm + jax.lax.stop_gradient(jnp.maximum(norm, eps) - norm)
  return x / denom


def cosine_similarity(a: jax.Array, b: jax.Array, axis: int = -1,
                      eps: float = 1e-7) -> jax.Array:
  """PyTorch 2.x ``F.cosine_similarity(a, b, dim=axis, eps=eps)`` with broadcasting.

  Each vector is divided by max(||v||, eps) before the dot product, so the result stays in
  [-1, 1] and is 0 for a zero vector.

  Args:
    a, b: arrays broadcastable against each other.
    axis: the vector axis (of the broadcast shape).
    eps: lower bound on each norm.

  Returns:
    The broadcast shape without `axis`.
  """
  a, b = jnp.broadcast_arrays(a, b)
  return jnp.sum(normalize_l2(a, axis, eps) * normalize_l2(b, axis, eps), axis=axis)


class Dropout2d(nn.Module):
  """PyTorch ``nn.Dropout2d`` on NHWC: zeroes whole channels per example.

  Kept channels are scaled by 1 / (1 - rate). Needs the 'dropout' RNG when not deterministic.
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    """x: (B, H, W, C) → same shape."""
    _check_nhwc(x, "Dropout2d")
    return nn.Dropout(rate=self.rate, broadcast_dims=(1, 2))(x, deterministic=deterministic)
