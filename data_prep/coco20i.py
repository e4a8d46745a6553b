r"""COCO 2014 instances -> COCO-20i TFRecords (fss_jax format), without pycocotools.

Inputs (--coco_root): annotations/instances_{train,val}<year>.json, {train,val}<year>/ images.
Splits: train = train<year>, val = val<year> (the COCO-20i convention), images in the JSON's
order. Every image is kept, also those without annotations (--skip_empty drops them).

Semantic label maps (uint8): category ids are mapped to contiguous 1..80 in category-id order
(= fss_jax.data.folds.COCO_CLASSES), 0 is background, 255 ignore.
- Polygons are rasterised by the pixel-centre rule (pixel (r, c) is inside when its centre
  (c + 0.5, r + 0.5) is, even-odd, parts of one annotation united). This is what pycocotools'
  frPoly samples; cv2.fillPoly also fills boundary pixels (an integer box [x0, x1) comes out
  one pixel too wide and tall), so it is not used.
- RLE segmentations are decoded here: uncompressed (`counts` a list) and compressed (`counts`
  a string in COCO's 5-bit LEB128-like delta code), column-major.
- Overlaps: crowd regions (iscrowd=1) are painted 255 first; then the other annotations are
  painted in decreasing pixel area (ties: annotation order), so smaller objects lying on larger
  ones stay visible and explicit instances win over the crowd ignore region.

Folds: --fold_scheme contiguous (fold i novel = 20i+1..20i+20, manifest scheme "coco20i") or
interleaved (fold i novel = i+1, i+5, ..., i+77, PFENet's use_split_coco, scheme
"coco20i_interleaved").

Usage:
  python -m data_prep.coco20i --coco_root=/data/coco --out_dir=data/coco20i \
      --fold_scheme=interleaved --workers=8
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Sequence

import numpy as np

from fss_jax.data import folds
from fss_jax.data import schema

try:
  from data_prep import _cli
except ImportError:  # run as a script: python data_prep/<name>.py
  import _cli

# --------------------------------------------------------------------------- masks


def rle_string_to_counts(s: str) -> list[int]:
  """Decodes COCO's compressed RLE string to run lengths.

  Each value is a run of characters c - 48 carrying 5 bits each (low group first); bit 0x20
  says another character follows, bit 0x10 of the last one is the sign. Values after the
  second are deltas to the value two positions back.
  """
  counts: list[int] = []
  pos, n = 0, len(s)
  while pos < n:
    x, shift, more = 0, 0, True
    while more:
      if pos >= n:
        raise ValueError(f"compressed RLE string ends inside a value: {s[:40]!r}")
      c = ord(s[pos]) - 48
      if not 0 <= c < 64:
        raise ValueError(f"invalid character {s[pos]!r} in compressed RLE string")
      x |= (c & 0x1F) << shift
      more = bool(c & 0x20)
      pos += 1
      shift += 5
      if not more and (c & 0x10):
        x |= -1 << shift
    if len(counts) > 2:
      x += counts[-2]
    counts.append(x)
  return counts


def rle_decode(counts: Sequence[int] | str, height: int, width: int) -> np.ndarray:
  """COCO RLE (alternating 0/1 runs, zeros first, column-major) -> bool (H, W)."""
  if isinstance(counts, (str, bytes)):
    counts = rle_string_to_counts(counts.decode("ascii") if isinstance(counts, bytes)
                                  else counts)
  counts = np.asarray(counts, np.int64)
  if counts.size and counts.min() < 0:
    raise ValueError("RLE has a negative run length")
  if int(counts.sum()) != height * width:
    raise ValueError(f"RLE covers {int(counts.sum())} pixels, image has "
                     f"{height}x{width}={height * width}")
  values = (np.arange(len(counts)) % 2).astype(bool)
  return np.repeat(values, counts).reshape(width, height).T


def polygon_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
  """Union of polygons [x0, y0, x1, y1, ...] (pixel-centre rule, even-odd) -> bool (H, W)."""
  mask = np.zeros((height, width), bool)
  for poly in polygons:
    xy = np.asarray(poly, np.float64).reshape(-1, 2)
    if len(xy) < 3:
      continue  # degenerate (pycocotools gives it no area either)
    x0, y0 = xy[:, 0], xy[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    # Row r is crossed by an edge when its centre r + 0.5 lies in [min y, max y) of the edge;
    # the half-open rule counts a shared vertex once.
    rlo = np.clip(np.ceil(np.minimum(y0, y1) - 0.5), 0, height).astype(np.int64)
    rhi = np.clip(np.ceil(np.maximum(y0, y1) - 0.5), 0, height).astype(np.int64)
    n = np.maximum(rhi - rlo, 0)
    if not n.sum():
      continue
    edge = np.repeat(np.arange(len(n)), n)
    row = rlo[edge] + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
    t = (row + 0.5 - y0[edge]) / (y1[edge] - y0[edge])
    xc = x0[edge] + t * (x1[edge] - x0[edge])
    # First pixel whose centre is at or right of the crossing flips the inside state.
    col = np.clip(np.ceil(xc - 0.5), 0, width).astype(np.int64)
    top = int(row.min())
    toggles = np.zeros((int(row.max()) - top + 1, width + 1), np.int32)
    np.add.at(toggles, (row - top, col), 1)
    inside = (np.cumsum(toggles, axis=1)[:, :width] & 1).astype(bool)
    mask[top:top + len(inside)] |= inside
  return mask


def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
  """Any COCO segmentation (polygons, RLE list, RLE string) -> bool (H, W)."""
  if isinstance(segmentation, list):
    return polygon_mask(segmentation, height, width)
  if isinstance(segmentation, dict) and "counts" in segmentation:
    size = segmentation.get("size")
    if size is not None and [int(v) for v in size] != [height, width]:
      raise ValueError(f"RLE size {size} differs from the image's [{height}, {width}]")
    return rle_decode(segmentation["counts"], height, width)
  raise ValueError(f"unknown segmentation format {type(segmentation).__name__}")


def semantic_label(annotations: Sequence[dict], height: int, width: int,
                   category_to_class: dict[int, int], where: str = "") -> np.ndarray:
  """Paints one image's annotations into a uint8 (H, W) label map (rule: module docstring)."""
  label = np.zeros((height, width), np.uint8)
  instances = []
  for k, ann in enumerate(annotations):
    ann_where = f"{where} annotation {ann.get('id', k)}"
    cat = ann.get("category_id")
    if cat not in category_to_class:
      raise ValueError(f"{ann_where}: unknown category_id {cat!r}")
    try:
      mask = annotation_mask(ann.get("segmentation", []), height, width)
    except ValueError as e:
      raise ValueError(f"{ann_where}: {e}") from e
    if ann.get("iscrowd", 0):
      label[mask] = schema.IGNORE_LABEL
    else:
      instances.append((-int(mask.sum()), k, mask, category_to_class[cat]))
  for _, _, mask, cls in sorted(instances, key=lambda t: (t[0], t[1])):
    label[mask] = cls
  return label


