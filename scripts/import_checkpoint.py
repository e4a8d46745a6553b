"""Reference ASGNet checkpoint (.pth/.safetensors, ``module.``/``state_dict`` wrapping ok) →
our msgpack variables.

  python scripts/import_checkpoint.py --input asgnet_fold0.pth --depth 50 --output model.msgpack
"""
import argparse

import jax

from fss_jax.convert import io
from fss_jax.convert import torch_import
from fss_jax.models import asgnet
from fss_jax.models import builder


def asgnet_template(depth: int):
  """ShapeDtypeStruct variables of ASGNet(depth) with the PASCAL bins (nothing is computed)."""
  return builder.variables_template(asgnet.ASGNet(depth=depth, bins=asgnet.PASCAL_BINS))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--input", required=True, help="reference checkpoint .pth/.safetensors")
  parser.add_argument("--depth", type=int, default=50, choices=(50, 101))
  parser.add_argument("--output", required=True, help="output .msgpack")
  args = parser.parse_args(argv)
  state_dict = torch_import.load_state_dict(args.input)
  variables = torch_import.model_variables_from_torch(state_dict, asgnet_template(args.depth),
                                                      source=args.input)
  io.save_variables(args.output, variables)
  n = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
  print(f"wrote {args.output}: ASGNet ResNet-{args.depth}, {n:,} parameters")


if __name__ == "__main__":
  main()
