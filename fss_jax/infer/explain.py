"""The internal maps of a prediction, per model: what the model computed for one query, drawn.

  figure(model_name, prediction) -> (H, W, 3) uint8 RGB: one figure per query. Every panel has a
    title; continuous maps have a colour bar with their numeric range; categorical maps (ASGNet's
    prototype slots) use one colour per slot in every panel, with a key under the panel.
  panels(model_name, prediction) -> [(title, (h, w, 3) uint8 RGB)]: the same panels one by one
    (the web demo shows them individually): each image carries its colour bar or key, the title
    is returned beside it instead of drawn on it.

``prediction`` is an ``fss_jax.infer.predictor.Prediction`` (only its fields are read). What is
drawn per model is the table ``EXPLAINERS`` (``config.model.name`` → function(prediction,
height, **options) → list of ``Panel``); a new model adds one entry, built from the helpers
here. Unknown models get ``generic_panels``: the supports with their masks, the fg − bg score
and the prediction.

* ``asgnet`` (with or without the prior / AMM options): per shot, the support with its mask and
  the SGC seeds (numbered dots in their prototype's colour) and the SGC assignment (which
  prototype each ROI pixel belongs to, ``fss_jax.models.sgc.sgc_assignment``); for the query,
  the GPA allocation (``guide_index``: the prototype each pixel is given, keyed "shot s · proto
  i" in the same colours), the probability map (``prob_map``: the sum of the cosines with every
  valid prototype), the prior (ASGNet + prior), the fg − bg score and the prediction.
* ``pfenet``: the supports with their masks, the prior mask (0..1), the fg − bg score and the
  prediction.

Geometry: a model's feature maps (h x w, h = (S-1)/stride + 1) cover the whole S x S input
canvas, in which the image occupies the top-left ``canvas_hw`` (``support_canvas_hw`` for the
supports). Feature pixel i sits at canvas position i (S-1)/(h-1) (the grid the models upsample
their logits on, align_corners); each display pixel is mapped to the canvas extent of the image
(pixel centres, canvas_hw over the display size) and sampled there: nearest feature pixel for
categorical maps (the cells stay visible), bilinear for continuous ones. The padding outside
the image is never shown, and every panel has the image's own aspect ratio.

OpenCV only (no matplotlib). ASGNet's SGC assignment runs the clustering again on the support
features in ``outputs`` (jitted, a few seconds of compilation per input shape); the number of
iterations is ``sgc_iters`` if given (``config.model.eval_iters`` of the model that predicted),
otherwise the one whose prototypes reproduce ``outputs['prototypes']`` (up to ``INFER_ITERS``).
"""
import dataclasses
import functools
from typing import Callable, Optional, Sequence

import cv2
import numpy as np

from fss_jax.data import visualize

PANEL_HEIGHT = 200          # display height of an image panel (wide images: see MAX_ASPECT)
MAX_ASPECT = 2.0            # widest panel: MAX_ASPECT x height (taller ones are never cut)
MIN_PANEL_WIDTH = 180       # narrower panels are padded so their title and key stay readable
CATEGORICAL_ALPHA = 0.7     # weight of a slot colour over the dimmed image
DIM = 0.5                   # the dimmed image under categorical maps: DIM x its grey value
INFER_ITERS = 10            # SGC iterations tried when sgc_iters is not given
BACKGROUND = (30, 30, 30)
TEXT_COLOUR = (235, 235, 235)
FONT = cv2.FONT_HERSHEY_SIMPLEX
TITLE_SCALE = 0.42
LABEL_SCALE = 0.38
LINE = 15                   # text line height (pixels)
GAP = 6

# One colour per prototype slot (ASGNet: slot p = shot * max_sp + i), the same in every panel.
# tab10 without its grey (invisible on the dimmed image), then tab20's light tones.
_SLOT_PALETTE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207), (0, 128, 128),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (219, 219, 141), (158, 218, 229), (128, 0, 0)], np.uint8)


