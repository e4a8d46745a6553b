r"""Trains and evaluates a few-shot segmentation model; resumes from --workdir automatically.

  python scripts/train.py --config=configs/synthetic_asgnet.py --workdir=workdirs/synthetic
  python scripts/train.py --config=configs/pascal_asgnet.py:fold=0,shot=5,backbone=resnet101 \
      --workdir=workdirs/pascal_f0_5shot --config.data.data_dir=data/pascal5i

Any config field can be overridden with ``--config.<group>.<field>=value``; unknown fields are
rejected. Multi-host: pass ``--distributed`` (or set FSS_JAX_DISTRIBUTED=1 /
JAX_COORDINATOR_ADDRESS) to call ``jax.distributed.initialize()`` first.

One run per workdir: ``<workdir>/train.lock`` names the running trainer (host, PID, start,
command); a second trainer on the workdir is refused (exit 3). A lock left by a killed run on
this host is taken over automatically; one of another host needs
``--config.train.break_lock=True``. Resuming with a config that differs from the workdir's
``config.json`` in anything but logging / evaluation cadence, checkpoint retention, data-loading
parallelism, ``data.eval_batch_size``, ``eval.protocol`` and damage handling (the list:
``fss_jax.train.workdir.HARMLESS``) is refused (exit 2) with the changed
keys; ``--config.train.accept_changes=train.total_steps,train.epochs`` lets exactly the listed
keys change (fss_jax/train/workdir.py).

Exit codes: 0 done; 1 the run failed and says why in one message (a damaged checkpoint with no
intact one to fall back to, a failed checkpoint write, divergence, a bad record); 2 bad command
line or config (one line, no traceback), or a refused config
change on resume; 3 the workdir is locked by another run; 143 (128 + SIGTERM) stopped by
SIGTERM / SIGINT after saving a checkpoint (not finished: run the same command to resume).
"""
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from fss_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "Call jax.distributed.initialize() (default: from the environment).")


def main(argv):
  from fss_jax.train import sharding  # pylint: disable=g-import-not-at-top
  sharding.script_setup(argv, _DISTRIBUTED.value)
  config = cli.checked_config(_CONFIG)
  from fss_jax.train import trainer  # pylint: disable=g-import-not-at-top
  from fss_jax.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  if not config.data.data_dir:
    cli.fail("config.data.data_dir is empty: set it to the converted dataset (data_prep/*.py "
             "--out_dir) or, for 'synthetic', to a cache folder.")
  from fss_jax.data import schema  # pylint: disable=g-import-not-at-top
  from fss_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  try:
    result = trainer.train_and_evaluate(config, _WORKDIR.value)
  except workdir_lib.WorkdirError as e:
    cli.fail(str(e), e.exit_code)
  except (ckpt_lib.CheckpointRestoreError, ckpt_lib.CheckpointWriteError,
          ckpt_lib.NonFiniteLossError, schema.BadRecordError) as e:
    cli.fail(f"{type(e).__name__}: {e}", cli.EXIT_FAILED)  # the message stands alone
  if result.get("stopped"):
    sys.exit(cli.EXIT_STOPPED)  # saved, not finished


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=cli.parse_flags)
