"""Reference (PFENet/ASGNet) augmentation and evaluation resize, in OpenCV on float32.

Images are RGB, (H, W, 3); labels uint8 (H, W) already made episode-local: {0 background,
1 class, 255 ignore} for a 1-way episode (`binarize_label`), way ids 1..N for an N-way query
(`query_label`), and {0, 1, 254 neither, 255} for an N-way support (`support_label`). Every
random number
comes from a passed `np.random.Generator`, drawn in this fixed order (per image):

  0. (no draw) with `resize_longer` > 0, resize so the longer side is that many pixels
  1. scale factor              lo + (hi - lo) * rng.random()
  2. rotate?                   rng.random() < rotate_p; if so angle = lo + (hi - lo) * rng.random()
  3. blur?                     rng.random() < blur_p
  4. flip?                     rng.random() < flip_p
  5. crop offsets              rng.integers(0, H - S + 1), rng.integers(0, W - S + 1),
                               re-drawn (same two calls) up to `crop_redraws` times while
                               the crop keeps < crop_keep of the class pixels.

`TrainAugConfig.mode = 'resize_flip'` is PANet's instead (reference_panet.md §2): the image is
resized to S x S without keeping its aspect (image bilinear, label nearest), then flipped
left-right when rng.random() < flip_p (one draw). Its evaluation counterpart is
`eval_stretch`. (PANet resizes with Pillow, whose bilinear filter antialiases when shrinking;
OpenCV's does not, so shrunk images differ slightly. Labels take Pillow's nearest source pixel
floor((dst + 0.5) * in / out), computed here in exact integer arithmetic (`nearest_indices`);
OpenCV's INTER_NEAREST_EXACT differs from it at some exact ties.)

An optional second label (`train_transform`'s `extra`, e.g. the query's base-class label of
BAM/MSANet, `base_label`) goes through the same geometric steps as the label, with the same
draws (nearest interpolation, 255 padding; BAM's transform_tri.py): no extra random number is
drawn, so the image and label are the same with and without it.

The reference draws the rotation angle before its coin and allows one more crop redraw
than documented (its loop test is `<= 30`); neither changes the distribution of the
result beyond that one redraw, and fss_jax follows the documented 30.
"""
from __future__ import annotations

import dataclasses
import functools
import threading

import cv2
import numpy as np

IGNORE_LABEL = 255
# Support labels: pixels that are neither foreground nor background of the support's way (in a
# dense N-way support, another class of the episode; in a weak support, the unlabelled pixels).
NEITHER = 254
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The reference works on 0..255 pixel values.
MEAN_255 = tuple(m * 255.0 for m in IMAGENET_MEAN)
STD_255 = tuple(s * 255.0 for s in IMAGENET_STD)
_MEAN32 = np.array(MEAN_255, np.float32)
_STD32 = np.array(STD_255, np.float32)
_MEAN_SCALAR = tuple(float(m) for m in _MEAN32) + (0.0,)
_STD_SCALAR = tuple(float(s) for s in _STD32) + (1.0,)


@dataclasses.dataclass(frozen=True)
class TrainAugConfig:
  """Reference training augmentation (PASCAL defaults; COCO uses scale (0.8, 1.25))."""
  size: int = 473
  scale: tuple[float, float] = (0.9, 1.1)
  rotate: tuple[float, float] = (-10.0, 10.0)
  rotate_p: float = 0.5
  blur_p: float = 0.5
  blur_kernel: int = 5
  flip_p: float = 0.5
  crop_keep: float = 0.85
  crop_redraws: int = 30
  # > 0: first resize each image (bilinear; label nearest) so its longer side is this many
  # pixels, then augment as above. 0 (off, the reference): crops are taken at the stored
  # resolution, which only matches evaluation (whole image resized to `size`) when images
  # are about `size` on their longer side, as PASCAL/COCO at 473. No random numbers drawn.
  resize_longer: int = 0
  # 'fss': the augmentation above (PFENet/ASGNet); 'resize_flip': PANet's (module docstring).
  mode: str = "fss"


TRAIN_MODES = ("fss", "resize_flip")


def check_size(size: int) -> int:
  """Output sizes must be 8k+1 (output-stride-8 backbone, align-corners upsampling)."""
  if size < 9 or (size - 1) % 8:
    raise ValueError(f"image size must be 8k+1 (e.g. 473), got {size}")
  return size


