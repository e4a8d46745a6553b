"""The AMM attention module (fss_jax/models/amm.py) against hand-computed gates and the PyTorch
transcription of the public AMM code (tests/torch_amm_ref.py).

The module is compared on its own (channel gate, spatial gate, both; outputs, input gradients,
parameter gradients, BatchNorm running statistics after a training-mode call) in float64 to
``numerics.EXACT`` and in float32 within the float64-vs-float32 noise of the oracle. Inside ASGNet
it is compared in tests/test_asgnet_parity.py.
"""
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fss_jax.convert import keymap
from fss_jax.convert import torch_import
from fss_jax.models import amm as amm_lib
import numerics
from tests import torch_amm_ref

torch.set_num_threads(2)


def test_gauss_projection_hand_case():
  """x = (−1, 1): μ = 0, unbiased σ = √2, so both gates are exp(−1/4) / (√(2π)·√2)."""
  with jax.enable_x64(True):
    got = np.asarray(amm_lib.gauss_projection(jnp.asarray([-1.0, 1.0], jnp.float64)))
  want = math.exp(-0.25) / (math.sqrt(2 * math.pi) * math.sqrt(2))
  np.testing.assert_allclose(got, [want, want], rtol=1e-15)
  # x = (0, 0, 3): μ = 1, σ² = (1 + 1 + 4) / 2 = 3; the gate peaks (1/(√(2π)σ) > 1 here is
  # possible for small σ: the gate is not bounded by 1).
  with jax.enable_x64(True):
    got = np.asarray(amm_lib.gauss_projection(jnp.asarray([0.0, 0.0, 3.0], jnp.float64)))
  s = math.sqrt(3.0)
  want = [math.exp(-1 / 6) / (math.sqrt(2 * math.pi) * s)] * 2 + [
      math.exp(-4 / 6) / (math.sqrt(2 * math.pi) * s)]
  np.testing.assert_allclose(got, want, rtol=1e-15)


def test_gauss_projection_sigma_zero_is_the_identity_gate():
  """σ = 0 (all values equal): the original divides 0 by 0 (NaN); ours gates by 1, and the
  gradient stays finite."""
  x = jnp.full((2, 3), 0.7, jnp.float32)
  np.testing.assert_array_equal(np.asarray(amm_lib.gauss_projection(x)), np.ones((2, 3)))
  g = jax.grad(lambda v: jnp.sum(amm_lib.gauss_projection(v) * v))(x)
  assert np.all(np.isfinite(np.asarray(g)))
  t = torch.full((2, 3), 0.7)
  assert torch.isnan(torch_amm_ref.GaussProjection(t, t.mean(), t.std())).all()


def test_amm_with_constant_gates_passes_its_input_through():
  """Zero MLP and conv weights make both gate tensors constant (σ = 0): AMM(x) = x exactly
  (the original would return NaN everywhere)."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 32))
  module = amm_lib.AMM(16)
  variables = module.init(jax.random.key(1), x, train=False)
  zeros = jax.tree.map(jnp.zeros_like, variables["params"])
  out, _ = module.apply({**variables, "params": zeros}, x, train=True, mutable=["batch_stats"])
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def _oracle(seed, c):
  torch.manual_seed(seed)
  m = torch_amm_ref.AMM(c, 16)
  with torch.no_grad():  # non-trivial BN state (the default is the identity)
    bn = m.SpatialAMM.conv.bn
    bn.weight.fill_(1.3)
    bn.bias.fill_(-0.2)
    bn.running_mean.fill_(0.1)
    bn.running_var.fill_(0.8)
  return m


def _ours(oracle, x_shape):
  init = lambda rng, x: amm_lib.AMM(16).init(rng, x, train=False)
  template = jax.eval_shape(init, jax.random.key(0), jax.ShapeDtypeStruct(x_shape, jnp.float32))
  naming = keymap.Naming(order=amm_lib.TORCH_ORDER)
  sd = {k: v.numpy() for k, v in oracle.state_dict().items()}
  return torch_import.variables_from_torch(sd, template, naming), naming


@pytest.mark.parametrize("train", [False, True])
def test_amm_matches_the_transcription(train):
  """Output, input gradient, parameter gradients and (training) BN running statistics, in
  float64 (exact) and float32 (within the oracle's float32 noise). Batch 3: μ, σ and the BN
  statistics couple the episodes of a batch, as in the original."""
  c = 64
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, c, 9, 11)).astype(np.float32)
  w = rng.normal(size=(3, c, 9, 11)).astype(np.float32)  # d loss / d output
  oracle32 = _oracle(0, c)
  results = {}
  for dtype in (torch.float64, torch.float32):
    m = _oracle(0, c).to(dtype)
    m.train(train)
    xt = torch.from_numpy(x).to(dtype).requires_grad_(True)
    out = m(xt)
    (out * torch.from_numpy(w).to(dtype)).sum().backward()
    res = {"out": out.detach().numpy().transpose(0, 2, 3, 1),
           "dx": xt.grad.numpy().transpose(0, 2, 3, 1)}
    res.update({k: p.grad.numpy() for k, p in m.named_parameters()})
    res.update({f"stats:{k}": b.numpy() for k, b in m.named_buffers()})
    results[dtype] = res
  want64, want32 = results[torch.float64], results[torch.float32]
  variables, naming = _ours(oracle32, (3, 9, 11, c))
  module = amm_lib.AMM(16)

  def ours(variables, x, w):
    def loss(params, x):
      out, upd = module.apply({**variables, "params": params}, x, train=train,
                              mutable=["batch_stats"])
      return jnp.sum(out * w), (out, upd)
    (_, (out, upd)), (gp, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables["params"], x)
    got = {"out": np.asarray(out), "dx": np.asarray(gx)}
    for path, g in flax.traverse_util.flatten_dict(gp).items():
      g = np.asarray(g)
      got[naming.key("params", path)] = g.transpose(3, 2, 0, 1) if g.ndim == 4 else g.T
    for path, v in flax.traverse_util.flatten_dict(upd["batch_stats"]).items():
      got["stats:" + naming.key("batch_stats", path)] = np.asarray(v)
    return got

  xn, wn = x.transpose(0, 2, 3, 1), w.transpose(0, 2, 3, 1)
  with jax.enable_x64(True):
    v64 = jax.tree.map(lambda a: np.asarray(a, np.float64)
                       if np.issubdtype(np.asarray(a).dtype, np.floating) else a, variables)
    got64 = ours(v64, xn.astype(np.float64), wn.astype(np.float64))
  assert set(got64) == set(want64)
  for k in want64:
    numerics.assert_exact(np.asarray(got64[k], np.float64) if k.endswith("tracked") else
                          got64[k], want64[k], k)
  got32 = ours(variables, xn, wn)
  for k in want64:
    numerics.assert_parity(got32[k], want64[k], want32[k], k)
  if train:  # the running statistics moved (momentum 0.01) and the counter counted the call
    assert want64["stats:SpatialAMM.conv.bn.num_batches_tracked"] == 1
    assert abs(float(want64["stats:SpatialAMM.conv.bn.running_mean"][0]) - 0.1) > 1e-6
