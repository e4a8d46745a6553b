"""Our checkpoint or msgpack variables → PyTorch state_dict (.pth/.pt or .safetensors).

  python scripts/export_torch.py --input workdirs/synthetic --step best --output model.pth
  python scripts/export_torch.py --input model.msgpack --output model.safetensors

``--input`` is a ``train.py`` run directory (its Orbax checkpoints; ``--step`` picks 'best',
'latest' or a number) or a ``.msgpack`` variables file. The keys are the reference's, so the
file loads with ``load_state_dict(strict=True)`` into its model.
A whole model (backbone under ``backbone``) gets the ASGNet checkpoint naming; a bare ResNet
(``layer0`` at the top) gets the ImageNet file naming (``conv1.weight``, ..., no ``fc``).
"""
import argparse
import os

from fss_jax.convert import io
from fss_jax.convert import torch_export


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--input", required=True,
                      help="train.py run directory, or .msgpack variables")
  parser.add_argument("--step", default="best",
                      help="with a run directory: 'best', 'latest' or a step number")
  parser.add_argument("--output", required=True, help="output .pth/.pt/.safetensors")
  parser.add_argument("--reference_wrapping", action="store_true",
                      help="(.pth) save {'state_dict': {'module.' + key: ...}} as the "
                           "reference's training script does, for its test script")
  args = parser.parse_args(argv)
  if os.path.isdir(args.input):
    from fss_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
    variables, step = checkpoint.load_model_variables(args.input, args.step)
    print(f"read {args.input} step {step}")
  else:
    variables = io.load_variables(args.input)
  params = variables.get("params", {})
  if "backbone" in params:
    state_dict = torch_export.model_state_dict_from_variables(variables)
  elif "layer0" in params:
    state_dict = torch_export.backbone_state_dict_from_variables(variables)
  else:
    raise ValueError(f"{args.input}: neither a whole model (params/backbone) nor a ResNet "
                     f"(params/layer0); top-level params: {sorted(params)[:10]}")
  torch_export.save_state_dict(state_dict, args.output,
                               reference_wrapping=args.reference_wrapping)
  print(f"wrote {args.output}: {len(state_dict)} tensors")


if __name__ == "__main__":
  main()
