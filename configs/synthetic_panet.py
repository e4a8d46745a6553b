r"""PANet on the procedural few-shot dataset: trains and evaluates on a 2-core CPU.

The data, small from-scratch backbone (its layer4 is PANet's feature map, 512 channels at stride
8, trained whole with the rest: PANet has no other parameters) and schedule of
``synthetic_asgnet.py`` (``configs_lib.synthetic_settings``), with PANet's resize + flip
transform (``data.transform='panet'``), 20·cosine prototypes and PAR. ``way=2`` trains and
evaluates 2-way episodes (the metric counts each way's class; 1-way and 2-way scores are not
comparable).

  python scripts/train.py --config=configs/synthetic_panet.py --workdir=workdirs/synthetic_panet
  python scripts/train.py --config=configs/synthetic_panet.py:way=2 \
      --workdir=workdirs/synthetic_panet_2way

Argument keys: fold (0-3), shot, way, align (false: no PAR).
"""
from fss_jax import configs_lib


def get_config(arg=None):
  args = configs_lib.parse_arg(arg, configs_lib.PANET_ARGS)
  config = configs_lib.synthetic_settings(configs_lib.base_config("panet"))
  configs_lib.panet_task(config, args)
  configs_lib.validate_config(config)
  return config
