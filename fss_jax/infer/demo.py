"""The local web demo (Gradio): annotate supports, give queries, see the predicted masks.

  build_app(predictor, examples=()) -> gradio.Blocks   # builds the page; launches nothing
  run(predictor, editors, mask_files, queries, class_id=None, out_dir=None) -> Result
  supports_from_inputs(editors, mask_files, class_id=None) -> list[Support]
  synthetic_examples(config, out_dir, count=3) -> examples for build_app

``scripts/demo.py`` loads a model and launches the app on 127.0.0.1. The page has
``MAX_SHOTS`` support slots (the first shown, "Add a support" shows the next): each takes an
image on which the object is painted with the brush, or an uploaded mask file (a mask file,
when given, is used instead of the painting). Queries are one or several image files. "Run"
shows each query with its predicted mask, the explanation panels of ``explain.py`` and offers
the masks (PNG, 255 = object) and the explanation figures as downloads. A missing support, an
empty mask and a missing query are reported in the page (``gradio.Error``; ``run`` raises
``InputError`` with the same message).

The app itself never reaches the network: gradio's analytics and version check are off, no
share link is made, and Hugging Face Hub telemetry is off (set below, before gradio's first
import, as its Hub client reads them at import time). The page loads only from the app's own
server (the default theme's fonts are local).
"""
import dataclasses
import os
import tempfile
from typing import Any, Optional, Sequence

# Before gradio (and huggingface_hub, which reads these once at import) is imported.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from fss_jax.infer import predictor as predictor_lib  # noqa: E402

MAX_SHOTS = 5  # support slots on the page (the field's K-shot setting is 1 or 5)
API_NAME = "run"  # the Run button's endpoint (gradio_client: api_name="/run")

NO_SUPPORT = ("No support: upload a support image (Support 1) and paint the object on it, or "
              "upload its mask file.")
NO_QUERY = "No query: upload one or more query images."


class InputError(ValueError):
  """What the user gave cannot be run (the message says what to do)."""


def empty_mask_message(k: int, mask_file: Optional[str] = None,
                       class_id: Optional[int] = None) -> str:
  """The message for support ``k`` (0-based) whose mask has no object pixel."""
  if mask_file is None:
    return (f"Support {k + 1}: the mask is empty. Paint the object on the image with the "
            "brush, or upload a mask file where the object's pixels are non-zero.")
  what = (f"no pixel has the class id {class_id}" if class_id is not None
          else "all its pixels are 0")
  return (f"Support {k + 1}: the mask is empty: in the mask file "
          f"{os.path.basename(mask_file)}, {what}.")


@dataclasses.dataclass
class Result:
  """What a run shows: ``overlays`` and ``panels`` are (uint8 RGB, caption) pairs, ``files``
  the paths of the masks and explanation figures written, ``message`` a Markdown summary."""
  predictions: list
  overlays: list
  panels: list
  files: list
  message: str


# ----------------------------------------------------------------------------- inputs


def _rgb(image: np.ndarray) -> np.ndarray:
  """uint8 gray / RGB / RGBA → RGB (transparent pixels composited on white)."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=2)
  if image.shape[2] == 4:
    alpha = image[..., 3:].astype(np.float32) / 255.0
    image = np.rint(image[..., :3] * alpha + 255.0 * (1.0 - alpha))
  return np.asarray(image[..., :3], np.uint8)


def painted_mask(layers: Sequence[np.ndarray], hw: tuple) -> np.ndarray:
  """The union of the editor's brush layers (RGBA; painted where alpha >= 128) at ``hw``,
  uint8 {0, 1}."""
  import cv2  # pylint: disable=g-import-not-at-top
  mask = np.zeros(hw, np.uint8)
  for layer in layers or ():
    layer = np.asarray(layer)
    if layer.ndim != 3 or layer.shape[2] != 4:
      continue  # a layer without alpha holds no stroke information
    painted = (layer[..., 3] >= 128).astype(np.uint8)
    if painted.shape != tuple(hw):
      painted = cv2.resize(painted, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)
    mask |= painted
  return mask


def _editor_parts(value: Any):
  """(background or None, layers) of an ImageEditor value (dict, or None when empty)."""
  if value is None:
    return None, []
  if isinstance(value, np.ndarray):
    return value, []
  background = value.get("background")
  if background is not None and np.asarray(background).size == 0:
    background = None
  return background, list(value.get("layers") or [])


def _class_id(class_id) -> Optional[int]:
  """None (any non-zero pixel is the object) or the class id of the mask files' pixels."""
  if class_id is None or (isinstance(class_id, str) and not class_id.strip()):
    return None
  try:
    value = int(str(class_id).strip())
  except ValueError:
    value = -1
  if not 0 <= value < 255:
    raise InputError(f"The class id must be a whole number from 0 to 254 (255 is ignore), "
                     f"got {class_id!r}; leave it empty to take any non-zero pixel.")
  return value


