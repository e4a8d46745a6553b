"""A reference model checkpoint (.pth/.safetensors) → our msgpack variables, for any model.

  python scripts/import_checkpoint.py --config=configs/pascal_asgnet.py \
      --input asgnet_fold0.pth --output model.msgpack
  python scripts/import_checkpoint.py --config=configs/pascal_pfenet.py:backbone=vgg16_bn \
      --input pfenet_vgg_split0.pth --output model.msgpack
  # PANet's official snapshot (DataParallel's state_dict: module.encoder.backbone.features.*)
  python scripts/import_checkpoint.py --config=configs/pascal_panet.py \
      --input runs/PANet_VOC_align_sets_0_1way_1shot_[train]/1/snapshots/30000.pth \
      --output model.msgpack
  # an ASGNet checkpoint as the start of an ASGNet + prior (zero prior columns), then train it:
  python scripts/import_checkpoint.py --config=configs/pascal_asgnet.py:prior=true \
      --input asgnet_fold0.pth --from_asgnet --output asgnet_prior_init.msgpack
  python scripts/train.py --config=configs/pascal_asgnet.py:prior=true \
      --config.model.init_weights=asgnet_prior_init.msgpack --workdir=...

The config says which model (``model.name``, backbone, bins) the checkpoint holds; the authors'
training checkpoints are read as they are (``{'state_dict': {'module.' + key: ...}}``, or PANet's
``{'module.' + key: ...}``), with
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
  parser.add_argument("--from_asgnet", action="store_true",
                      help="the input is a plain ASGNet checkpoint; seed the configured ASGNet + "
                           "prior from it (its 513 corr_conv columns, a zero prior column)")
  args = parser.parse_args(argv)
  config = configs_lib.load_config(args.config)
  if args.from_asgnet:
    variables = weights.read_asgnet_as_prior(args.input, config)
  else:
    variables = weights.read_model(args.input, registry.build_model(config), config)
  io.save_variables(args.output, variables)
  n = sum(x.size for x in jax.tree_util.tree_leaves(variables["params"]))
  print(f"wrote {args.output}: {config.model.name} ({config.model.backbone}), "
        f"{n:,} parameters")


if __name__ == "__main__":
  main()
