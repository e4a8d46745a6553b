r"""Segments your own images: a few annotated supports (image + mask) → masks on query images.

  # one support (the mask: nonzero = the object), every image of a folder as queries, with the
  # best checkpoint of a training run (and the config that run saved):
  python scripts/predict.py --workdir=workdirs/synthetic \
      --support=cat1.jpg:cat1_mask.png --query=photos/ --output=predictions
  # 2 shots with class-id masks (PASCAL-style PNGs, palette or grayscale: pixel == 8 is the
  # object, 255 ignored), queries from a glob and a file, an imported model file:
  python scripts/predict.py --config=configs/pascal_asgnet.py --checkpoint=asgnet_f0.pth \
      --support=a.jpg:a.png --support=b.jpg:b.png --class_id=8 \
      --query='shots/*.jpg' --query=extra.png --output=out --npz --explain

Inputs:
  --support IMAGE:MASK   repeatable, K shots (any K >= 1); the mask has the image's size. Without
                         --class_id a mask is binary: nonzero = the object (0/255 and 0/1 masks,
                         and the *_mask.png files this script writes, all work); with --class_id=C
                         its pixel values are class ids: C = the object, 255 = ignore, others
                         background. Grayscale, palette or colour PNGs whose channels agree.
  --query PATH           repeatable: an image file, a folder (its images: .jpg .jpeg .png .bmp
                         .tif .tiff .webp, not its subfolders) or a glob ('dir/*.jpg', quoted).
                         Any size; a file named twice is predicted once.
  --workdir RUN [--step best|latest|N]  a scripts/train.py run (its config.json unless --config),
  or --checkpoint FILE --config CONFIG  a .pth/.pt/.safetensors/.msgpack model file.

Outputs (per query, named after its file's stem, in --output):
  <name>_mask.png     the predicted mask at the query's own size: single channel, 8-bit,
                      0 = background, 255 = the object
  <name>_overlay.png  the query with the mask tinted and outlined (RGB)
  <name>.npz          with --npz: fg_score (H, W) float32 (foreground − background logit at the
                      query's size; the mask is fg_score > 0), mask (H, W) uint8 {0, 1}, logits
                      (S, S, 2) float32 (the model's logits on its S×S input canvas, the query
                      resized into its top-left canvas_hw corner), canvas_hw, image_size
  <name>_explain.png  with --explain: what the model computed (fss_jax/infer/explain.py)
Two queries with the same stem (a/x.jpg and b/x.png) would write the same files: that is refused
before anything runs (predict them with separate --output folders, or rename one).

The masks are what the evaluator scores with original-size labels: each image is resized as in
evaluation (longer side → the config's data.image_size, top-left of the square input), the
model's fg − bg logit is upsampled back to the image's size as the evaluator's original-label
mode does (fss_jax/infer/predictor.py). A support whose mask is empty at the model's input size
gives a warning saying what the model then does, not an error.

Exit codes: 0 done; 1 failed with one message naming the cause (a missing, empty or undecodable
image or mask, a mask whose size differs from its image's, a damaged checkpoint or non-finite
weights, a checkpoint that does not fit the config's model, --explain without
fss_jax/infer/explain.py); 2 bad command line or config (one line, no traceback; also two
queries with the same name).
"""
import glob
import os
import sys
import warnings

from absl import app
from absl import flags
from ml_collections import config_flags

from fss_jax import cli

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py[:arg]); with --workdir optional (default: the "
    "run's saved config.json).", lock_config=True)
_SUPPORT = flags.DEFINE_multi_string(
    "support", [], "IMAGE:MASK of one support shot (repeat for K shots).")
_CLASS_ID = flags.DEFINE_integer(
    "class_id", None, "The masks are class-id maps and this id is the object (255: ignore); "
    "default: binary masks, nonzero = the object.")
_QUERY = flags.DEFINE_multi_string(
    "query", [], "Query image file, folder of images or glob (repeatable).")
_WORKDIR = flags.DEFINE_string("workdir", None, "A scripts/train.py run directory.")
_STEP = flags.DEFINE_string("step", "best", "With --workdir: 'best', 'latest' or a step.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Instead of --workdir: a .pth/.pt/.safetensors (reference naming) or "
    ".msgpack model file (needs --config).")
