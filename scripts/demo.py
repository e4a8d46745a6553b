r"""A local web demo: annotate a support or a few, give queries, see the predicted masks.

  pip install -r requirements-demo.txt   # or: pip install -e .[demo]
  # the best checkpoint of a training run (its own config.json):
  python scripts/demo.py --workdir=workdirs/synthetic
  # a model file (.pth/.pt/.safetensors in the reference's naming, or .msgpack) with its config:
  python scripts/demo.py --checkpoint=asgnet_split0_resnet50.pth \
      --config=configs/pascal_asgnet.py:fold=0

Then open the printed URL (http://127.0.0.1:7860/ by default). The server listens on
127.0.0.1 (this machine only) unless --host says otherwise; --host=0.0.0.0 opens it to the
network, with no authentication. Nothing is sent anywhere else: gradio's analytics, version
check and share links are off. Stop with Ctrl-C.

Models trained on the procedural dataset get a few examples (fold's novel classes, scenes the
dataset does not hold; --noexamples to leave them out). The page is fss_jax/infer/demo.py.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fss_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py[:arg]); required with --checkpoint, defaults to "
    "the run's config.json with --workdir.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A train.py run directory.")
_STEP = flags.DEFINE_string("step", "best", "With --workdir: 'best', 'latest' or a step.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Instead of --workdir: .pth/.pt/.safetensors (reference naming) or "
    ".msgpack variables.")
_HOST = flags.DEFINE_string(
    "host", "127.0.0.1", "Address to listen on. The default, 127.0.0.1, serves this machine "
    "only (localhost); 0.0.0.0 serves every network interface, without authentication.")
_PORT = flags.DEFINE_integer("port", 7860, "Port to listen on.")
_EXAMPLES = flags.DEFINE_bool(
    "examples", True, "Offer a few examples when the model was trained on the procedural "
    "dataset.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 4, "Queries per forward call.")


def _step(value: str):
  return int(value) if value.isdigit() else value


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax's and the HTTP client's INFO lines: only
    logging.set_verbosity(logging.WARNING)   # with --verbosity (as train.py / evaluate.py)
  if (_WORKDIR.value is None) == (_CHECKPOINT.value is None):
    cli.fail("give exactly one of --workdir (a training run) or --checkpoint (a model file).")
  from fss_jax import configs_lib  # pylint: disable=g-import-not-at-top
  # Paths and configs first, before gradio and the model are loaded (a typo fails at once).
  if _CHECKPOINT.value is not None or _CONFIG.value is not None:
    config = cli.checked_config(_CONFIG)  # --checkpoint without --config: one line, exit 2
  else:
    try:
      config = configs_lib.load_run_config(_WORKDIR.value)
    except (FileNotFoundError, ValueError) as e:
      cli.fail(str(e), cli.EXIT_FAILED)
  if _CHECKPOINT.value is not None and not os.path.isfile(_CHECKPOINT.value):
    cli.fail(f"{_CHECKPOINT.value}: no such file", cli.EXIT_FAILED)
  from fss_jax.convert import torch_import  # pylint: disable=g-import-not-at-top
  from fss_jax.infer import demo  # pylint: disable=g-import-not-at-top
  from fss_jax.infer import predictor as predictor_lib  # pylint: disable=g-import-not-at-top
  from fss_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  try:
    if _WORKDIR.value is not None:
      predictor = predictor_lib.Predictor.from_run(
          _WORKDIR.value, _step(_STEP.value), config=config, batch_size=_BATCH_SIZE.value)
    else:
      predictor = predictor_lib.Predictor.from_checkpoint(
          _CHECKPOINT.value, config, batch_size=_BATCH_SIZE.value)
  except (ckpt_lib.CheckpointRestoreError, ckpt_lib.NonFiniteWeightsError,
          torch_import.CheckpointMismatchError, FileNotFoundError, ValueError) as e:
    cli.fail(f"{type(e).__name__}: {e}", cli.EXIT_FAILED)
  examples = []
  examples_dir = None
  if _EXAMPLES.value:
    import tempfile  # pylint: disable=g-import-not-at-top
    examples_dir = tempfile.TemporaryDirectory(prefix="fss_demo_examples_")
    examples = demo.synthetic_examples(predictor.config, examples_dir.name)
  page = demo.build_app(predictor, examples=examples)
  try:
    page.launch(server_name=_HOST.value, server_port=_PORT.value, share=False,
                inbrowser=False, prevent_thread_lock=True, quiet=True, show_error=True)
  except OSError as e:
    cli.fail(f"cannot listen on {_HOST.value}:{_PORT.value}: {e}", cli.EXIT_FAILED)
  url = f"http://{'127.0.0.1' if _HOST.value in ('0.0.0.0', '::') else _HOST.value}" \
        f":{page.server_port}/"
  print(f"fss_jax demo: {predictor.model_name} from {predictor.source}")
  print(f"open {url} (Ctrl-C to stop)", flush=True)
  if _HOST.value not in ("127.0.0.1", "localhost", "::1"):
    print(f"warning: listening on {_HOST.value}: anyone who can reach this machine on port "
          f"{page.server_port} can use the demo (no authentication)", file=sys.stderr)
  try:
    page.block_thread()
  except KeyboardInterrupt:
    pass
  finally:
    page.close()
    if examples_dir is not None:
      examples_dir.cleanup()


if __name__ == "__main__":
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
  app.run(main, flags_parser=cli.parse_flags)
