"""Procedural few-shot segmentation scenes (a small stand-in for PASCAL-5i).

Twenty classes, each a distinct combination of a shape family, a texture and a hue.
Every shape family, texture and hue is shared by two to four classes, and every *pair* of
attributes is unique, so a class is identified by its appearance as a whole, never by one
cue alone. Instances vary in size (about 4x), rotation, aspect, hue, saturation, brightness
and texture period/orientation. One to three objects are pasted over a cluttered background
(desaturated textured patches and thin strokes of any colour, none of which is a class);
later objects occlude earlier ones and thin strokes can cross objects, and the label keeps
only the visible pixels. As in VOC, a thin band on every label boundary is 255 (ignore).

A scene is a pure function of (seed, split, index): each gets its own
``np.random.default_rng([seed, split_code, index])``, so any subset can be regenerated in
any order or process. Folds follow the PASCAL-5i rule (fold i: classes 5i+1..5i+5 novel).
"""
from __future__ import annotations

import colorsys
import dataclasses
import json
import multiprocessing
import os
import sys
from typing import Iterator, Sequence

import cv2
import numpy as np

NUM_FOLDS = 4
DEFAULT_IMAGE_SIZE = 192
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

SHAPES = ("ellipse", "star", "polygon", "ring", "cross", "crescent", "blob")
TEXTURES = ("stripes_h", "stripes_v", "stripes_d", "checker", "dots", "noise",
            "gradient")
# Hue in degrees and the class's hue spread (std, degrees).
HUES = {"red": (0.0, 6.0), "orange": (28.0, 5.0), "yellow": (55.0, 6.0),
        "green": (120.0, 10.0), "cyan": (185.0, 8.0), "blue": (225.0, 8.0),
        "purple": (285.0, 8.0)}


@dataclasses.dataclass(frozen=True)
class ClassSpec:
  """Appearance of one class.

  Attributes:
    name: readable name, e.g. "ellipse-stripes_h-red".
    shape: one of SHAPES.
    texture: one of TEXTURES.
    hue: key of HUES.
    period: texture period as a fraction of the object radius.
  """
  name: str
  shape: str
  texture: str
  hue: str
  period: float


def _spec(shape: str, texture: str, hue: str, period: float) -> ClassSpec:
  return ClassSpec(f"{shape}-{texture}-{hue}", shape, texture, hue, period)


# Class id = position + 1. The order is chosen so that in every PASCAL-5i fold each novel
# class's shape family, texture and hue all also occur among the fold's base classes:
# nothing about a novel class is new except the combination.
CLASSES: tuple[ClassSpec, ...] = (
    _spec("star", "gradient", "purple", 1.00),
    _spec("ring", "gradient", "orange", 1.00),
    _spec("polygon", "stripes_d", "cyan", 0.30),
    _spec("crescent", "stripes_v", "blue", 0.25),
    _spec("cross", "noise", "cyan", 0.30),
    _spec("ellipse", "checker", "blue", 0.40),
    _spec("blob", "stripes_h", "cyan", 0.35),
    _spec("ring", "stripes_h", "purple", 0.25),
    _spec("star", "stripes_v", "green", 0.30),
    _spec("polygon", "dots", "blue", 0.40),
    _spec("polygon", "checker", "orange", 0.35),
    _spec("cross", "checker", "yellow", 0.35),
    _spec("cross", "stripes_d", "red", 0.30),
    _spec("ellipse", "noise", "yellow", 0.30),
    _spec("star", "dots", "red", 0.35),
    _spec("ring", "noise", "green", 0.30),
    _spec("ellipse", "stripes_h", "red", 0.30),
    _spec("blob", "checker", "purple", 0.30),
    _spec("blob", "gradient", "yellow", 1.00),
    _spec("crescent", "dots", "green", 0.35),
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
NUM_CLASSES = len(CLASSES)


GENERATOR_FILE = "generator.json"


def novel_classes(fold: int) -> list[int]:
  """PASCAL-5i rule: fold i's novel class ids are 5i+1..5i+5."""
  if not 0 <= fold < NUM_FOLDS:
    raise ValueError(f"fold must be in [0, {NUM_FOLDS}), got {fold}")
  per_fold = NUM_CLASSES // NUM_FOLDS
  return list(range(per_fold * fold + 1, per_fold * (fold + 1) + 1))


@dataclasses.dataclass(frozen=True)
class Scene:
  """A rendered scene.

  Attributes:
    image: uint8 (H, W, 3) RGB.
    label: uint8 (H, W): 0 background, 1..NUM_CLASSES, 255 ignore (boundary band).
    objects: class ids of the pasted objects, in paste order (later ones on top).
    instance: uint8 (H, W) instance map: k + 1 on the visible pixels of objects[k], 0 on the
      background, 255 on the label's ignore band (as VOC's SegmentationObject); an object
      fully occluded (or too small to paint) has no pixel. Nonzero exactly where the label
      is a class, and there instance k + 1 has class objects[k].
  """
  image: np.ndarray
  label: np.ndarray
  objects: tuple[int, ...]
  instance: np.ndarray | None = None


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The scene's own generator: independent of every other scene."""
  if split not in SPLIT_CODES:
    raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_CODES)}")
  return np.random.default_rng([seed, SPLIT_CODES[split], index])


