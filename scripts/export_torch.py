"""Our msgpack variables → PyTorch state_dict (.pth/.pt or .safetensors) in the reference naming.

  python scripts/export_torch.py --input model.msgpack --output model.pth
A whole model (backbone under ``backbone``) gets the ASGNet checkpoint naming; a bare ResNet
(``layer0`` at the top) gets the ImageNet file naming (``conv1.weight``, ..., no ``fc``).
"""
import argparse

from fss_jax.convert import io
from fss_jax.convert import torch_export


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--input", required=True, help=".msgpack variables")
  parser.add_argument("--output", required=True, help="output .pth/.pt/.safetensors")
  parser.add_argument("--reference_wrapping", action="store_true",
                      help="(.pth) save {'state_dict': {'module.' + key: ...}} as the "
                           "reference's training script does, for its test script")
  args = parser.parse_args(argv)
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
