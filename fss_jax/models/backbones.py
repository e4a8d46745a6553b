"""Backbones by ``config.model.backbone``: the module, its PyTorch names, and how models run it.

Every backbone is a Flax module called as ``backbone(x, use_running_average, upto=, start=)``
that returns a dict of the layers it ran, 'layer0'..'layer4' (``resnet.ResNet``,
``vgg.VGG16BN``, ``vgg.VGG16PANet``). Registered:

  resnet        deep-stem dilated ResNet-50/101, output stride 8 (``model.depth``)
  resnet_small  the same with ``model.backbone_width`` / ``backbone_blocks`` (trained from scratch)
  vgg16_bn      torchvision's VGG16-bn cut as PFENet does, output stride 16
  vgg16_panet   PANet's VGG-16 (no BN; 3x3 pools, pool4 stride 1, conv5 dilated 2, no ReLU after
                conv5_3), output stride 8 from layer2 on; PANet uses layer4 only and trains it all

A backbone's PyTorch names come in two schemes: 'imagenet' (the ImageNet file it is initialised
from: ``resnet50_v2.pth``, torchvision's ``vgg16_bn-6c64b313.pth`` / ``vgg16-397923af.pth``) and
'model' (inside a trained model's checkpoint: ``layer0.4.weight``, ``layer2.7.running_mean``;
PANet's ``features.6.2.weight``, under the model's ``encoder.backbone.``).
"""
import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fss_jax.models import ops
from fss_jax.models import resnet
from fss_jax.models import vgg

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A registered backbone family.

  Attributes:
    build: ``config.model`` → the Flax module (named 'backbone' in the model).
    torch_module_path: (Flax module path inside the backbone, scheme) → torch module path.
    torch_order: registration order of its torch modules (for writing state_dicts in order).
    imagenet_ignored: key prefixes of its ImageNet file that have no counterpart (classifier).
    stride: output stride of layer2..layer4 as models use them (layer2 is resized to layer3).
  """
  build: Callable[[Any], nn.Module]
  torch_module_path: Callable[[tuple[str, ...], str], str]
  torch_order: tuple[str, ...]
  imagenet_ignored: tuple[str, ...]
  stride: int


def _resnet(m) -> resnet.ResNet:
  blocks = tuple(int(b) for b in m.backbone_blocks) or None
  if blocks is not None and len(blocks) != 4:
    raise ValueError(f"config.model.backbone_blocks = {m.backbone_blocks!r}: four stage "
                     "counts, or () for the standard depth.")
  return resnet.ResNet(depth=int(m.depth), dtype=DTYPES[m.backbone_dtype],
                       width=int(m.backbone_width), blocks=blocks)


def _vgg(m) -> vgg.VGG16BN:
  return vgg.VGG16BN(dtype=DTYPES[m.backbone_dtype])


def _vgg_panet(m) -> vgg.VGG16PANet:
  return vgg.VGG16PANet(dtype=DTYPES[m.backbone_dtype])


_RESNET = Backbone(_resnet, resnet.torch_module_path, resnet.TORCH_ORDER,
                   resnet.IMAGENET_IGNORED, stride=8)
BACKBONES = {
    "resnet": _RESNET,
    "resnet_small": _RESNET,
    "vgg16_bn": Backbone(_vgg, vgg.torch_module_path, vgg.TORCH_ORDER, vgg.IMAGENET_IGNORED,
                         stride=16),
    "vgg16_panet": Backbone(_vgg_panet, vgg.panet_torch_module_path, vgg.PANET_TORCH_ORDER,
                            vgg.IMAGENET_IGNORED, stride=8),
}


def get(name: str) -> Backbone:
  if name not in BACKBONES:
    raise ValueError(f"config.model.backbone = {name!r}: must be one of {sorted(BACKBONES)}.")
  return BACKBONES[name]


def build(model_config) -> nn.Module:
  """The backbone module of ``config.model`` (``backbone``, ``depth``, width, blocks, dtype)."""
  if model_config.backbone_dtype not in DTYPES:
    raise ValueError(f"config.model.backbone_dtype = {model_config.backbone_dtype!r}: must be "
                     f"one of {sorted(DTYPES)}.")
  return get(model_config.backbone).build(model_config)


def model_fields(config) -> dict[str, Any]:
  """The backbone fields every model takes from a config: ``backbone`` (the module),
  ``bn_batch_stats`` (``model.bn_mode == 'batch_stats'``) and ``train_backbone`` (the backbone
  is not among ``train.frozen_keys``)."""
  return {"backbone": build(config.model),
          "bn_batch_stats": config.model.bn_mode == "batch_stats",
          "train_backbone": "backbone" not in tuple(config.train.frozen_keys)}


# ----------------------------------------------------------------------------- use in models


def run(backbone: nn.Module, groups: Sequence[jax.Array], *, batch_stats: bool,
        **kwargs) -> list[dict[str, jax.Array]]:
  """Runs ``backbone`` on each group of images/features (e.g. the query, then each shot).

  Frozen BN (``batch_stats=False``): one call on the concatenated groups (the same numbers as
  separate calls, in one larger batch). Batch statistics (the references' train-mode quirk):
  one call per group, so each group is its own BN batch as in the reference's separate calls.

  Args:
    groups: arrays with the same trailing shape, (B_i, ...).
    kwargs: ``upto`` / ``start`` for the backbone.
  Returns:
    one feature dict per group.
  """
  if batch_stats:
    return [backbone(g, use_running_average=False, **kwargs) for g in groups]
  out = backbone(jnp.concatenate(groups, axis=0), use_running_average=True, **kwargs)
  bounds = [0]
  for g in groups:
    bounds.append(bounds[-1] + g.shape[0])
  # 'hyper' (MSANet's hyper-features) is a list of arrays: each is split the same way.
  cut = lambda v, a, b: [x[a:b] for x in v] if isinstance(v, list) else v[a:b]
  return [{k: cut(v, a, b) for k, v in out.items()} for a, b in zip(bounds[:-1], bounds[1:])]


def mid_level(feats: dict[str, jax.Array]) -> jax.Array:
  """concat[layer3, layer2] in (at least) float32, layer2 first resized (bilinear,
  align_corners) to the layer3 size when they differ (VGG): (B,h3,w3,C3+C2), the head's input."""
  l3, l2 = feats["layer3"], feats["layer2"]
  dtype = jnp.promote_types(l3.dtype, jnp.float32)
  l3, l2 = l3.astype(dtype), l2.astype(dtype)
  if l2.shape[1:3] != l3.shape[1:3]:
    l2 = ops.resize_bilinear_ac(l2, l3.shape[1:3])
  return jnp.concatenate([l3, l2], axis=-1)
