r"""Smallest end-to-end ASGNet config (tests and smoke runs): a few steps on a tiny dataset.

Set ``data.data_dir`` to a temporary directory (the trainer generates the data there).
Argument keys: fold (0-3), shot, backbone (resnet_small | resnet50 | resnet101), depth;
prior, amm (true | false): ASGNet + prior, ASGNet + AMM (options of fss_jax/models/asgnet.py).
"""
from fss_jax import configs_lib


def get_config(arg=None):
  args = configs_lib.parse_arg(arg, {**configs_lib.COMMON_ARGS, "prior": False, "amm": False})
  config = configs_lib.tiny_settings(configs_lib.base_config("asgnet"))
  config.model.train_iters = 2
  config.model.eval_iters = 2
  configs_lib.apply_common_args(
      config, args, allowed_backbones=("resnet_small", "resnet50", "resnet101"))
  config.model.prior = args["prior"]  # ASGNet + prior (fss_jax/models/asgnet.py)
  config.model.amm = args["amm"]      # ASGNet + AMM
  configs_lib.validate_config(config)
  return config
