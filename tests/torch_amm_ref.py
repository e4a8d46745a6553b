"""A PyTorch oracle of the AMM attention modulation module (reference_pfenet.md §10).

The ASGNet reproduction report that introduced "ASGNet + prior" also tried AMM; neither PFENet
nor ASGNet contains it. Public code with the report's structure exists (original repository not
identified): CBAM's channel and spatial gates with the sigmoid replaced by a Gauss projection.
This file reproduces that public code's structure and module names, so its state_dict keys are
the public ones (``ChannelAMM.conv.{1,3}.{weight,bias}``, ``SpatialAMM.conv.conv.weight``,
``SpatialAMM.conv.bn.*``), and its numerics op for op (checked bitwise against it: outputs,
input and parameter gradients, BatchNorm running statistics; train and eval; float32/64):

- GaussProjection(x; μ, σ) = exp(−(x − μ)² / (2σ²)) / (√(2π)·σ); μ = mean and σ = unbiased std
  over the WHOLE gate tensor (batch included), both detached. σ = 0 gives NaN, as in the public
  code (not guarded: this is an oracle).
- Channel gate: avg_pool2d over (H, W) → Flatten → Linear(C, C//r) → ReLU → Linear(C//r, C) →
  Gauss → x · gate per channel.
- Spatial gate: ChannelPool = cat[max over C, mean over C] (max first) → BasicConv(2 → 1, 7×7,
  stride 1, padding 3, no conv bias, BatchNorm2d(eps 1e-5, momentum 0.01), no ReLU) → Gauss →
  x · gate.
- AMM = spatial gate of the channel-gated input.

No tensor is created with a fixed dtype: ``module.double()`` gives a float64 oracle.
"""
import math

import torch
from torch import nn
import torch.nn.functional as F


def GaussProjection(x, mean, std):  # noqa: N802 (the public name)
  """exp(−(x − mean)² / (2·std²)) / (√(2π)·std), elementwise."""
  return torch.exp(-(x - mean) ** 2 / (2 * std ** 2)) / (math.sqrt(2 * math.pi) * std)


def _detached_stats(t):
  """Mean and unbiased std over the whole tensor (batch included), detached."""
  return torch.mean(t).detach(), torch.std(t).detach()


class ChannelAMM(nn.Module):
  """Channel gate: GAP → MLP (C → C//reduction → C, biases, ReLU) → Gauss projection."""

  def __init__(self, in_features, reduction=16):
    super().__init__()
    hidden = in_features // reduction
    self.conv = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                              nn.Linear(hidden, in_features))

  def forward(self, x):
    size = tuple(x.shape[2:])
    gate = self.conv(F.avg_pool2d(x, size, stride=size))  # (B, C)
    mean, std = _detached_stats(gate)
    return x * GaussProjection(gate, mean, std)[..., None, None].expand_as(x)


class ChannelPool(nn.Module):
  """(B,C,H,W) → (B,2,H,W): [max over C, mean over C]."""

  def forward(self, x):
    return torch.cat([x.max(1)[0][:, None], x.mean(1)[:, None]], 1)


class BasicConv(nn.Module):
  """Conv2d → optional BatchNorm2d(eps 1e-5, momentum 0.01, affine) → optional ReLU."""

  def __init__(self, in_planes, out_planes, kernel_size, stride=1, padding=0, relu=True, bn=True,
               bias=False):
    super().__init__()
    self.out_channels = out_planes
    self.conv = nn.Conv2d(in_planes, out_planes, kernel_size, stride=stride, padding=padding,
                          bias=bias)
    self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=0.01, affine=True) if bn else None
    self.relu = nn.ReLU() if relu else None

  def forward(self, x):
    x = self.conv(x)
    if self.bn is not None:
      x = self.bn(x)
    return x if self.relu is None else self.relu(x)


class SpatialAMM(nn.Module):
  """Spatial gate: ChannelPool → 7×7 conv (2 → 1) + BN, no ReLU → Gauss projection."""

  def __init__(self, kernel_size=7):
    super().__init__()
    self.avg_pool = ChannelPool()  # the public name, though it is a max+mean pool
    self.conv = BasicConv(2, 1, kernel_size, stride=1, padding=(kernel_size - 1) // 2, relu=False)

  def forward(self, x):
    gate = self.conv(self.avg_pool(x))  # (B,1,H,W)
    mean, std = _detached_stats(gate)
    return x * GaussProjection(gate, mean, std)


class AMM(nn.Module):
  """Channel gate, then spatial gate. Parameters for (256, 16): 4,112 + 4,352 + 98 + 2 = 8,564."""

  def __init__(self, in_features, reduction):
    super().__init__()
    self.ChannelAMM = ChannelAMM(in_features=in_features, reduction=reduction)  # noqa: N815
    self.SpatialAMM = SpatialAMM()  # noqa: N815

  def forward(self, x):
    return self.SpatialAMM(self.ChannelAMM(x))
