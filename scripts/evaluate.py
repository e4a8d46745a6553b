r"""Evaluates a model with the few-shot protocol: a training run's checkpoint or an imported file.

  # the best checkpoint of a run, as configured (protocol 'custom': data.eval_episodes,
  # data.eval_seeds, data.original_label_eval):
  python scripts/evaluate.py --config=configs/synthetic_asgnet.py --workdir=workdirs/synthetic \
      --predictions=predictions.png
  # the authors' trained PyTorch checkpoint with ASGNet's own test protocol (seed 321, 1001
  # episodes on PASCAL-5i, original-size labels):
  python scripts/evaluate.py --config=configs/pascal_asgnet.py:fold=0,shot=1 \
      --checkpoint=train_epoch_xx.pth --config.data.data_dir=data/pascal5i \
      --config.eval.protocol=asgnet --output=fold0_asgnet.json
  # the multi-seed protocol of BAM / MSANet (5 seeds x 1000 episodes, original labels):
  python scripts/evaluate.py --config=configs/pascal_asgnet.py:fold=0,shot=1 \
      --checkpoint=train_epoch_xx.pth --config.data.data_dir=data/pascal5i \
      --config.eval.protocol=bam --output=fold0_bam.json

``--config.eval.protocol`` is one of custom, asgnet, pfenet, bam, hsnet, panet (any model, any
checkpoint; fss_jax/train/protocols.py lists what each fixes). Prints the protocol, the
per-class table and mIoU / FB-IoU (mean ± std over seeds); ``--output`` writes them as JSON
with the protocol, episode count, seeds and label mode first; ``--predictions`` writes a PNG of
a few episodes (supports, truth, prediction).

A config error (unknown ``--config.<field>``, wrong type, bad config argument, invalid value)
is one line on stderr and exit code 2 (fss_jax/cli.py).
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from fss_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A train.py run directory to evaluate.")
_STEP = flags.DEFINE_string("step", "best", "With --workdir: 'best', 'latest' or a step.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Instead of --workdir: .pth/.pt/.safetensors (reference naming) or "
    ".msgpack variables.")
_CLASSES = flags.DEFINE_enum("classes", "novel", ["novel", "base"],
                             "Episodes of the fold's novel classes (protocol) or base classes.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results as JSON here.")
_PREDICTIONS = flags.DEFINE_string("predictions", None, "Write a PNG of a few predictions.")
_NUM_PREDICTIONS = flags.DEFINE_integer("num_predictions", 8, "Episodes in --predictions.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bar (on a terminal).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "Call jax.distributed.initialize() (default: from the environment).")


def _evaluate_semantic(config, model, mesh, data, variables, source):
  """A per-image model (``fss_jax/train/semantic.py``): every validation image, base classes."""
  import jax  # pylint: disable=g-import-not-at-top
  from fss_jax.train import evaluator as evaluator_lib  # pylint: disable=g-import-not-at-top
  from fss_jax.train import semantic  # pylint: disable=g-import-not-at-top
  ev = semantic.from_config(config, model, mesh, data)
  say = print if jax.process_index() == 0 else (lambda *_: None)
  say(f"evaluating {source} on {data} fold {config.data.fold}; {ev.protocol.describe()}")
  out = ev.run_protocol(variables, progress=_PROGRESS.value)
  say(f"\n{out['runs'][0].table()}\n{out['runs'][0].headline()}")
  if _OUTPUT.value and jax.process_index() == 0:
    evaluator_lib.write_json(_OUTPUT.value, semantic.results_json(
        out["runs"][0], **ev.protocol.header(), source=source))
    say(f"wrote {_OUTPUT.value}")


def main(argv):
  from fss_jax.train import sharding  # pylint: disable=g-import-not-at-top
  sharding.script_setup(argv, _DISTRIBUTED.value)
  import jax  # pylint: disable=g-import-not-at-top
  from fss_jax.data import dataset_dir  # pylint: disable=g-import-not-at-top
  from fss_jax.data import visualize  # pylint: disable=g-import-not-at-top
  from fss_jax.models import registry  # pylint: disable=g-import-not-at-top
  from fss_jax.train import evaluator as evaluator_lib  # pylint: disable=g-import-not-at-top

  config = cli.checked_config(_CONFIG)  # errors: one line, exit 2
  mesh = sharding.make_mesh()
  model = registry.build_model(config)
  from fss_jax.convert import torch_import  # pylint: disable=g-import-not-at-top
  from fss_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  try:
    variables, source = evaluator_lib.load_variables(
        model, config, workdir=_WORKDIR.value, checkpoint=_CHECKPOINT.value, step=_STEP.value)
  except (ckpt_lib.CheckpointRestoreError, ckpt_lib.NonFiniteWeightsError,
          torch_import.CheckpointMismatchError, FileNotFoundError) as e:
    cli.fail(f"{type(e).__name__}: {e}", cli.EXIT_FAILED)
  variables = jax.device_put(variables, sharding.replicated(mesh))
  data = dataset_dir.prepare(config)
  if registry.task(model) == "semantic":  # PSPNet (BAM's stage 1): base-class mIoU per image
    _evaluate_semantic(config, model, mesh, data, variables, source)
    return
  protocol = evaluator_lib.protocol_settings(config)
  ev = evaluator_lib.from_config(config, model, mesh, data, _CLASSES.value, protocol=protocol)
  say = print if jax.process_index() == 0 else (lambda *_: None)
  say(f"evaluating {source} on {data} fold {config.data.fold} {ev.shot}-shot, "
      f"{_CLASSES.value} classes; {protocol.describe()}\n  ({protocol.note})")
  out = ev.run_protocol(variables, progress=_PROGRESS.value, log=say)
  for r in out["runs"]:
    say(f"\nseed {r.seed}\n{r.table()}")
  say(f"\n{protocol.describe()}\n{evaluator_lib.format_seeds(out)}")
  if _OUTPUT.value and jax.process_index() == 0:
    evaluator_lib.write_json(_OUTPUT.value, evaluator_lib.results_json(
        out, **protocol.header(), source=source, classes=_CLASSES.value))
    say(f"wrote {_OUTPUT.value}")
  if _PREDICTIONS.value:
    rows = ev.prediction_rows(variables, protocol.seeds[0], _NUM_PREDICTIONS.value)
    if jax.process_index() == 0:
      visualize.write_grid(_PREDICTIONS.value, rows)
      say(f"wrote {_PREDICTIONS.value} ({len(rows)} episodes)")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=cli.parse_flags)
