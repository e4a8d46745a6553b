r"""Stage 1 of BAM / MSANet on coco20i: the PSPNet base learner on a fold's base classes.

The official recipe (chunbolang/BAM ``train_base.py``, ``config/coco/coco_split*_*_base.yaml``;
``configs_lib.bam_base_settings`` lists it). Stage 2 (configs/coco_bam.py) reads this run:

  python scripts/train.py --config=configs/coco_bam_base.py:fold=0,backbone=resnet50 \
      --config.data.data_dir=data/coco20i --config.model.backbone_weights=resnet50_v2.pth \
      --workdir=workdirs/bam_base_coco0_r50
  python scripts/train.py --config=configs/coco_bam.py:fold=0,shot=1,backbone=resnet50 \
      --config.data.data_dir=data/coco20i \
      --config.model.base_weights=workdirs/bam_base_coco0_r50 --workdir=workdirs/bam_coco0_r50

Argument keys: fold (0-3), backbone (resnet50 | resnet101 | vgg16_bn).
"""
from fss_jax import configs_lib


def get_config(arg=None):
  args = configs_lib.parse_bam_arg(arg, {"fold": 0, "backbone": "resnet50"})
  config = configs_lib.bam_base_settings(configs_lib.base_config("pspnet"), "coco20i", args)
  configs_lib.validate_config(config)
  return config
