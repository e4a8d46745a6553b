"""A reference model checkpoint (.pth/.safetensors) → our msgpack variables, for any model.

  python scripts/import_checkpoint.py --config=configs/pascal_asgnet.py \
      --input asgnet_fold0.pth --output model.msgpack
  python scripts/import_checkpoint.py --config=configs/pascal_pfenet.py:backbone=vgg16_bn \
      --input pfenet_vgg_split0.pth --output model.msgpack

The config says which model (``model.name``, backbone, bins) the checkpoint holds; the authors'
training checkpoints are read as they are (``{'state_dict': {'module.' + key: ...}}``), with
``torch.load(weights_only=True)``. A key that does not fit is listed with its shape.
"""
import argparse

import jax

from fss_jax import configs_lib
from fss_jax import weights
from fss_jax.convert import io
from fss_jax.models import registry


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True,
                      help="config of the model, configs/<file>.py[:arg] (e.g. "
                           "configs/pascal_pfenet.py:backbone=vgg16_bn)")
  parser.add_argument("--input", required=True, help="reference checkpoint .pth/.safetensors")
  parser.add_argument("--output", required=True, help="output .msgpack")
  args = parser.parse_args(argv)
  config = configs_lib.load_config(args.config)
  model = registry.build_model(config)
  variables = weights.read_model(args.input, model, config)
  io.save_variables(args.output, variables)
  n = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
  print(f"wrote {args.output}: {config.model.name} ({config.model.backbone}), "
        f"{n:,} parameters")


if __name__ == "__main__":
  main()
