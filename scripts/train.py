r"""Trains and evaluates a few-shot segmentation model; resumes from --workdir automatically.

  python scripts/train.py --config=configs/synthetic_asgnet.py --workdir=workdirs/synthetic
  python scripts/train.py --config=configs/pascal_asgnet.py:fold=0,shot=5,backbone=resnet101 \
      --workdir=workdirs/pascal_f0_5shot --config.data.data_dir=data/pascal5i

Any config field can be overridden with ``--config.<group>.<field>=value``; unknown fields are
rejected. Multi-host: pass ``--distributed`` (or set FSS_JAX_DISTRIBUTED=1 /
JAX_COORDINATOR_ADDRESS) to call ``jax.distributed.initialize()`` first.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "Call jax.distributed.initialize() (default: from the environment).")


def main(argv):
  from fss_jax.train import sharding  # pylint: disable=g-import-not-at-top
  sharding.script_setup(argv, _DISTRIBUTED.value)
  from fss_jax.train import trainer  # pylint: disable=g-import-not-at-top
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