@dataclasses.dataclass
class Panel:
  """One panel: ``image`` (h, w, 3) uint8 RGB with its colour bar / key, ``title`` (not drawn
  on it), ``row``: panels with the same row are laid out side by side in ``figure``."""
  title: str
  image: np.ndarray
  row: str = "query"


# ----------------------------------------------------------------------------- colours


def slot_colour(p: int) -> np.ndarray:
  """(3,) uint8 RGB of prototype slot ``p`` (a fixed palette, then golden-angle hues)."""
  if p < len(_SLOT_PALETTE):
    return _SLOT_PALETTE[p]
  hue = int((p * 137.508) % 360) // 2  # OpenCV hue is 0..179
  hsv = np.array([[[hue, 200, 230]]], np.uint8)
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0]


@functools.lru_cache(maxsize=None)
def viridis_lut() -> np.ndarray:
  """(256, 3) uint8 RGB: OpenCV's viridis (low → high)."""
  bgr = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_VIRIDIS)
  return np.ascontiguousarray(bgr[:, 0, ::-1])


@functools.lru_cache(maxsize=None)
def diverging_lut() -> np.ndarray:
  """(256, 3) uint8 RGB: blue (negative) → light grey (0, entry 127.5) → red (positive)."""
  anchors = np.array([(40, 70, 200), (220, 220, 220), (200, 30, 40)], np.float64)
  t = np.linspace(0.0, 2.0, 256)
  lo = np.minimum(t.astype(int), 1)
  f = (t - lo)[:, None]
  return np.rint((1 - f) * anchors[lo] + f * anchors[lo + 1]).astype(np.uint8)


def colourize(values: np.ndarray, lo: float, hi: float, lut: np.ndarray) -> np.ndarray:
  """values → RGB through ``lut``, ``lo`` → entry 0, ``hi`` → entry 255 (clipped)."""
  span = hi - lo if hi > lo else 1.0
  idx = np.clip(np.rint((np.asarray(values, np.float64) - lo) / span * 255.0), 0, 255)
  return lut[idx.astype(np.int64)]


# ----------------------------------------------------------------------------- text


def _ascii_segments(text: str) -> list:
  """``text`` split at '·' (drawn as a dot), other non-ASCII characters spelled in ASCII."""
  table = {"−": "-", "–": "-", "×": "x", "≤": "<=", "≥": ">="}
  out = []
  for seg in text.split("·"):
    seg = "".join(table.get(ch, ch) for ch in seg)
    out.append(seg.encode("ascii", "replace").decode("ascii"))
  return out


_DOT_W = 5


def text_width(text: str, scale: float = TITLE_SCALE) -> int:
  segs = _ascii_segments(text)
  return (sum(cv2.getTextSize(s, FONT, scale, 1)[0][0] for s in segs) +
          _DOT_W * (len(segs) - 1))


