r"""Smallest end-to-end MSANet config (tests and smoke runs) on the stage-1 run of
configs/tiny_bam_base.py (``model.base_weights``). Set ``data.data_dir`` to a temporary directory.
Argument keys: fold (0-3), shot.
"""
from fss_jax import configs_lib


def get_config(arg=None):
  args = configs_lib.parse_arg(arg, {"fold": 0, "shot": 1})
  config = configs_lib.tiny_settings(configs_lib.base_config("msanet"))
  config.data.fold, config.data.shot = args["fold"], args["shot"]
  configs_lib.synthetic_bam_settings(config, stage=2)
  config.model.cls_dim = 16
  configs_lib.validate_config(config)
  return config
