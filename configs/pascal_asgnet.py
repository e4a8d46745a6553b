r"""ASGNet on PASCAL-5i, the reference's settings (``pascal_asgnet_split*_resnet*.yaml``).

  python scripts/train.py --config=configs/pascal_asgnet.py:fold=0,shot=5,backbone=resnet101 \
      --config.data.data_dir=/data/pascal5i --config.model.backbone_weights=resnet101_v2.pth \
      --workdir=workdirs/pascal_f0_5shot_r101

Argument keys: fold (0-3), shot, backbone (resnet50 | resnet101), depth (50 | 101);
prior, amm (true | false): ASGNet + prior, ASGNet + AMM (options of fss_jax/models/asgnet.py).
"""
from fss_jax import configs_lib


def get_config(arg=None):
  args = configs_lib.parse_arg(arg, {**configs_lib.COMMON_ARGS, "prior": False, "amm": False})
  config = configs_lib.base_config("asgnet")
  config.data.dataset = "pascal5i"
  configs_lib.apply_common_args(config, args)
  config.model.prior = args["prior"]  # ASGNet + prior (fss_jax/models/asgnet.py)
  config.model.amm = args["amm"]      # ASGNet + AMM
  configs_lib.validate_config(config)
  return config
