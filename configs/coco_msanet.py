r"""MSANet (stage 2) on coco20i, on the frozen stage-1 PSPNet of BAM (configs/coco_bam_base.py).

MSANet has no stage-1 script and no coco20i trainer of its own (reference_msanet.md §0): the
faithful recipe is BAM's ``train.py`` loop with MSANet's ``config/coco/*.yaml`` values, which are
BAM's (batch 8, base_lr 0.005 × 10, poly 0.9, weight decay 1e-4, fix_bn; ``configs_lib.bam_settings``),
and one SGD group over every learnable tensor (as fss_jax always does):

  python scripts/train.py --config=configs/coco_msanet.py:fold=0,shot=1,backbone=resnet50 \
      --config.data.data_dir=data/coco20i \
      --config.model.base_weights=workdirs/bam_base_coco0_r50 --workdir=workdirs/msanet_coco0_r50

Some of MSANet's configs say 500 epochs (R50 folds 1-3, R101 fold 2; --config.train.epochs=500).
Argument keys: fold (0-3), shot, backbone (resnet50 | resnet101 | vgg16_bn).
"""
from fss_jax import configs_lib


def get_config(arg=None):
  args = configs_lib.parse_bam_arg(arg)
  config = configs_lib.bam_settings(configs_lib.base_config("msanet"), "coco20i", args)
  configs_lib.validate_config(config)
  return config
