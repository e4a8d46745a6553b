"""Deep-stem ("v2") dilated ResNet-50/101 with output stride 8, as in PSPNet/PFENet/ASGNet.

NHWC throughout. Layout (reference_asgnet.md §1):
  layer0  3x3 conv 3→64 s2, BN, ReLU, 3x3 64→64, BN, ReLU, 3x3 64→128, BN, ReLU, 3x3 max-pool s2
  layer1  bottlenecks, 256 ch, stride 1
  layer2  bottlenecks, 512 ch, stride 2 (on the 3x3 conv and the downsample)
  layer3  bottlenecks, 1024 ch, stride 1, every 3x3 conv dilation 2 / padding 2
  layer4  bottlenecks, 2048 ch, stride 1, every 3x3 conv dilation 4 / padding 4
``layer3_last_relu=False`` drops the final ReLU of layer3's last block (the "blog" PANet's
``last_relu=False``, reference_panet.md §15); the default keeps it (PSPNet/PFENet/ASGNet).
A (8k+1)x(8k+1) input gives (k+1)x(k+1) maps from layer2 on (473 → 237 → 119 → 119 → 60 → 60).

Variable names follow the PyTorch module paths with '.' → '_' (``layer1_0/downsample_1``), except
that the stem's convs and BNs are ``layer0/{conv,bn}{1,2,3}``; ``torch_module_path`` maps them to
both the ImageNet file naming and the model checkpoints' naming.
"""
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fss_jax.convert import keymap

LAYERS = ("layer0", "layer1", "layer2", "layer3", "layer4")
BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# (planes, stride, dilation) of layer1..layer4.
_STAGES = ((64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4))
EXPANSION = 4


def check_input_size(height: int, width: int) -> None:
  """Raises ValueError unless both sides are 8k+1 (the reference's size convention)."""
  for name, size in (("height", height), ("width", width)):
    if size < 9 or (size - 1) % 8:
      raise ValueError(
          f"ResNet input {name} must be 8k+1 with k >= 1 (e.g. 473, 641); got {height}x{width}")


def resnet_output_stride_size(size: int) -> int:
  """Side of the layer2..layer4 maps for an input side ``size`` = 8k+1: (size-1)//8+1."""
  check_input_size(size, size)
  return (size - 1) // 8 + 1


def _conv(features: int, kernel: int, stride: int, padding: int, dilation: int, dtype: Any,
          name: str) -> nn.Conv:
  """PyTorch-style conv: explicit symmetric padding (never "SAME"), no bias, float32 params."""
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride),
      padding=((padding, padding), (padding, padding)), kernel_dilation=(dilation, dilation),
      use_bias=False, dtype=dtype, param_dtype=jnp.float32,
      # torchvision's ResNet init (kaiming normal, fan_out); only matters without a checkpoint.
      kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"), name=name)


