r"""Smallest end-to-end PFENet config (tests and smoke runs): a few steps on a tiny dataset.

Set ``data.data_dir`` to a temporary directory (the trainer generates the data there).
Argument keys: fold (0-3), shot, backbone (resnet_small | resnet50 | resnet101 | vgg16_bn), depth.
"""
from fss_jax import configs_lib


def get_config(arg=None):
  args = configs_lib.parse_arg(arg, configs_lib.COMMON_ARGS)
  config = configs_lib.tiny_settings(configs_lib.base_config("pfenet"))
  configs_lib.apply_common_args(
      config, args, allowed_backbones=("resnet_small", "resnet50", "resnet101", "vgg16_bn"))
  configs_lib.validate_config(config)
  return config