def put_text(img: np.ndarray, text: str, org: tuple, scale: float = TITLE_SCALE,
             colour=TEXT_COLOUR) -> None:
  """cv2.putText that also draws '·' (OpenCV's Hershey fonts are ASCII only). In place."""
  x, y = int(org[0]), int(org[1])
  colour = tuple(int(c) for c in colour)
  segs = _ascii_segments(text)
  for i, seg in enumerate(segs):
    cv2.putText(img, seg, (x, y), FONT, scale, colour, 1, cv2.LINE_AA)
    x += cv2.getTextSize(seg, FONT, scale, 1)[0][0]
    if i < len(segs) - 1:
      cv2.circle(img, (x + _DOT_W // 2, y - 4), 1, colour, -1, cv2.LINE_AA)
      x += _DOT_W


def _wrap(text: str, width: int, scale: float) -> list:
  lines, line = [], ""
  for word in text.split(" "):
    trial = word if not line else line + " " + word
    if line and text_width(trial, scale) > width:
      lines.append(line)
      line = word
    else:
      line = trial
  return lines + [line]


def _text_block(lines: Sequence[str], width: int, scale: float) -> np.ndarray:
  img = np.full((LINE * len(lines) + 4, width, 3), BACKGROUND, np.uint8)
  for i, line in enumerate(lines):
    put_text(img, line, (2, LINE * (i + 1) - 2), scale)
  return img


def title_strip(title: str, width: int) -> np.ndarray:
  """The title, wrapped to ``width``, white on the background."""
  return _text_block(_wrap(title, width - 4, TITLE_SCALE), width, TITLE_SCALE)


def key_strip(entries: Sequence[tuple], width: int) -> np.ndarray:
  """Colour swatches with labels, in as many columns as fit ``width``: entries (colour, label);
  a colour of None gives a plain text line."""
  if not entries:
    return np.zeros((0, width, 3), np.uint8)
  col_w = max(text_width(label, LABEL_SCALE) for _, label in entries) + 22
  cols = max(1, min(len(entries), width // col_w))
  rows = -(-len(entries) // cols)
  img = np.full((rows * LINE + 4, max(width, col_w), 3), BACKGROUND, np.uint8)
  for i, (colour, label) in enumerate(entries):
    x, y = (i // rows) * col_w + 2, (i % rows) * LINE + 2
    if colour is not None:
      cv2.rectangle(img, (x, y + 2), (x + 12, y + 12), tuple(int(c) for c in colour), -1)
      cv2.rectangle(img, (x, y + 2), (x + 12, y + 12), (200, 200, 200), 1)
    put_text(img, label, (x + 17, y + 11), LABEL_SCALE)
  return img


def _fmt(v: float) -> str:
  s = f"{v:.3g}"
  return "0" if s in ("-0", "0") else s


def colour_bar(height: int, lo: float, hi: float, lut: np.ndarray,
               ticks: Optional[Sequence[float]] = None) -> np.ndarray:
  """Vertical bar (hi at the top) with numeric labels: lo, hi and ``ticks`` (default: the
  middle, or 0 when lo < 0 < hi)."""
  if ticks is None:
    ticks = [0.0] if lo < 0 < hi else [(lo + hi) / 2]
  labels = [(v, _fmt(v)) for v in [hi, *ticks, lo]]
  label_w = max(text_width(t, LABEL_SCALE) for _, t in labels)
  bar_w, top, bottom = 12, 6, 6
  img = np.full((height, bar_w + label_w + 14, 3), BACKGROUND, np.uint8)
  span = max(height - top - bottom, 2)
  vals = hi - (np.arange(span) / (span - 1)) * (hi - lo)
  img[top:top + span, 2:2 + bar_w] = colourize(vals, lo, hi, lut)[:, None, :]
  cv2.rectangle(img, (2, top), (1 + bar_w, top + span - 1), (200, 200, 200), 1)
  for v, t in labels:
    frac = 0.0 if hi == lo else (hi - v) / (hi - lo)
    y = top + int(round(frac * (span - 1)))
    cv2.line(img, (2 + bar_w, y), (5 + bar_w, y), (200, 200, 200), 1)
    put_text(img, t, (8 + bar_w, min(max(y + 4, 10), height - 2)), LABEL_SCALE)
  return img


# ----------------------------------------------------------------------------- geometry


def display_hw(image_hw: tuple, height: int = PANEL_HEIGHT) -> tuple:
  """Display size of an image of size ``image_hw``: ``height`` tall at its own aspect, at most
  MAX_ASPECT x height wide (then less tall)."""
  h, w = (int(s) for s in image_hw[:2])
  dh, dw = height, max(1, int(round(height * w / h)))
  if dw > MAX_ASPECT * height:
    dw = int(MAX_ASPECT * height)
    dh = max(1, int(round(dw * h / w)))
  return dh, dw


def feature_coords(n_feat: int, extent: int, image_size: int, n_out: int) -> np.ndarray:
  """Fractional feature-grid coordinate of each of ``n_out`` display pixels along one axis.

  The display spans the image's ``extent`` canvas pixels (pixel centres: canvas coordinate
  (u + 0.5) extent / n_out - 0.5, clipped to [0, extent - 1]); feature pixel i sits at canvas
  coordinate i (S - 1) / (n_feat - 1).
  """
  stride = (image_size - 1) / (n_feat - 1) if n_feat > 1 else 1.0
  canvas = (np.arange(n_out, dtype=np.float64) + 0.5) * extent / n_out - 0.5
  return np.clip(canvas, 0.0, extent - 1.0) / stride


def sample_feature_map(fmap: np.ndarray, canvas_hw: tuple, image_size: int, out_hw: tuple,
                       nearest: bool) -> np.ndarray:
  """A feature-grid map (h, w) cropped to the image's canvas extent and resampled to
  ``out_hw`` (see the module docstring): nearest pixel or bilinear."""
  fmap = np.asarray(fmap)
  if fmap.ndim == 3:
    fmap = fmap[..., 0]
  h, w = fmap.shape
  ys = feature_coords(h, canvas_hw[0], image_size, out_hw[0])
  xs = feature_coords(w, canvas_hw[1], image_size, out_hw[1])
  if nearest:
    iy = np.minimum(np.floor(ys + 0.5).astype(np.int64), h - 1)
    ix = np.minimum(np.floor(xs + 0.5).astype(np.int64), w - 1)
    return fmap[iy][:, ix]
  fmap = fmap.astype(np.float64)
  y0 = np.minimum(np.floor(ys).astype(np.int64), h - 1)
  x0 = np.minimum(np.floor(xs).astype(np.int64), w - 1)
  y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
  fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
  top = fmap[y0][:, x0] * (1 - fx) + fmap[y0][:, x1] * fx
  bottom = fmap[y1][:, x0] * (1 - fx) + fmap[y1][:, x1] * fx
  return top * (1 - fy) + bottom * fy


def canvas_to_display(points_rc: np.ndarray, canvas_hw: tuple, out_hw: tuple) -> np.ndarray:
  """Canvas (row, col) positions → display (x, y) (the inverse of the pixel-centre mapping)."""
  p = np.asarray(points_rc, np.float64)
  y = (p[..., 0] + 0.5) * out_hw[0] / canvas_hw[0] - 0.5
  x = (p[..., 1] + 0.5) * out_hw[1] / canvas_hw[1] - 0.5
  return np.stack([x, y], -1)


def resize_image(image: np.ndarray, out_hw: tuple) -> np.ndarray:
  return cv2.resize(np.ascontiguousarray(image), (out_hw[1], out_hw[0]),
                    interpolation=cv2.INTER_AREA)


def resize_mask(mask: np.ndarray, out_hw: tuple) -> np.ndarray:
  return cv2.resize(np.ascontiguousarray(mask, np.uint8), (out_hw[1], out_hw[0]),
                    interpolation=cv2.INTER_NEAREST)


def dimmed(image: np.ndarray) -> np.ndarray:
  """The grey image at DIM brightness, as float32 (the base under categorical maps)."""
  grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY).astype(np.float32)
  return np.repeat((DIM * grey)[..., None], 3, axis=-1)


def categorical_image(base: np.ndarray, index: np.ndarray, weight: Optional[np.ndarray] = None,
                      slot_offset: int = 0) -> np.ndarray:
  """``slot_colour(slot_offset + index)`` over ``base`` (float (h, w, 3), see ``dimmed``) with
  weight CATEGORICAL_ALPHA (times ``weight`` if given); index < 0 leaves the base. uint8."""
  out = base.astype(np.float32).copy()
  valid = index >= 0
  if np.any(valid):
    slots = np.unique(index[valid])
    colours = np.zeros((int(slots.max()) + 1, 3), np.float32)
    for s in slots:
      colours[s] = slot_colour(slot_offset + int(s))
    alpha = np.full(index.shape, CATEGORICAL_ALPHA, np.float32)
    if weight is not None:
      alpha = alpha * np.clip(weight, 0.0, 1.0)
    a = np.where(valid, alpha, 0.0)[..., None]
    out = (1 - a) * out + a * colours[np.maximum(index, 0)]
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def with_colour_bar(image: np.ndarray, lo: float, hi: float, lut: np.ndarray,
                    ticks=None) -> np.ndarray:
  bar = colour_bar(image.shape[0], lo, hi, lut, ticks)
  gap = np.full((image.shape[0], 4, 3), BACKGROUND, np.uint8)
  return np.concatenate([image, gap, bar], axis=1)


def with_key(image: np.ndarray, entries: Sequence[tuple]) -> np.ndarray:
  key = key_strip(entries, max(image.shape[1], MIN_PANEL_WIDTH))
  if not len(key):
    return image
  return _vstack([image, key], gap=3)


def _pad_to(img: np.ndarray, width: int) -> np.ndarray:
  if img.shape[1] >= width:
    return img
  out = np.full((img.shape[0], width, 3), BACKGROUND, np.uint8)
  out[:, :img.shape[1]] = img
  return out


def _vstack(images: Sequence[np.ndarray], gap: int = GAP) -> np.ndarray:
  width = max(i.shape[1] for i in images)
  parts = []
  for i, img in enumerate(images):
    if i:
      parts.append(np.full((gap, width, 3), BACKGROUND, np.uint8))
    parts.append(_pad_to(img, width))
  return np.concatenate(parts, axis=0)


def _hstack(images: Sequence[np.ndarray], gap: int = GAP) -> np.ndarray:
  height = max(i.shape[0] for i in images)
  parts = []
  for i, img in enumerate(images):
    if i:
      parts.append(np.full((height, gap, 3), BACKGROUND, np.uint8))
    pad = np.full((height, img.shape[1], 3), BACKGROUND, np.uint8)
    pad[:img.shape[0]] = img
    parts.append(pad)
  return np.concatenate(parts, axis=1)


# ----------------------------------------------------------------------------- panels


def _shot_name(k: int) -> str:
  return f"shot {k + 1}"


def support_panel(prediction, k: int, height: int, title: Optional[str] = None) -> Panel:
  """Support ``k`` with its mask (green; ignore in grey)."""
  s = prediction.supports[k]
  out_hw = display_hw(s.image.shape, height)
  img = visualize.overlay(resize_image(s.image, out_hw), resize_mask(s.mask, out_hw),
                          visualize.GT_COLOUR)
  return Panel(title or f"{_shot_name(k)}: support and mask", img, _shot_name(k))


def score_panel(prediction, height: int) -> Panel:
  """The fg − bg logit at the query's size, diverging colours symmetric around 0."""
  score = np.asarray(prediction.fg_score, np.float32)
  out_hw = display_hw(score.shape, height)
  m = float(np.max(np.abs(score))) if score.size else 0.0
  m = m if m > 0 else 1.0
  img = colourize(cv2.resize(score, (out_hw[1], out_hw[0]), interpolation=cv2.INTER_AREA),
                  -m, m, diverging_lut())
  return Panel("query: fg − bg logit (foreground where > 0)",
               with_colour_bar(img, -m, m, diverging_lut()))


def prediction_panel(prediction, height: int) -> Panel:
  """The query with the predicted mask (red)."""
  out_hw = display_hw(prediction.query.shape, height)
  mask = np.asarray(prediction.mask)
  img = visualize.overlay(resize_image(prediction.query, out_hw), resize_mask(mask, out_hw),
                          visualize.PRED_COLOUR)
  share = 100.0 * float(np.mean(mask == 1)) if mask.size else 0.0
  return Panel(f"query: prediction ({share:.1f}% foreground)", img)


def query_map_panel(prediction, fmap: np.ndarray, title: str, height: int,
                    lo: Optional[float] = None, hi: Optional[float] = None,
                    lut: Optional[np.ndarray] = None) -> Panel:
  """A continuous feature-grid map of the query (bilinear, cropped to the image) with a colour
  bar; the range is [lo, hi] if given, else the shown values' own range."""
  out_hw = display_hw(prediction.query.shape, height)
  vals = sample_feature_map(fmap, prediction.canvas_hw, prediction.image_size, out_hw,
                            nearest=False)
  lo = float(np.min(vals)) if lo is None else lo
  hi = float(np.max(vals)) if hi is None else hi
  if hi <= lo:
    lo, hi = lo - 0.5, lo + 0.5
  lut = viridis_lut() if lut is None else lut
  return Panel(title, with_colour_bar(colourize(vals, lo, hi, lut), lo, hi, lut))


def prior_panel(prediction, height: int) -> Panel:
  return query_map_panel(prediction, prediction.outputs["prior"],
                         "query: prior mask (PFENet's, 0..1)", height, 0.0, 1.0)


def generic_panels(prediction, height: int = PANEL_HEIGHT, **unused) -> list:
  """Any model: the supports with their masks, the fg − bg score and the prediction."""
  del unused
  out = [support_panel(prediction, k, height) for k in range(len(prediction.supports))]
  return out + [prediction_panel(prediction, height), score_panel(prediction, height)]


def pfenet_panels(prediction, height: int = PANEL_HEIGHT, **unused) -> list:
  """PFENet: supports, the prior mask (colour bar 0..1), the prediction and its score."""
  del unused
  out = [support_panel(prediction, k, height) for k in range(len(prediction.supports))]
  if "prior" in prediction.outputs:
    out.append(prior_panel(prediction, height))
  return out + [prediction_panel(prediction, height), score_panel(prediction, height)]


# ----------------------------------------------------------------------------- ASGNet


@functools.lru_cache(maxsize=None)
def _jitted_trace():
  import jax  # pylint: disable=g-import-not-at-top
  from fss_jax.models import sgc  # pylint: disable=g-import-not-at-top
  return jax.jit(sgc.sgc_trace, static_argnames=("n_iter", "distance"))


def effective_num_seeds(seeds: np.ndarray) -> np.ndarray:
  """``sgc.effective_num_seeds`` in numpy: (K, max_sp, 2) → (K,)."""
  nz = np.asarray(seeds) != 0
  return np.maximum(nz[..., 0].sum(-1), nz[..., 1].sum(-1))


def asgnet_sgc(outputs: dict, sgc_iters: Optional[int] = None) -> tuple:
  """ASGNet's SGC assignment of every shot, from its outputs.

  Returns (assignment (K, h, w) int32 or None when ``supp_feat`` is missing, iterations used,
  relative error of the recomputed prototypes against ``outputs['prototypes']`` over the shots
  that cluster (0.0 when none does)). With ``sgc_iters`` None the iteration count 1..INFER_ITERS
  whose prototypes come closest is taken.
  """
  if "supp_feat" not in outputs:
    return None, sgc_iters, float("nan")
  feat = np.asarray(outputs["supp_feat"], np.float32)
  soft = np.asarray(outputs["supp_mask"], np.float32)
  seeds = np.asarray(outputs["seeds"], np.int32)
  k, max_sp = seeds.shape[:2]
  n_iter = int(sgc_iters) if sgc_iters else INFER_ITERS
  assign, protos = (np.asarray(x) for x in _jitted_trace()(feat, soft, seeds, n_iter=n_iter))
  use = effective_num_seeds(seeds) >= 2
  if not np.any(use) or "prototypes" not in outputs:
    t = n_iter - 1
    return assign[t], t + 1, 0.0
  want = np.asarray(outputs["prototypes"], np.float64).reshape(k, max_sp, -1)[use]
  scale = max(float(np.max(np.abs(want))), 1e-30)
  errs = [float(np.max(np.abs(protos[t][use] - want))) / scale for t in range(n_iter)]
  t = n_iter - 1 if sgc_iters else int(np.argmin(errs))
  return assign[t], t + 1, errs[t]


def asgnet_panels(prediction, height: int = PANEL_HEIGHT, sgc_iters: Optional[int] = None,
                  **unused) -> list:
  """ASGNet (also + prior, + AMM): see the module docstring."""
  del unused
  out = prediction.outputs
  seeds = np.asarray(out["seeds"])
  k_shots, max_sp = seeds.shape[:2]
  valid = np.asarray(out["proto_valid"], bool).reshape(k_shots, max_sp)
  n_seeds = effective_num_seeds(seeds)
  assign, iters, err = asgnet_sgc(out, sgc_iters)
  feat_h, feat_w = np.asarray(out["supp_mask"]).shape[1:3]
  stride = (prediction.image_size - 1) / max(feat_h - 1, 1), (
      (prediction.image_size - 1) / max(feat_w - 1, 1))
  panels_ = []
  for k in range(k_shots):
    s = prediction.supports[k]
    chw = tuple(prediction.support_canvas_hw[k])
    out_hw = display_hw(s.image.shape, height)
    used = n_seeds[k] >= 2
    dots = []
    if used:
      rc = seeds[k, :n_seeds[k]].astype(np.float64) * np.array(stride)
      dots = [(xy, k * max_sp + i, i + 1)
              for i, xy in enumerate(canvas_to_display(rc, chw, out_hw))]
    title = (f"{_shot_name(k)}: support, mask, {n_seeds[k]} SGC seeds" if used else
             f"{_shot_name(k)}: support, mask (fewer than 2 seeds: no clustering)")
    p = support_panel(prediction, k, height, title)
    p.image = _draw_dots(p.image, dots)
    panels_.append(p)
    if assign is None:
      continue
    base = dimmed(resize_image(s.image, out_hw))
    soft = np.asarray(out["supp_mask"][k], np.float32)
    if used:
      idx = sample_feature_map(assign[k], chw, prediction.image_size, out_hw, nearest=True)
      img = _draw_dots(categorical_image(base, idx, slot_offset=k * max_sp), dots)
      roi = int(np.sum(assign[k] >= 0))
      entries = [(slot_colour(k * max_sp + i),
                  f"proto {i + 1}: {int(np.sum(assign[k] == i))}/{roi} ROI cells")
                 for i in range(max_sp) if valid[k, i]]
      note = "" if err <= 1e-3 else f" (recomputed prototypes differ by {err:.1e})"
      title = (f"{_shot_name(k)}: SGC assignment after {iters} iteration"
               f"{'s' if iters != 1 else ''}{note}")
    else:
      # The one prototype is the soft-masked average: show its weights (the soft mask).
      w = sample_feature_map(soft, chw, prediction.image_size, out_hw, nearest=True)
      idx = np.where(w > 0, 0, -1)
      img = categorical_image(base, idx, weight=w, slot_offset=k * max_sp)
      entries = [(slot_colour(k * max_sp), "proto 1: masked average (weight = soft mask)")]
      title = f"{_shot_name(k)}: no SGC, 1 prototype = masked average"
    panels_.append(Panel(title, with_key(img, entries), _shot_name(k)))

  # ---- the query ----
  q_hw = display_hw(prediction.query.shape, height)
  guide = np.asarray(out["guide_index"]).astype(np.int64)
  idx = sample_feature_map(guide, prediction.canvas_hw, prediction.image_size, q_hw,
                           nearest=True)
  img = categorical_image(dimmed(resize_image(prediction.query, q_hw)), idx)
  flat_valid = valid.reshape(-1)
  counts = np.bincount(idx.reshape(-1), minlength=k_shots * max_sp)
  entries = [(slot_colour(p), f"shot {p // max_sp + 1} · proto {p % max_sp + 1}: "
              f"{100.0 * counts[p] / idx.size:.0f}%")
             for p in range(k_shots * max_sp) if flat_valid[p] and counts[p]]
  unused_ = int(np.sum(flat_valid)) - len(entries)
  if unused_:
    entries.append((None, f"{unused_} other prototype{'s' if unused_ != 1 else ''} unused"))
  panels_.append(Panel("query: GPA allocation (prototype given to each pixel)",
                       with_key(img, entries)))
  n_valid = int(np.sum(flat_valid))
  panels_.append(query_map_panel(
      prediction, out["prob_map"],
      f"query: GPA probability map (sum of cosines with {n_valid} prototype"
      f"{'s' if n_valid != 1 else ''})", height))
  if "prior" in out:
    panels_.append(prior_panel(prediction, height))
  return panels_ + [prediction_panel(prediction, height), score_panel(prediction, height)]


def _draw_dots(img: np.ndarray, dots) -> np.ndarray:
  """Numbered dots: dots = [((x, y), slot, number)], filled with the slot's colour (kept whole
  inside the image: a seed on the border is drawn up to 7 pixels inwards)."""
  img = img.copy()
  h, w = img.shape[:2]
  for (x, y), slot, number in dots:
    c = (int(np.clip(round(x), 7, max(w - 8, 7))), int(np.clip(round(y), 7, max(h - 8, 7))))
    cv2.circle(img, c, 7, tuple(int(v) for v in slot_colour(slot)), -1, cv2.LINE_AA)
    cv2.circle(img, c, 7, (255, 255, 255), 1, cv2.LINE_AA)
    text = str(number)
    (tw, th), _ = cv2.getTextSize(text, FONT, 0.35, 1)
    cv2.putText(img, text, (c[0] - tw // 2, c[1] + th // 2), FONT, 0.35, (255, 255, 255), 1,
                cv2.LINE_AA)
  return img


# ----------------------------------------------------------------------------- entry points

# config.model.name → function(prediction, height, **options) → list of Panel.
EXPLAINERS: dict = {
    "asgnet": asgnet_panels,
    "pfenet": pfenet_panels,
}


def explain(model_name: str, prediction, height: int = PANEL_HEIGHT, **options) -> list:
  """The ``Panel`` list of ``model_name`` (``generic_panels`` for a model not in EXPLAINERS).
  ``options``: ``sgc_iters`` (ASGNet: SGC iterations of the model; default inferred)."""
  fn: Callable = EXPLAINERS.get(model_name, generic_panels)
  return fn(prediction, height=height, **options)


def panels(model_name: str, prediction, height: int = PANEL_HEIGHT,
           **options) -> list:
  """[(title, (h, w, 3) uint8 RGB)]: each panel with its colour bar / key, titles beside."""
  return [(p.title, p.image) for p in explain(model_name, prediction, height, **options)]


def figure(model_name: str, prediction, height: int = PANEL_HEIGHT, **options) -> np.ndarray:
  """One figure of the query: a header line, the supports' panels (one group per support,
  groups side by side as far as the query's row is wide), then the query's panels; each panel
  under its title. (H, W, 3) uint8 RGB."""
  rows: dict = {}
  for p in explain(model_name, prediction, height, **options):
    width = max(p.image.shape[1], MIN_PANEL_WIDTH)
    tile = _vstack([title_strip(p.title, width), _pad_to(p.image, width)], gap=2)
    rows.setdefault(p.row, []).append(tile)
  name = f" {prediction.name}" if getattr(prediction, "name", "") else ""
  k = len(prediction.supports)
  header = (f"{model_name}: query{name}, {k} shot{'s' if k != 1 else ''}, "
            f"{prediction.image_size}x{prediction.image_size} input")
  groups = {row: _hstack(tiles) for row, tiles in rows.items()}
  query = groups.pop("query", None)
  limit = max([g.shape[1] for g in groups.values()] + ([query.shape[1]] if query is not None
                                                       else []))
  lines, line, used = [], [], 0
  for g in groups.values():  # pack the support groups into lines no wider than the query row
    if line and used + 3 * GAP + g.shape[1] > limit:
      lines.append(_hstack(line, gap=3 * GAP))
      line, used = [], 0
    used += (3 * GAP if line else 0) + g.shape[1]
    line.append(g)
  if line:
    lines.append(_hstack(line, gap=3 * GAP))
  body = _vstack(lines + ([query] if query is not None else []), gap=2 * GAP)
  head = _text_block([header], max(body.shape[1], text_width(header, 0.5) + 8), 0.5)
  fig = _vstack([head, body])
  border = np.full((fig.shape[0] + 2 * GAP, fig.shape[1] + 2 * GAP, 3), BACKGROUND, np.uint8)
  border[GAP:-GAP, GAP:-GAP] = fig
  return border
