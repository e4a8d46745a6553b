"""The attention modulation module (AMM): CBAM with a Gauss projection in place of the sigmoid.

Tried on ASGNet by a reproduction report of ASGNet (reference_pfenet.md §10). No PFENet or
ASGNet code contains it; public code with the report's structure names its modules ``AMM``,
``ChannelAMM``, ``SpatialAMM`` (CBAM, Jongchan/attention-module ``MODELS/cbam.py``, with the
gate changed). Variable names follow those modules so PyTorch keys map by the common rule:
``amm.ChannelAMM.conv.{1,3}.{weight,bias}`` (the two Linear layers),
``amm.SpatialAMM.conv.conv.weight`` (7x7, no bias), ``amm.SpatialAMM.conv.bn.*`` (BatchNorm2d,
eps 1e-5, momentum 0.01).

  GaussProjection(x; μ, σ) = exp(−(x − μ)² / (2σ²)) / (√(2π)·σ)

with μ = mean and σ = unbiased standard deviation (N − 1) of the *whole* gate tensor (batch
included), both without gradient. The gate is not bounded by 1 (its peak is 1/(√(2π)σ)), and the
episodes of a batch are coupled through μ and σ, as in the original.

σ = 0 (every gate value equal, e.g. a constant input) gives 0/0 = NaN in the original. Here the
gate is then 1 (the module passes its input through unchanged): with no spread there is nothing
to modulate, and a NaN would end the run.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fss_jax.models import resnet

# PyTorch's Linear / Conv2d default init: U(−1/√fan_in, 1/√fan_in) for weights and biases.
_torch_uniform = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def gauss_projection(x: jax.Array) -> jax.Array:
  """The Gauss gate of ``x`` (any shape) with μ, σ over all of ``x``, both without gradient.

  Returns an array shaped like ``x``; all ones where σ = 0 (see the module docstring).
  """
  n = x.size
  mean = jax.lax.stop_gradient(jnp.mean(x))
  std = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(jnp.square(x - mean)) / max(n - 1, 1)))
  ok = std > 0
  s = jnp.where(ok, std, 1.0)
  gate = jnp.exp(-jnp.square(x - mean) / (2.0 * jnp.square(s))) / (math.sqrt(2.0 * math.pi) * s)
  return jnp.where(ok, gate, jnp.ones_like(gate))


class ChannelAMM(nn.Module):
  """Channel gate: global average pool → Linear C→C/r → ReLU → Linear C/r→C → Gauss.

  Parameters ``conv_1``, ``conv_3`` (the original's ``conv`` Sequential: Flatten, Linear, ReLU,
  Linear). (B,H,W,C) → (B,H,W,C).
  """
  reduction: int = 16

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    if c // self.reduction < 1:
      raise ValueError(f"ChannelAMM: {c} channels with reduction {self.reduction} leave none")
    y = jnp.mean(x, axis=(1, 2))                                          # (B,C)
    r = c // self.reduction
    y = nn.relu(nn.Dense(r, kernel_init=_torch_uniform, bias_init=_fan_in_bias(c),
                         name="conv_1")(y))
    y = nn.Dense(c, kernel_init=_torch_uniform, bias_init=_fan_in_bias(r), name="conv_3")(y)
    return x * gauss_projection(y)[:, None, None, :]


class BasicConv(nn.Module):
  """The original's BasicConv(2, 1, 7, padding 3, relu=False): 7x7 conv (no bias) → BatchNorm
  (eps 1e-5, momentum 0.01). Submodules ``conv``, ``bn``."""
  kernel: int = 7

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    p = self.kernel // 2
    x = nn.Conv(1, (self.kernel, self.kernel), padding=((p, p), (p, p)), use_bias=False,
                kernel_init=_torch_uniform, name="conv")(x)
    return resnet.TorchBatchNorm(momentum=0.01, dtype=x.dtype, name="bn")(
        x, use_running_average=use_running_average)


class SpatialAMM(nn.Module):
  """Spatial gate: [max, mean] over channels (max first) → BasicConv → Gauss.

  (B,H,W,C) → (B,H,W,C). In training the BatchNorm uses the batch's statistics and updates its
  running statistics (call apply with ``mutable=['batch_stats']``).
  """

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    pooled = jnp.concatenate([jnp.max(x, -1, keepdims=True), jnp.mean(x, -1, keepdims=True)],
                             axis=-1)
    y = BasicConv(name="conv")(pooled, use_running_average)
    return x * gauss_projection(y)


class AMM(nn.Module):
  """Channel gate, then spatial gate. (B,H,W,C) → (B,H,W,C)."""
  reduction: int = 16

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = ChannelAMM(self.reduction, name="ChannelAMM")(x)
    return SpatialAMM(name="SpatialAMM")(x, use_running_average=not train)


def _fan_in_bias(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


# Registration order of the original's modules (for writing state_dicts in its key order).
TORCH_ORDER = ("ChannelAMM", "SpatialAMM", "conv", "bn")
