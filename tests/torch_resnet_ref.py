"""PyTorch oracle: deep-stem dilated ResNet written from reference_asgnet.md §1 (tests only).

``DeepStemResNet`` has the ASGNet checkpoint naming (``layer0`` is an nn.Sequential, so its convs
and BNs are ``layer0.{0,1,3,4,6,7}``); ``imagenet_state_dict`` renames it to the ImageNet file
naming (``conv1``, ``bn1``, ..., plus ``fc``). ``AsgnetNaming`` adds a parameter-only stand-in for
the ASGNet head registered in the reference's module order, so its ``state_dict()`` gives the
reference checkpoint's keys, shapes and order.
"""
import collections

import torch
from torch import nn

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STEM_RENAME = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3", "7": "bn3"}


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation,
                           dilation=dilation, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU()
    self.downsample = downsample

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


def _conv3x3(cin, cout, stride=1):
  return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class DeepStemResNet(nn.Module):
  """Output-stride-8 ResNet; forward returns {'layer0': ..., ..., 'layer4': ...} (NCHW)."""

  def __init__(self, depth=50):
    super().__init__()
    self.layer0 = nn.Sequential(
        _conv3x3(3, 64, 2), nn.BatchNorm2d(64), nn.ReLU(),
        _conv3x3(64, 64), nn.BatchNorm2d(64), nn.ReLU(),
        _conv3x3(64, 128), nn.BatchNorm2d(128), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1))
    self.inplanes = 128
    n1, n2, n3, n4 = BLOCKS[depth]
    self.layer1 = self._make_layer(64, n1, 1, 1)
    self.layer2 = self._make_layer(128, n2, 2, 1)
    self.layer3 = self._make_layer(256, n3, 1, 2)
    self.layer4 = self._make_layer(512, n4, 1, 4)

  def _make_layer(self, planes, blocks, stride, dilation):
    downsample = nn.Sequential(
        nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
        nn.BatchNorm2d(planes * 4))
    layers = [Bottleneck(self.inplanes, planes, stride, dilation, downsample)]
    self.inplanes = planes * 4
    layers += [Bottleneck(self.inplanes, planes, 1, dilation) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    out = {}
    for name in ("layer0", "layer1", "layer2", "layer3", "layer4"):
      x = getattr(self, name)(x)
      out[name] = x
    return out


def _seq(*mods):
  return nn.Sequential(*mods)


def _conv(cin, cout, k, bias=False):
  return nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)


class AsgnetNaming(DeepStemResNet):
  """Backbone + ASGNet head parameters in the reference's registration order (no forward)."""

  def __init__(self, depth=50, num_bins=4):
    super().__init__(depth)
    self.cls = _seq(_conv(256, 256, 3), nn.ReLU(), nn.Dropout2d(0.1), _conv(256, 2, 1, True))
    self.down_conv = _seq(_conv(1536, 256, 1), nn.Dropout2d(0.5))
    self.corr_conv = nn.ModuleList([_seq(_conv(513, 256, 1), nn.ReLU())
                                    for _ in range(num_bins)])
    self.beta_conv = nn.ModuleList([
        _seq(_conv(256, 256, 3), nn.ReLU(), _conv(256, 256, 3), nn.ReLU())
        for _ in range(num_bins)])
    self.inner_cls = nn.ModuleList([
        _seq(_conv(256, 256, 3), nn.ReLU(), nn.Dropout2d(0.1), _conv(256, 2, 1, True))
        for _ in range(num_bins)])
    self.alpha_conv = nn.ModuleList([_seq(_conv(512, 256, 1), nn.ReLU())
                                     for _ in range(num_bins - 1)])
    self.res1 = _seq(_conv(1024, 256, 1), nn.ReLU())
    self.res2 = _seq(_conv(256, 256, 3), nn.ReLU(), _conv(256, 256, 3), nn.ReLU())


@torch.no_grad()
def randomize_(model, seed=0):
  """Random conv weights (He-scaled), BN affine params, running stats and batch counters."""
  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, nn.Conv2d):
      fan_in = m.weight[0].numel()
      m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      if m.bias is not None:
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    elif isinstance(m, nn.BatchNorm2d):
      c = m.num_features
      m.weight.copy_(torch.rand(c, generator=g) + 0.5)
      m.bias.copy_(torch.randn(c, generator=g) * 0.1)
      m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
      m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
      m.num_batches_tracked.fill_(int(torch.randint(0, 10000, (), generator=g)))
  return model


def imagenet_state_dict(model, seed=0):
  """The ImageNet file naming of ``model``'s backbone (``conv1.weight``, ..., ``fc.*``)."""
  g = torch.Generator().manual_seed(seed + 1)
  out = collections.OrderedDict()
  for key, value in model.state_dict().items():
    parts = key.split(".")
    if parts[0] == "layer0":
      key = ".".join([STEM_RENAME[parts[1]]] + parts[2:])
    elif parts[0] not in ("layer1", "layer2", "layer3", "layer4"):
      continue
    out[key] = value.clone()
  out["fc.weight"] = torch.randn((1000, 2048), generator=g) * 0.01
  out["fc.bias"] = torch.zeros(1000)
  return out