def supports_from_inputs(editors: Sequence[Any], mask_files: Sequence[Optional[str]],
                         class_id=None) -> list:
  """``Support``s from the page's slots: each slot is an ImageEditor value (a dict with
  ``background`` (H, W, 3|4) uint8 and ``layers``, RGBA brush strokes) and an optional mask file
  (read with ``predictor.read_mask(path, class_id)``; it replaces the painting). Empty slots are
  skipped; a slot with an image but an empty mask, or a mask file without an image, is an
  ``InputError``."""
  class_id = _class_id(class_id)
  supports = []
  n = max(len(editors), len(mask_files))
  for k in range(n):
    editor = editors[k] if k < len(editors) else None
    mask_file = mask_files[k] if k < len(mask_files) else None
    background, layers = _editor_parts(editor)
    if background is None:
      if mask_file:
        raise InputError(f"Support {k + 1}: a mask file but no image; upload the support "
                         "image too.")
      continue
    image = _rgb(background)
    if mask_file:
      try:
        mask = predictor_lib.read_mask(mask_file, class_id)
      except (OSError, ValueError) as e:
        raise InputError(f"Support {k + 1}: " + _short_paths(str(e), [mask_file])) from e
      if mask.shape != image.shape[:2]:
        raise InputError(
            f"Support {k + 1}: the mask file {os.path.basename(mask_file)} is "
            f"{mask.shape[0]}x{mask.shape[1]} (HxW) but the image is "
            f"{image.shape[0]}x{image.shape[1]}; a mask must have its image's size.")
      if not np.any(mask == 1):
        raise InputError(empty_mask_message(k, mask_file, class_id))
      name = os.path.basename(mask_file)
    else:
      mask = painted_mask(layers, image.shape[:2])
      if not np.any(mask):
        raise InputError(empty_mask_message(k))
      name = ""
    supports.append(predictor_lib.Support(image, mask, name=f"support {k + 1}",
                                          mask_name=name))
  if not supports:
    raise InputError(NO_SUPPORT)
  return supports


def _short_paths(message: str, paths: Sequence[str]) -> str:
  """Upload paths (gradio's cache folders) → their file names in a message."""
  for p in paths:
    if p:
      message = message.replace(os.fspath(p), os.path.basename(os.fspath(p)))
  return message


def _file_path(f) -> str:
  """A gradio file value (a path, or an object / dict with a path) → its path."""
  if isinstance(f, dict):
    return f.get("path") or f.get("name")
  return os.fspath(getattr(f, "path", None) or getattr(f, "name", None) or f)


def read_queries(files: Optional[Sequence[Any]]) -> tuple:
  """(images, names) of the query files (``predictor.read_image``); none is an InputError."""
  paths = [_file_path(f) for f in (files or ()) if f]
  if not paths:
    raise InputError(NO_QUERY)
  images, names = [], []
  for p in paths:
    try:
      images.append(predictor_lib.read_image(p))
    except (OSError, ValueError) as e:
      raise InputError("Query " + _short_paths(str(e), [p])) from e
    names.append(os.path.basename(p))
  return images, names


# ----------------------------------------------------------------------------- run


def _unique_stems(names: Sequence[str]) -> list:
  seen, out = {}, []
  for i, name in enumerate(names):
    stem = os.path.splitext(os.path.basename(name))[0] or f"query_{i + 1}"
    n = seen.get(stem, 0)
    seen[stem] = n + 1
    out.append(stem if n == 0 else f"{stem}_{n + 1}")
  return out


def explain_options(predictor) -> dict:
  """``explain``'s options for the predictor's model: ASGNet's SGC iterations at evaluation
  (``config.model.eval_iters``), so that they need not be inferred."""
  model = predictor.config.get("model", {}) if hasattr(predictor.config, "get") else {}
  if predictor.model_name == "asgnet" and "eval_iters" in model:
    return {"sgc_iters": int(model["eval_iters"])}
  return {}


