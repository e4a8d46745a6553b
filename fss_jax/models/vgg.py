"""VGG16-bn in PFENet's layer split (torchvision ``vgg16_bn`` ``features``, cfg "D").

NHWC throughout. Every conv is 3x3, padding 1, **with bias**, followed by BatchNorm and ReLU;
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
               upto: str = "layer4", start: str = "layer0") -> dict[str, jax.Array]:
    """Runs layers ``start``..``upto`` (same contract as ``resnet.ResNet``).

    Args:
      x: (B,H,W,3) normalised RGB when ``start`` is 'layer0', else the previous layer's output.
      use_running_average: True: frozen BN; False: batch statistics (see ``TorchBatchNorm``).
    Returns:
      {'layer0': (B,H/2,W/2,64), 'layer1': (·/4,128), 'layer2': (·/8,256), 'layer3': (·/16,512),
       'layer4': (·/16,512)} for the layers run (sides rounded up at every pool).
    """
    first, last = resnet.layer_range(start, upto)
    if first == 0 and (x.ndim != 4 or x.shape[-1] != 3):
      raise ValueError(f"VGG16BN expects (B,H,W,3) inputs, got shape {x.shape}")
    x = x.astype(self.dtype)
    feats = {}
    for stage in range(first, last + 1):
      name = LAYERS[stage]
      _, widths, pool = STAGES[stage]
      for i, features in enumerate(widths):
        x = nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                    param_dtype=jnp.float32,
                    # torchvision's VGG init (kaiming normal, fan_out; zero bias).
                    kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                    name=f"{name}_{3 * i}")(x)
        x = resnet.TorchBatchNorm(dtype=self.dtype, name=f"{name}_{3 * i + 1}")(
            x, use_running_average)
        x = nn.relu(x)
      if pool:
        x = max_pool_ceil(x)
      feats[name] = x
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
