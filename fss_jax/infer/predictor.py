"""Prediction on any images: supports (image + mask) and queries of any size → masks.

Interface (explain.py and demo.py are written against it):

  read_image(path) -> (H, W, 3) uint8 RGB                     # clear error naming the file
  read_mask(path, class_id=None) -> (H, W) uint8 {0, 1, 255}  # binary: nonzero = 1; with
                                                              # class_id: ==id → 1, 255 kept
  class Predictor:
    Predictor(model, variables, config, batch_size=...)       # model from models.registry
    Predictor.from_run(workdir, step="best", config=None)     # config: the run's config.json
    Predictor.from_checkpoint(path, config)                   # .pth/.safetensors/.msgpack
    .model_name: str, .image_size: int (S), .config
    .predict(supports: Sequence[Support], queries: Sequence[np.ndarray],
             names: Sequence[str] = ()) -> list[Prediction]
  overlay(prediction) -> (H, W, 3) uint8 RGB: the query with the predicted mask drawn on it.

Also: ``load_support(image_path, mask_path, class_id=None) -> Support`` (both files read, sizes
checked, both named in errors), ``Predictor.predict_iter`` (the same as ``predict``, but takes
any iterable of queries and yields each batch's predictions as soon as they are computed), and
``EmptySupportWarning``.

What ``predict`` computes is exactly what the evaluator scores with original-size labels
(``fss_jax/train/evaluator.py``, ``data.original_label_eval``): each support is binarised and
resized as ``pipeline.EvalBatchFn`` does (``transforms.eval_resize``: longer side → S, both
sides floored to a multiple of 8, top-left of an S×S canvas, the label padded with 255), each
query the same way; one jitted forward (``model.apply(..., train=False)``) runs over batches of
``batch_size`` queries (the last batch padded, so there is one compiled shape per shot count K),
the supports repeated on every row; the fg − bg logit of the canvas is upsampled with
``evaluator.resize_to_original`` (bilinear, align_corners) to L×L, L = max(H, W), and cropped to
the query's H×W; foreground where it is > 0 (ties go to background, as the evaluator's argmax).

A support whose mask holds no foreground once resized is not an error: the prediction is made
and an ``EmptySupportWarning`` says what the model does with such a shot (see ``_EMPTY_EFFECT``).
"""
import dataclasses
import functools
import os
import warnings
from typing import Any, Iterable, Iterator, Optional, Sequence

import cv2
import jax
import numpy as np

from fss_jax.data import schema
from fss_jax.data import transforms
from fss_jax.data import visualize

# Entries of the model's output dict that ``Prediction.outputs`` leaves out (large and not
# needed to inspect a prediction: the FEM's auxiliary logits, ASGNet's 512-ch guide feature).
DROPPED_OUTPUTS = ("aux_logits", "guide_feat")

# The S×S-canvas score map is resized onto a square canvas whose side is L rounded up to this
# (one compiled resize per bucket instead of one per image size).
_RESIZE_BUCKET = 64


class EmptySupportWarning(UserWarning):
  """A support whose mask has no foreground at the model's input size (or feature grid)."""


@dataclasses.dataclass
class Support:
  """One annotated support: ``image`` (H, W, 3) uint8 RGB, ``mask`` (H, W) uint8 in {0, 1, 255}
  (1 = the object, 255 = ignore), both at the image's own size."""
  image: np.ndarray
  mask: np.ndarray
  name: str = ""
  mask_name: str = ""  # the mask's file, when read from one (named in errors)


