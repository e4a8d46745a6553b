"""VGG-16 backbones: VGG16-bn in PFENet's layer split, and PANet's VGG-16 (``VGG16PANet``, below).

VGG16-bn (torchvision ``vgg16_bn`` ``features``, cfg "D"). NHWC throughout. Every conv is 3x3, padding 1, **with bias**, followed by BatchNorm and ReLU;
every max-pool is 2x2 stride 2 with ``ceil_mode=True``. torchvision's ``features`` indices are
cut as PFENet's ``get_vgg16_layer`` does (reference_pfenet.md §1):
  layer0  features 0-6    conv1_1, conv1_2, pool1       64 ch, stride 2
  layer1  features 7-13   conv2_x, pool2               128 ch, stride 4
  layer2  features 14-23  conv3_x, pool3               256 ch, stride 8
  layer3  features 24-33  conv4_x, pool4               512 ch, stride 16
  layer4  features 34-42  conv5_x (no pool5)           512 ch, stride 16
473 → 237 → 119 → 60 (layer2) → 30 (layer3, layer4); 641 → 321 → 161 → 81 → 41.

Variable names are the index inside each PFENet layer: ``layer2_7`` is the BatchNorm at
``layer2.7`` of a PFENet checkpoint and at ``features.21`` of torchvision's ImageNet file
(``torch_module_path``).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fss_jax.convert import keymap
from fss_jax.models import resnet

LAYERS = resnet.LAYERS
# (first torchvision ``features`` index, conv widths, ends with a max-pool) per layer.
STAGES = ((0, (64, 64), True), (7, (128, 128), True), (14, (256, 256, 256), True),
          (24, (512, 512, 512), True), (34, (512, 512, 512), False))
# torchvision's classifier (and avgpool, which has no tensors): no counterpart here.
IMAGENET_IGNORED = ("classifier.",)
TORCH_ORDER = ("features", "layer0", "layer1", "layer2", "layer3", "layer4", "classifier")


def max_pool_ceil(x: jax.Array) -> jax.Array:
  """``nn.MaxPool2d(2, 2, ceil_mode=True)``: (B,H,W,C) → (B,⌈(H−2)/2⌉+1,⌈(W−2)/2⌉+1,C).

  An odd side gets a last window of one row/column (PyTorch takes the max over the valid
  elements; the -inf padding of ``nn.max_pool`` does the same).
  """
  return nn.max_pool(x, (2, 2), strides=(2, 2),
                     padding=((0, x.shape[1] % 2), (0, x.shape[2] % 2)))


class VGG16BN(nn.Module):
  """torchvision ``vgg16_bn`` features as PFENet's layer0..layer4 (output stride 16).

  Attributes:
    dtype: compute dtype (params and BN statistics stay float32).
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool = True,
               upto: str = "layer4", start: str = "layer0",
               hyper: bool = False) -> dict[str, jax.Array]:
    """Runs layers ``start``..``upto`` (same contract as ``resnet.ResNet``).

    Args:
      x: (B,H,W,3) normalised RGB when ``start`` is 'layer0', else the previous layer's output.
      use_running_average: True: frozen BN; False: batch statistics (see ``TorchBatchNorm``).
      hyper: also return 'hyper': the raw outputs (before BN) of layer3's and layer4's convs
        (conv4_1..3, conv5_1..3), then layer4's output (MSANet's ``extract_feat_vgg``).
    Returns:
      {'layer0': (B,H/2,W/2,64), 'layer1': (·/4,128), 'layer2': (·/8,256), 'layer3': (·/16,512),
       'layer4': (·/16,512)} for the layers run (sides rounded up at every pool).
    """
    first, last = resnet.layer_range(start, upto)
    if first == 0 and (x.ndim != 4 or x.shape[-1] != 3):
      raise ValueError(f"VGG16BN expects (B,H,W,3) inputs, got shape {x.shape}")
    x = x.astype(self.dtype)
    feats = {}
    pre = []
    for stage in range(first, last + 1):
      name = LAYERS[stage]
      _, widths, pool = STAGES[stage]
      for i, features in enumerate(widths):
        x = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                    param_dtype=jnp.float32,
                    # torchvision's VGG init (kaiming normal, fan_out; zero bias).
                    kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                    name=f"{name}_{3 * i}")(x)
        if hyper and stage >= 3:
          pre.append(x)
        x = resnet.TorchBatchNorm(dtype=self.dtype, name=f"{name}_{3 * i + 1}")(
            x, use_running_average)
        x = nn.relu(x)
      if pool:
        x = max_pool_ceil(x)
      feats[name] = x
    if hyper:
      feats["hyper"] = pre + [x]
    return feats


