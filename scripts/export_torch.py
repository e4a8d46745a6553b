"""Our checkpoint or msgpack variables → PyTorch state_dict (.pth/.pt or .safetensors).

  python scripts/export_torch.py --input workdirs/synthetic --step best --output model.pth
  python scripts/export_torch.py --input model.msgpack --config=configs/pascal_pfenet.py \
      --output model.safetensors
  python scripts/export_torch.py --input r50.msgpack --backbone resnet50 --output r50.pth
  python scripts/export_torch.py --input workdirs/panet --output 30000.pth --reference_wrapping

``--input`` is a ``train.py`` run directory (its Orbax checkpoints and saved config; ``--step``
picks 'best', 'latest' or a number) or a ``.msgpack`` variables file: a whole model (give its
``--config``) or a bare backbone (give ``--backbone``). A model gets its reference checkpoint's
keys in the reference's order, so the file loads with ``load_state_dict(strict=True)`` into the
official model; a backbone gets its ImageNet file naming (no classifier).

``--reference_wrapping`` saves the file as the model's official training script does, for its
test script: ``{'state_dict': {'module.' + key: ...}}`` (ASGNet, PFENet) or, for PANet, the
DataParallel state_dict ``{'module.' + key: ...}`` (``module.encoder.backbone.features...``).
``--module_prefix`` writes ``{'module.' + key: ...}`` for any model.
"""
import argparse
import os

from fss_jax import configs_lib
from fss_jax import weights
from fss_jax.convert import io
from fss_jax.convert import torch_export

BACKBONES = ("resnet50", "resnet101", "vgg16_bn", "vgg16_panet")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--input", required=True,
                      help="train.py run directory, or .msgpack variables")
  parser.add_argument("--step", default="best",
                      help="with a run directory: 'best', 'latest' or a step number")
  parser.add_argument("--config", help="with a whole-model .msgpack: configs/<file>.py[:arg]")
  parser.add_argument("--backbone", choices=BACKBONES, help="with a bare-backbone .msgpack")
  parser.add_argument("--output", required=True, help="output .pth/.pt/.safetensors")
  parser.add_argument("--reference_wrapping", action="store_true",
                      help="save as the model's reference training script does, for its test "
                           "script: {'state_dict': {'module.' + key: ...}} (.pth; ASGNet, "
                           "PFENet), {'module.' + key: ...} (PANet)")
  parser.add_argument("--module_prefix", action="store_true",
                      help="save {'module.' + key: ...} (a DataParallel state_dict)")
  args = parser.parse_args(argv)
  if args.module_prefix and args.reference_wrapping:
    parser.error("give --reference_wrapping or --module_prefix, not both")
  if os.path.isdir(args.input):
    from fss_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
    variables, step = checkpoint.load_model_variables(args.input, args.step)
    config = configs_lib.load_run_config(args.input)
    print(f"read {args.input} step {step}")
  else:
    variables = io.load_variables(args.input)
    config = configs_lib.load_config(args.config) if args.config else None
  if "backbone" in variables.get("params", {}):
    if config is None:
      parser.error(f"{args.input} holds a whole model: give its --config "
                   "(e.g. --config=configs/pascal_pfenet.py:backbone=vgg16_bn).")
    state_dict = weights.model_state_dict(variables, config)
    wrapping = weights.reference_wrapping(config) if args.reference_wrapping else False
  else:
    if not args.backbone:
      parser.error(f"{args.input} holds no 'backbone' entry: a bare backbone? Give --backbone "
                   f"({', '.join(BACKBONES)}).")
    state_dict = weights.backbone_state_dict(
        variables, configs_lib.BACKBONES.get(args.backbone, (args.backbone,))[0])
    wrapping = args.reference_wrapping
  if args.module_prefix:
    wrapping = "module"
  torch_export.save_state_dict(state_dict, args.output, reference_wrapping=wrapping)
  print(f"wrote {args.output}: {len(state_dict)} tensors")


if __name__ == "__main__":
  main()
