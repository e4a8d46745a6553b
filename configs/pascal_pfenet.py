r"""PFENet on PASCAL-5i, the reference's settings (``config/pascal/pascal_split0_resnet50.yaml``,
``train.py``, ``test.py`` of dvlab-research/PFENet).

  python scripts/train.py --config=configs/pascal_pfenet.py:fold=0,backbone=vgg16_bn \
      --config.data.data_dir=data/pascal5i --config.model.backbone_weights=vgg16_bn.pth \
      --workdir=workdirs/pfenet_p0_vgg
  # PFENet's 5-shot protocol: the 1-shot-trained model evaluated with 5 shots
  python scripts/evaluate.py --config=configs/pascal_pfenet.py:fold=0,shot=5 \
      --workdir=workdirs/pfenet_p0 --config.data.data_dir=data/pascal5i

Settings: 473², batch 4, 200 epochs, SGD lr 0.025 effective (base 0.0025 × 10) poly 0.9,
momentum 0.9, weight decay 1e-4, scale 0.9-1.1, rotation ±10°, seed 321, frozen backbone
(layer4 included, which only feeds the prior), bins 60/30/15/8 (with VGG the 60 bin exceeds the
30×30 map and up-samples by replication, as the reference does), evaluation with 5000 episodes
(``test.py``; its in-training validation also asks for 5000 but stops after 10 passes over
the validation list, fewer episodes on folds with fewer than 500 eligible images).

Argument keys: fold (0-3), shot (evaluation shots), train_shot (default 1: PFENet's 5-shot
results come from its 1-shot-trained models, maintainer in issue #65; set train_shot=5 to train
a 5-shot model as ASGNet does), backbone (resnet50 | resnet101 | vgg16_bn), depth (50 | 101).
"""
from fss_jax import configs_lib

BACKBONES = ("resnet50", "resnet101", "vgg16_bn")


def get_config(arg=None):
  args = configs_lib.parse_arg(arg, {**configs_lib.COMMON_ARGS, "train_shot": 1})
  config = configs_lib.base_config("pfenet")
  config.data.dataset = "pascal5i"
  config.data.eval_episodes = 5000
  configs_lib.apply_common_args(config, args, allowed_backbones=BACKBONES)
  config.data.eval_shot = config.data.shot
  config.data.shot = args["train_shot"]
  configs_lib.validate_config(config)
  return config