def binarize_label(label: np.ndarray, class_id: int) -> np.ndarray:
  """uint8 (H, W) class map -> {0, 1, 255}: class_id -> 1, 255 stays, all else -> 0."""
  out = (label == class_id).astype(np.uint8)
  out[label == IGNORE_LABEL] = IGNORE_LABEL
  return out


def query_label(label: np.ndarray, class_ids) -> np.ndarray:
  """uint8 (H, W) class map -> the episode's query target: class_ids[j] -> j + 1, 255 stays,
  every other class -> 0 (PANet's ``fewShot``). One class: ``binarize_label``."""
  class_ids = [int(c) for c in class_ids]
  if len(class_ids) == 1:
    return binarize_label(label, class_ids[0])
  out = np.zeros(label.shape, np.uint8)
  for j, c in enumerate(class_ids):
    out[label == c] = j + 1
  out[label == IGNORE_LABEL] = IGNORE_LABEL
  return out


def support_label(label: np.ndarray, class_ids, way: int) -> np.ndarray:
  """uint8 (H, W) class map -> the label of a support of way ``way``: its class -> 1, the other
  classes of the episode -> NEITHER (254), 255 stays, everything else -> 0. PANet's ``getMask``
  reads it as fg = (== 1), bg = (== 0 or 255); 1-way models as fg = (== 1). One class:
  ``binarize_label``."""
  class_ids = [int(c) for c in class_ids]
  out = binarize_label(label, class_ids[way])
  for j, c in enumerate(class_ids):
    if j != way:
      out[label == c] = NEITHER
  return out


@functools.lru_cache(maxsize=64)
def _base_label_table(base_classes: tuple[int, ...]) -> np.ndarray:
  table = np.zeros(256, np.uint8)
  for j, c in enumerate(base_classes):
    if not 1 <= c <= 254:
      raise ValueError(f"base class ids must be in 1..254, got {c}")
    table[c] = j + 1
  table[IGNORE_LABEL] = IGNORE_LABEL
  table.setflags(write=False)
  return table


def base_label_table(base_classes) -> np.ndarray:
  """Read-only uint8 (256,) lookup table of `base_label`: base class c -> (index of c in the
  ascending base list) + 1, 255 -> 255, every other value -> 0."""
  classes = tuple(sorted({int(c) for c in base_classes}))
  if len(classes) > 254:
    raise ValueError(f"at most 254 base classes fit a uint8 label, got {len(classes)}")
  return _base_label_table(classes)


def base_label(label: np.ndarray, base_classes) -> np.ndarray:
  """uint8 (H, W) class map -> base-class label (BAM's BaseData / get_mulway_base_data.py): base
  class c -> (index of c in the ascending base list) + 1, novel classes and 0 -> 0 (background),
  255 kept. A new array."""
  return base_label_table(base_classes)[np.asarray(label, np.uint8)]


def base_index(class_id: int, base_classes) -> int:
  """(index of class_id in the ascending base list) + 1, or 0 when it is not a base class."""
  return int(base_label_table(base_classes)[int(class_id)]) if 0 < int(class_id) < 255 else 0