def torch_module_path(path: tuple[str, ...], scheme: str) -> str:
  """Flax module path inside the VGG → torch module path.

  scheme 'model': inside a PFENet checkpoint (``layer2.7``); 'imagenet': torchvision's
  ``vgg16_bn`` file (``features.21`` = offset 14 of layer2 + 7).
  """
  if len(path) != 1:
    raise ValueError(f"unexpected VGG module {'/'.join(path)}")
  if scheme == "model":
    return keymap.dotted(path)
  if scheme == "imagenet":
    layer, _, index = path[0].partition("_")
    if layer not in LAYERS or not index.isdigit():
      raise ValueError(f"unexpected VGG module {path[0]!r}")
    return f"features.{STAGES[LAYERS.index(layer)][0] + int(index)}"
  raise ValueError(f"unknown naming scheme {scheme!r}; expected 'model' or 'imagenet'")


# ----------------------------------------------------------------------------- PANet's VGG-16

# PANet's ``Encoder.features`` (reference_panet.md §1), one entry per conv block: (its child
# index in ``features``, conv widths, dilation, torchvision ``features`` index of its first conv,
# stride of the 3x3 max-pool after it or 0 for none). Convs sit at 0, 2, 4 inside a block (a ReLU
# after each), at first + 0, 2, 4 in torchvision's vgg16.
PANET_BLOCKS = ((0, (64, 64), 1, 0, 2), (2, (128, 128), 1, 5, 2), (4, (256, 256, 256), 1, 10, 2),
                (6, (512, 512, 512), 1, 17, 1), (8, (512, 512, 512), 2, 24, 0))
# Registration order of the torch modules: the Encoder's (and torchvision's) ``features``, then
# torchvision's classifier, which has no counterpart here.
PANET_TORCH_ORDER = ("features", "classifier")


def max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
  """``nn.MaxPool2d(3, stride, padding=1)`` (-inf padding, floor mode): a side H becomes
  ⌈H/2⌉ for stride 2, H for stride 1."""
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)))