# ----------------------------------------------------------------------------- colours


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
  """HSV (degrees, [0,1], [0,1]) -> float32 (3,) RGB in [0, 255]."""
  r, g, b = colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, min(max(float(s), 0.0), 1.0),
                                min(max(float(v), 0.0), 1.0))
  return np.array([r, g, b], np.float32) * 255.0


def _instance_colours(spec: ClassSpec, rng: np.random.Generator):
  """Two tones of the class hue (bright, dark) with per-instance jitter."""
  mean, spread = HUES[spec.hue]
  hue = mean + rng.normal(0.0, spread)
  bright = _hsv(hue, rng.uniform(0.7, 0.95), rng.uniform(0.8, 1.0))
  dark = _hsv(hue + rng.normal(0.0, spread / 2), rng.uniform(0.6, 0.9),
              rng.uniform(0.3, 0.5))
  return bright, dark


def _mix(t: np.ndarray, a: np.ndarray, b: np.ndarray,
         scale: np.ndarray | None = None) -> np.ndarray:
  """(a + t (b - a)) [* scale] per pixel: t, scale float32 (h, w) -> float32 (h, w, 3).

  Channel by channel: numpy broadcasting over a trailing axis of 3 is ~10x slower.
  """
  out = np.empty(t.shape + (3,), np.float32)
  for ch in range(3):
    plane = a[ch] + t * (b[ch] - a[ch])
    out[..., ch] = plane if scale is None else plane * scale
  return out


# ----------------------------------------------------------------------------- textures


def _smooth_noise(shape: tuple[int, int], cells: int,
                  rng: np.random.Generator) -> np.ndarray:
  """Low-frequency noise in [0, 1], float32 (h, w)."""
  h, w = shape
  grid = rng.random((cells, cells)).astype(np.float32)
  out = cv2.resize(grid, (max(w, 1), max(h, 1)), interpolation=cv2.INTER_CUBIC)
  lo, hi = out.min(), out.max()
  return (out - lo) / max(hi - lo, 1e-6)


def _texture(kind: str, dx: np.ndarray, dy: np.ndarray, period: float,
             rng: np.random.Generator) -> np.ndarray:
  """Texture mixing weight in [0, 1], float32, same shape as dx.

  dx, dy are pixel offsets from the object centre in the image frame: textures keep their
  image-frame orientation (a class cue) while objects rotate freely.
  """
  period = max(period, 2.0)
  if kind.startswith("stripes"):
    base = {"stripes_h": 90.0, "stripes_v": 0.0, "stripes_d": 45.0}[kind]
    a = np.deg2rad(base + rng.normal(0.0, 6.0))
    s = (dx * np.cos(a) + dy * np.sin(a)) / period + rng.random()
    return (s - np.floor(s) < 0.5).astype(np.float32)
  if kind == "checker":
    a = np.deg2rad(rng.normal(0.0, 6.0))
    s1 = (dx * np.cos(a) + dy * np.sin(a)) / period + rng.random()
    s2 = (-dx * np.sin(a) + dy * np.cos(a)) / period + rng.random()
    return ((np.floor(s1) + np.floor(s2)) % 2).astype(np.float32)
  if kind == "dots":
    s1 = dx / period + rng.random()
    s2 = dy / period + rng.random()
    d2 = (s1 - np.round(s1)) ** 2 + (s2 - np.round(s2)) ** 2
    return (d2 < 0.3 ** 2).astype(np.float32)
  if kind == "noise":
    h, w = dx.shape
    cells = int(np.clip(max(h, w) / period, 4, 24))
    # Stretched contrast: a mottled two-tone pattern, not a soft shading.
    return np.clip((_smooth_noise((h, w), cells, rng) - 0.5) * 2.5 + 0.5, 0.0, 1.0)
  if kind == "gradient":
    a = rng.uniform(0, 2 * np.pi)
    s = (dx * np.cos(a) + dy * np.sin(a)) / period
    return np.clip(0.5 + s, 0.0, 1.0).astype(np.float32)
  if kind == "solid":
    return np.zeros_like(dx, np.float32)
  raise ValueError(f"unknown texture {kind!r}")