def normalize(image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
  """(..., H, W, 3) RGB in 0..255 -> float32 (x - mean) / std, into `out` if given.

  Subtract then divide in float32, as the reference's torch Normalize does. OpenCV's
  per-channel scalar subtract/divide give the same float32 results (checked against torch in
  tests/test_transforms.py) in one pass each over the interleaved channels, where numpy needs
  a strided pass per channel.
  """
  image = np.asarray(image, np.float32)
  if out is None:
    out = np.empty(image.shape, np.float32)
  if image.ndim < 3 or image.shape[-1] != 3 or out.shape != image.shape:
    raise ValueError(f"normalize: expected (..., H, W, 3) images and an `out` of the same "
                     f"shape, got {image.shape} and {out.shape}")
  if image.ndim > 3:
    for i in np.ndindex(image.shape[:-3]):  # leading batch axes: one image at a time
      normalize(image[i], out[i])
    return out
  got = cv2.subtract(image, _MEAN_SCALAR, dst=out)
  got = cv2.divide(got, _STD_SCALAR, dst=got)
  if got is not out:  # OpenCV wrote elsewhere (an `out` it cannot address in place)
    np.copyto(out, got)
  return out


def _fill_normalized(out: np.ndarray, value: np.ndarray) -> None:
  """Fills float32 (..., 3) `out` with the normalised value of the RGB pixel `value`."""
  for ch in range(3):
    out[..., ch] = (np.float32(value[ch]) - _MEAN32[ch]) / _STD32[ch]


# ----------------------------------------------------------------------------- training


class Scratch:
  """Reusable intermediate arrays for one thread's augmentation steps.

  Each step writes into a view of a buffer that is kept between calls (grown when an image
  needs more): fresh multi-MB temporaries at every step cost page faults. Views are valid
  until the next use of the same name.
  """

  def __init__(self):
    self._buffers: dict[str, np.ndarray] = {}

  def get(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buf = self._buffers.get(name)
    if buf is None or buf.nbytes < nbytes:
      buf = self._buffers[name] = np.empty(nbytes + nbytes // 4, np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)


class _ThreadScratch(threading.local):

  def __init__(self):
    super().__init__()
    self.scratch = Scratch()


_THREAD_SCRATCH = _ThreadScratch()


def _dst(scratch: Scratch | None, name: str, shape, dtype):
  return None if scratch is None else scratch.get(name, tuple(shape), dtype)


def _scaled_hw(h: int, w: int, factor: float) -> tuple[int, int]:
  """cv2.resize's output size for fx = fy = factor (saturate_cast: round half to even)."""
  return round(h * factor), round(w * factor)


def _with_extra(image, label, extra, extra_fn):
  """(image, label) or, with a second label `extra`, (image, label, extra_fn(extra))."""
  if extra is None:
    return image, label
  return image, label, extra_fn(extra)


def resize_longer(image, label, side: int, scratch: Scratch | None = None, extra=None):
  """Resizes so the longer side is `side` (the other rounded, >= 1): bilinear image, nearest
  label (`TrainAugConfig.resize_longer`). With `extra` (a second label of the same size)
  returns (image, label, extra), extra resized as the label."""
  h, w = label.shape
  ratio = side / max(h, w)
  new_h, new_w = max(round(h * ratio), 1), max(round(w * ratio), 1)
  if (new_h, new_w) == (h, w):
    return _with_extra(image, label, extra, lambda x: x)
  image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR,
                     dst=_dst(scratch, "long_img", (new_h, new_w) + image.shape[2:],
                              image.dtype))
  near = lambda x, name: cv2.resize(x, (new_w, new_h), interpolation=cv2.INTER_NEAREST,
                                    dst=_dst(scratch, name, (new_h, new_w), x.dtype))
  return _with_extra(image, near(label, "long_lab"), extra, lambda x: near(x, "long_extra"))


def random_scale(image, label, rng, scale=(0.9, 1.1), scratch: Scratch | None = None,
                 extra=None):
  """Isotropic rescale by U[scale]: bilinear image, nearest label (cv2 fx/fy mapping).

  With `scratch`, the results are views of its buffers (see `Scratch`). With `extra` (a second
  label) returns (image, label, extra), extra scaled as the label.
  """
  factor = scale[0] + (scale[1] - scale[0]) * rng.random()
  h, w = _scaled_hw(*label.shape, factor)
  # OpenCV uses dst only when its size matches; otherwise it returns a new array.
  image = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR,
                     dst=_dst(scratch, "scale_img", (h, w) + image.shape[2:], image.dtype))
  near = lambda x, name: cv2.resize(x, None, fx=factor, fy=factor,
                                    interpolation=cv2.INTER_NEAREST,
                                    dst=_dst(scratch, name, (h, w), x.dtype))
  return _with_extra(image, near(label, "scale_lab"), extra, lambda x: near(x, "scale_extra"))


def random_rotate(image, label, rng, angle_range=(-10.0, 10.0), p=0.5,
                  scratch: Scratch | None = None, extra=None):
  """With probability p rotate about the centre; borders = ImageNet mean / 255. With `extra`
  (a second label) returns (image, label, extra), extra rotated as the label."""
  if rng.random() >= p:
    return _with_extra(image, label, extra, lambda x: x)
  angle = angle_range[0] + (angle_range[1] - angle_range[0]) * rng.random()
  h, w = label.shape
  matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1)
  image = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=MEAN_255,
                         dst=_dst(scratch, "rot_img", image.shape, image.dtype))
  near = lambda x, name: cv2.warpAffine(x, matrix, (w, h), flags=cv2.INTER_NEAREST,
                                        borderMode=cv2.BORDER_CONSTANT,
                                        borderValue=IGNORE_LABEL,
                                        dst=_dst(scratch, name, x.shape, x.dtype))
  return _with_extra(image, near(label, "rot_lab"), extra, lambda x: near(x, "rot_extra"))


