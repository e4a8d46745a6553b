r"""A plain folder of images + masks -> TFRecords (fss_jax format).

Layout (--root):
  images/<stem>.<jpg|jpeg|png|bmp|tif|webp>   (JPEG and PNG are stored as they are; other
                                               formats are re-encoded as PNG)
  masks/<stem>.png     same stem; class-id map (grayscale or palette PNG, 0 background,
                       1..C classes, 255 ignore) or, with --mask_mode=binary, a binary mask
                       (a single foreground class 1: values > 127, or == 1 for 0/1 masks)
  classes.txt          optional: names of classes 1..C, one per line (a first line
                       "background"/"_background_"/"__background__" names id 0 and is dropped).
                       Without it C is the largest id found and classes are named class_<id>.

Splits: images (sorted stems) are shuffled with numpy.random.default_rng(--seed) and the first
round(--val_fraction * N) go to "val", the rest to "train"; each split keeps sorted stem order.
Folds: the classes 1..C are partitioned into --num_folds novel sets, contiguous blocks like
PASCAL-5i (--fold_assignment=contiguous, sizes differ by at most one, larger first) or
round-robin like COCO-20i's interleaved split (--fold_assignment=round_robin). Scheme "custom".

Usage:
  python -m data_prep.folder --root=my_data --out_dir=data/my_data --num_folds=4
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

import numpy as np

from fss_jax.data import folds
from fss_jax.data import schema

try:
  from data_prep import _cli
except ImportError:  # run as a script: python data_prep/<name>.py
  import _cli

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_BACKGROUND_NAMES = ("background", "_background_", "__background__")


def _stems(folder: str, exts: Sequence[str]) -> dict[str, str]:
  out = {}
  for f in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(f)
    if ext.lower() in exts:
      if stem in out:
        raise ValueError(f"{folder}: two files with stem {stem!r}: {out[stem]}, {f}")
      out[stem] = f
  return out


def pair_files(root: str) -> list[tuple[str, str, str]]:
  """(stem, image path, mask path), sorted by stem; errors name unmatched files."""
  for path in (root, os.path.join(root, "images"), os.path.join(root, "masks")):
    if not os.path.isdir(path):
      raise FileNotFoundError(f"folder not found: {path}")
  images = _stems(os.path.join(root, "images"), IMAGE_EXTS)
  masks = _stems(os.path.join(root, "masks"), (".png",))
  lonely_images = sorted(set(images) - set(masks))
  lonely_masks = sorted(set(masks) - set(images))
  if lonely_images or lonely_masks:
    raise FileNotFoundError(
        f"{root}: {len(lonely_images)} images without masks/<stem>.png "
        f"{[images[s] for s in lonely_images[:3]]}, {len(lonely_masks)} masks without images "
        f"{[masks[s] for s in lonely_masks[:3]]}")
  if not images:
    raise FileNotFoundError(f"{os.path.join(root, 'images')}: no images")
  return [(s, os.path.join(root, "images", images[s]), os.path.join(root, "masks", masks[s]))
          for s in sorted(images)]


def read_classes_txt(path: str) -> list[str]:
  with open(path, "r", encoding="utf-8") as f:
    names = [line.strip() for line in f if line.strip()]
  if names and names[0].lower() in _BACKGROUND_NAMES:
    names = names[1:]
  if not names:
    raise ValueError(f"{path}: no class names")
  if len(names) > 254:
    raise ValueError(f"{path}: {len(names)} classes; at most 254 fit a uint8 label map")
  return names


def load_mask(path: str, mode: str) -> np.ndarray:
  """Mask file -> uint8 (H, W) label map."""
  mask = schema.read_label_image(path)
  if mode == "binary":
    fg = (mask == 1) if mask.max() <= 1 else (mask > 127)
    return fg.astype(np.uint8)
  return mask


def _make_item(spec: tuple[str, str, str, str]) -> dict:
  stem, image_path, mask_path, mode = spec
  with open(image_path, "rb") as f:
    image_bytes, image_format = schema.normalize_image_bytes(f.read(), image_path)
  label = load_mask(mask_path, mode)
  try:
    hw = schema.image_size(image_bytes)
  except ValueError as e:
    raise ValueError(f"{image_path}: {e}") from e
  if hw != label.shape:
    raise ValueError(f"{mask_path} is {label.shape[0]}x{label.shape[1]} but {image_path} is "
                     f"{hw[0]}x{hw[1]}")
  return {"image_bytes": image_bytes, "image_format": image_format, "id": stem,
          "label": label}


def split_stems(stems: Sequence[str], val_fraction: float, seed: int):
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  stems = sorted(stems)
  order = np.random.default_rng(seed).permutation(len(stems))
  n_val = int(round(val_fraction * len(stems)))
  val = set(stems[i] for i in order[:n_val])
  return [s for s in stems if s not in val], [s for s in stems if s in val]


def convert(*, root: str, out_dir: str, name: str | None = None, mask_mode: str = "ids",
            val_fraction: float = 0.2, seed: int = 0, num_folds: int | None = None,
            fold_assignment: str = "contiguous",
            num_shards: dict[str, int] | int | None = None, workers: int = 0,
            progress: bool = True) -> schema.Manifest:
  """Builds a dataset from `root` in `out_dir`; returns its manifest."""
  if mask_mode not in ("ids", "binary"):
    raise ValueError(f"mask_mode must be ids or binary, got {mask_mode!r}")
  pairs = pair_files(root)
  classes_txt = os.path.join(root, "classes.txt")
  if mask_mode == "binary":
    classes = (read_classes_txt(classes_txt)[:1] if os.path.isfile(classes_txt)
               else ["foreground"])
  elif os.path.isfile(classes_txt):
    classes = read_classes_txt(classes_txt)
  else:
    # No names: one pass over the masks to find the largest class id.
    top = 0
    for _, _, mask_path in pairs:
      counts = schema.class_pixel_counts(load_mask(mask_path, mask_mode))
      top = max([top] + list(counts))
    if top == 0:
      raise ValueError(f"{root}: masks hold no class ids (all 0/255); binary masks need "
                       "--mask_mode=binary")
    classes = [f"class_{c}" for c in range(1, top + 1)]
  num_folds = min(4, len(classes)) if num_folds is None else num_folds
  novel = folds.split_classes_into_folds(range(1, len(classes) + 1), num_folds,
                                         fold_assignment)
  train, val = split_stems([p[0] for p in pairs], val_fraction, seed)
  by_stem = {p[0]: p for p in pairs}
  specs = {"train": [by_stem[s] + (mask_mode,) for s in train],
           "val": [by_stem[s] + (mask_mode,) for s in val]}
  extra = {"source": os.path.abspath(root), "mask_mode": mask_mode,
           "val_fraction": val_fraction, "seed": seed, "fold_assignment": fold_assignment}
  return schema.write_dataset(
      out_dir, name=name or os.path.basename(os.path.abspath(root)), classes=classes,
      novel_folds=novel, scheme="custom",
      splits={s: schema.LazyItems(specs[s], _make_item, workers=workers) for s in specs},
      num_shards=num_shards or 1, progress=progress, extra=extra)


def main(argv: Sequence[str] | None = None) -> schema.Manifest:
  parser = argparse.ArgumentParser(
      prog="python -m data_prep.folder", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--root", required=True, help="folder with images/ and masks/")
  parser.add_argument("--out_dir", required=True)
  parser.add_argument("--name", help="dataset name (default: the root folder's name)")
  parser.add_argument("--mask_mode", choices=("ids", "binary"), default="ids")
  parser.add_argument("--val_fraction", type=float, default=0.2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_folds", type=int, help="default min(4, number of classes)")
  parser.add_argument("--fold_assignment", choices=("contiguous", "round_robin"),
                      default="contiguous")
  parser.add_argument("--shards", type=int, default=1, help="shards per split")
  parser.add_argument("--workers", type=int, default=0)
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  manifest = convert(root=args.root, out_dir=args.out_dir, name=args.name,
                     mask_mode=args.mask_mode, val_fraction=args.val_fraction,
                     seed=args.seed, num_folds=args.num_folds,
                     fold_assignment=args.fold_assignment, num_shards=args.shards,
                     workers=args.workers, progress=not args.no_progress)
  _cli.report(manifest)
  return manifest


if __name__ == "__main__":
  _cli.run(main)
