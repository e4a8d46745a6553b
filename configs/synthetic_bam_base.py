r"""Stage 1 of BAM / MSANet on the procedural dataset: a small PSPNet on a fold's base classes.

The same data and small from-scratch backbone as the other synthetic configs
(``configs_lib.synthetic_settings``, ``synthetic_bam_settings``); evaluated on every validation
image (base-class mIoU). Stage 2 (configs/synthetic_bam.py) reads this run:

  python scripts/train.py --config=configs/synthetic_bam_base.py --workdir=workdirs/synthetic_bam_base
  python scripts/train.py --config=configs/synthetic_bam.py \
      --config.model.base_weights=workdirs/synthetic_bam_base --workdir=workdirs/synthetic_bam

Argument keys: fold (0-3).
"""
from fss_jax import configs_lib


def get_config(arg=None):
  args = configs_lib.parse_arg(arg, {"fold": 0})
  config = configs_lib.synthetic_settings(configs_lib.base_config("pspnet"))
  config.data.fold = args["fold"]
  configs_lib.synthetic_bam_settings(config, stage=1)
  configs_lib.validate_config(config)
  return config