def random_blur(image, rng, kernel=5, p=0.5, scratch: Scratch | None = None):
  """With probability p, kernel x kernel Gaussian blur, sigma derived from the kernel."""
  if rng.random() >= p:
    return image
  return cv2.GaussianBlur(image, (kernel, kernel), 0,
                          dst=_dst(scratch, "blur_img", image.shape, image.dtype))


def random_hflip(image, label, rng, p=0.5, scratch: Scratch | None = None, extra=None):
  """With probability p flip left-right. With `extra` (a second label) returns (image, label,
  extra), extra flipped as the label."""
  if rng.random() >= p:
    return _with_extra(image, label, extra, lambda x: x)
  flip = lambda x, name: cv2.flip(x, 1, dst=_dst(scratch, name, x.shape, x.dtype))
  return _with_extra(flip(image, "flip_img"), flip(label, "flip_lab"), extra,
                     lambda x: flip(x, "flip_extra"))


def draw_crop(label: np.ndarray, rng: np.random.Generator, size: int, keep: float = 0.85,
              redraws: int = 30, keep_value: int = 1) -> tuple[int, int]:
  """Top-left (y, x) of a random size x size window of the centre-padded label.

  The window is re-drawn up to `redraws` times while it holds fewer than keep * (all class
  pixels) of label == keep_value (1; an N-way query: its own way's id). Class-pixel counts come from an integral image (O(1) per draw);
  the padded arrays are never built.
  """
  h, w = label.shape
  pad_h, pad_w = max(size - h, 0), max(size - w, 0)
  top, left = pad_h // 2, pad_w // 2
  fg = cv2.integral((label == keep_value).astype(np.uint8))  # (h+1, w+1) int32
  total = int(fg[-1, -1])

  def count(y0, x0):  # class pixels inside the window, in unpadded coordinates
    ya, yb = min(max(y0 - top, 0), h), min(max(y0 - top + size, 0), h)
    xa, xb = min(max(x0 - left, 0), w), min(max(x0 - left + size, 0), w)
    return int(fg[yb, xb] - fg[ya, xb] - fg[yb, xa] + fg[ya, xa])

  def draw():
    return int(rng.integers(0, h + pad_h - size + 1)), int(rng.integers(0, w + pad_w - size + 1))

  y0, x0 = draw()
  tries = 0
  while count(y0, x0) < keep * total and tries < redraws:
    y0, x0 = draw()
    tries += 1
  return y0, x0


def _window(shape: tuple[int, int], size: int, y0: int, x0: int):
  """Source and destination slices of a padded-window crop (centred padding)."""
  h, w = shape
  top, left = max(size - h, 0) // 2, max(size - w, 0) // 2
  sy, sx = max(y0 - top, 0), max(x0 - left, 0)
  ey, ex = min(y0 - top + size, h), min(x0 - left + size, w)
  dy, dx = sy - (y0 - top), sx - (x0 - left)
  src = (slice(sy, ey), slice(sx, ex))
  dst = (slice(dy, dy + ey - sy), slice(dx, dx + ex - sx))
  return src, dst


def random_crop(image, label, rng, size, keep=0.85, redraws=30):
  """Random size x size crop after centred padding (image: mean, label: 255).

  Returns:
    image float32 (size, size, 3) (not normalised), label uint8 (size, size).
  """
  y0, x0 = draw_crop(label, rng, size, keep, redraws)
  src, dst = _window(label.shape, size, y0, x0)
  out_img = np.empty((size, size, 3), np.float32)
  for ch in range(3):
    out_img[..., ch] = _MEAN32[ch]
  out_lab = np.full((size, size), IGNORE_LABEL, np.uint8)
  out_img[dst] = image[src]
  out_lab[dst] = label[src]
  return out_img, out_lab


def _fill_outside(arr: np.ndarray, window: tuple[slice, slice], value) -> None:
  """Sets ``arr`` (H, W, ...) to ``value`` everywhere outside the 2-D ``window`` slices."""
  rows, cols = window
  h, w = arr.shape[:2]
  r0, r1, _ = rows.indices(h)
  c0, c1, _ = cols.indices(w)
  if r1 <= r0 or c1 <= c0:
    arr.fill(value)
    return
  arr[:r0] = value
  arr[r1:] = value
  arr[r0:r1, :c0] = value
  arr[r0:r1, c1:] = value