# ----------------------------------------------------------------------------- shapes


def _poly_mask(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Filled polygon (points (N, 2) as x, y in region pixels) -> bool (h, w)."""
  mask = np.zeros(shape, np.uint8)
  cv2.fillPoly(mask, [np.round(points * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
  return mask.astype(bool)


def _shape_mask(shape_name: str, u: np.ndarray, v: np.ndarray, to_region,
                rng: np.random.Generator) -> np.ndarray:
  """Shape in normalised object coordinates (u, v): unit radius, centred at 0.

  Args:
    shape_name: one of SHAPES.
    u, v: float32 (h, w) object-frame coordinates of every region pixel.
    to_region: maps object-frame points (N, 2) to region pixel (x, y) points.
    rng: generator for per-instance shape parameters.
  Returns:
    bool (h, w).
  """
  if shape_name == "ellipse":
    return u * u + v * v <= 1.0
  if shape_name == "ring":
    inner = rng.uniform(0.45, 0.62)
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= inner * inner)
  if shape_name == "crescent":
    off, r_cut = rng.uniform(0.4, 0.6), rng.uniform(0.75, 0.9)
    return (u * u + v * v <= 1.0) & ((u - off) ** 2 + v * v > r_cut * r_cut)
  if shape_name == "blob":
    theta = np.arctan2(v, u)
    radius = np.full_like(u, 0.8)
    for k in (2, 3, 5):
      radius += rng.uniform(0.04, 0.14) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return u * u + v * v <= radius * radius
  if shape_name == "star":
    n = int(rng.integers(5, 7))
    inner = rng.uniform(0.4, 0.55)
    ang = np.arange(2 * n) * np.pi / n
    rad = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], -1)
    return _poly_mask(to_region(pts), u.shape)
  if shape_name == "polygon":
    n = int(rng.integers(5, 8))
    ang = np.arange(n) * 2 * np.pi / n
    rad = 1.0 - rng.uniform(0.0, 0.08, n)
    pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], -1)
    return _poly_mask(to_region(pts), u.shape)
  if shape_name == "cross":
    a = rng.uniform(0.28, 0.4)
    pts = np.array([[a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a],
                    [-1, a], [-1, -a], [-a, -a], [-a, -1]], np.float64)
    return _poly_mask(to_region(pts), u.shape)
  raise ValueError(f"unknown shape {shape_name!r}")


# ----------------------------------------------------------------------------- painting


def _paint_object(image: np.ndarray, label: np.ndarray, class_id: int,
                  rng: np.random.Generator, instance: np.ndarray | None = None,
                  instance_id: int = 0) -> None:
  """Pastes one instance of class_id in place (occluding what is below); its pixels get
  instance_id in `instance` when given (no effect on the random stream)."""
  spec = CLASSES[class_id - 1]
  h, w = label.shape
  short = min(h, w)
  radius = short * np.exp(rng.uniform(np.log(0.15), np.log(0.45)))
  aspect = np.exp(rng.uniform(np.log(0.7), np.log(1.4)))
  ru, rv = radius * np.sqrt(aspect), radius / np.sqrt(aspect)
  rot = rng.uniform(0, 2 * np.pi)
  cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
  extent = max(ru, rv) + 2
  y0, y1 = max(int(cy - extent), 0), min(int(np.ceil(cy + extent)) + 1, h)
  x0, x1 = max(int(cx - extent), 0), min(int(np.ceil(cx + extent)) + 1, w)
  if y1 - y0 < 2 or x1 - x0 < 2:
    return
  yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
  dx, dy = xx - cx, yy - cy
  c, s = np.float32(np.cos(rot)), np.float32(np.sin(rot))
  u = (dx * c + dy * s) / ru
  v = (-dx * s + dy * c) / rv

  def to_region(pts):
    px = pts[:, 0] * ru * c - pts[:, 1] * rv * s + cx - x0
    py = pts[:, 0] * ru * s + pts[:, 1] * rv * c + cy - y0
    return np.stack([px, py], -1)

  mask = _shape_mask(spec.shape, u, v, to_region, rng)
  bright, dark = _instance_colours(spec, rng)
  period = spec.period * radius * rng.uniform(0.85, 1.2)
  if spec.texture == "gradient":
    period = 2.0 * radius
  t = _texture(spec.texture, dx, dy, period, rng)
  shade = 0.85 + 0.15 * np.clip(1.0 - (u * u + v * v), 0.0, 1.0)
  colour = _mix(t, dark, bright, shade)
  np.copyto(image[y0:y1, x0:x1], colour, where=mask[..., None])
  label[y0:y1, x0:x1][mask] = class_id
  if instance is not None:
    instance[y0:y1, x0:x1][mask] = instance_id


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
  """Cluttered, class-free background: float32 (h, w, 3) in [0, 255]."""
  hue = rng.uniform(0, 360)
  c0 = _hsv(hue, rng.uniform(0.0, 0.25), rng.uniform(0.35, 0.8))
  c1 = _hsv(hue + rng.uniform(-60, 60), rng.uniform(0.0, 0.25), rng.uniform(0.2, 0.9))
  image = _mix(_smooth_noise((h, w), int(rng.integers(2, 6)), rng), c0, c1)
  # Textured patches: rotated rectangles, desaturated, any texture.
  for _ in range(int(rng.integers(2, 7))):
    pw, ph = rng.uniform(0.15, 0.6) * w, rng.uniform(0.15, 0.6) * h
    rect = ((rng.uniform(0, w), rng.uniform(0, h)), (pw, ph), rng.uniform(0, 180))
    pts = cv2.boxPoints(rect)
    # Work inside the patch's bounding box only.
    x0, y0 = np.clip(np.floor(pts.min(0)).astype(int), 0, [w, h])
    x1, y1 = np.clip(np.ceil(pts.max(0)).astype(int) + 1, 0, [w, h])
    kind = str(rng.choice(["stripes_h", "stripes_v", "checker", "noise", "solid"]))
    period = rng.uniform(4, 20)
    noise_cells = int(rng.integers(3, 10))
    phue = rng.uniform(0, 360)
    a = _hsv(phue, rng.uniform(0.0, 0.3), rng.uniform(0.3, 0.9))
    b = _hsv(phue + rng.uniform(-40, 40), rng.uniform(0.0, 0.3), rng.uniform(0.2, 0.9))
    if x1 - x0 < 1 or y1 - y0 < 1:
      continue
    mask = _poly_mask(pts - np.float32([x0, y0]), (y1 - y0, x1 - x0))
    if kind == "noise":
      t = _smooth_noise((y1 - y0, x1 - x0), noise_cells, rng)
    else:
      yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
      t = _texture(kind, xx, yy, period, rng)
    np.copyto(image[y0:y1, x0:x1], _mix(t, a, b), where=mask[..., None])
  _strokes(image, None, int(rng.integers(3, 10)), rng)
  return image


def _strokes(image: np.ndarray, label: np.ndarray | None, count: int,
             rng: np.random.Generator, instance: np.ndarray | None = None) -> None:
  """Thin random polylines of any colour; their pixels become background in label (and 0 in
  instance)."""
  h, w = image.shape[:2]
  for _ in range(count):
    n = int(rng.integers(2, 5))
    pts = np.stack([rng.uniform(0, w, n), rng.uniform(0, h, n)], -1)
    pts = np.round(pts).astype(np.int32)
    colour = _hsv(rng.uniform(0, 360), rng.uniform(0, 1), rng.uniform(0.1, 1))
    thickness = int(rng.integers(1, 4))
    cv2.polylines(image, [pts], False, colour.tolist(), thickness, cv2.LINE_AA)
    if label is not None:
      cv2.polylines(label, [pts], False, 0, thickness, cv2.LINE_8)
    if instance is not None:
      cv2.polylines(instance, [pts], False, 0, thickness, cv2.LINE_8)


def render_scene(seed: int, split: str, index: int,
                 image_size: int = DEFAULT_IMAGE_SIZE) -> Scene:
  """Renders scene `index` of `split`: a pure function of its arguments.

  Args:
    seed: dataset seed.
    split: "train", "val" or "test" (separate streams).
    index: scene number within the split.
    image_size: longer side in pixels; the shorter side is 75-100% of it, orientation
      random.
  Returns:
    Scene with image uint8 (H, W, 3) RGB, label uint8 (H, W) and its instance map.
  """
  rng = scene_rng(seed, split, index)
  long_side = int(image_size)
  short_side = int(round(long_side * rng.uniform(0.75, 1.0)))
  h, w = (long_side, short_side) if rng.random() < 0.4 else (short_side, long_side)
  image = _background(h, w, rng)
  label = np.zeros((h, w), np.uint8)
  instance = np.zeros((h, w), np.uint8)
  num_objects = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
  objects = tuple(int(c) for c in rng.integers(1, NUM_CLASSES + 1, num_objects))
  for k, class_id in enumerate(objects):
    _paint_object(image, label, class_id, rng, instance, k + 1)
  _strokes(image, label, int(rng.integers(0, 3)), rng, instance)
  image += 3.0 * rng.standard_normal(image.shape, dtype=np.float32)
  # VOC-style ignore band on every label boundary.
  kernel = np.ones((3, 3), np.uint8)
  band = cv2.dilate(label, kernel) != cv2.erode(label, kernel)
  label[band] = 255
  instance[band] = 255
  return Scene(np.clip(np.round(image), 0, 255).astype(np.uint8), label, objects, instance)


# ----------------------------------------------------------------------------- records


def encode_scene(scene: Scene, scene_id: str, image_format: str = "jpeg",
                 instances: bool = False) -> dict:
  """Scene -> an example dict for schema.write_dataset (JPEG quality 90 or PNG); with
  `instances`, the instance map too (the records' optional instance/encoded feature)."""
  bgr = cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR)
  if image_format == "jpeg":
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
  elif image_format == "png":
    ok, buf = cv2.imencode(".png", bgr)
  else:
    raise ValueError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
  if not ok:
    raise RuntimeError(f"encoding scene {scene_id} failed")
  item = {"image_bytes": buf.tobytes(), "image_format": image_format, "id": scene_id,
          "label": scene.label}
  if instances:
    item["instance"] = scene.instance
  return item


def _render_encoded(args) -> dict:
  seed, split, index, image_size, image_format, instances = args
  scene = render_scene(seed, split, index, image_size)
  return encode_scene(scene, f"{split}_{index:06d}", image_format, instances)


def generate_split(seed: int, split: str, num: int,
                   image_size: int = DEFAULT_IMAGE_SIZE, image_format: str = "jpeg",
                   workers: int = 0, instances: bool = False) -> Iterator[dict]:
  """Yields encoded example dicts for scenes 0..num-1 of split, in order (with `instances`,
  each with its instance map).

  workers > 0 renders in a process pool; the output is identical for any worker count.
  """
  jobs = ((seed, split, i, image_size, image_format, instances) for i in range(num))
  if workers <= 0:
    yield from map(_render_encoded, jobs)
    return
  # fork is fastest, but not safe once JAX (multithreaded) is loaded, e.g. in the trainer.
  spawn = os.name == "nt" or "jax" in sys.modules
  ctx = multiprocessing.get_context("spawn" if spawn else "fork")
  with ctx.Pool(workers) as pool:
    yield from pool.imap(_render_encoded, jobs, chunksize=16)


def write_synthetic_dataset(out_dir: str, *, num_train: int = 2000, num_val: int = 500,
                            image_size: int = DEFAULT_IMAGE_SIZE, seed: int = 0,
                            image_format: str = "jpeg", workers: int = 0,
                            num_shards: int = 2, progress: bool = False,
                            instances: bool = False):
  """Writes the procedural dataset as TFRecord shards + manifest.json.

  Also writes ``generator.json`` with the generation settings. With `instances`, every record
  also stores its instance map (each pasted object one instance; schema's optional
  instance/encoded feature); the scenes themselves do not change.

  Returns:
    The schema.Manifest written.
  """
  from fss_jax.data import schema  # The generator itself does not need the I/O layer.

  splits = {
      "train": generate_split(seed, "train", num_train, image_size, image_format,
                              workers, instances),
      "val": generate_split(seed, "val", num_val, image_size, image_format, workers,
                            instances),
  }
  manifest = schema.write_dataset(
      out_dir, name="synthetic", classes=list(CLASS_NAMES),
      novel_folds=[novel_classes(f) for f in range(NUM_FOLDS)], scheme="pascal5i",
      splits=splits, num_shards=num_shards, progress=progress)
  # The settings that determine the scenes, so a cache can be checked against a config.
  settings = {"num_train": int(num_train), "num_val": int(num_val),
              "image_size": int(image_size), "seed": int(seed), "image_format": image_format}
  if instances:  # only when set, so datasets generated before the option compare equal
    settings["instances"] = True
  with open(os.path.join(out_dir, GENERATOR_FILE), "w") as f:
    json.dump(settings, f)
  return manifest


def check_cache_path(path: str) -> None:
  """Refuses a cache path that is a file, or a non-empty folder without a complete generated
  dataset (``manifest.json`` + ``generator.json``): generating there would mix foreign files
  with ours (or fail after minutes of work). Nothing is written."""
  if not os.path.lexists(path):
    return
  if not os.path.isdir(path):
    raise ValueError(f"config.data.data_dir: {path} is a file, not a folder for the procedural "
                     "dataset; set config.data.data_dir to an empty or new folder.")
  names = os.listdir(path)
  if names and not {"manifest.json", GENERATOR_FILE} <= set(names):
    shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
    raise ValueError(
        f"config.data.data_dir: {path} is a non-empty folder ({shown}) that is not a procedural "
        "dataset of fss_jax (no manifest.json + generator.json); nothing was written. Set "
        "config.data.data_dir to an empty or new folder (the dataset is generated there).")


def generate_cache(path: str, settings: dict, *, workers: int = 0) -> bool:
  """Generates the dataset (``write_synthetic_dataset(**settings)``) into the cache folder
  ``path``, atomically: into a temporary folder next to it (same parent, so same file system)
  renamed into place at the end. The temporary folder is removed on any failure (and an
  interruption), so no partial copy is left behind. ``path`` is checked first
  (``check_cache_path``).

  Returns:
    True when this call's copy was put in place; False when another process completed ``path``
    first (its copy is kept, ours removed).
  """
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(os.path.expanduser(path))
  check_cache_path(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    write_synthetic_dataset(tmp, workers=workers, progress=False, **settings)
    try:
      os.rename(tmp, path)  # also replaces an empty folder
    except OSError:
      if os.path.isfile(os.path.join(path, "manifest.json")):
        return False  # someone else finished first: theirs is identical
      raise
    tmp = None
    return True
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- preview

_PALETTE = np.array(
    [[0, 0, 0]] + [list(_hsv(i * 360.0 / NUM_CLASSES, 1.0, 1.0)) for i in
                   range(NUM_CLASSES)], np.float32)


def preview_grid(scenes: Sequence[Scene], cols: int = 4, cell: int = 224) -> np.ndarray:
  """Image + mask-overlay pairs in a grid: uint8 (rows*cell, 2*cols*cell, 3) RGB.

  Left of each pair: the image. Right: the image dimmed, objects tinted by class and
  outlined, ignore pixels white, with the visible class names written in.
  """
  rows = (len(scenes) + cols - 1) // cols
  grid = np.full((rows * cell, 2 * cols * cell, 3), 40, np.uint8)
  for i, scene in enumerate(scenes):
    h, w = scene.label.shape
    scale = (cell - 4) / max(h, w)
    size = (int(w * scale), int(h * scale))
    img = cv2.resize(scene.image, size, interpolation=cv2.INTER_AREA)
    lab = cv2.resize(scene.label, size, interpolation=cv2.INTER_NEAREST)
    over = img.astype(np.float32) * 0.45
    fg = (lab > 0) & (lab < 255)
    over[fg] = 0.35 * img[fg] + 0.65 * _PALETTE[lab[fg]]
    over[lab == 255] = 255
    over = over.astype(np.uint8)
    present = [c for c in np.unique(scene.label) if 0 < c < 255]
    for k, c in enumerate(present):
      text = f"{c}:{CLASSES[c - 1].name}"
      cv2.putText(over, text, (2, 10 + 10 * k), cv2.FONT_HERSHEY_PLAIN, 0.7,
                  (255, 255, 255), 1, cv2.LINE_AA)
    r, col = divmod(i, cols)
    y, x = r * cell + 2, 2 * col * cell + 2
    grid[y:y + size[1], x:x + size[0]] = img
    grid[y:y + size[1], x + cell:x + cell + size[0]] = over
  return grid


def write_preview(path: str, seed: int = 0, split: str = "train", count: int = 12,
                  image_size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
  """Renders scenes 0..count-1 and writes their preview grid as a PNG."""
  scenes = [render_scene(seed, split, i, image_size) for i in range(count)]
  grid = preview_grid(scenes)
  if not cv2.imwrite(path, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
    raise OSError(f"could not write preview {path}")
  return grid
