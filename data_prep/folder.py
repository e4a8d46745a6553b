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

Unknown mask ids: with classes.txt, a mask holding an id beyond its C classes (other than 255)
is refused, naming the mask; without it, the ids found must look like a class list: when more
than half of 1..(largest id) occur in no mask (a stray 200 among ids 1..5 would otherwise make
200 classes, most of them empty), the conversion is refused, naming the ids larger than twice
the number of distinct ids and a mask holding each (a few unused ids pass, with a note).
--allow_unknown_ids accepts them instead: with classes.txt such pixels become 255 (ignore);
without it C is the largest id, as before.

Bad files: zero-byte or undecodable images and masks are errors naming the file.

--max_side S (default 0, off): images whose longer side exceeds S are downscaled on conversion
(image INTER_AREA, re-encoded in its format, JPEG at quality 95; mask nearest) so the longer
side is S. Use it for photographs much larger than the training data.image_size (the trainer
warns about that scale trap; data.train_resize_longer does the same at training time).

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


# Largest class id a uint8 label map can hold (255 is "ignore").
MAX_CLASS_ID = 254


def _make_item(spec: tuple) -> dict:
  """(stem, image path, mask path, mask mode, C, allow_unknown_ids, max_side) -> item."""
  stem, image_path, mask_path, mode, num_classes, allow_unknown, max_side = spec
  with open(image_path, "rb") as f:
    image_bytes, image_format = schema.normalize_image_bytes(f.read(), image_path)
  try:
    hw = schema.image_size(image_bytes)
    schema.check_image_decodes(image_bytes)
  except ValueError as e:
    raise ValueError(f"{image_path}: {e}") from e
  label = load_mask(mask_path, mode)
  if hw != label.shape:
    raise ValueError(f"{mask_path} is {label.shape[0]}x{label.shape[1]} but {image_path} is "
                     f"{hw[0]}x{hw[1]}")
  unknown = sorted(c for c in schema.class_pixel_counts(label) if c > num_classes)
  if unknown:
    if not allow_unknown:
      raise ValueError(
          f"{mask_path} holds class ids {unknown} absent from classes.txt ({num_classes} "
          "classes): fix the mask, name the classes in classes.txt, or pass "
          "--allow_unknown_ids to map them to 255 (ignore)")
    label = label.copy()
    label[(label > num_classes) & (label != schema.IGNORE_LABEL)] = schema.IGNORE_LABEL
  if max_side and max(hw) > max_side:
    image_bytes, label = _downscale(image_bytes, image_format, label, max_side, image_path)
  return {"image_bytes": image_bytes, "image_format": image_format, "id": stem,
          "label": label}


