"""Record schema (tf.train.Example features), label-image helpers and the dataset manifest.

A converted dataset is one directory holding TFRecord shards of serialized `tf.train.Example`
protos (the proto classes bundled with `tensorflow_datasets`; no TensorFlow needed) and a
`manifest.json` that lists, per split, the shard files and the classes present in every image,
in record order. The manifest lets episode samplers index classes without reading any record.

Features of one record:
  image/encoded       bytes   original encoded image (JPEG or PNG, as in the source)
  image/format        bytes   b"jpeg" | b"png"
  image/id            bytes   utf-8 image id
  image/height, image/width  int64
  label/encoded       bytes   PNG of the uint8 (H, W) label map: 0 background, 1..C, 255 ignore
                              (16-bit PNG / uint16 only when a dataset has more than 254
                              classes, e.g. FSS-1000; id 255 stays "ignore" and is never a
                              class there)
  label/classes       int64[] class ids present (ascending, excluding 0 and 255)
  label/class_pixels  int64[] pixel count of each of those classes

Optional features (OPTIONAL_FEATURES; a record without one simply lacks the key, so datasets
written before they existed read unchanged; `decode_extras` / `read_extras` decode them):
  instance/encoded    bytes   PNG of the (H, W) instance-id map (uint8, or uint16 for more than
                              255 ids): 0 no instance, 1.. instance ids, 255 = VOC's border
                              (VOC SegmentationObject / SBD GTinst); for PANet's box supports
  scribble/encoded    bytes   PNG of the uint8 (H, W) scribble map: 255 no scribble, 0 background
                              scribble, other values object scribble ids (PANet's ScribbleAugAuto
                              encoding); for PANet's scribble supports
The manifest says which records have them: "optional_features" {name: {split: record count}}
and, per image, "features" [names] (both left out when a dataset has none).
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any, Iterable, Mapping

import cv2
import numpy as np
from tensorflow_datasets.proto import tf_example_generated_pb2 as _example_pb
from tensorflow_datasets.proto import tf_feature_generated_pb2 as _feature_pb

from fss_jax.data import tfrecord

IGNORE_LABEL = 255
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
SCHEMES = ("pascal5i", "coco20i", "coco20i_interleaved", "fss1000", "custom")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Optional per-record maps: name -> (feature key, allowed dtypes of the decoded map).
OPTIONAL_FEATURES = ("instance", "scribble")
_OPTIONAL = {"instance": ("instance/encoded", (np.uint8, np.uint16)),
             "scribble": ("scribble/encoded", (np.uint8,))}

# --------------------------------------------------------------------------- examples


def _bytes_feature(values) -> _feature_pb.Feature:
  return _feature_pb.Feature(bytes_list=_feature_pb.BytesList(value=list(values)))


def _int64_feature(values) -> _feature_pb.Feature:
  return _feature_pb.Feature(int64_list=_feature_pb.Int64List(value=[int(v) for v in values]))


def encode_example(*, image_bytes: bytes, image_format: str, image_id: str, height: int,
                   width: int, label_png: bytes, class_pixels: Mapping[int, int],
                   instance_png: bytes | None = None,
                   scribble_png: bytes | None = None) -> bytes:
  """Serializes one image + label map as a tf.train.Example (see module docstring).

  instance_png / scribble_png: the optional features' PNG bytes; None stores no feature.
  """
  classes = sorted(int(c) for c in class_pixels)
  feature = {
      "image/encoded": _bytes_feature([bytes(image_bytes)]),
      "image/format": _bytes_feature([image_format.encode("utf-8")]),
      "image/id": _bytes_feature([str(image_id).encode("utf-8")]),
      "image/height": _int64_feature([height]),
      "image/width": _int64_feature([width]),
      "label/encoded": _bytes_feature([bytes(label_png)]),
      "label/classes": _int64_feature(classes),
      "label/class_pixels": _int64_feature([class_pixels[c] for c in classes]),
  }
  for name, png in (("instance", instance_png), ("scribble", scribble_png)):
    if png is not None:
      feature[_OPTIONAL[name][0]] = _bytes_feature([bytes(png)])
  return _example_pb.Example(features=_feature_pb.Features(feature=feature)).SerializeToString()


def decode_example(record: bytes) -> dict[str, Any]:
  """Parses a record written by `encode_example`.

  Returns:
    dict with image_bytes (bytes), image_format (str), id (str), height, width (int),
    label_png (bytes), class_pixels (dict[int, int], ascending class ids), and for the
    optional features instance_png, scribble_png (bytes, or None when the record has none).
  """
  try:
    example = _example_pb.Example.FromString(bytes(record))
  except Exception as e:  # protobuf raises DecodeError, a plain Exception subclass
    raise ValueError(f"record is not a serialized tf.train.Example: {e}") from e
  feats = example.features.feature

  def get(key, kind):
    if key not in feats:
      raise ValueError(f"record lacks feature {key!r} (has {sorted(feats)})")
    values = getattr(feats[key], kind).value
    return list(values)

  def one(key, kind):
    values = get(key, kind)
    if len(values) != 1:
      raise ValueError(f"feature {key!r} must hold one value, has {len(values)}")
    return values[0]

  classes = get("label/classes", "int64_list")
  pixels = get("label/class_pixels", "int64_list")
  if len(classes) != len(pixels):
    raise ValueError(f"label/classes ({len(classes)}) and label/class_pixels ({len(pixels)}) "
                     "differ in length")
  return {
      "image_bytes": one("image/encoded", "bytes_list"),
      "image_format": one("image/format", "bytes_list").decode("utf-8"),
      "id": one("image/id", "bytes_list").decode("utf-8"),
      "height": int(one("image/height", "int64_list")),
      "width": int(one("image/width", "int64_list")),
      "label_png": one("label/encoded", "bytes_list"),
      "class_pixels": {int(c): int(n) for c, n in zip(classes, pixels)},
      **{f"{name}_png": (one(key, "bytes_list") if key in feats else None)
         for name, (key, _) in _OPTIONAL.items()},
  }


# --------------------------------------------------------------------------- images and labels


def _imdecode(data: bytes, flags: int):
  """cv2.imdecode that returns None, instead of raising cv2.error, for empty or bad input."""
  if not data:
    return None
  try:
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags)
  except cv2.error:
    return None


def decode_image(image_bytes: bytes) -> np.ndarray:
  """Decodes JPEG/PNG bytes to uint8 (H, W, 3) RGB.

  EXIF orientation is ignored on purpose: label maps are stored in the file's pixel order, and
  honouring the tag would transpose the image against its label.
  """
  image = _imdecode(image_bytes, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
  if image is None:
    raise ValueError(f"cannot decode image ({len(image_bytes)} bytes)")
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def check_image_decodes(image_bytes: bytes) -> None:
  """Raises ValueError unless the bytes decode as an image (JPEG: at 1/8 scale, which still
  entropy-decodes the whole stream, several times faster than a full decode)."""
  flags = cv2.IMREAD_IGNORE_ORIENTATION | (
      cv2.IMREAD_REDUCED_GRAYSCALE_8 if sniff_image_format(image_bytes) == "jpeg"
      else cv2.IMREAD_UNCHANGED)
  if _imdecode(image_bytes, flags) is None:
    raise ValueError(f"cannot decode image ({len(image_bytes)} bytes)")


def decode_label(label_png: bytes) -> np.ndarray:
  """Decodes a label PNG written by `encode_label_png` to uint8 (H, W).

  (uint16 (H, W) for the 16-bit labels of datasets with more than 254 classes.)
  """
  label = _imdecode(label_png, cv2.IMREAD_UNCHANGED)
  if label is None or label.ndim != 2 or label.dtype not in (np.uint8, np.uint16):
    raise ValueError(f"label/encoded ({len(label_png)} bytes) is not a single-channel 8- or "
                     "16-bit PNG")
  return label


# --------------------------------------------------------------------------- reading records


class BadRecordError(ValueError):
  """A record that cannot be read or decoded.

  The message starts with ``<shard file> record <j> (image id '<id>')`` (j counts from 0
  within the shard; "image id unreadable" when the record cannot be parsed that far).

  Attributes:
    kind: 'crc' (framing / CRC check failed), 'parse' (not an Example, missing or malformed
      feature), 'image' / 'label' (undecodable), 'size' (image and label sizes differ),
      'instance' / 'scribble' (an optional map undecodable or not of the label's size; raised
      by `read_extras` only).
    path, record, image_id: where (image_id None when unreadable).
    detail: the underlying error's message.
  """

  def __init__(self, kind: str, path: str, record: int, image_id: str | None, detail: str):
    self.kind, self.path, self.record, self.image_id, self.detail = (
        kind, path, int(record), image_id, detail)
    super().__init__(f"{record_name(path, record, image_id)}: {detail}")

  def __reduce__(self):  # picklable across Grain worker processes
    return (type(self), (self.kind, self.path, self.record, self.image_id, self.detail))


def record_name(path: str, record: int, image_id: str | None) -> str:
  """``<path> record <j> (image id 'x')``: how every bad-record message names a record."""
  what = "image id unreadable" if image_id is None else f"image id {image_id!r}"
  return f"{path} record {int(record)} ({what})"


def _readable_id(data: bytes) -> str | None:
  """The record's image/id if the bytes still parse that far, else None."""
  try:
    feats = _example_pb.Example.FromString(bytes(data)).features.feature
    return feats["image/id"].bytes_list.value[0].decode("utf-8")
  except Exception:  # pylint: disable=broad-except
    return None


