r"""Stage 1 of BAM / MSANet on pascal5i: the PSPNet base learner on a fold's base classes.

The official recipe (chunbolang/BAM ``train_base.py``, ``config/pascal/pascal_split*_*_base.yaml``;
``configs_lib.bam_base_settings`` lists it). Stage 2 (configs/pascal_bam.py) reads this run:

  python scripts/train.py --config=configs/pascal_bam_base.py:fold=0,backbone=resnet50 \
      --config.data.data_dir=data/pascal5i --config.model.backbone_weights=resnet50_v2.pth \
      --workdir=workdirs/bam_base_pascal0_r50
  python scripts/train.py --config=configs/pascal_bam.py:fold=0,shot=1,backbone=resnet50 \
      --config.data.data_dir=data/pascal5i \
      --config.model.base_weights=workdirs/bam_base_pascal0_r50 --workdir=workdirs/bam_pascal0_r50

Argument keys: fold (0-3), backbone (resnet50 | resnet101 | vgg16_bn).
"""
from fss_jax import configs_lib


def get_config(arg=None):
  args = configs_lib.parse_bam_arg(arg, {"fold": 0, "backbone": "resnet50"})
  config = configs_lib.bam_base_settings(configs_lib.base_config("pspnet"), "pascal5i", args)
  configs_lib.validate_config(config)
  return config
