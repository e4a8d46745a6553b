r"""PFENet on COCO-20i, the reference's settings (``config/coco/coco_split0_vgg.yaml`` and
``coco_split0_resnet101.yaml``; the released COCO models are VGG16-bn, the default here).

Differences from PASCAL: 641², 50 epochs (validated every epoch), scale 0.8-1.25, FEM bins
relative to the feature size (1.0/0.5/0.25/0.125 → 41/20/10/5 with VGG, 81/40/20/10 with
ResNet), 20000 evaluation episodes, and the reference's batch of 32 on 4 GPUs with base_lr 0.02
(effective 0.2). The reference trained with DataParallel: its loss is the mean of 4 per-GPU
means and, in its BN quirk, statistics per 8 images; here the batch is one global batch. Its
config notes that one GPU should use batch 8 with base_lr 0.005
(``--config.data.train_batch_size=8 --config.train.lr=0.05``). The reference uses the
interleaved fold split (``use_split_coco``); that is chosen when converting the data
(data_prep/coco20i.py).

Argument keys: fold (0-3), shot (evaluation shots), train_shot (default 1, as pascal_pfenet.py),
backbone (vgg16_bn | resnet50 | resnet101), depth (50 | 101).
"""
from fss_jax import configs_lib


def get_config(arg=None):
  args = configs_lib.parse_arg(arg, {**configs_lib.COMMON_ARGS, "train_shot": 1})
  config = configs_lib.base_config("pfenet")
  config.data.dataset = "coco20i"
  config.data.image_size = 641
  config.data.train_batch_size = 32
  config.data.eval_episodes = 20000
  config.data.scale = (0.8, 1.25)
  config.model.bins = (1.0, 0.5, 0.25, 0.125)
  configs_lib.set_backbone(config, "vgg16_bn")
  config.train.epochs = 50
  config.train.lr = 0.2
  config.train.eval_every_epochs = 1
  configs_lib.apply_common_args(config, args,
                                allowed_backbones=("vgg16_bn", "resnet50", "resnet101"))
  config.data.eval_shot = config.data.shot
  config.data.shot = args["train_shot"]
  configs_lib.validate_config(config)
  return config
