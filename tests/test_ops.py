"""Parity of fss_jax.models.ops with the PyTorch ops they reproduce.

Each op runs on both sides in float64 (ours under jax.enable_x64: equal to numerics.EXACT) and
in float32 (ours against PyTorch float64, within numerics' multiple of PyTorch float32's own
error), forward and gradient of <out, w> for a random cotangent w.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fss_jax.models import ops
import numerics


def _rand(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _to_nchw(x, dtype=torch.float64):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dtype)


def _to_nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _check_op_and_grad(jax_fn, torch_fn, x, out_shape):
  """Compares forward and the gradient of <out, w> for a random cotangent w, float64 exactly
  and float32 within the float32 noise of the PyTorch op."""
  w = _rand(out_shape, seed=1)

  def ours(dtype):
    v, c = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    return jax.jit(jax_fn)(v), jax.grad(lambda v: jnp.sum(jax_fn(v) * c))(v)

  want = {}
  for dtype in (torch.float64, torch.float32):
    xt = _to_nchw(x, dtype).requires_grad_(True)
    out_t = torch_fn(xt)
    (out_t * _to_nchw(w, dtype)).sum().backward()
    want[dtype] = (_to_nhwc(out_t), _to_nhwc(xt.grad))

  with jax.enable_x64(True):
    out, grad = ours(jnp.float64)
    numerics.assert_exact(out, want[torch.float64][0], "forward")
    numerics.assert_exact(grad, want[torch.float64][1], "grad")
  out, grad = ours(jnp.float32)
  assert out.shape == out_shape and out.dtype == jnp.float32
  for name, got, w64, w32 in zip(("forward", "grad"), (out, grad), want[torch.float64],
                                 want[torch.float32]):
    numerics.assert_parity(got, w64, w32, name)


RESIZE_CASES = [
    ((60, 60), (8, 8)),
    ((60, 60), (30, 30)),
    ((60, 60), (15, 15)),
    ((15, 15), (60, 60)),
    ((8, 8), (1, 1)),
    ((7, 5), (3, 11)),
    ((1, 4), (5, 1)),
    ((9, 9), (65, 65)),  # x8 upsample of logits: (h - 1) * 8 + 1.
]


@pytest.mark.parametrize("in_hw,out_hw", RESIZE_CASES)
def test_resize_bilinear_ac_matches_torch(in_hw, out_hw):
  x = _rand((2, *in_hw, 3))
  _check_op_and_grad(
      lambda v: ops.resize_bilinear_ac(v, out_hw),
      lambda t: F.interpolate(t, size=out_hw, mode="bilinear", align_corners=True),
      x, (2, *out_hw, 3))


def test_resize_bilinear_ac_identity_and_corners():
  x = jnp.asarray(_rand((1, 6, 6, 2)))
  assert ops.resize_bilinear_ac(x, (6, 6)) is x
  up = ops.resize_bilinear_ac(x, (11, 16))
  # align_corners=True keeps the four corner pixels exactly.
  np.testing.assert_array_equal(np.asarray(up)[:, [0, 0, -1, -1], [0, -1, 0, -1]],
                                np.asarray(x)[:, [0, 0, -1, -1], [0, -1, 0, -1]])


def test_resize_bilinear_ac_hand_case():
  # 1-D ramp 0..3 resized 4 -> 7: source coords i * 3 / 6 = i / 2.
  x = jnp.arange(4.0).reshape(1, 4, 1, 1)
  out = ops.resize_bilinear_ac(x, (7, 1))
  # i/2 is exact in binary; 1e-7 allows one ulp of the interpolation weights' rounding.
  np.testing.assert_allclose(np.asarray(out).ravel(), np.arange(7) / 2.0, rtol=0, atol=1e-7)


def test_resize_bilinear_ac_keeps_dtype():
  x = jnp.asarray(_rand((1, 5, 5, 2))).astype(jnp.bfloat16)
  assert ops.resize_bilinear_ac(x, (9, 9)).dtype == jnp.bfloat16


def test_resize_rejects_bad_input():
  with pytest.raises(ValueError, match="NHWC"):
    ops.resize_bilinear_ac(jnp.zeros((4, 4, 3)), (2, 2))
  with pytest.raises(ValueError, match="out_hw"):
    ops.resize_bilinear_ac(jnp.zeros((1, 4, 4, 3)), (0, 2))


POOL_CASES = [
    ((60, 60), (8, 8)),
    ((60, 60), (30, 30)),
    ((60, 60), (15, 15)),
    ((15, 15), (60, 60)),
    ((7, 7), (3, 3)),
    ((5, 9), (1, 4)),
    ((3, 2), (7, 5)),
]


@pytest.mark.parametrize("in_hw,out_hw", POOL_CASES)
def test_adaptive_avg_pool_matches_torch(in_hw, out_hw):
  x = _rand((2, *in_hw, 3))
  _check_op_and_grad(
      lambda v: ops.adaptive_avg_pool(v, out_hw),
      lambda t: F.adaptive_avg_pool2d(t, out_hw),
      x, (2, *out_hw, 3))


def test_adaptive_avg_pool_hand_case():
  # 5 -> 3 bins: [0, 2), [1, 4), [3, 5) overlap.
  x = jnp.asarray([0.0, 1.0, 2.0, 3.0, 4.0]).reshape(1, 5, 1, 1)
  out = ops.adaptive_avg_pool(x, (3, 1))
  # means of 2-3 small integers: exact in binary up to the division's ulp.
  np.testing.assert_allclose(np.asarray(out).ravel(), [0.5, 2.0, 3.5], rtol=0, atol=1e-7)


def test_masked_average_pool_matches_formula():
  rng = np.random.default_rng(0)
  feat = rng.standard_normal((3, 6, 5, 4)).astype(np.float32)
  mask = rng.uniform(size=(3, 6, 5)).astype(np.float32)
  mask[1] = 0.0  # Empty mask: the eps keeps it finite (zeros).
  mask[2] = (mask[2] > 0.5).astype(np.float32)
  out = np.asarray(ops.masked_average_pool(jnp.asarray(feat), jnp.asarray(mask)))

  # The reference: avg_pool over the whole map times its area, divided by (area + 0.0005).
  ft, mt = _to_nchw(feat), torch.from_numpy(mask).double()[:, None]
  h, w = feat.shape[1:3]
  num = F.avg_pool2d(ft * mt, (h, w)) * h * w
  area = F.avg_pool2d(mt, (h, w)) * h * w + 0.0005
  expected = (num / area)[:, :, 0, 0].numpy()
  with jax.enable_x64(True):
    numerics.assert_exact(ops.masked_average_pool(jnp.asarray(feat, jnp.float64),
                                                  jnp.asarray(mask, jnp.float64)), expected)
  # float32: a mean of 30 products, a few ulps (1.2e-7) relative; 1e-6 is ~8 ulps.
  assert numerics.rel_err(out, expected) <= 1e-6
  np.testing.assert_array_equal(out[1], 0.0)


def _cos_inputs():
  rng = np.random.default_rng(3)
  a = rng.standard_normal((2, 1, 5, 8)).astype(np.float32)
  b = rng.standard_normal((1, 4, 1, 8)).astype(np.float32)
  a[0, 0, 0] = 0.0                       # Zero vector.
  a[1, 0, 1] = 1e-9 * a[1, 0, 1]         # Norm far below eps.
  b[0, 2, 0] = 3e-8 * b[0, 2, 0] / np.linalg.norm(b[0, 2, 0])  # Norm just below eps.
  return a, b


def test_cosine_similarity_matches_torch_forward_and_grad():
  """Forward and gradients, with a zero vector and vectors whose norm is below or just below
  the eps on the product of norms (gradients there are ~1/eps)."""
  a, b = _cos_inputs()
  w = _rand((2, 4, 5), seed=5)
  f = lambda x, y: ops.cosine_similarity(x, y, axis=-1)

  def ours(dtype):
    x, y, c = (jnp.asarray(v, dtype) for v in (a, b, w))
    return (jax.jit(f)(x, y),) + jax.grad(lambda x, y: jnp.sum(f(x, y) * c), argnums=(0, 1))(x, y)

  want = {}
  for dtype in (torch.float64, torch.float32):
    at = torch.from_numpy(a).to(dtype).requires_grad_(True)
    bt = torch.from_numpy(b).to(dtype).requires_grad_(True)
    out_t = F.cosine_similarity(at, bt, dim=-1, eps=1e-7)
    (out_t * torch.from_numpy(w).to(dtype)).sum().backward()
    want[dtype] = (out_t.detach().numpy(), at.grad.numpy(), bt.grad.numpy())

  names = ("forward", "grad_a", "grad_b")
  with jax.enable_x64(True):
    for name, got, w64 in zip(names, ours(jnp.float64), want[torch.float64]):
      numerics.assert_exact(got, w64, name)
  got32 = ours(jnp.float32)
  assert got32[0].shape == (2, 4, 5)
  assert np.all(np.asarray(got32[0])[0, :, 0] == 0.0)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in got32)
  for name, got, w64, w32 in zip(names, got32, want[torch.float64], want[torch.float32]):
    numerics.assert_parity(got, w64, w32, name)


def test_cosine_similarity_other_axis_and_matmul_form():
  a, b = _cos_inputs()
  # Channel axis first: same numbers.
  out = ops.cosine_similarity(np.moveaxis(a, -1, 0), np.moveaxis(b, -1, 0), axis=0)
  # Same reductions over another axis; XLA may order the 8-term sums differently: a few ulps.
  np.testing.assert_allclose(np.asarray(out), np.asarray(ops.cosine_similarity(a, b)),
                             rtol=1e-6, atol=1e-7)
  # GPA computes cosine as normalize_l2(q) @ normalize_l2(p).T.
  q, p = a.reshape(-1, 8), b.reshape(-1, 8)
  mat = ops.normalize_l2(q) @ ops.normalize_l2(p).T
  direct = ops.cosine_similarity(q[:, None], p[None])
  # Two float32 formulas of one value (normalise-then-dot vs dot-over-norms): ~10 ulps apart.
  np.testing.assert_allclose(np.asarray(mat), np.asarray(direct), rtol=1e-5, atol=1e-6)


def test_normalize_l2_values():
  x = np.array([[3.0, 4.0], [0.0, 0.0], [3e-8, 4e-8]], np.float32)
  out = np.asarray(ops.normalize_l2(jnp.asarray(x)))
  # 0.6 etc. are not float32-representable: the result is within an ulp or two (rtol 1e-6).
  np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [0.3, 0.4]], rtol=1e-6)


class _Wrap(nn.Module):
  rate: float

  @nn.compact
  def __call__(self, x, deterministic):
    return ops.Dropout2d(self.rate)(x, deterministic=deterministic)


def test_dropout2d_drops_whole_channels_and_rescales():
  rate = 0.5
  x = jnp.asarray(np.abs(_rand((4, 5, 6, 32))) + 0.1)
  mod = _Wrap(rate)
  params = mod.init(jax.random.key(0), x, deterministic=True)
  assert jax.tree_util.tree_leaves(params) == []
  y = np.asarray(mod.apply(params, x, deterministic=False,
                           rngs={"dropout": jax.random.key(1)}))
  ratio = y / np.asarray(x)
  per_channel = ratio.reshape(4, -1, 32)
  # Each (example, channel) is either all zero or all scaled by 1 / (1 - rate).
  kept = np.all(np.isclose(per_channel, 1 / (1 - rate)), axis=1)
  dropped = np.all(per_channel == 0.0, axis=1)
  assert np.all(kept | dropped)
  assert 0 < dropped.sum() < dropped.size
  # The pattern differs across examples (PyTorch draws per (N, C)).
  assert not np.all(dropped == dropped[:1])


def test_dropout2d_deterministic_is_identity():
  x = jnp.asarray(_rand((2, 3, 3, 4)))
  mod = _Wrap(0.5)
  y = mod.apply({}, x, deterministic=True)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