def run(predictor, editors: Sequence[Any], mask_files: Sequence[Optional[str]],
        queries: Optional[Sequence[Any]], class_id=None,
        out_dir: Optional[str] = None) -> Result:
  """One press of "Run": supports from the slots, the queries' predictions, their overlays,
  explanation panels and figures, and the files to download (written into ``out_dir``, a new
  temporary folder by default): ``<query>_mask.png`` (0 / 255) and ``<query>_explain.png``.

  Raises ``InputError`` (no support, an empty mask, no query, unreadable files, sizes that
  do not match); the predictor's ValueErrors (e.g. an image too elongated) become InputErrors.
  """
  from fss_jax.infer import explain  # pylint: disable=g-import-not-at-top
  supports = supports_from_inputs(editors, mask_files, class_id)
  images, names = read_queries(queries)
  try:
    predictions = predictor.predict(supports, images, names)
  except ValueError as e:
    raise InputError(str(e)) from e
  out_dir = out_dir or tempfile.mkdtemp(prefix="fss_demo_")
  os.makedirs(out_dir, exist_ok=True)
  options = explain_options(predictor)
  overlays, panels, files = [], [], []
  for stem, name, pred in zip(_unique_stems(names), names, predictions):
    share = 100.0 * float(pred.mask.mean())
    overlays.append((predictor_lib.overlay(pred), f"{name}: {share:.1f}% object"))
    for title, picture in explain.panels(predictor.model_name, pred, **options):
      panels.append((picture, f"{name}: {title}"))
    mask_path = os.path.join(out_dir, f"{stem}_mask.png")
    predictor_lib.write_mask_png(mask_path, pred.mask)
    figure_path = os.path.join(out_dir, f"{stem}_explain.png")
    predictor_lib.write_rgb_png(figure_path,
                                explain.figure(predictor.model_name, pred, **options))
    files += [mask_path, figure_path]
  k = len(supports)
  lines = [f"**{predictor.model_name}**, {k}-shot, {len(images)} "
           f"quer{'y' if len(images) == 1 else 'ies'} (model input "
           f"{predictor.image_size}x{predictor.image_size})."]
  notes = list(dict.fromkeys(m for p in predictions for m in p.warnings))
  lines += [f"- warning: {m}" for m in notes]
  return Result(predictions, overlays, panels, files, "\n".join(lines))


# ----------------------------------------------------------------------------- examples


def synthetic_examples(config, out_dir: str, count: int = 3) -> list:
  """For a model trained on the procedural dataset: ``count`` examples (support image, its
  mask, [query]) of the fold's novel classes, rendered from the generator's "test" stream
  (scenes the dataset does not hold) into ``out_dir``. Other datasets: []."""
  from fss_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  if config.data.dataset != "synthetic":
    return []
  settings = config.data.get("synthetic", None)
  seed = int(settings.seed) if settings is not None else 0
  size = int(settings.source_size) if settings is not None and "source_size" in settings \
      else synthetic.DEFAULT_IMAGE_SIZE
  os.makedirs(out_dir, exist_ok=True)
  found = {c: [] for c in synthetic.novel_classes(int(config.data.fold))}
  for index in range(400):
    if all(len(v) >= 2 for v in list(found.values())[:count]):
      break
    scene = synthetic.render_scene(seed, "test", index, size)
    for c, scenes in found.items():
      if len(scenes) < 2 and np.sum(scene.label == c) >= 0.02 * scene.label.size:
        scenes.append((index, scene))
  examples = []
  for c, scenes in list(found.items())[:count]:
    if len(scenes) < 2:
      continue
    (i_s, support), (i_q, query) = scenes[:2]
    name = synthetic.CLASS_NAMES[c - 1]
    support_path = os.path.join(out_dir, f"{name}_support_{i_s}.png")
    mask_path = os.path.join(out_dir, f"{name}_support_{i_s}_mask.png")
    query_path = os.path.join(out_dir, f"{name}_query_{i_q}.png")
    predictor_lib.write_rgb_png(support_path, support.image)
    predictor_lib.write_mask_png(mask_path, support.label == c)
    predictor_lib.write_rgb_png(query_path, query.image)
    examples.append((support_path, mask_path, [query_path]))
  return examples


# ----------------------------------------------------------------------------- the page

_INTRO = """\
### Few-shot segmentation: {model} ({source})

1. **Support**: upload an image that shows the object, then paint the object on it with the
   brush, or upload its mask file (any non-zero pixel is the object; with a class id below,
   the pixels of that id). "Add a support" for more shots (K-shot).
2. **Queries**: one or several images in which to find the same kind of object.
3. **Run**. The first run with a given number of supports compiles the model (from seconds to a
   minute); later runs are fast.
"""