@dataclasses.dataclass
class Prediction:
  """One query's prediction, back at the query's own size, with what the model computed.

  mask: (H, W) uint8 {0, 1} at the query's original size (the evaluation resize undone exactly
    as the evaluator's original-label mode: logits of the S×S canvas upsampled bilinearly with
    align_corners to L×L, L = max(H, W), cropped to H×W, foreground where fg logit > bg logit).
  fg_score: (H, W) float32 foreground − background logit at the original size (the same map).
  query: (H, W, 3) uint8 RGB, the query as given.
  canvas_hw: (h', w') extent of the resized query inside the S×S model input (top-left).
  image_size: S.
  outputs: the model's output dict for this query, numpy, batch axis removed (``logits``
    (S, S, 2); ASGNet: ``seeds`` (K, max_sp, 2), ``supp_mask`` (K, h, w), ``prob_map`` (h, w, 1),
    ``guide_index`` (h, w), ``proto_valid`` (K·max_sp,), ...; PFENet / ASGNet + prior: ``prior``
    (h, w, 1)); ``aux_logits`` and ``guide_feat`` are dropped; ``query_feat`` / ``supp_feat`` are kept
    (explain.py recomputes ASGNet's SGC assignment from them).
  supports: the supports as given.
  support_canvas_hw: per support, (h', w') of its resized extent inside the S×S canvas.
  name: the query's name (file name) if known.
  warnings: the messages of the ``EmptySupportWarning``s raised for this prediction's supports.
  """
  mask: np.ndarray
  fg_score: np.ndarray
  query: np.ndarray
  canvas_hw: tuple
  image_size: int
  outputs: dict
  supports: list
  support_canvas_hw: list
  name: str = ""
  warnings: list = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------- files


def _read_bytes(path, what: str) -> bytes:
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such {what} file")
  if os.path.isdir(path):
    raise IsADirectoryError(f"{path}: is a folder, not an {what} file")
  with open(path, "rb") as f:
    data = f.read()
  if not data:
    raise ValueError(f"{path}: empty {what} file (0 bytes)")
  return data


def read_image(path) -> np.ndarray:
  """An image file → (H, W, 3) uint8 RGB, decoded as the dataset records are
  (``cv2.IMREAD_COLOR | IMREAD_IGNORE_ORIENTATION``: the EXIF orientation tag is ignored, so the
  pixels stay in the file's order, the order its mask is drawn in).

  Raises FileNotFoundError for a missing file, ValueError for a zero-byte or undecodable one;
  the message names the file.
  """
  data = _read_bytes(path, "image")
  try:
    return schema.decode_image(data)
  except ValueError as e:
    raise ValueError(f"{os.fspath(path)}: {e}") from e


def read_mask(path, class_id: Optional[int] = None) -> np.ndarray:
  """A mask file → (H, W) uint8 in {0, 1, 255}.

  Read as ``data_prep/folder.py`` reads masks (``schema.read_label_image``: 8-bit grayscale,
  palette PNGs by their palette indices, colour images whose three channels agree).
  Without ``class_id`` the mask is binary: nonzero = 1 (the object; a 0/255 mask, a 0/1 mask
  and the ``*_mask.png`` files ``scripts/predict.py`` writes all work). With ``class_id`` the
  pixel values are class ids, binarised as the evaluator does
  (``transforms.binarize_label``): == class_id → 1, 255 → 255 (ignore), anything else → 0.

  Raises FileNotFoundError / ValueError naming the file for missing, zero-byte and undecodable
  files, masks of more than 8 bits and colour masks whose channels differ.
  """
  path = os.fspath(path)
  if class_id is not None and not 0 <= int(class_id) < transforms.IGNORE_LABEL:
    raise ValueError(f"class_id must be in [0, {transforms.IGNORE_LABEL}) "
                     f"({transforms.IGNORE_LABEL} is ignore), got {class_id}")
  data = _read_bytes(path, "mask")
  try:
    mask = schema.decode_label_image(data, path)
  except ValueError as e:
    if "channels differ" in str(e):
      raise ValueError(
          f"{path}: a colour mask whose channels differ; give a single-channel (grayscale) or "
          "palette PNG: " + ("pixel value = class id, 255 ignore" if class_id is not None
                             else "0 background, nonzero the object")) from e
    raise
  if class_id is None:
    return (mask != 0).astype(np.uint8)
  return transforms.binarize_label(mask, int(class_id))


