r"""Smallest end-to-end config (tests and smoke runs): a few steps on a tiny synthetic dataset.

Set ``data.data_dir`` to a temporary directory (the trainer generates the data there).
Argument keys: fold (0-3), shot, backbone (resnet_small | resnet50 | resnet101), depth.
"""
import ml_collections

from fss_jax import configs_lib


def get_config(arg=None):
  args = configs_lib.parse_arg(arg, configs_lib.COMMON_ARGS)
  config = configs_lib.asgnet_base_config()
  config.data.dataset = "synthetic"
  config.data.data_dir = ""
  config.data.image_size = 65
  config.data.train_batch_size = 2
  config.data.eval_batch_size = 2
  config.data.num_workers = 0
  config.data.eval_episodes = 4
  config.data.min_class_pixels = 16
  config.data.synthetic = ml_collections.ConfigDict(dict(
      num_train=24, num_val=12, source_size=80, seed=0))

  configs_lib.set_backbone(config, "resnet_small")
  config.model.bins = (1.0, 0.5)
  config.model.reduce_dim = 16
  config.model.train_iters = 2
  config.model.eval_iters = 2
  config.model.bn_mode = "batch_stats"

  config.train.epochs = 0
  config.train.total_steps = 4
  config.train.lr = 0.01
  config.train.frozen_keys = ()
  config.train.log_every = 1
  config.train.eval_every = 2
  config.train.eval_every_epochs = 0
  config.train.checkpoint_every = 2
  config.train.keep_checkpoints = 2
  configs_lib.apply_common_args(
      config, args, allowed_backbones=("resnet_small", "resnet50", "resnet101"))
  configs_lib.validate_config(config)
  return config
