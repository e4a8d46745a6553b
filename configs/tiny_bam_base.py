r"""Smallest end-to-end stage-1 PSPNet config (tests and smoke runs): a few steps on a tiny
procedural dataset. Set ``data.data_dir`` to a temporary directory.
Argument keys: fold (0-3).
"""
from fss_jax import configs_lib


def get_config(arg=None):
  args = configs_lib.parse_arg(arg, {"fold": 0})
  config = configs_lib.tiny_settings(configs_lib.base_config("pspnet"))
  config.data.fold = args["fold"]
  configs_lib.synthetic_bam_settings(config, stage=1)
  config.model.cls_dim = 16
  configs_lib.validate_config(config)
  return config