def _downscale(image_bytes: bytes, image_format: str, label: np.ndarray, max_side: int,
               image_path: str) -> tuple[bytes, np.ndarray]:
  """Image and label resized so the longer side is max_side (see --max_side)."""
  import cv2  # pylint: disable=g-import-not-at-top
  h, w = label.shape
  new_h, new_w = round(h * max_side / max(h, w)), round(w * max_side / max(h, w))
  new_h, new_w = max(new_h, 1), max(new_w, 1)
  bgr = cv2.imdecode(np.frombuffer(image_bytes, np.uint8),
                     cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
  if bgr is None:
    raise ValueError(f"{image_path}: cannot decode image ({len(image_bytes)} bytes)")
  bgr = cv2.resize(bgr, (new_w, new_h), interpolation=cv2.INTER_AREA)
  params = [cv2.IMWRITE_JPEG_QUALITY, 95] if image_format == "jpeg" else []
  ok, buf = cv2.imencode(".jpg" if image_format == "jpeg" else ".png", bgr, params)
  if not ok:
    raise ValueError(f"{image_path}: re-encoding the downscaled image failed")
  label = cv2.resize(label, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
  return buf.tobytes(), label


def infer_classes(root: str, pairs, mode: str, allow_unknown: bool) -> list[str]:
  """Class names class_1..class_C from the masks (no classes.txt); see the module docstring
  for when the ids found are refused."""
  first: dict[int, str] = {}  # id -> first mask holding it
  for _, _, mask_path in pairs:
    for c in schema.class_pixel_counts(load_mask(mask_path, mode)):
      first.setdefault(c, mask_path)
  if not first:
    raise ValueError(f"{root}: masks hold no class ids (all 0/255); binary masks need "
                     "--mask_mode=binary")
  top = max(first)
  if top > MAX_CLASS_ID:
    raise ValueError(f"{root}: class id {top} in {first[top]}; at most {MAX_CLASS_ID} fit a "
                     "uint8 label map (255 is ignore)")
  # Refused when more than half of 1..top occur in no mask, i.e. some id exceeds twice the
  # number of distinct ids: those are named.
  stray = sorted((c for c in first if c > 2 * len(first)), reverse=True)
  if stray and not allow_unknown:
    listed = ", ".join(f"{c} (in {first[c]})" for c in stray[:5])
    more = f" and {len(stray) - 5} more" if len(stray) > 5 else ""
    raise ValueError(
        f"{root}: no classes.txt, and the masks use only {len(first)} distinct class ids, "
        f"but id {listed}{more} would make {top} classes, most of them empty. Fix the masks, "
        "write classes.txt naming the real classes (masks with other ids are then refused, "
        f"each named), or pass --allow_unknown_ids to make {top} classes anyway")
  if len(first) < top:
    print(f"note: {root}: no classes.txt; classes 1..{top} from the masks, of which "
          f"{top - len(first)} occur in no mask")
  return [f"class_{c}" for c in range(1, top + 1)]


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
            progress: bool = True, allow_unknown_ids: bool = False,
            max_side: int = 0) -> schema.Manifest:
  """Builds a dataset from `root` in `out_dir`; returns its manifest (see the module
  docstring for allow_unknown_ids and max_side)."""
  if max_side < 0:
    raise ValueError(f"max_side must be >= 0 (0: off), got {max_side}")
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
    # No names: one pass over the masks for the class ids.
    classes = infer_classes(root, pairs, mask_mode, allow_unknown_ids)
  num_folds = min(4, len(classes)) if num_folds is None else num_folds
  novel = folds.split_classes_into_folds(range(1, len(classes) + 1), num_folds,
                                         fold_assignment)
  train, val = split_stems([p[0] for p in pairs], val_fraction, seed)
  by_stem = {p[0]: p for p in pairs}
  tail = (mask_mode, len(classes), bool(allow_unknown_ids), int(max_side))
  specs = {"train": [by_stem[s] + tail for s in train],
           "val": [by_stem[s] + tail for s in val]}
  extra = {"source": os.path.abspath(root), "mask_mode": mask_mode,
           "val_fraction": val_fraction, "seed": seed, "fold_assignment": fold_assignment,
           "allow_unknown_ids": bool(allow_unknown_ids), "max_side": int(max_side)}
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
  parser.add_argument("--allow_unknown_ids", action="store_true",
                      help="accept mask ids beyond classes.txt (-> 255, ignore) or, without "
                      "classes.txt, sparse ids (C = the largest id)")
  parser.add_argument("--max_side", type=int, default=0,
                      help="downscale images whose longer side exceeds this (0: off)")
  args = parser.parse_args(argv)
  manifest = convert(root=args.root, out_dir=args.out_dir, name=args.name,
                     mask_mode=args.mask_mode, val_fraction=args.val_fraction,
                     seed=args.seed, num_folds=args.num_folds,
                     fold_assignment=args.fold_assignment, num_shards=args.shards,
                     workers=args.workers, progress=not args.no_progress,
                     allow_unknown_ids=args.allow_unknown_ids, max_side=args.max_side)
  _cli.report(manifest)
  return manifest


if __name__ == "__main__":
  _cli.run(main)