def _outputs(size: int, out):
  if out is None:
    return np.empty((size, size, 3), np.float32), np.empty((size, size), np.uint8)
  image, label = out
  if image.shape != (size, size, 3) or label.shape != (size, size):
    raise ValueError(f"output buffers {image.shape}, {label.shape} do not match size {size}")
  return image, label


def train_transform(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                    config: TrainAugConfig = TrainAugConfig(), out=None, keep_value: int = 1,
                    extra: np.ndarray | None = None, extra_out: np.ndarray | None = None):
  """Reference training augmentation of one image.

  Args:
    image: (H, W, 3) RGB, uint8 or float32 (0..255).
    label: uint8 (H, W) episode-local label (see the module docstring).
    rng: the only source of randomness (see the module docstring for the draw order).
    config: augmentation settings; config.size must be 8k+1.
    out: optional (image float32 (S, S, 3), label integer (S, S)) buffers to write into
      (e.g. slices of a batch), saving a copy.
    keep_value: the label value whose pixels the crop tries to keep (1; an N-way query: the
      id of the way its class was drawn for).
    extra: optional second uint8 (H, W) label (BAM's base-class label of the query) given
      the label's geometric steps with the same draws (nearest, 255 padding); it draws no
      random number and plays no part in the crop rule, so image and label do not change.
    extra_out: optional (S, S) buffer for the transformed `extra`.
  Returns:
    image float32 (S, S, 3) normalised, label (S, S) with label's values (uint8 unless
    `out`), padding 255; with `extra`, also the transformed extra (a third item).
  """
  if extra is not None and np.shape(extra) != np.shape(label):
    raise ValueError(f"extra label {np.shape(extra)} and label {np.shape(label)} differ in size")
  if config.mode == "resize_flip":
    return _resize_flip(image, label, rng, config, out, extra, extra_out)
  if config.mode != "fss":
    raise ValueError(f"TrainAugConfig.mode must be one of {TRAIN_MODES}, got {config.mode!r}")
  scratch = _THREAD_SCRATCH.scratch
  image = np.asarray(image)
  if image.dtype != np.float32:
    image_f32 = scratch.get("float", image.shape, np.float32)
    np.copyto(image_f32, image)
    image = image_f32
  if extra is not None:
    extra = np.asarray(extra, np.uint8)
  if config.resize_longer > 0:
    image, label, *ex = resize_longer(image, label, config.resize_longer, scratch, extra)
    extra = ex[0] if ex else None
  image, label, *ex = random_scale(image, label, rng, config.scale, scratch, extra)
  extra = ex[0] if ex else None
  image, label, *ex = random_rotate(image, label, rng, config.rotate, config.rotate_p,
                                    scratch, extra)
  extra = ex[0] if ex else None
  image = random_blur(image, rng, config.blur_kernel, config.blur_p, scratch)
  image, label, *ex = random_hflip(image, label, rng, config.flip_p, scratch, extra)
  extra = ex[0] if ex else None
  size = config.size
  y0, x0 = draw_crop(label, rng, size, config.crop_keep, config.crop_redraws, keep_value)
  src, dst = _window(label.shape, size, y0, x0)
  out_img, out_lab = _outputs(size, out)
  # The normalised padding mean is exactly 0: (m - m) / s. Only the padding is filled: the
  # window is written over anyway (the whole-canvas fill cost ~15% of an episode).
  _fill_outside(out_img, dst, 0.0)
  _fill_outside(out_lab, dst, IGNORE_LABEL)
  normalize(image[src], out=out_img[dst])
  out_lab[dst] = label[src]
  if extra is None:
    return out_img, out_lab
  out_extra = _extra_output(size, extra_out)
  _fill_outside(out_extra, dst, IGNORE_LABEL)
  out_extra[dst] = extra[src]
  return out_img, out_lab, out_extra


def _extra_output(size: int, extra_out):
  if extra_out is None:
    return np.empty((size, size), np.uint8)
  if extra_out.shape != (size, size):
    raise ValueError(f"extra label buffer {extra_out.shape} does not match size {size}")
  return extra_out