class TorchBatchNorm(nn.Module):
  """BatchNorm with torch.nn.BatchNorm2d semantics (eps 1e-5, momentum 0.1) on NHWC inputs.

  Variables: params ``scale``/``bias`` (C,); batch_stats ``mean``/``var`` (C,) float32 and
  ``num_batches_tracked`` (int32 scalar).

  With ``use_running_average=False`` it normalises with the biased batch variance over all but
  the last axis and, when ``batch_stats`` is mutable (and not during init), updates the running
  statistics as PyTorch's train mode does: momentum 0.1 on the mean and on the *unbiased*
  variance, and num_batches_tracked += 1. Under jit with a sharded batch the statistics are
  global over the batch (like SyncBatchNorm), not per device.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    """x: (..., C) → (..., C) in ``dtype``."""
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    count = self.variable("batch_stats", "num_batches_tracked",
                          lambda: jnp.zeros((), jnp.int32))
    # Statistics and normalisation in float32 even for a bfloat16 compute dtype (float64 for a
    # float64 one: the parity tests' exact mode).
    xf = x.astype(jnp.promote_types(self.dtype, jnp.float32))
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      n = x.size // c
      if n < 2:
        raise ValueError(f"TorchBatchNorm: batch statistics need more than 1 value per channel, "
                         f"got input shape {x.shape}")
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)
      if self.is_mutable_collection("batch_stats") and not self.is_initializing():
        m = self.momentum
        ra_mean.value = (1.0 - m) * ra_mean.value + m * mean
        ra_var.value = (1.0 - m) * ra_var.value + m * var * (n / (n - 1))
        count.value = count.value + 1
    mul = jax.lax.rsqrt(var + self.epsilon) * scale
    return ((xf - mean) * mul + bias).astype(self.dtype)


class Stem(nn.Module):
  """Deep stem (``layer0``): (B,H,W,3) → (B,(H-1)//4+1,(W-1)//4+1,2·width) for 8k+1 inputs."""
  dtype: Any = jnp.float32
  width: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    w = self.width
    for i, (features, stride) in enumerate(((w, 2), (w, 1), (2 * w, 1)), start=1):
      x = _conv(features, 3, stride, 1, 1, self.dtype, name=f"conv{i}")(x)
      x = TorchBatchNorm(dtype=self.dtype, name=f"bn{i}")(x, use_running_average)
      x = nn.relu(x)
    # Inputs are post-ReLU (>= 0), so the -inf padding of max_pool equals PyTorch's.
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class Bottleneck(nn.Module):
  """1x1 → 3x3 (stride, dilation) → 1x1 (×4) with an optional 1x1-conv+BN downsample."""
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32
  last_relu: bool = True  # False: the block returns out + identity without the final ReLU

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool, preact: bool = False):
    """x: (B,H,W,Cin) → (B,(H-1)//stride+1,(W-1)//stride+1,4·planes); with ``preact`` the pair
    (output, the residual sum before the final ReLU) (MSANet's hyper-features)."""
    bn = lambda name: TorchBatchNorm(dtype=self.dtype, name=name)
    out = _conv(self.planes, 1, 1, 0, 1, self.dtype, "conv1")(x)
    out = nn.relu(bn("bn1")(out, use_running_average))
    out = _conv(self.planes, 3, self.stride, self.dilation, self.dilation, self.dtype,
                "conv2")(out)
    out = nn.relu(bn("bn2")(out, use_running_average))
    out = _conv(self.planes * EXPANSION, 1, 1, 0, 1, self.dtype, "conv3")(out)
    out = bn("bn3")(out, use_running_average)
    if self.downsample:
      x = _conv(self.planes * EXPANSION, 1, self.stride, 0, 1, self.dtype, "downsample_0")(x)
      x = bn("downsample_1")(x, use_running_average)
    out = out + x.astype(out.dtype)
    result = nn.relu(out) if self.last_relu else out
    return (result, out) if preact else result