def load_support(image_path, mask_path, class_id: Optional[int] = None) -> Support:
  """A ``Support`` from an image file and its mask file (``read_image``, ``read_mask``); a
  mask whose size differs from the image's is a ValueError naming both files and sizes."""
  image = read_image(image_path)
  mask = read_mask(mask_path, class_id)
  support = Support(image, mask, name=os.fspath(image_path), mask_name=os.fspath(mask_path))
  _check_support(support, 0)
  return support


def _hw(a) -> str:
  return f"{a.shape[0]}x{a.shape[1]}"


def _support_name(s: Support, k: int) -> str:
  return s.name or f"support {k + 1}"


def _check_support(s: Support, k: int) -> None:
  image, mask = np.asarray(s.image), np.asarray(s.mask)
  name = _support_name(s, k)
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f"{name}: the image must be (H, W, 3) uint8 RGB, got {image.shape} "
                     f"{image.dtype}")
  if mask.ndim != 2:
    raise ValueError(f"{name}: the mask must be (H, W), got {mask.shape}")
  if mask.shape != image.shape[:2]:
    mask_name = s.mask_name or "its mask"
    raise ValueError(f"{name}: {mask_name} is {_hw(mask)} (HxW) but the image is "
                     f"{_hw(image)}; a mask must have its image's size")
  bad = np.setdiff1d(np.unique(mask), [0, 1, transforms.IGNORE_LABEL])
  if bad.size:
    raise ValueError(f"{name}: mask values must be 0, 1 or {transforms.IGNORE_LABEL}, found "
                     f"{bad[:5].tolist()} (read_mask makes them so)")


def _query_image(image, name: str) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2 and image.dtype == np.uint8:
    image = np.repeat(image[..., None], 3, axis=2)
  if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
    raise ValueError(f"{name or 'query'}: expected an (H, W, 3) uint8 RGB image, got "
                     f"{image.shape} {image.dtype}")
  return image


def canvas_hw(height: int, width: int, size: int, name: str = "") -> tuple:
  """(h', w') of an H×W image inside the S×S model input (``transforms.eval_hw``); a
  ValueError when a side would vanish (an image too elongated for S)."""
  hw = transforms.eval_hw(int(height), int(width), int(size))
  if min(hw) < 1:
    raise ValueError(f"{name or 'image'}: {height}x{width} is too elongated for the model's "
                     f"{size}x{size} input (its shorter side would be {min(hw)} pixels after "
                     "the resize, which floors sides to multiples of 8); crop it first")
  return hw


# ----------------------------------------------------------------------------- the model


# What the models do with a shot whose mask is empty (read from fss_jax/models/asgnet.py, sgc.py,
# gpa.py and pfenet.py).
_EMPTY_EFFECT = {
    "asgnet": (
        "ASGNet then gives that shot a single all-zero prototype (SGC over an empty region); "
        "its cosine with every query pixel is 0. With no other shot, the probability map and "
        "the guide feature are zero everywhere, so the prediction comes from the query's "
        "features alone and says nothing about the object (expect an arbitrary mask); with "
        "other shots, the zero prototype still counts: it adds 0 to the probability map and "
        "takes the pixels where every real prototype's cosine is negative, feeding them a zero "
        "guide feature."),
    "pfenet": (
        "PFENet then gives that shot an all-zero prototype and an all-zero prior, and both "
        "still count in the mean over shots. With no other shot, the prediction comes from "
        "the query's features alone and says nothing about the object (expect an arbitrary "
        "mask); with other shots, their prototype and prior are scaled down by the share of "
        "the empty shot."),
}
_EMPTY_GENERIC = ("the model gets no object information from that shot; with no other shot "
                  "the prediction says nothing about the object.")


def _empty_effect(model_name: str) -> str:
  return _EMPTY_EFFECT.get(model_name, _EMPTY_GENERIC)


@functools.partial(jax.jit, static_argnames=("model",))
def _forward(model, variables, batch):
  """The evaluator's forward (``evaluator.episode_scores``) without the scoring: the model's
  output dict, less ``DROPPED_OUTPUTS``."""
  from fss_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  out = model.apply(variables, **step_lib.model_inputs(model, batch), train=False)
  return {k: v for k, v in out.items() if k not in DROPPED_OUTPUTS}