def read_record(reader: tfrecord.TFRecordReader, index: int
                ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
  """Record `index` of `reader`, parsed and decoded: (example dict, image RGB, label).

  Raises:
    BadRecordError: naming the shard, the record number in it and the image id.
  """
  k, j = reader.locate(index)
  path = reader.paths[k]
  try:
    record = reader[index]
  except tfrecord.TFRecordCorruptError as e:
    detail = str(e)
    if detail.startswith(path + ": "):
      detail = detail[len(path) + 2:]
    detail = detail.replace(f" in record {j} ", " ").replace(f" record {j} ", " record ")
    raise BadRecordError("crc", path, j, _readable_id(reader.raw(index)), detail) from e
  try:
    ex = decode_example(record)
  except ValueError as e:
    raise BadRecordError("parse", path, j, _readable_id(record), str(e)) from e
  try:
    image = decode_image(ex["image_bytes"])
  except ValueError as e:
    raise BadRecordError("image", path, j, ex["id"], str(e)) from e
  try:
    label = decode_label(ex["label_png"])
  except ValueError as e:
    raise BadRecordError("label", path, j, ex["id"], str(e)) from e
  if image.shape[:2] != label.shape:
    raise BadRecordError("size", path, j, ex["id"],
                         f"image {image.shape[0]}x{image.shape[1]} and label "
                         f"{label.shape[0]}x{label.shape[1]} differ in size")
  return ex, image, label


def decode_extra(example: Mapping[str, Any], name: str,
                 shape: tuple[int, int] | None = None) -> np.ndarray | None:
  """One optional map of a `decode_example` dict, decoded; None when the record has none.

  Args:
    example: a `decode_example` (or `read_record`) dict.
    name: one of OPTIONAL_FEATURES ("instance": uint8 or uint16 (H, W); "scribble": uint8
      (H, W)).
    shape: when given, the (H, W) the map must have (the record's label's).

  Raises:
    ValueError: naming the feature and the image id (undecodable, wrong dtype, wrong size).
  """
  if name not in _OPTIONAL:
    raise ValueError(f"unknown optional feature {name!r} (known: {OPTIONAL_FEATURES})")
  png = example.get(f"{name}_png")
  if png is None:
    return None
  try:
    return _decode_optional(png, name, shape)
  except ValueError as e:
    raise ValueError(f"image {example.get('id')!r}: {e}") from e


def _decode_optional(png: bytes, name: str, shape: tuple[int, int] | None) -> np.ndarray:
  key, dtypes = _OPTIONAL[name]
  array = _imdecode(png, cv2.IMREAD_UNCHANGED)
  if array is None or array.ndim != 2 or array.dtype not in dtypes:
    kind = "8- or 16-bit" if len(dtypes) == 2 else "8-bit"
    got = "undecodable" if array is None else f"{array.dtype} {array.shape}"
    raise ValueError(f"{key} ({len(png)} bytes) is not a single-channel {kind} PNG ({got})")
  if shape is not None and array.shape != tuple(shape):
    raise ValueError(f"{key} is {array.shape[0]}x{array.shape[1]} but the label is "
                     f"{shape[0]}x{shape[1]}")
  return array


def decode_extras(example: Mapping[str, Any], shape: tuple[int, int] | None = None
                  ) -> dict[str, np.ndarray | None]:
  """All optional maps of a `decode_example` dict: {"instance": array or None,
  "scribble": array or None} (see `decode_extra`; errors are ValueErrors naming the feature and
  the image id)."""
  return {name: decode_extra(example, name, shape) for name in OPTIONAL_FEATURES}


def read_extras(reader: tfrecord.TFRecordReader, index: int, example: Mapping[str, Any],
                shape: tuple[int, int] | None = None) -> dict[str, np.ndarray | None]:
  """`decode_extras` of record `index` of `reader`, whose `read_record` dict is `example`.

  Raises:
    BadRecordError: kind 'instance' or 'scribble', naming the shard, the record number in it
      and the image id, as `read_record` does.
  """
  out = {}
  for name in OPTIONAL_FEATURES:
    png = example.get(f"{name}_png")
    try:
      out[name] = None if png is None else _decode_optional(png, name, shape)
    except ValueError as e:
      k, j = reader.locate(index)
      raise BadRecordError(name, reader.paths[k], j, example.get("id"), str(e)) from e
  return out


def encode_label_png(label: np.ndarray) -> bytes:
  """Encodes a uint8 (or uint16, see module docstring) (H, W) label map as a grayscale PNG."""
  label = np.asarray(label)
  if label.ndim != 2 or label.dtype not in (np.uint8, np.uint16):
    raise ValueError(f"label must be uint8 (H, W), got {label.dtype} {label.shape}")
  ok, buf = cv2.imencode(".png", np.ascontiguousarray(label), [cv2.IMWRITE_PNG_COMPRESSION, 3])
  if not ok:
    raise ValueError("PNG encoding of the label failed")
  return buf.tobytes()


def class_pixel_counts(label: np.ndarray) -> dict[int, int]:
  """Pixels per class present in a label map, ascending ids, excluding 0 and 255."""
  label = np.asarray(label)
  if label.dtype not in (np.uint8, np.uint16):
    raise ValueError(f"label must be uint8 or uint16, got {label.dtype}")
  counts = np.bincount(label.ravel(), minlength=256)
  return {int(c): int(counts[c]) for c in np.flatnonzero(counts)
          if c != 0 and c != IGNORE_LABEL}


def sniff_image_format(data: bytes) -> str | None:
  """'jpeg' or 'png' from the magic bytes; None for anything else."""
  if data[:3] == b"\xff\xd8\xff":
    return "jpeg"
  if data[:8] == _PNG_SIGNATURE:
    return "png"
  return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
  pos, n = 2, len(data)
  while pos + 4 <= n:
    if data[pos] != 0xFF:
      return None
    marker = data[pos + 1]
    if marker == 0xFF:  # fill byte
      pos += 1
      continue
    if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
      pos += 2
      continue
    (seg_len,) = struct.unpack(">H", data[pos + 2:pos + 4])
    # SOF0..SOF15 except DHT (C4), JPG (C8), DAC (CC) carry the frame size.
    if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
      if pos + 9 > n:
        return None
      h, w = struct.unpack(">HH", data[pos + 5:pos + 9])
      return h, w
    if marker == 0xDA:  # start of scan before any frame header
      return None
    pos += 2 + seg_len
  return None


def image_size(data: bytes) -> tuple[int, int]:
  """(height, width) of an encoded image, from the JPEG/PNG header when possible."""
  fmt = sniff_image_format(data)
  size = None
  if fmt == "png" and len(data) >= 24 and data[12:16] == b"IHDR":
    w, h = struct.unpack(">II", data[16:24])
    size = (h, w)
  elif fmt == "jpeg":
    size = _jpeg_size(data)
  if size is None:
    image = _imdecode(data, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
      raise ValueError(f"cannot decode image ({len(data)} bytes)")
    size = image.shape[:2]
  return int(size[0]), int(size[1])


def normalize_image_bytes(data: bytes, source: str = "<bytes>") -> tuple[bytes, str]:
  """Keeps JPEG/PNG bytes as they are; re-encodes any other format cv2 reads as PNG."""
  if not data:
    raise ValueError(f"{source}: empty file (0 bytes)")
  fmt = sniff_image_format(data)
  if fmt is not None:
    return data, fmt
  image = _imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
  if image is None:
    raise ValueError(f"{source}: cannot decode image ({len(data)} bytes)")
  ok, buf = cv2.imencode(".png", image)
  if not ok:
    raise ValueError(f"{source}: PNG re-encoding failed")
  return buf.tobytes(), "png"


def _png_chunks(data: bytes):
  pos = len(_PNG_SIGNATURE)
  while pos + 8 <= len(data):
    length, kind = struct.unpack(">I4s", data[pos:pos + 8])
    yield kind, data[pos + 8:pos + 8 + length]
    if kind == b"IEND":
      return
    pos += 12 + length


def decode_label_image(data: bytes, source: str = "<bytes>") -> np.ndarray:
  """Decodes a label image file to uint8 (H, W) class ids.

  Handles 8-bit grayscale PNGs (values are ids), palette PNGs such as VOC's SegmentationClass
  (palette indices are ids; OpenCV expands palettes to colours, so the colours are mapped back
  through the file's own PLTE chunk, the lowest index winning for duplicated colours), and
  colour images whose three channels are equal. `source` names the file in errors.
  """
  if not data:
    raise ValueError(f"{source}: empty file (0 bytes)")
  if data[:8] == _PNG_SIGNATURE:
    chunks = list(_png_chunks(data))
    if not chunks or chunks[0][0] != b"IHDR":
      raise ValueError(f"{source}: malformed PNG (no IHDR)")
    bit_depth, color_type = chunks[0][1][8], chunks[0][1][9]
    if color_type == 3:
      plte = next((body for kind, body in chunks if kind == b"PLTE"), None)
      if plte is None:
        raise ValueError(f"{source}: palette PNG without a PLTE chunk")
      return _palette_to_index(data, np.frombuffer(plte, np.uint8).reshape(-1, 3), source)
    if bit_depth > 8:
      raise ValueError(f"{source}: {bit_depth}-bit label PNG; expected 8-bit class ids")
  image = _imdecode(data, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
  if image is None:
    raise ValueError(f"{source}: cannot decode label image ({len(data)} bytes)")
  if image.dtype != np.uint8:
    raise ValueError(f"{source}: label image has dtype {image.dtype}; expected 8-bit")
  if image.ndim == 3:
    image = image[..., :3]
    if not (np.array_equal(image[..., 0], image[..., 1]) and
            np.array_equal(image[..., 0], image[..., 2])):
      raise ValueError(f"{source}: colour label image whose channels differ; expected a "
                       "grayscale or palette PNG of class ids")
    image = image[..., 0]
  return np.ascontiguousarray(image)


def _palette_to_index(data: bytes, palette_rgb: np.ndarray, source: str) -> np.ndarray:
  bgr = _imdecode(data, cv2.IMREAD_COLOR)
  if bgr is None:
    raise ValueError(f"{source}: cannot decode palette PNG")
  packed = ((bgr[..., 2].astype(np.int64) << 16) | (bgr[..., 1].astype(np.int64) << 8) |
            bgr[..., 0].astype(np.int64))
  pal = ((palette_rgb[:, 0].astype(np.int64) << 16) | (palette_rgb[:, 1].astype(np.int64) << 8)
         | palette_rgb[:, 2].astype(np.int64))
  lookup = {}
  for index in range(len(pal) - 1, -1, -1):  # reversed, so the lowest index wins
    lookup[int(pal[index])] = index
  colours, inverse = np.unique(packed, return_inverse=True)
  ids = np.empty(len(colours), np.uint8)
  for k, colour in enumerate(colours):
    if int(colour) not in lookup:
      raise ValueError(f"{source}: pixel colour #{int(colour):06x} is not in the PNG palette")
    ids[k] = lookup[int(colour)]
  return ids[inverse.reshape(packed.shape)]


def read_label_image(path: str | os.PathLike) -> np.ndarray:
  """`decode_label_image` of a file, naming it in errors."""
  path = os.fspath(path)
  with open(path, "rb") as f:
    return decode_label_image(f.read(), path)


# --------------------------------------------------------------------------- manifest


class ManifestError(ValueError):
  """An invalid manifest.json (the message names the file and the offending key)."""


@dataclasses.dataclass
class Manifest:
  """In-memory `manifest.json` of a converted dataset.

  Attributes:
    name: dataset name.
    classes: class names for ids 1..C (classes[0] is id 1).
    novel_folds: novel class ids of each fold.
    splits: split name -> {"files": [relative shard paths], "images": [per-record dicts]}.
    scheme: fold scheme (one of SCHEMES).
    root: directory holding the manifest (shard paths are relative to it).
    extra: free-form metadata written by the converter (sources, choices made).
    optional_features: {name: {split: number of records having it}} for the OPTIONAL_FEATURES
      the dataset stores (empty for none; see also `has_feature`, `records_with`).
  """
  name: str
  classes: list[str]
  novel_folds: list[list[int]]
  splits: dict[str, dict[str, Any]]
  scheme: str = "custom"
  root: str = ""
  version: int = MANIFEST_VERSION
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)
  optional_features: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  @property
  def path(self) -> str:
    return os.path.join(self.root, MANIFEST_NAME)

  def _split(self, split: str) -> dict[str, Any]:
    if split not in self.splits:
      raise KeyError(f"{self.path}: no split {split!r} (has {sorted(self.splits)})")
    return self.splits[split]

  def split_files(self, split: str) -> list[str]:
    """Absolute paths of the split's shards, in record order (each must exist)."""
    paths = [os.path.join(self.root, f) for f in self._split(split)["files"]]
    for p in paths:
      if not os.path.isfile(p):
        raise FileNotFoundError(f"{self.path}: shard {p} of split {split!r} is missing")
    return paths

  def images(self, split: str) -> list[dict[str, Any]]:
    """Per-record metadata, record order: {"id", "height", "width", "classes": {"<id>": n}}.

    The class keys are strings, exactly as stored in JSON; see `class_pixels` for int keys.
    """
    return self._split(split)["images"]

  def class_pixels(self, split: str) -> list[dict[int, int]]:
    """Per-record {class id: pixel count} with int keys."""
    return [{int(c): int(n) for c, n in im["classes"].items()} for im in self.images(split)]

  def source(self, split: str, *, verify_data: bool = False) -> tfrecord.TFRecordDataSource:
    """Grain source over the split's records, checked against the manifest's image count."""
    src = tfrecord.TFRecordDataSource(self.split_files(split), verify_data=verify_data)
    if len(src) != len(self.images(split)):
      raise ManifestError(f"{self.path}: split {split!r} lists {len(self.images(split))} "
                          f"images but its shards hold {len(src)} records")
    return src

  def has_feature(self, name: str, split: str | None = None) -> bool:
    """Whether any record (of `split`, or of any split) stores optional feature `name`."""
    counts = self.optional_features.get(name, {})
    if split is None:
      return any(n > 0 for n in counts.values())
    self._split(split)
    return counts.get(split, 0) > 0

  def records_with(self, name: str, split: str) -> list[bool]:
    """Per record of `split`, in record order: whether it stores optional feature `name`."""
    return [name in im.get("features", ()) for im in self.images(split)]

  def to_json(self) -> dict[str, Any]:
    out = {"name": self.name, "version": self.version, "classes": list(self.classes),
           "folds": {"scheme": self.scheme, "novel": [list(f) for f in self.novel_folds]},
           "splits": self.splits}
    if self.extra:
      out["extra"] = self.extra
    if self.optional_features:
      out["optional_features"] = self.optional_features
    return out


def _require(cond: bool, path: str, what: str) -> None:
  if not cond:
    raise ManifestError(f"{path}: {what}")


def manifest_from_json(obj: Any, path: str) -> Manifest:
  """Validates a parsed manifest.json; `path` (the file) names it in errors."""
  _require(isinstance(obj, dict), path, "top level must be a JSON object")
  for key in ("name", "version", "classes", "folds", "splits"):
    _require(key in obj, path, f"missing key {key!r}")
  _require(isinstance(obj["name"], str), path, "'name' must be a string")
  _require(obj["version"] == MANIFEST_VERSION, path,
           f"unsupported version {obj['version']!r} (expected {MANIFEST_VERSION})")
  classes = obj["classes"]
  _require(isinstance(classes, list) and all(isinstance(c, str) for c in classes), path,
           "'classes' must be a list of strings")
  num_classes = len(classes)
  folds = obj["folds"]
  _require(isinstance(folds, dict) and "novel" in folds and "scheme" in folds, path,
           "'folds' must be an object with 'scheme' and 'novel'")
  _require(folds["scheme"] in SCHEMES, path,
           f"folds.scheme {folds['scheme']!r} not one of {SCHEMES}")
  novel = folds["novel"]
  _require(isinstance(novel, list) and all(isinstance(f, list) for f in novel), path,
           "folds.novel must be a list of lists of class ids")
  for k, fold in enumerate(novel):
    for c in fold:
      _require(isinstance(c, int) and 1 <= c <= num_classes, path,
               f"folds.novel[{k}] has class id {c!r} outside 1..{num_classes}")
  splits = obj["splits"]
  _require(isinstance(splits, dict), path, "'splits' must be an object")
  for split, body in splits.items():
    where = f"splits.{split}"
    _require(isinstance(body, dict) and "files" in body and "images" in body, path,
             f"{where} must have 'files' and 'images'")
    _require(isinstance(body["files"], list) and
             all(isinstance(f, str) for f in body["files"]), path,
             f"{where}.files must be a list of relative paths")
    _require(isinstance(body["images"], list), path, f"{where}.images must be a list")
    for i, im in enumerate(body["images"]):
      ok = (isinstance(im, dict) and isinstance(im.get("id"), str) and
            isinstance(im.get("height"), int) and isinstance(im.get("width"), int) and
            isinstance(im.get("classes"), dict))
      _require(ok, path, f"{where}.images[{i}] must have id (str), height, width (int), "
               "classes (object)")
      for c, n in im["classes"].items():
        _require(c.isdigit() and 1 <= int(c) <= num_classes and isinstance(n, int), path,
                 f"{where}.images[{i}] ({im['id']}) has bad class entry {c!r}: {n!r}")
      if "features" in im:
        _require(isinstance(im["features"], list) and
                 all(f in OPTIONAL_FEATURES for f in im["features"]), path,
                 f"{where}.images[{i}] ({im['id']}) features must be a list of names from "
                 f"{OPTIONAL_FEATURES}, got {im['features']!r}")
  optional = obj.get("optional_features", {})
  _require(isinstance(optional, dict), path, "'optional_features' must be an object")
  for name, counts in optional.items():
    _require(name in OPTIONAL_FEATURES, path,
             f"optional_features has unknown feature {name!r} (known: {OPTIONAL_FEATURES})")
    _require(isinstance(counts, dict) and all(s in splits for s in counts), path,
             f"optional_features.{name} must be an object of split names")
  for split, body in splits.items():
    for name in OPTIONAL_FEATURES:
      have = sum(name in im.get("features", ()) for im in body["images"])
      n = optional.get(name, {}).get(split, 0)
      _require(isinstance(n, int) and n == have, path,
               f"optional_features.{name}.{split} is {n!r} but {have} images of that split "
               f"list {name!r} in their features")
  return Manifest(name=obj["name"], classes=list(classes), novel_folds=novel, splits=splits,
                  scheme=folds["scheme"], root=os.path.dirname(os.path.abspath(path)),
                  version=obj["version"], extra=obj.get("extra", {}),
                  optional_features=optional)


def load_manifest(dataset_dir: str | os.PathLike) -> Manifest:
  """Loads `<dataset_dir>/manifest.json` (or a manifest file path given directly)."""
  path = os.fspath(dataset_dir)
  if os.path.isdir(path):
    path = os.path.join(path, MANIFEST_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"dataset manifest not found: {path}")
  try:
    with open(path, "r", encoding="utf-8") as f:
      obj = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ManifestError(f"{path}: not valid JSON ({e})") from e
  return manifest_from_json(obj, path)


# --------------------------------------------------------------------------- writing datasets


class LazyItems:
  """A sized iterable of `make_item(key)` over `keys`, in order (for `write_dataset`).

  With workers > 0 items are built in a process pool (order kept); `make_item` and the keys
  must then be picklable (a module-level function or functools.partial of one).
  """

  def __init__(self, keys, make_item, *, workers: int = 0, chunksize: int = 4):
    self._keys = list(keys)
    self._make_item = make_item
    self._workers = int(workers)
    self._chunksize = chunksize

  def __len__(self) -> int:
    return len(self._keys)

  def __iter__(self):
    if self._workers <= 0 or len(self._keys) < 2:
      for key in self._keys:
        yield self._make_item(key)
      return
    import multiprocessing  # pylint: disable=g-import-not-at-top
    with multiprocessing.get_context("spawn").Pool(self._workers) as pool:
      yield from pool.imap(self._make_item, self._keys, chunksize=self._chunksize)


def _example_from_item(item: Mapping[str, Any], num_classes: int, where: str):
  """Builds (record bytes, image metadata) from one converter item."""
  for key in ("image_bytes", "id"):
    if key not in item:
      raise ValueError(f"{where}: item lacks {key!r}")
  image_id = str(item["id"])
  where = f"{where} image {image_id!r}"
  image_bytes = bytes(item["image_bytes"])
  image_format = item.get("image_format") or sniff_image_format(image_bytes)
  if image_format not in ("jpeg", "png"):
    raise ValueError(f"{where}: image format {image_format!r} is not jpeg/png "
                     "(use normalize_image_bytes)")
  if "label" in item:
    label = np.asarray(item["label"])
    if label.ndim != 2 or label.dtype not in (np.uint8, np.uint16):
      raise ValueError(f"{where}: label must be uint8 (H, W), got {label.dtype} {label.shape}")
    label_png = encode_label_png(label)
  elif "label_png" in item:
    label_png = bytes(item["label_png"])
    label = decode_label(label_png)
  else:
    raise ValueError(f"{where}: item needs 'label' or 'label_png'")
  height, width = label.shape
  try:
    image_hw = image_size(image_bytes)
    check_image_decodes(image_bytes)  # a header alone does not make a readable image
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e
  if image_hw != (height, width):
    raise ValueError(f"{where}: image is {image_hw[0]}x{image_hw[1]} but its label is "
                     f"{height}x{width}")
  extras = {}
  for name in OPTIONAL_FEATURES:
    extras[name] = _optional_png(item, name, (height, width), where)
  counts = class_pixel_counts(label)
  bad = [c for c in counts if c > num_classes]
  if bad:
    raise ValueError(f"{where}: label has class ids {bad} outside 1..{num_classes} (and 255)")
  if label.dtype == np.uint16 and num_classes <= 254:
    raise ValueError(f"{where}: 16-bit label maps are only for datasets of more than 254 "
                     "classes; pass uint8")
  record = encode_example(image_bytes=image_bytes, image_format=image_format,
                          image_id=image_id, height=height, width=width,
                          label_png=label_png, class_pixels=counts,
                          instance_png=extras["instance"], scribble_png=extras["scribble"])
  meta = {"id": image_id, "height": int(height), "width": int(width),
          "classes": {str(c): n for c, n in counts.items()}}
  features = [name for name in OPTIONAL_FEATURES if extras[name] is not None]
  if features:
    meta["features"] = features
  return record, meta


def _optional_png(item: Mapping[str, Any], name: str, shape: tuple[int, int],
                  where: str) -> bytes | None:
  """PNG bytes of optional map `name` of a converter item (`name` array or `name_png` bytes,
  None / absent = not stored), checked to decode to the label's size and dtype."""
  key, dtypes = _OPTIONAL[name]
  array, png = item.get(name), item.get(f"{name}_png")
  if array is not None and png is not None:
    raise ValueError(f"{where}: item has both {name!r} and {name + '_png'!r}")
  if array is not None:
    array = np.asarray(array)
    if array.ndim != 2 or array.dtype not in dtypes:
      want = " or ".join(np.dtype(d).name for d in dtypes)
      raise ValueError(f"{where}: {name} map must be {want} (H, W), got {array.dtype} "
                       f"{array.shape}")
    if array.shape != shape:
      raise ValueError(f"{where}: {name} map is {array.shape[0]}x{array.shape[1]} but its "
                       f"label is {shape[0]}x{shape[1]}")
    return encode_label_png(array)
  if png is None:
    return None
  png = bytes(png)
  try:
    _decode_optional(png, name, shape)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e
  return png


def _shard_bounds(n: int, num_shards: int) -> list[int]:
  """Contiguous shard boundaries: shard k holds records [b[k], b[k+1])."""
  return [k * n // num_shards for k in range(num_shards + 1)]


def _shard_name(split: str, k: int, num_shards: int) -> str:
  return f"{split}-{k:05d}-of-{num_shards:05d}.tfrecord"


def write_dataset(out_dir: str | os.PathLike, *, name: str, classes: Iterable[str],
                  novel_folds: Iterable[Iterable[int]], scheme: str,
                  splits: Mapping[str, Iterable[Mapping[str, Any]]],
                  num_shards: int | Mapping[str, int] = 1, progress: bool = True,
                  extra: Mapping[str, Any] | None = None) -> Manifest:
  """Writes TFRecord shards and manifest.json for a converted dataset.

  Args:
    out_dir: output directory (created).
    name, classes, novel_folds, scheme: manifest fields (classes[k] names id k+1).
    splits: split name -> iterable of items, each a dict with image_bytes, id, and either
      label (uint8 (H, W)) or label_png; image_format optional (sniffed); optionally, per
      OPTIONAL_FEATURES name, the map (`instance` uint8/uint16, `scribble` uint8, (H, W) like
      the label) or its PNG (`instance_png`, `scribble_png`); None or absent = not stored. Record order is
      iteration order. Sized iterables are written straight to contiguous shards; others go
      through one temporary file that is then cut into shards.
    num_shards: shards per split (an int for all, or a dict; missing splits get 1); capped at
      the split's image count.
    progress: show a tqdm bar per split.
    extra: free-form metadata stored under "extra".

  Every item is validated before it is written (image bytes decode, image and label sizes
  agree, class ids within 1..C or 255), and every shard is read back (CRCs, record count)
  before it is published.

  Returns:
    The written Manifest. Shards and manifest appear atomically (temporary names, then
    rename, manifest last); on error no temporary file is left behind.
  """
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top

  out_dir = os.path.abspath(os.fspath(out_dir))
  os.makedirs(out_dir, exist_ok=True)
  classes = [str(c) for c in classes]
  novel_folds = [[int(c) for c in f] for f in novel_folds]
  if scheme not in SCHEMES:
    raise ValueError(f"scheme {scheme!r} not one of {SCHEMES}")
  tag = f".tmp-{os.getpid()}"
  renames: list[tuple[str, str]] = []  # (tmp path, final path)
  temps: list[str] = []
  manifest_splits = {}
  optional: dict[str, dict[str, int]] = {}
  try:
    for split, items in splits.items():
      want = num_shards.get(split, 1) if isinstance(num_shards, Mapping) else num_shards
      if int(want) < 1:
        raise ValueError(f"num_shards for split {split!r} must be >= 1, got {want}")
      try:
        total = len(items)  # type: ignore[arg-type]
      except TypeError:
        total = None
      where = f"{name}/{split}"
      bar = tqdm.tqdm(items, total=total, desc=where, unit="img", disable=not progress)
      metas: list[dict[str, Any]] = []
      seen: set[str] = set()

      def examples():
        for item in bar:
          record, meta = _example_from_item(item, len(classes), where)
          if meta["id"] in seen:
            raise ValueError(f"{where}: duplicate image id {meta['id']!r}")
          seen.add(meta["id"])
          metas.append(meta)
          yield record

      if total is not None:
        count = max(1, min(int(want), total))
        bounds = _shard_bounds(total, count)
        stream = examples()
        files = []
        for k in range(count):
          final = os.path.join(out_dir, _shard_name(split, k, count))
          tmp = final + tag
          temps.append(tmp)
          with tfrecord.TFRecordWriter(tmp) as writer:
            for _ in range(bounds[k + 1] - bounds[k]):
              record = next(stream, None)
              if record is None:
                raise ValueError(f"{where}: iterable yielded fewer items than its len() "
                                 f"({len(metas)} < {total})")
              writer.write(record)
          _verify_shard(tmp, bounds[k + 1] - bounds[k], where)
          renames.append((tmp, final))
          files.append(os.path.basename(final))
        if next(stream, None) is not None:
          raise ValueError(f"{where}: iterable yielded more items than its len() ({total})")
      else:
        single = os.path.join(out_dir, f"{split}.all{tag}")
        temps.append(single)
        tfrecord.write_tfrecord(single, examples())
        files = _cut_into_shards(single, out_dir, split, int(want), tag, temps, renames)
        os.remove(single)
      bar.close()
      manifest_splits[split] = {"files": files, "images": metas}
      for feature in OPTIONAL_FEATURES:
        have = sum(feature in m.get("features", ()) for m in metas)
        if have:
          optional.setdefault(feature, {})[split] = have

    manifest = Manifest(name=name, classes=classes, novel_folds=novel_folds,
                        splits=manifest_splits, scheme=scheme, root=out_dir,
                        extra=dict(extra or {}),
                        optional_features={f: {s: n for s, n in c.items()}
                                           for f, c in optional.items()})
    manifest_from_json(json.loads(json.dumps(manifest.to_json())), manifest.path)
    for tmp, final in renames:
      os.replace(tmp, final)
    tmp_manifest = manifest.path + tag
    temps.append(tmp_manifest)
    with open(tmp_manifest, "w", encoding="utf-8") as f:
      json.dump(manifest.to_json(), f, indent=1)
      f.write("\n")
    os.replace(tmp_manifest, manifest.path)
    return manifest
  finally:
    for tmp in temps:
      if os.path.exists(tmp):
        os.remove(tmp)


def _cut_into_shards(single: str, out_dir: str, split: str, want: int, tag: str,
                     temps: list[str], renames: list[tuple[str, str]]) -> list[str]:
  """Copies the records of one TFRecord file into contiguous shard files (byte ranges)."""
  index = tfrecord.scan_tfrecord(single)
  total = len(index)
  count = max(1, min(want, total))
  bounds = _shard_bounds(total, count)
  # Byte start of each record's frame; the file end closes the last range.
  starts = [int(o) - 12 for o in index[:, 0]] + [os.path.getsize(single)]
  files = []
  with open(single, "rb") as src:
    for k in range(count):
      final = os.path.join(out_dir, _shard_name(split, k, count))
      tmp = final + tag
      temps.append(tmp)
      begin = starts[bounds[k]] if total else 0
      end = starts[bounds[k + 1]] if total else 0
      src.seek(begin)
      with open(tmp, "wb") as dst:
        remaining = end - begin
        while remaining:
          chunk = src.read(min(remaining, 1 << 24))
          dst.write(chunk)
          remaining -= len(chunk)
      _verify_shard(tmp, bounds[k + 1] - bounds[k], f"{split} shard {k}")
      renames.append((tmp, final))
      files.append(os.path.basename(final))
  return files


def _verify_shard(path: str, count: int, where: str) -> None:
  """Re-reads a written shard: every length and data CRC, and the record count."""
  n = len(tfrecord.scan_tfrecord(path, verify_data=True))
  if n != count:
    raise ValueError(f"{where}: {path} holds {n} records after writing, expected {count}")