def torch_conv_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default ``Conv2d`` bias init: U(−1/√fan_in, 1/√fan_in), fan_in = in·kh·kw."""
  bound = 1.0 / fan_in ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class VGG16PANet(nn.Module):
  """PANet's VGG-16 encoder (kaixin96/PANet ``models/vgg.py``), output stride 8, no BatchNorm.

  Every conv is 3x3 with bias and padding = dilation, followed by ReLU, except conv5_3 (the
  output may be negative). Pools 1-3 are 3x3 stride 2 pad 1 (⌈H/2⌉), pool4 3x3 stride 1, no pool5;
  conv5 is dilated 2. 417 → 209 → 105 → 53 → 53 → 53; an 8k+1 side gives (H−1)/8+1.

  The layers of the backbone contract (torchvision ``features`` indices in brackets):
    layer0  conv1_1, conv1_2, pool1 [0-4]      64 ch, stride 2
    layer1  conv2_x, pool2 [5-9]              128 ch, stride 4
    layer2  conv3_x, pool3 [10-16]            256 ch, stride 8
    layer3  conv4_x, pool4 (stride 1) [17-23] 512 ch, stride 8
    layer4  conv5_x, dilated, no last ReLU    512 ch, stride 8: PANet's features (the only
            [24-29]                            output PANet uses)
  i.e. layer k = PANet's ``features[2k]`` conv block and the pool after it.

  Variable names are the Encoder's module paths, ``features_6_2`` = ``features.6.2`` (conv4_2;
  ``encoder.backbone.features.6.2`` in a PANet checkpoint, ``features.19`` in torchvision's
  ``vgg16-397923af.pth``). Initialisation is PANet's: conv weights Kaiming-normal (fan_in, ReLU
  gain: std √(2/fan_in), not truncated), biases PyTorch's default U(±1/√fan_in). The whole
  encoder trains in PANet; there are no batch statistics.

  Attributes:
    dtype: compute dtype (params stay float32).
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool = True,
               upto: str = "layer4", start: str = "layer0") -> dict[str, jax.Array]:
    """Runs layers ``start``..``upto`` (the backbone contract of ``resnet.ResNet``).

    Args:
      x: (B,H,W,3) normalised RGB when ``start`` is 'layer0', else the previous layer's output.
      use_running_average: unused (no BatchNorm); accepted for the contract.
    Returns:
      {'layer0': (B,⌈H/2⌉,·,64), 'layer1': (·/4,128), 'layer2': (·/8,256), 'layer3': (·/8,512),
       'layer4': (·/8,512)} for the layers run (sides rounded up at every stride-2 pool).
    """
    del use_running_average
    first, last = resnet.layer_range(start, upto)
    if first == 0 and (x.ndim != 4 or x.shape[-1] != 3):
      raise ValueError(f"VGG16PANet expects (B,H,W,3) inputs, got shape {x.shape}")
    x = x.astype(self.dtype)
    feats = {}
    for stage in range(first, last + 1):
      block, widths, dilation, _, pool = PANET_BLOCKS[stage]
      for i, features in enumerate(widths):
        x = nn.Conv(features, (3, 3), padding=((dilation, dilation), (dilation, dilation)),
                    kernel_dilation=(dilation, dilation), dtype=self.dtype,
                    param_dtype=jnp.float32,
                    # PANet's Encoder._init_weights: kaiming_normal_(nonlinearity='relu').
                    kernel_init=nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
                    bias_init=torch_conv_bias_init(9 * x.shape[-1]),
                    name=f"features_{block}_{2 * i}")(x)
        if stage < 4 or i < len(widths) - 1:  # no ReLU after conv5_3
          x = nn.relu(x)
      if pool:
        x = max_pool_3x3(x, pool)
      feats[LAYERS[stage]] = x
    return feats


def panet_torch_module_path(path: tuple[str, ...], scheme: str) -> str:
  """Flax module path inside ``VGG16PANet`` → torch module path.

  scheme 'model': PANet's ``Encoder`` (``features.6.2``; the PANet model adds
  ``encoder.backbone.``); 'imagenet': torchvision's ``vgg16`` file (``features.19``). The
  ImageNet map is PANet's positional load (the file's first 26 tensors, in order, into the
  Encoder's 26) written out by name, so it holds for a file in any key order.
  """
  if len(path) != 1:
    raise ValueError(f"unexpected VGG module {'/'.join(path)}")
  head, block, index = (path[0].split("_") + ["", ""])[:3]
  blocks = {b[0]: b for b in PANET_BLOCKS}
  if (head != "features" or not block.isdigit() or not index.isdigit()
      or int(block) not in blocks or int(index) % 2
      or int(index) // 2 >= len(blocks[int(block)][1]) or path[0].count("_") != 2):
    raise ValueError(f"unexpected PANet VGG module {path[0]!r}")
  if scheme == "model":
    return keymap.dotted(path)
  if scheme == "imagenet":
    return f"features.{blocks[int(block)][3] + int(index)}"
  raise ValueError(f"unknown naming scheme {scheme!r}; expected 'model' or 'imagenet'")
