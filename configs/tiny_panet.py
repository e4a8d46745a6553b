r"""Smallest end-to-end PANet config (tests and smoke runs): a few steps on a tiny dataset.

Set ``data.data_dir`` to a temporary directory (the trainer generates the data there).
Argument keys: fold (0-3), shot, way, align.
"""
from fss_jax import configs_lib


def get_config(arg=None):
  args = configs_lib.parse_arg(arg, configs_lib.PANET_ARGS)
  config = configs_lib.tiny_settings(configs_lib.base_config("panet"))
  configs_lib.panet_task(config, args)
  configs_lib.validate_config(config)
  return config