# --------------------------------------------------------------------------- dataset


def load_instances(path: str) -> tuple[list[dict], dict[int, list[dict]], list[dict]]:
  """instances_*.json -> (images, annotations by image id, categories sorted by id)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"COCO annotation file not found: {path}")
  with open(path, "r", encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e
  for key in ("images", "annotations", "categories"):
    if key not in data:
      raise ValueError(f"{path}: missing key {key!r}")
  by_image: dict[int, list[dict]] = {}
  for ann in data["annotations"]:
    by_image.setdefault(ann["image_id"], []).append(ann)
  image_ids = {im["id"] for im in data["images"]}
  orphans = set(by_image) - image_ids
  if orphans:
    raise ValueError(f"{path}: annotations refer to unknown image ids, e.g. "
                     f"{sorted(orphans)[:3]}")
  return data["images"], by_image, sorted(data["categories"], key=lambda c: c["id"])


def _make_item(spec: tuple[dict, list[dict], str, dict[int, int], str]) -> dict:
  image, anns, image_path, cat_map, where = spec
  with open(image_path, "rb") as f:
    image_bytes = f.read()
  label = semantic_label(anns, int(image["height"]), int(image["width"]), cat_map,
                         f"{where} image {image['id']}")
  return {"image_bytes": image_bytes, "id": str(image["id"]), "label": label}


def build_specs(coco_root: str, year: str = "2014", skip_empty: bool = False):
  """-> (specs per split, class names); raises naming missing folders and files."""
  if not os.path.isdir(coco_root):
    raise FileNotFoundError(f"COCO root folder not found: {coco_root}")
  specs, categories = {}, None
  for split in ("train", "val"):
    ann_path = os.path.join(coco_root, "annotations", f"instances_{split}{year}.json")
    images, by_image, cats = load_instances(ann_path)
    if categories is None:
      categories = cats
    elif [(c["id"], c["name"]) for c in cats] != [(c["id"], c["name"]) for c in categories]:
      raise ValueError(f"{ann_path}: categories differ from the train file's")
    if len(cats) != 80:
      raise ValueError(f"{ann_path}: {len(cats)} categories; COCO-20i needs the 80 of COCO")
    cat_map = {c["id"]: k + 1 for k, c in enumerate(cats)}
    image_dir = os.path.join(coco_root, f"{split}{year}")
    if not os.path.isdir(image_dir):
      raise FileNotFoundError(f"COCO image folder not found: {image_dir}")
    split_specs = []
    for im in images:
      anns = by_image.get(im["id"], [])
      if skip_empty and not anns:
        continue
      split_specs.append((im, anns, os.path.join(image_dir, im["file_name"]), cat_map,
                          ann_path))
    missing = [s[2] for s in split_specs if not os.path.isfile(s[2])]
    if missing:
      raise FileNotFoundError(f"{len(missing)} {split} images missing, e.g. {missing[:3]}")
    specs[split] = split_specs
  return specs, [c["name"] for c in categories]


def convert(*, coco_root: str, out_dir: str, fold_scheme: str = "contiguous",
            year: str = "2014", skip_empty: bool = False,
            num_shards: dict[str, int] | int | None = None, workers: int = 0,
            progress: bool = True) -> schema.Manifest:
  """Builds COCO-20i in `out_dir`; returns its manifest."""
  if fold_scheme not in ("contiguous", "interleaved"):
    raise ValueError(f"fold_scheme must be contiguous or interleaved, got {fold_scheme!r}")
  scheme = "coco20i" if fold_scheme == "contiguous" else "coco20i_interleaved"
  specs, names = build_specs(coco_root, year, skip_empty)
  extra = {"source": f"COCO {year} instances", "fold_scheme": fold_scheme,
           "overlap_rule": "crowd=255 first, then instances by decreasing area",
           "skip_empty": bool(skip_empty)}
  return schema.write_dataset(
      out_dir, name="coco20i", classes=names, novel_folds=folds.scheme_novel_folds(scheme),
      scheme=scheme,
      splits={s: schema.LazyItems(specs[s], _make_item, workers=workers, chunksize=16)
              for s in ("train", "val")},
      num_shards=num_shards or {"train": 64, "val": 32}, progress=progress, extra=extra)


def main(argv: Sequence[str] | None = None) -> schema.Manifest:
  parser = argparse.ArgumentParser(
      prog="python -m data_prep.coco20i", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--coco_root", required=True,
                      help="folder with annotations/ and train<year>/, val<year>/")
  parser.add_argument("--out_dir", required=True)
  parser.add_argument("--fold_scheme", choices=("contiguous", "interleaved"),
                      default="contiguous")
  parser.add_argument("--year", default="2014")
  parser.add_argument("--skip_empty", action="store_true",
                      help="drop images without annotations")
  parser.add_argument("--train_shards", type=int, default=64)
  parser.add_argument("--val_shards", type=int, default=32)
  parser.add_argument("--workers", type=int, default=0, help="label processes (0: inline)")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  manifest = convert(coco_root=args.coco_root, out_dir=args.out_dir,
                     fold_scheme=args.fold_scheme, year=args.year, skip_empty=args.skip_empty,
                     num_shards={"train": args.train_shards, "val": args.val_shards},
                     workers=args.workers, progress=not args.no_progress)
  _cli.report(manifest)
  return manifest


if __name__ == "__main__":
  _cli.run(main)
