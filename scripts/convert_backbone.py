"""ImageNet deep-stem ResNet weights (.pth/.safetensors) → our msgpack variables.

  python scripts/convert_backbone.py --input initmodel/resnet50_v2.pth --depth 50 \
      --output backbone.msgpack
"""
import argparse

import jax

from fss_jax.convert import io
from fss_jax.convert import torch_import


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--input", required=True, help=".pth/.pt/.safetensors ImageNet weights")
  parser.add_argument("--depth", type=int, default=50, choices=(50, 101))
  parser.add_argument("--output", required=True, help="output .msgpack")
  args = parser.parse_args(argv)
  state_dict = torch_import.load_state_dict(args.input)
  variables = torch_import.backbone_variables_from_torch(state_dict, args.depth,
                                                         source=args.input)
  io.save_variables(args.output, variables)
  n = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
  print(f"wrote {args.output}: ResNet-{args.depth}, {n:,} parameters")


if __name__ == "__main__":
  main()
