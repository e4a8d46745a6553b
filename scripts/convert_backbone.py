"""ImageNet backbone weights (.pth/.safetensors) → our msgpack variables.

  python scripts/convert_backbone.py --backbone resnet50 --input initmodel/resnet50_v2.pth \
      --output r50.msgpack
  python scripts/convert_backbone.py --backbone vgg16_bn --input vgg16_bn-6c64b313.pth \
      --output vgg16_bn.msgpack
  python scripts/convert_backbone.py --backbone vgg16_panet --input vgg16-397923af.pth \
      --output vgg16_panet.msgpack

ResNets: the deep-stem ``resnet{50,101}_v2.pth`` of PSPNet/PFENet/ASGNet (``conv1.weight``, ...,
``fc.*`` ignored); VGG16-bn: torchvision's file (``features.N.*``, ``classifier.*`` ignored);
PANet's VGG-16: torchvision's ``vgg16`` file (no BN), its 13 convs as PANet's positional load
places them (``classifier.*`` ignored). ``model.backbone_weights`` also takes these files directly.
"""
import argparse

import jax

from fss_jax import configs_lib
from fss_jax import weights
from fss_jax.convert import io

CHOICES = ("resnet50", "resnet101", "vgg16_bn", "vgg16_panet")


def backbone_config(name: str):
  """A config whose ``model`` fields describe the backbone ``name`` (a ``CHOICES`` value: a
  config ``backbone=`` argument, or a backbone family such as ``vgg16_panet``)."""
  config = configs_lib.base_config()
  return configs_lib.set_backbone(config, *configs_lib.BACKBONES.get(name, (name,)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--backbone", required=True, choices=CHOICES)
  parser.add_argument("--input", required=True, help=".pth/.pt/.safetensors ImageNet weights")
  parser.add_argument("--output", required=True, help="output .msgpack")
  args = parser.parse_args(argv)
  variables = weights.read_backbone(args.input, backbone_config(args.backbone))
  io.save_variables(args.output, variables)
  n = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
  print(f"wrote {args.output}: {args.backbone}, {n:,} parameters")


if __name__ == "__main__":
  main()
