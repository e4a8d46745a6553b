r"""BAM (stage 2) on coco20i: the meta learner on the frozen stage-1 PSPNet of the same fold.

The official recipe (chunbolang/BAM ``train.py``, ``config/coco/coco_split*_{resnet50,vgg}.yaml``;
``configs_lib.bam_settings`` lists it). ``model.base_weights`` is required: the stage-1 workdir
(configs/coco_bam_base.py) or BAM's released ``initmodel/PSPNet/.../best.pth``:

  python scripts/train.py --config=configs/coco_bam.py:fold=0,shot=1,backbone=resnet50 \
      --config.data.data_dir=data/coco20i \
      --config.model.base_weights=workdirs/bam_base_coco0_r50 --workdir=workdirs/bam_coco0_r50

5-shot models are trained separately (shot=5: the k-shot weights depend on K).
Argument keys: fold (0-3), shot, backbone (resnet50 | resnet101 | vgg16_bn).
"""
from fss_jax import configs_lib


def get_config(arg=None):
  args = configs_lib.parse_bam_arg(arg)
  config = configs_lib.bam_settings(configs_lib.base_config("bam"), "coco20i", args)
  configs_lib.validate_config(config)
  return config