def build_app(predictor, examples: Sequence[tuple] = (), title: str = "fss_jax demo"):
  """The demo page for ``predictor`` (nothing is launched; call ``.launch()``).

  Args:
    predictor: a ``predictor.Predictor``.
    examples: (support image path, its mask path, [query paths]) tuples offered under the
      inputs (``synthetic_examples``).
    title: the browser tab's title.
  Returns:
    gradio.Blocks. Its Run event is the API endpoint ``/run`` with inputs (editor 1..MAX_SHOTS,
    mask file 1..MAX_SHOTS, class id, queries) and outputs (overlays, panels, files, message).
  """
  work = tempfile.TemporaryDirectory(prefix="fss_demo_")
  counter = [0]

  def on_run(*values):
    editors = values[:MAX_SHOTS]
    masks = values[MAX_SHOTS:2 * MAX_SHOTS]
    class_id, queries = values[2 * MAX_SHOTS:]
    counter[0] += 1
    try:
      result = run(predictor, editors, masks, queries, class_id,
                   out_dir=os.path.join(work.name, f"run_{counter[0]}"))
    except InputError as e:
      raise gr.Error(str(e), duration=None, print_exception=False) from e
    for p in result.predictions:
      for m in p.warnings:
        gr.Warning(m)
    return result.overlays, result.panels, result.files, result.message

  source = os.path.basename(str(getattr(predictor, "source", "") or "")) or "random weights"
  with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
    app.fss_work_dir = work  # kept alive with the app (temporary files of the runs)
    gr.Markdown(_INTRO.format(model=predictor.model_name, source=source))
    shown = gr.State(1)
    editors, masks, slots = [], [], []
    with gr.Row():
      with gr.Column(scale=1):
        for k in range(MAX_SHOTS):
          with gr.Column(visible=k == 0, variant="panel") as slot:
            editors.append(gr.ImageEditor(
                label=f"Support {k + 1}: upload the image, paint the object",
                type="numpy", image_mode="RGBA", sources=("upload", "clipboard"),
                transforms=(), layers=False, buttons=["fullscreen"],
                brush=gr.Brush(colors=["#ff2040"], color_mode="fixed"),
                elem_id=f"support-{k + 1}"))
            masks.append(gr.File(
                label=f"...or the mask file of support {k + 1} (PNG; replaces the painting)",
                file_count="single", file_types=["image"], type="filepath",
                elem_id=f"mask-{k + 1}"))
          slots.append(slot)
        with gr.Row():
          add = gr.Button("Add a support", size="sm")
          remove = gr.Button("Remove the last support", size="sm")
        class_id = gr.Textbox(
            label="Class id in the mask files (empty: any non-zero pixel is the object)",
            value="", placeholder="e.g. 15: pixels of value 15 are the object, 255 ignored",
            max_lines=1, elem_id="class-id")
      with gr.Column(scale=1):
        queries = gr.File(label="Queries (one or several images)", file_count="multiple",
                          file_types=["image"], type="filepath", elem_id="queries")
        run_button = gr.Button("Run", variant="primary", elem_id="run")
        message = gr.Markdown(elem_id="message")
        overlays = gr.Gallery(label="Prediction per query", format="png", columns=2,
                              object_fit="contain", buttons=["download", "fullscreen"],
                              elem_id="overlays")
        panels = gr.Gallery(label="What the model computed", format="png", columns=3,
                            object_fit="contain", buttons=["download", "fullscreen"],
                            elem_id="panels")
        files = gr.File(label="Downloads: masks (PNG, 255 = object) and explanation figures",
                        file_count="multiple", interactive=False, elem_id="downloads")
    if examples:
      gr.Examples([[s, m, list(q)] for s, m, q in examples],
                  inputs=[editors[0], masks[0], queries],
                  label="Examples (support 1 with its mask, a query)")

    def show(n):
      return [n] + [gr.Column(visible=k < n) for k in range(MAX_SHOTS)]

    def add_slot(n):
      return show(min(int(n) + 1, MAX_SHOTS))

    add.click(add_slot, shown, [shown] + slots, api_name=False, queue=False)

    def remove_and_clear(n):  # hides the last slot and clears its image and mask file
      n = int(n)
      out = show(max(n - 1, 1))
      clear = [gr.skip()] * (2 * MAX_SHOTS)
      if n > 1:
        clear[n - 1] = None
        clear[MAX_SHOTS + n - 1] = None
      return out + clear

    remove.click(remove_and_clear, shown, [shown] + slots + editors + masks, api_name=False,
                 queue=False)
    run_button.click(on_run, editors + masks + [class_id, queries],
                     [overlays, panels, files, message], api_name=API_NAME,
                     concurrency_limit=1)
  return app
