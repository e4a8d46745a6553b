r"""PANet on COCO-20i, the official recipe (the same settings as PASCAL-5i: kaixin96/PANet
``config.py``; docs in ``configs_lib.panet_settings``).

  python scripts/train.py --config=configs/coco_panet.py:fold=0,shot=1 \
      --config.data.data_dir=data/coco20i --config.model.backbone_weights=vgg16-397923af.pth \
      --workdir=workdirs/panet_c0

PANet splits COCO's 80 classes contiguously (fold i novel = classes 20i+1..20i+20 in category-id
order): convert with ``data_prep/coco20i.py --fold_scheme contiguous`` (the default), not
PFENet's interleaved split. Training and test episodes both come from train2014
(``data.train_split``), as PANet's. Its COCO labels hold only the episode class's own mask, so
in an N-way episode another episode class counts as a support's background there; here the
full label map is used and such pixels are neither (as PANet's VOC loader does).

Argument keys: fold (0-3), shot, way, align, backbone (vgg16 | resnet50: the "blog" variant;
as configs/pascal_panet.py).
"""
from fss_jax import configs_lib


def get_config(arg=None):
  args = configs_lib.parse_arg(arg, configs_lib.PANET_ARGS)
  config = configs_lib.base_config("panet")
  config.data.dataset = "coco20i"
  configs_lib.panet_settings(config, args)
  configs_lib.validate_config(config)
  return config
