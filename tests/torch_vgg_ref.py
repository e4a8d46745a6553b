"""PyTorch oracle: VGG16-bn backbone cut as PFENet cuts it (reference_pfenet.md §1; tests only).

torchvision's ``vgg16_bn`` ``features`` (cfg "D": 3x3 conv with bias, pad 1 → BN → ReLU; 2x2
max-pool stride 2, ceil_mode) split into ``layer0..layer4`` nn.Sequentials renumbered from 0, so
the keys are PFENet's ``layerK.j.*``. ``imagenet_state_dict`` gives the torchvision file naming
(``features.N.*`` and an unused ``classifier``).
"""
import collections

import torch
from torch import nn

CFG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# features index ranges of layer0..layer4; pool5 (index 43) is dropped by PFENet.
SPLITS = ((0, 7), (7, 14), (14, 24), (24, 34), (34, 43))
OFFSETS = tuple(a for a, _ in SPLITS)
CLASSIFIER_SHAPES = {"0": (4096, 512 * 7 * 7), "3": (4096, 4096), "6": (1000, 4096)}


def vgg16_bn_features():
  """torchvision ``vgg16_bn().features`` (44 modules, indices 0..43)."""
  mods, cin = [], 3
  for v in CFG_D:
    if v == "M":
      mods.append(nn.MaxPool2d(2, 2, ceil_mode=True))
    else:
      mods += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
      cin = v
  return nn.Sequential(*mods)


class VGG16BN(nn.Module):
  """PFENet's VGG16-bn cut; forward returns {'layer0': ..., ..., 'layer4': ...} (NCHW)."""

  def __init__(self):
    super().__init__()
    feats = list(vgg16_bn_features())
    # Build from a list, not features[a:b]: slicing a Sequential keeps the original keys.
    for k, (a, b) in enumerate(SPLITS):
      setattr(self, f"layer{k}", nn.Sequential(*feats[a:b]))

  def forward(self, x):
    out = {}
    for k in range(5):
      x = getattr(self, f"layer{k}")(x)
      out[f"layer{k}"] = x
    return out


def imagenet_state_dict(model, seed=0):
  """torchvision naming of a VGG backbone: ``features.N.*`` + random ``classifier.{0,3,6}``.

  ``model`` has ``layer0..layer4`` (VGG16BN, RefPFENet('vgg')) or is a ``features`` Sequential.
  Other keys (a PFENet head) are dropped; an importer must ignore ``classifier``.
  """
  g = torch.Generator().manual_seed(seed + 1)
  out = collections.OrderedDict()
  for key, value in model.state_dict().items():
    parts = key.split(".")
    if parts[0].isdigit():
      n = int(parts[0])
    elif parts[0] in ("layer0", "layer1", "layer2", "layer3", "layer4"):
      n = OFFSETS[int(parts[0][-1])] + int(parts[1])
      parts = parts[1:]
    else:
      continue
    out[".".join(["features", str(n)] + parts[1:])] = value.clone()
  for i, shape in CLASSIFIER_SHAPES.items():
    out[f"classifier.{i}.weight"] = torch.randn(shape, generator=g) * 0.01
    out[f"classifier.{i}.bias"] = torch.randn(shape[:1], generator=g) * 0.01
  return out