_OUTPUT = flags.DEFINE_string("output", None, "Folder for the outputs (created if needed).")
_NPZ = flags.DEFINE_bool("npz", False, "Also write <name>.npz (fg_score, mask, canvas logits).")
_EXPLAIN = flags.DEFINE_bool(
    "explain", False, "Also write <name>_explain.png (fss_jax/infer/explain.py).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 4, "Queries per forward call.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bar (on a terminal).")


def parse_support(spec: str) -> tuple:
  """'IMAGE:MASK' → (image, mask); split at the last ':' (so 'C:\\a.jpg:m.png' works)."""
  image, sep, mask = spec.rpartition(":")
  if not sep or not image or not mask:
    cli.fail(f"--support={spec}: expected IMAGE:MASK (an image file and its mask file).")
  return image, mask


def expand_queries(specs) -> list:
  """The query files of the --query values, in order (folders and globs sorted), each once.
  Errors (FileNotFoundError) name the value that gave nothing."""
  paths, seen = [], set()
  for spec in specs:
    if os.path.isdir(spec):
      found = sorted(os.path.join(spec, f) for f in os.listdir(spec)
                     if os.path.splitext(f)[1].lower() in IMAGE_EXTS
                     and os.path.isfile(os.path.join(spec, f)))
      if not found:
        raise FileNotFoundError(f"--query={spec}: a folder without images "
                                f"({' '.join(IMAGE_EXTS)})")
    elif os.path.exists(spec):
      found = [spec]
    elif glob.has_magic(spec):
      found = sorted(p for p in glob.glob(spec)
                     if os.path.isfile(p) and os.path.splitext(p)[1].lower() in IMAGE_EXTS)
      if not found:
        raise FileNotFoundError(f"--query={spec}: the pattern matches no image file")
    else:
      raise FileNotFoundError(f"--query={spec}: no such file or folder")
    for p in found:
      key = os.path.realpath(p)
      if key not in seen:
        seen.add(key)
        paths.append(p)
  return paths


def query_names(paths) -> list:
  """Each query's output name (its file's stem); two queries with one name are refused."""
  names, first = [], {}
  for p in paths:
    name = os.path.splitext(os.path.basename(p))[0]
    if name in first:
      cli.fail(f"queries {first[name]} and {p} have the same name {name!r}: their outputs "
               f"({name}_mask.png, {name}_overlay.png, ...) would overwrite each other in "
               f"--output={_OUTPUT.value}. Predict them in separate runs with different "
               "--output folders, or rename one.")
    first[name] = p
    names.append(name)
  return names


def _explain_figure():
  """``fss_jax.infer.explain.figure``, imported only with --explain."""
  try:
    from fss_jax.infer import explain  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    cli.fail(f"--explain needs fss_jax/infer/explain.py, which cannot be imported here ({e}); "
             "run without --explain.", cli.EXIT_FAILED)
  figure = getattr(explain, "figure", None)
  if not callable(figure):
    cli.fail("--explain: fss_jax/infer/explain.py has no figure(model_name, prediction); run "
             "without --explain.", cli.EXIT_FAILED)
  return figure


def _show_warning(original):
  def show(message, category, filename, lineno, file=None, line=None):
    from fss_jax.infer import predictor  # pylint: disable=g-import-not-at-top
    if issubclass(category, predictor.EmptySupportWarning):
      prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "predict.py"
      sys.stderr.write(f"{prog}: warning: {message}\n")
    else:
      original(message, category, filename, lineno, file, line)
  return show


def _class_id_note(mask_path: str, class_id: int) -> None:
  """A note when a class-id mask lacks --class_id (the warning that follows says the effect)."""
  from fss_jax.data import schema  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  ids = np.unique(schema.read_label_image(mask_path)).tolist()
  print(f"note: {mask_path} holds the class ids {ids}, not --class_id={class_id}",
        file=sys.stderr)


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {argv[1:]}")
  # ---- the command line, before anything costly ----
  if not _SUPPORT.value:
    cli.fail("give at least one --support=IMAGE:MASK.")
  if not _QUERY.value:
    cli.fail("give at least one --query (an image, a folder of images or a glob).")
  if not _OUTPUT.value:
    cli.fail("--output (a folder for the predictions) is required.")
  if (_WORKDIR.value is None) == (_CHECKPOINT.value is None):
    cli.fail("give exactly one of --workdir (a training run) or --checkpoint (a model file).")
  if _CHECKPOINT.value is not None and _CONFIG.value is None:
    cli.fail("--checkpoint needs --config (the config the model was trained with).")
  if _CHECKPOINT.value is not None and flags.FLAGS["step"].present:
    cli.fail("--step goes with --workdir, not --checkpoint.")
  if _BATCH_SIZE.value < 1:
    cli.fail(f"--batch_size must be >= 1, got {_BATCH_SIZE.value}.")
  shots = [parse_support(s) for s in _SUPPORT.value]
  try:
    paths = expand_queries(_QUERY.value)
  except FileNotFoundError as e:
    cli.fail(str(e), cli.EXIT_FAILED)
  names = query_names(paths)
  figure = _explain_figure() if _EXPLAIN.value else None
  config = cli.checked_config(_CONFIG) if _CONFIG.value is not None else None

  from absl import logging  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fss_jax.convert import torch_import  # pylint: disable=g-import-not-at-top
  from fss_jax.infer import predictor as predictor_lib  # pylint: disable=g-import-not-at-top
  from fss_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from fss_jax.train import logging as logging_lib  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  warnings.showwarning = _show_warning(warnings.showwarning)

  # ---- supports (all read before the model loads) ----
  supports = []
  for image_path, mask_path in shots:
    try:
      support = predictor_lib.load_support(image_path, mask_path, _CLASS_ID.value)
    except (OSError, ValueError) as e:
      cli.fail(str(e), cli.EXIT_FAILED)
    if _CLASS_ID.value is not None and not np.any(support.mask == 1):
      _class_id_note(mask_path, _CLASS_ID.value)
    supports.append(support)

  # ---- the model ----
  try:
    if _WORKDIR.value is not None:
      predictor = predictor_lib.Predictor.from_run(
          _WORKDIR.value, _STEP.value, config=config, batch_size=_BATCH_SIZE.value)
    else:
      predictor = predictor_lib.Predictor.from_checkpoint(
          _CHECKPOINT.value, config, batch_size=_BATCH_SIZE.value)
  except (ckpt_lib.CheckpointRestoreError, ckpt_lib.NonFiniteWeightsError,
          torch_import.CheckpointMismatchError) as e:
    cli.fail(f"{type(e).__name__}: {e}", cli.EXIT_FAILED)
  except (OSError, ValueError, KeyError) as e:
    cli.fail(str(e), cli.EXIT_FAILED)

  # ---- predict, one batch of queries at a time, writing as they come ----
  out_dir = _OUTPUT.value
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    cli.fail(f"--output={out_dir}: {e}", cli.EXIT_FAILED)
  print(f"predicting {len(paths)} image(s) with {predictor.source} ({predictor.model_name}, "
        f"{len(supports)}-shot, input {predictor.image_size}x{predictor.image_size}) into "
        f"{out_dir}")

  def images():
    for p in paths:
      yield predictor_lib.read_image(p)

  bar = logging_lib.ProgressBar(len(paths), desc="predict", unit="image",
                                enabled=None if _PROGRESS.value else False)
  written = 0
  try:
    for pred in predictor.predict_iter(supports, images(), names):
      base = os.path.join(out_dir, pred.name)
      predictor_lib.write_mask_png(f"{base}_mask.png", pred.mask)
      predictor_lib.write_rgb_png(f"{base}_overlay.png", predictor_lib.overlay(pred))
      if _NPZ.value:
        np.savez_compressed(f"{base}.npz", fg_score=pred.fg_score, mask=pred.mask,
                            logits=np.asarray(pred.outputs["logits"], np.float32),
                            canvas_hw=np.asarray(pred.canvas_hw, np.int32),
                            image_size=np.int32(pred.image_size))
      if figure is not None:
        predictor_lib.write_rgb_png(f"{base}_explain.png",
                                    figure(predictor.model_name, pred))
      written += 1
      bar.update(1)
  except (OSError, ValueError) as e:
    bar.close()
    cli.fail(f"{e} ({written} of {len(paths)} queries written to {out_dir})", cli.EXIT_FAILED)
  bar.close()
  extra = "".join([", .npz" if _NPZ.value else "", ", _explain.png" if figure else ""])
  print(f"wrote {written} prediction(s) (_mask.png, _overlay.png{extra}) to {out_dir}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