@functools.partial(jax.jit, static_argnames=("canvas",))
def _to_original(logits, sizes, canvas: int):
  """(B, S, S, 2) canvas logits → (B, canvas, canvas) fg − bg score on each L×L (top-left)."""
  from fss_jax.train import evaluator  # pylint: disable=g-import-not-at-top
  return evaluator.resize_to_original(logits[..., 1] - logits[..., 0], sizes, canvas)


def _flat_shapes(tree) -> dict:
  return {jax.tree_util.keystr(p): tuple(np.shape(v))
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _check_variables(model, variables, config, source: str) -> None:
  """A ValueError unless ``variables`` have the configured model's parameter paths and shapes
  (a checkpoint with another config's model fails here rather than deep inside Flax)."""
  from fss_jax.models import registry  # pylint: disable=g-import-not-at-top
  template = registry.variables_template(model)
  for collection in ("params", "batch_stats"):
    got = _flat_shapes(variables.get(collection, {}))
    want = _flat_shapes(template.get(collection, {}))
    if got != want:
      missing = sorted(set(want) - set(got))[:5]
      extra = sorted(set(got) - set(want))[:5]
      shape = [(k, got[k], want[k]) for k in sorted(set(got) & set(want)) if got[k] != want[k]]
      raise ValueError(
          f"{source}: the {collection} do not match the model of the config "
          f"(model.name={config.model.name!r}, backbone={config.model.backbone!r}): missing "
          f"{missing}, unexpected {extra}, shape (checkpoint vs model) {shape[:5]}; give the "
          "config the checkpoint was trained with")


class Predictor:
  """A model with its variables and config, for prediction on images of any size.

  Args:
    model: the configured model (``fss_jax.models.registry.build_model(config)``).
    variables: its variables ({'params', 'batch_stats'}), e.g. from
      ``fss_jax.train.evaluator.load_variables``.
    config: the config (``data.image_size`` is S, ``model.name`` the model).
    batch_size: queries per forward call (the last batch is padded: one compiled shape per
      shot count).
  """

  def __init__(self, model, variables, config, batch_size: int = 4, source: str = ""):
    if int(batch_size) < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.model = model
    self.config = config
    self.variables = jax.device_put(variables)
    self.batch_size = int(batch_size)
    self.image_size = int(config.data.image_size)
    self.model_name = str(config.model.name)
    self.source = source

  @classmethod
  def from_run(cls, workdir: str, step: Any = "best", config=None,
               batch_size: int = 4) -> "Predictor":
    """A ``scripts/train.py`` run's checkpoint ('best', 'latest' or a step number).

    ``config`` defaults to the run's own (``<workdir>/config.json``, as the trainer saved it).
    Damaged checkpoints and non-finite weights are refused (``evaluator.load_variables``).
    """
    from fss_jax import configs_lib  # pylint: disable=g-import-not-at-top
    from fss_jax.models import registry  # pylint: disable=g-import-not-at-top
    from fss_jax.train import evaluator  # pylint: disable=g-import-not-at-top
    if config is None:
      config = configs_lib.load_run_config(workdir)
    model = registry.build_model(config)
    variables, source = evaluator.load_variables(model, config, workdir=workdir, step=step)
    _check_variables(model, variables, config, source)
    return cls(model, variables, config, batch_size=batch_size, source=source)

  @classmethod
  def from_checkpoint(cls, path: str, config, batch_size: int = 4) -> "Predictor":
    """A model file: the reference's ``.pth``/``.pt``/``.safetensors`` naming or our
    ``.msgpack`` (``evaluator.load_variables``; shapes checked against ``config``'s model)."""
    from fss_jax.models import registry  # pylint: disable=g-import-not-at-top
    from fss_jax.train import evaluator  # pylint: disable=g-import-not-at-top
    model = registry.build_model(config)
    variables, source = evaluator.load_variables(model, config, checkpoint=path)
    _check_variables(model, variables, config, source)
    return cls(model, variables, config, batch_size=batch_size, source=source)

  # --------------------------------------------------------------------------- preprocessing

  def _prepare_supports(self, supports: Sequence[Support]):
    """(images (K, S, S, 3) float32, labels (K, S, S) uint8, canvas (h', w') per shot, warnings)."""
    supports = list(supports)
    if not supports:
      raise ValueError("predict needs at least one support (image + mask)")
    s = self.image_size
    images = np.empty((len(supports), s, s, 3), np.float32)
    labels = np.empty((len(supports), s, s), np.uint8)
    hws, messages = [], []
    for k, sup in enumerate(supports):
      _check_support(sup, k)
      name = _support_name(sup, k)
      hws.append(canvas_hw(*sup.mask.shape, s, name))
      transforms.eval_resize(sup.image, np.asarray(sup.mask, np.uint8), s,
                             out=(images[k], labels[k]))
      # The canvas outside the image is no pixel of the support: neither foreground nor
      # background (PANet reads 255 as void = background; the other models read both as 0).
      h, w = hws[-1]
      labels[k, h:, :] = transforms.NEITHER
      labels[k, :, w:] = transforms.NEITHER
      if not np.any(labels[k] == 1):
        had = np.any(np.asarray(sup.mask) == 1)
        why = (f"its mask's foreground ({int(np.sum(np.asarray(sup.mask) == 1))} pixels) "
               f"vanishes when the image is resized to the model's {s}x{s} input" if had
               else "its mask has no foreground (no pixel is the object)")
        messages.append(f"{name}: {why}. {_empty_effect(self.model_name)}")
    return images, labels, hws, messages

  def _model_empty_shots(self, outputs: dict, supports, labels) -> list:
    """Warnings for shots with foreground at S×S that the model still sees as empty (a mask
    too small for the feature grid: all-zero prototypes / feature-size mask)."""
    k = len(supports)
    per_shot = None
    if "prototypes" in outputs and "proto_valid" in outputs:  # ASGNet: K·max_sp slots
      p = np.asarray(outputs["prototypes"]).reshape((k, -1) + outputs["prototypes"].shape[1:])
      per_shot = [not np.any(p[i]) for i in range(k)]
    elif "shot_prototypes" in outputs:  # PFENet
      per_shot = [not np.any(outputs["shot_prototypes"][i]) for i in range(k)]
    elif "supp_mask" in outputs:
      per_shot = [not np.any(outputs["supp_mask"][i]) for i in range(k)]
    if per_shot is None:
      return []
    return [f"{_support_name(sup, i)}: its mask's foreground is too small for the model's "
            f"feature grid at {self.image_size}x{self.image_size} (the model's prototype of "
            f"that shot is zero). {_empty_effect(self.model_name)}"
            for i, sup in enumerate(supports) if per_shot[i] and np.any(labels[i] == 1)]

  # --------------------------------------------------------------------------- prediction

  def predict(self, supports: Sequence[Support], queries: Sequence[np.ndarray],
              names: Sequence[str] = ()) -> list:
    """Predictions (``Prediction``, in order) of the queries' masks of the supports' object.

    Each prediction keeps the model's outputs (features included: several MB per query at
    473²); for many queries use ``predict_iter`` and keep what you need.

    Args:
      supports: K >= 1 ``Support``s (image + mask at the image's size).
      queries: (H, W, 3) uint8 RGB images of any sizes.
      names: optional names of the queries (``Prediction.name``).
    """
    return list(self.predict_iter(supports, queries, names))

  def predict_iter(self, supports: Sequence[Support], queries: Iterable[np.ndarray],
                   names: Sequence[str] = ()) -> Iterator[Prediction]:
    """``predict`` over any iterable of queries (read lazily, e.g. from files), yielding the
    predictions of each batch of ``batch_size`` queries as soon as it is computed."""
    supports = list(supports)
    supp_images, supp_labels, supp_hw, messages = self._prepare_supports(supports)
    for m in messages:
      warnings.warn(m, EmptySupportWarning, stacklevel=3)
    names = list(names)
    state = {"messages": messages, "checked": False}
    pending = []
    for i, query in enumerate(queries):
      name = names[i] if i < len(names) else ""
      pending.append((_query_image(query, name), name))
      if len(pending) == self.batch_size:
        yield from self._run(pending, supports, supp_images, supp_labels, supp_hw, state)
        pending = []
    if pending:
      yield from self._run(pending, supports, supp_images, supp_labels, supp_hw, state)

  def _run(self, items, supports, supp_images, supp_labels, supp_hw, state):
    s, b, k = self.image_size, self.batch_size, len(supports)
    query = np.zeros((b, s, s, 3), np.float32)  # padding rows: zeros (their output is unused)
    dummy = np.zeros((s, s), np.uint8)
    hws = []
    for j, (image, name) in enumerate(items):
      hws.append(canvas_hw(*image.shape[:2], s, name))
      label = np.zeros(image.shape[:2], np.uint8)
      transforms.eval_resize(image, label, s, out=(query[j], dummy))
    batch = {
        "query": query,
        "supp_images": np.broadcast_to(supp_images[None], (b, k, s, s, 3)),
        "supp_labels": np.broadcast_to(supp_labels[None], (b, k, s, s)),
    }
    if "base_class" in self.model.inputs:  # BAM/MSANet: read in training only
      batch["base_class"] = np.zeros((b,), np.int32)
    outputs = _forward(self.model, self.variables, batch)
    logits = outputs["logits"]
    outputs = jax.device_get(outputs)
    if not state["checked"]:
      state["checked"] = True
      for m in self._model_empty_shots(_row(outputs, 0, b), supports, supp_labels):
        warnings.warn(m, EmptySupportWarning, stacklevel=4)
        state["messages"].append(m)
    for j, (image, name) in enumerate(items):
      h, w = image.shape[:2]
      side = max(h, w)
      canvas = -(-side // _RESIZE_BUCKET) * _RESIZE_BUCKET
      score = _to_original(logits[j:j + 1], np.asarray([side], np.int32), canvas)
      score = np.asarray(score[0, :h, :w], np.float32)
      yield Prediction(
          mask=(score > 0).astype(np.uint8), fg_score=score, query=image,
          canvas_hw=tuple(hws[j]), image_size=s,
          outputs=_row(outputs, j, b), supports=supports,
          support_canvas_hw=[tuple(hw) for hw in supp_hw], name=name,
          warnings=list(state["messages"]))


def _row(outputs: dict, j: int, batch: int) -> dict:
  """Episode j's part of a model's batched outputs; outputs without a batch axis (a scalar such
  as PANet's align_loss) are left out."""
  out = {}
  for key, value in outputs.items():
    leaves = jax.tree.leaves(value)
    if leaves and all(np.ndim(x) and np.shape(x)[0] == batch for x in leaves):
      out[key] = jax.tree.map(lambda x: np.array(x[j]), value)
  return out


def overlay(prediction: Prediction) -> np.ndarray:
  """(H, W, 3) uint8 RGB at the query's size: the query with the predicted mask tinted and
  outlined in ``visualize.PRED_COLOUR``."""
  return visualize.overlay(prediction.query, prediction.mask, visualize.PRED_COLOUR)


def write_mask_png(path: str, mask: np.ndarray) -> None:
  """Writes a {0, 1} mask as a single-channel 8-bit PNG of 0 (background) and 255 (object)."""
  if not cv2.imwrite(path, np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8)):
    raise OSError(f"{path}: cannot write the PNG")


def write_rgb_png(path: str, image: np.ndarray) -> None:
  """Writes (H, W, 3) uint8 RGB as a PNG."""
  if not cv2.imwrite(path, cv2.cvtColor(np.asarray(image, np.uint8), cv2.COLOR_RGB2BGR)):
    raise OSError(f"{path}: cannot write the PNG")