class ResNet(nn.Module):
  """Deep-stem dilated ResNet (output stride 8).

  Attributes:
    depth: 50 or 101.
    dtype: compute dtype (params and BN statistics stay float32).
    width: base width (64 in ResNet-50/101; planes are width·(1,2,4,8), the stem 2·width).
    blocks: blocks per stage, overriding ``depth`` (e.g. (1,1,1,1) for a small backbone trained
      from scratch on small data).
    layer3_last_relu: the final ReLU of layer3's last block (default True, the standard
      network; False: the "blog" PANet's layer3, whose 1024-channel output can be negative).
  """
  depth: int = 50
  dtype: Any = jnp.float32
  width: int = 64
  blocks: Optional[Tuple[int, int, int, int]] = None
  layer3_last_relu: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool = True,
               upto: str = "layer4", start: str = "layer0",
               hyper: bool = False) -> dict[str, jax.Array]:
    """Runs layers ``start``..``upto``.

    Args:
      x: (B,H,W,3) normalised RGB, H and W of the form 8k+1, when ``start`` is 'layer0';
        otherwise the output of the layer before ``start`` (e.g. a masked layer3 for 'layer4').
      use_running_average: True: frozen BN (running statistics); False: batch statistics (and
        running-statistics updates when ``batch_stats`` is mutable).
      upto: last layer to run, one of ``LAYERS``.
      start: first layer to run.
      hyper: also return 'hyper': the list of every bottleneck's residual sum before its final
        ReLU, in network order (MSANet's hyper-features, its ``extract_feat_res``).

    Returns:
      {'layer0': (B,2k+1,2k+1,2w), 'layer1': (B,2k+1,2k+1,4w), 'layer2': (B,k+1,k+1,8w),
       'layer3': (B,k+1,k+1,16w), 'layer4': (B,k+1,k+1,32w)} for the layers run (w = width).
    """
    if self.blocks is None and self.depth not in BLOCKS:
      raise ValueError(f"ResNet depth must be one of {sorted(BLOCKS)}, got {self.depth}")
    first, last = layer_range(start, upto)
    if first == 0:
      if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"ResNet expects (B,H,W,3) inputs, got shape {x.shape}")
      check_input_size(x.shape[1], x.shape[2])
    x = x.astype(self.dtype)
    feats = {}
    pre = []
    if first == 0:
      x = feats["layer0"] = Stem(dtype=self.dtype, width=self.width, name="layer0")(
          x, use_running_average)
    blocks_per_stage = self.blocks if self.blocks is not None else BLOCKS[self.depth]
    for stage, ((planes, stride, dilation), blocks) in enumerate(
        zip(_STAGES, blocks_per_stage), start=1):
      if not first <= stage <= last:
        continue
      planes = planes * self.width // 64
      for i in range(blocks):
        x = Bottleneck(planes, stride=stride if i == 0 else 1, dilation=dilation,
                       downsample=i == 0, dtype=self.dtype,
                       last_relu=self.layer3_last_relu or stage != 3 or i != blocks - 1,
                       name=f"layer{stage}_{i}")(x, use_running_average, preact=hyper)
        if hyper:
          x, sum_ = x
          pre.append(sum_)
      feats[f"layer{stage}"] = x
    if hyper:
      feats["hyper"] = pre
    return feats


def layer_range(start: str, upto: str) -> tuple[int, int]:
  """(first, last) indices into ``LAYERS`` of a ``start``..``upto`` run; raises on bad names."""
  for name, value in (("start", start), ("upto", upto)):
    if value not in LAYERS:
      raise ValueError(f"{name} must be one of {LAYERS}, got {value!r}")
  first, last = LAYERS.index(start), LAYERS.index(upto)
  if first > last:
    raise ValueError(f"start={start!r} comes after upto={upto!r}")
  return first, last


# ----------------------------------------------------------------------------- PyTorch names

# Stem child → its index in the nn.Sequential ``layer0`` of PSPNet-style models (PFENet, ASGNet:
# ReLUs at 2, 5, 8, max-pool at 9); the ImageNet files name them conv1, bn1, ... at the top.
STEM_INDEX = {"conv1": "0", "bn1": "1", "conv2": "3", "bn2": "4", "conv3": "6", "bn3": "7"}
# Registration order of the reference's modules (ImageNet file and model checkpoints).
TORCH_ORDER = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample",
               "layer0", "layer1", "layer2", "layer3", "layer4", "fc")
# ImageNet-file keys with no counterpart here (the classifier).
IMAGENET_IGNORED = ("fc.",)


def torch_module_path(path: tuple[str, ...], scheme: str) -> str:
  """Flax module path inside the ResNet → torch module path.

  scheme 'model': inside a PSPNet/PFENet/ASGNet checkpoint (stem ``layer0.{0,1,3,4,6,7}``);
  'imagenet': the ImageNet files ``resnet{50,101}_v2.pth`` (stem ``conv1``, ``bn1``, ...).
  Elsewhere '_' before digits becomes '.': ``layer1_0/downsample_1`` → ``layer1.0.downsample.1``.
  """
  if path and path[0] == "layer0":
    if len(path) != 2 or path[1] not in STEM_INDEX:
      raise ValueError(f"unexpected stem module {'/'.join(path)}")
    if scheme == "model":
      return f"layer0.{STEM_INDEX[path[1]]}"
    if scheme == "imagenet":
      return path[1]
    raise ValueError(f"unknown naming scheme {scheme!r}; expected 'model' or 'imagenet'")
  return keymap.dotted(path)
