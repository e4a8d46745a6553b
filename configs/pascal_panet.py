r"""PANet on PASCAL-5i, the official recipe (kaixin96/PANet ``config.py``, ``train.py``,
``test.py``; docs in ``configs_lib.panet_settings``).

  python scripts/train.py --config=configs/pascal_panet.py:fold=0,shot=1 \
      --config.data.data_dir=data/pascal5i --config.model.backbone_weights=vgg16-397923af.pth \
      --workdir=workdirs/panet_p0
  # 2-way 5-shot, and the paper's "w/o PAR" ablation
  python scripts/train.py --config=configs/pascal_panet.py:fold=0,shot=5,way=2,align=false ...
  # PANet's test protocol (5 runs x 1000 episodes from the training split), last snapshot
  python scripts/evaluate.py --config=configs/pascal_panet.py:fold=0,shot=1 \
      --workdir=workdirs/panet_p0 --step=latest --config.data.data_dir=data/pascal5i
  # with box or scribble supports (a model trained on dense masks, as the paper)
  python scripts/evaluate.py ... --config.data.support_annotation=box

The ImageNet weights are torchvision's ``vgg16-397923af.pth`` (PANet's ``pretrained_path``),
mapped by position as the official ``Encoder`` does (``scripts/convert_backbone.py`` or
directly as ``model.backbone_weights``). PANet trains and tests on the PASCAL-5i class split
with its own image sets: training and test episodes both come from SBD-augmented trainaug
(``data.train_split``); convert with data_prep/pascal5i.py.

Argument keys: fold (0-3), shot, way (N-way episodes in training and evaluation; PANet trains
and tests with the same N and K), align (true: PAR, the paper's PANet; false: "w/o PAR"),
backbone (vgg16: the official PANet, the default; resnet50: the "blog" PANet of
reference_panet.md §15 on the deep-stem ResNet-50, 1-way, 473² images, ImageNet weights
``resnet50_v2.pth`` as ``model.backbone_weights``; docs in ``configs_lib.panet_settings``):

  python scripts/train.py --config=configs/pascal_panet.py:fold=0,shot=1,backbone=resnet50 \
      --config.data.data_dir=data/pascal5i --config.model.backbone_weights=resnet50_v2.pth ...
"""
from fss_jax import configs_lib


def get_config(arg=None):
  args = configs_lib.parse_arg(arg, configs_lib.PANET_ARGS)
  config = configs_lib.base_config("panet")
  config.data.dataset = "pascal5i"
  configs_lib.panet_settings(config, args)
  configs_lib.validate_config(config)
  return config
