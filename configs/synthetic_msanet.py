r"""MSANet (stage 2) on the procedural dataset, on the frozen stage-1 PSPNet of
configs/synthetic_bam_base.py (``model.base_weights``: that run's workdir; required).

  python scripts/train.py --config=configs/synthetic_msanet.py \
      --config.model.base_weights=workdirs/synthetic_bam_base --workdir=workdirs/synthetic_msanet

Argument keys: fold (0-3, as stage 1's), shot.
"""
from fss_jax import configs_lib


def get_config(arg=None):
  args = configs_lib.parse_arg(arg, {"fold": 0, "shot": 1})
  config = configs_lib.synthetic_settings(configs_lib.base_config("msanet"))
  config.data.fold, config.data.shot = args["fold"], args["shot"]
  configs_lib.synthetic_bam_settings(config, stage=2)
  configs_lib.validate_config(config)
  return config