def _resize_flip(image, label, rng, config: TrainAugConfig, out=None, extra=None,
                 extra_out=None):
  """PANet's training transform: `eval_stretch`, then a left-right flip with p = flip_p."""
  out_img, out_lab = eval_stretch(image, label, config.size, out)
  out_extra = None
  if extra is not None:
    out_extra = _extra_output(config.size, extra_out)
    out_extra[:] = eval_stretch_label(np.asarray(extra, np.uint8), config.size)
  if rng.random() < config.flip_p:
    out_img[:] = out_img[:, ::-1].copy()
    out_lab[:] = out_lab[:, ::-1].copy()
    if out_extra is not None:
      out_extra[:] = out_extra[:, ::-1].copy()
  if out_extra is None:
    return out_img, out_lab
  return out_img, out_lab, out_extra


# ----------------------------------------------------------------------------- evaluation


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
  """Source index of each output pixel of a nearest resize, Pillow's rule
  floor((dst + 0.5) * n_in / n_out) in exact integer arithmetic: (n_out,) int64."""
  dst = np.arange(n_out, dtype=np.int64)
  return np.minimum((2 * dst + 1) * n_in // (2 * n_out), n_in - 1)


def eval_stretch(image: np.ndarray, label: np.ndarray, size: int = 417, out=None):
  """PANet's resize: image and label to size x size, aspect not kept (image bilinear, label
  nearest by `nearest_indices`). No padding.

  Returns:
    image float32 (size, size, 3) normalised; label (size, size) with label's values.
  """
  image = np.asarray(image, np.float32)
  out_img, out_lab = _outputs(size, out)
  normalize(cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR), out=out_img)
  out_lab[:] = eval_stretch_label(label, size)
  return out_img, out_lab


def eval_stretch_label(label: np.ndarray, size: int) -> np.ndarray:
  """A label-like map (class, instance or scribble ids) resized as `eval_stretch` does."""
  h, w = label.shape
  return label[nearest_indices(h, size)][:, nearest_indices(w, size)]



def eval_hw(height: int, width: int, size: int) -> tuple[int, int]:
  """Resized (h, w): longer side -> size, shorter truncated, both floored to 8k."""
  if height >= width:
    ratio = size * 1.0 / height
    new_h, new_w = size, int(width * ratio)
  else:
    ratio = size * 1.0 / width
    new_h, new_w = int(height * ratio), size
  return new_h // 8 * 8, new_w // 8 * 8


def eval_resize(image: np.ndarray, label: np.ndarray, size: int = 473, out=None):
  """Reference evaluation resize: top-left in a size x size canvas.

  Args:
    image: (H, W, 3) RGB, uint8 or float32.
    label: uint8 (H, W) episode-local label (see the module docstring).
    size: canvas side, 8k+1.
    out: optional (image, label) buffers to write into, as in `train_transform`.
  Returns:
    image float32 (size, size, 3): the resized image normalised, the rest of the canvas
    the normalised value of 0; label (size, size) padded with 255.
  """
  h, w = label.shape
  new_h, new_w = eval_hw(h, w, size)
  image = np.asarray(image, np.float32)
  out_img, out_lab = _outputs(size, out)
  _fill_normalized(out_img, (0.0, 0.0, 0.0))
  normalize(cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR),
            out=out_img[:new_h, :new_w])
  eval_resize_label(label, size, out=out_lab)
  return out_img, out_lab


def eval_resize_label(label: np.ndarray, size: int = 473, out=None) -> np.ndarray:
  """The label part of `eval_resize`: nearest resize to `eval_hw`, top-left in a size x size
  canvas padded with 255 (BAM's transform_tri.Resize does the same to its second label)."""
  h, w = label.shape
  new_h, new_w = eval_hw(h, w, size)
  if out is None:
    out = np.empty((size, size), np.uint8)
  elif out.shape != (size, size):
    raise ValueError(f"output buffer {out.shape} does not match size {size}")
  out.fill(IGNORE_LABEL)
  out[:new_h, :new_w] = cv2.resize(label, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
  return out


def pad_label(label: np.ndarray, size: int | None = None) -> np.ndarray:
  """Original-size label padded with 255 to a square (side max(H, W), or `size`).

  The reference's "original-label" evaluation compares logits upsampled to the
  max(H, W) square; a larger `size` gives fixed-shape batches (crop back to max(H, W)).
  """
  h, w = label.shape
  side = max(h, w) if size is None else size
  if side < max(h, w):
    raise ValueError(f"label of size {h}x{w} does not fit a {side}x{side} square")
  out = np.full((side, side), IGNORE_LABEL, np.uint8)
  out[:h, :w] = label
  return out
