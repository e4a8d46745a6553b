r"""PFENet on the procedural few-shot dataset: trains and evaluates on a 2-core CPU.

The same data, small from-scratch backbone and schedule as ``synthetic_asgnet.py``
(``configs_lib.synthetic_settings``). PFENet's prior comes from layer4, which never gets a
gradient (the prior is training-free), so here it is computed from a randomly initialised
layer4 on top of the trained layer3. One run on a 2-core CPU: 4 min 50 s, novel-class mIoU
10.8% at step 0, best 38.7% at step 500 (ASGNet on the same data: 38.4%).

  python scripts/train.py --config=configs/synthetic_pfenet.py --workdir=workdirs/synthetic_pfenet

Argument keys: fold (0-3), shot, backbone (resnet_small | resnet50 | resnet101 | vgg16_bn),
depth.
"""
from fss_jax import configs_lib


def get_config(arg=None):
  args = configs_lib.parse_arg(arg, configs_lib.COMMON_ARGS)
  config = configs_lib.synthetic_settings(configs_lib.base_config("pfenet"))
  configs_lib.apply_common_args(
      config, args, allowed_backbones=("resnet_small", "resnet50", "resnet101", "vgg16_bn"))
  configs_lib.validate_config(config)
  return config
