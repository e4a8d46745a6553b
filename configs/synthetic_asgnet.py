r"""ASGNet on the procedural few-shot dataset: trains and evaluates on a 2-core CPU.

The dataset (fss_jax/data/synthetic.py) is generated into ``data.data_dir`` on first use with
the ``data.synthetic`` settings. A small backbone is trained from scratch together with the head
(no frozen keys, BatchNorm in batch-statistics mode); FEM bins are relative because the feature
maps are small (``configs_lib.synthetic_settings``). On a 2-core CPU the run takes about 5
minutes; novel-class mIoU rises from ~11% (untrained, evaluated at step 0) to ~38% (best
checkpoint, around step 500, selected on the novel classes as the reference does) and falls
again as the from-scratch backbone specialises on the base classes. The novel score is noisy
from one evaluation to the next (200 episodes), hence frequent evaluation and the
best-checkpoint policy.

  python scripts/train.py --config=configs/synthetic_asgnet.py --workdir=workdirs/synthetic

Argument keys: fold (0-3), shot, backbone (resnet_small | resnet50 | resnet101), depth;
prior, amm (true | false): ASGNet + prior, ASGNet + AMM (options of fss_jax/models/asgnet.py).
"""
from fss_jax import configs_lib


def get_config(arg=None):
  args = configs_lib.parse_arg(arg, {**configs_lib.COMMON_ARGS, "prior": False, "amm": False})
  config = configs_lib.synthetic_settings(configs_lib.base_config("asgnet"))
  configs_lib.apply_common_args(
      config, args, allowed_backbones=("resnet_small", "resnet50", "resnet101"))
  config.model.prior = args["prior"]  # ASGNet + prior (fss_jax/models/asgnet.py)
  config.model.amm = args["amm"]      # ASGNet + AMM
  configs_lib.validate_config(config)
  return config
