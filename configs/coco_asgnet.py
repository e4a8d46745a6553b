r"""ASGNet on COCO-20i, the reference's settings (``coco_asgnet_split*_resnet50.yaml``).

Differences from PASCAL: 641×641, batch 8, effective lr 0.05 (base 0.005 × 10), 50 epochs
(evaluated every epoch), scale 0.8-1.25, FEM bins relative to the feature size, 20000
evaluation episodes. The reference uses the interleaved fold split (``use_split_coco``); that
choice is made when converting the data (data_prep/coco20i.py), not here.

Argument keys: fold (0-3), shot, backbone (resnet50 | resnet101), depth (50 | 101);
prior, amm (true | false): ASGNet + prior, ASGNet + AMM (options of fss_jax/models/asgnet.py).
"""
from fss_jax import configs_lib


def get_config(arg=None):
  args = configs_lib.parse_arg(arg, {**configs_lib.COMMON_ARGS, "prior": False, "amm": False})
  config = configs_lib.base_config("asgnet")
  config.data.dataset = "coco20i"
  config.data.image_size = 641
  config.data.train_batch_size = 8
  config.data.eval_episodes = 20000
  config.data.scale = (0.8, 1.25)
  config.model.bins = (1.0, 0.5, 0.25, 0.125)
  config.train.epochs = 50
  config.train.lr = 0.05
  config.train.eval_every_epochs = 1
  configs_lib.apply_common_args(config, args)
  config.model.prior = args["prior"]  # ASGNet + prior (fss_jax/models/asgnet.py)
  config.model.amm = args["amm"]      # ASGNet + AMM
  configs_lib.validate_config(config)
  return config
