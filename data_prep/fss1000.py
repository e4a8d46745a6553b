r"""FSS-1000 -> TFRecords (fss_jax format).

Input (--root): one folder per class, each holding N.jpg images and N.png binary masks of the
same stem (mask > 127 is foreground; 1- or 3-channel PNGs). An image's label is its class id
where the mask is set. Class ids number the sorted class names of the split from 1; since
1000 classes do not fit uint8 label maps, labels are then 16-bit PNGs and id 255 is skipped
(255 stays the ignore value everywhere; the manifest's class list holds a placeholder there).

Class split (FSS-1000's standard: 520 train / 240 val / 240 test classes):
  --split_file  a JSON file {"train": [names], "val": [...], "test": [...]} ("trn" is accepted
                for "train"), or a folder with text lists trn.txt|train.txt, val.txt, test.txt
                (one class name per line, the layout HSNet ships).
  otherwise a deterministic built-in split: the sorted class names permuted by
  numpy.random.default_rng(--seed, default 0); the first 52% (520 of 1000) are train, the next
  24% val, the rest test. It is NOT the official split; use --split_file for published numbers.
Splits of the dataset are "train", "val", "test", each holding the images of its classes.
Folds: scheme "fss1000", a single fold whose novel classes are the test classes.

Usage:
  python -m data_prep.fss1000 --root=fewshot_data --out_dir=data/fss1000 \
      --split_file=hsnet/data/splits/fss
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Sequence

import cv2
import numpy as np

from fss_jax.data import schema

try:
  from data_prep import _cli
except ImportError:  # run as a script: python data_prep/<name>.py
  import _cli

SPLITS = ("train", "val", "test")
IGNORE_PLACEHOLDER = "<ignore (id 255 is not a class)>"
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def _natural_key(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_classes(root: str) -> list[str]:
  if not os.path.isdir(root):
    raise FileNotFoundError(f"FSS-1000 root folder not found: {root}")
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if not classes:
    raise FileNotFoundError(f"no class folders in {root}")
  return classes


def class_pairs(class_dir: str) -> list[tuple[str, str, str]]:
  """(stem, image path, mask path) of one class folder, natural stem order.

  An image is a .jpg/.jpeg file; its mask is the .png of the same stem.
  """
  files = os.listdir(class_dir)
  pngs = {os.path.splitext(f)[0] for f in files if f.lower().endswith(".png")}
  images = {}
  for f in files:
    stem, ext = os.path.splitext(f)
    if ext.lower() in (".jpg", ".jpeg"):
      images[stem] = f
  unmatched_images = sorted(set(images) - pngs)
  unmatched_masks = sorted(pngs - set(images))
  if unmatched_images or unmatched_masks:
    raise FileNotFoundError(
        f"{class_dir}: images without masks {unmatched_images[:3]}, masks without images "
        f"{unmatched_masks[:3]}")
  if not images:
    raise FileNotFoundError(f"{class_dir}: no .jpg images")
  return [(s, os.path.join(class_dir, images[s]), os.path.join(class_dir, s + ".png"))
          for s in sorted(images, key=_natural_key)]


def builtin_split(classes: Sequence[str], seed: int = 0) -> dict[str, list[str]]:
  """Deterministic 52/24/24 % class split of the sorted names (see module docstring)."""
  names = sorted(classes)
  order = np.random.default_rng(seed).permutation(len(names))
  n_train = int(round(0.52 * len(names)))
  n_val = int(round(0.24 * len(names)))
  picked = [names[i] for i in order]
  return {"train": sorted(picked[:n_train]), "val": sorted(picked[n_train:n_train + n_val]),
          "test": sorted(picked[n_train + n_val:])}


def read_split_file(path: str) -> dict[str, list[str]]:
  """JSON dict or a folder of trn/train, val, test text lists -> {split: class names}."""
  if os.path.isdir(path):
    out = {}
    for split, candidates in (("train", ("trn.txt", "train.txt")), ("val", ("val.txt",)),
                              ("test", ("test.txt",))):
      found = [os.path.join(path, c) for c in candidates if os.path.isfile(os.path.join(path, c))]
      if not found:
        raise FileNotFoundError(f"{path}: no {' or '.join(candidates)} class list")
      with open(found[0], "r", encoding="utf-8") as f:
        out[split] = [line.strip() for line in f if line.strip()]
    return out
  if not os.path.isfile(path):
    raise FileNotFoundError(f"split file not found: {path}")
  with open(path, "r", encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e
  if isinstance(data, dict) and "trn" in data and "train" not in data:
    data["train"] = data.pop("trn")
  if not isinstance(data, dict) or any(
      not isinstance(data.get(s), list) for s in SPLITS):
    raise ValueError(f"{path}: expected an object with lists 'train', 'val', 'test'")
  return {s: [str(c) for c in data[s]] for s in SPLITS}


def _make_item(spec: tuple[str, str, str, int, type, bool]) -> dict:
  image_id, image_path, mask_path, class_id, dtype, resize_masks = spec
  with open(image_path, "rb") as f:
    image_bytes = f.read()
  mask = cv2.imread(mask_path, cv2.IMREAD_GRAYSCALE)
  if mask is None:
    raise ValueError(f"{mask_path}: cannot read mask")
  h, w = schema.image_size(image_bytes)
  if mask.shape != (h, w):
    if not resize_masks:
      raise ValueError(f"{mask_path}: mask is {mask.shape[0]}x{mask.shape[1]} but "
                       f"{image_path} is {h}x{w} (--resize_masks resizes masks, nearest)")
    mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
  label = np.where(mask > 127, class_id, 0).astype(dtype)
  return {"image_bytes": image_bytes, "id": image_id, "label": label}


def convert(*, root: str, out_dir: str, split_file: str | None = None, seed: int = 0,
            resize_masks: bool = False, num_shards: dict[str, int] | int | None = None,
            workers: int = 0, progress: bool = True) -> schema.Manifest:
  """Builds the FSS-1000 dataset in `out_dir`; returns its manifest."""
  classes = list_classes(root)
  split = read_split_file(split_file) if split_file else builtin_split(classes, seed)
  known = set(classes)
  listed = [c for s in SPLITS for c in split[s]]
  missing = sorted(set(listed) - known)
  if missing:
    raise FileNotFoundError(f"{len(missing)} classes of the split have no folder in {root}, "
                            f"e.g. {missing[:3]}")
  seen, dupes = set(), set()
  for c in listed:
    (dupes if c in seen else seen).add(c)
  dupes = sorted(dupes)
  if dupes:
    raise ValueError(f"classes listed in more than one split: {dupes[:5]}")
  unlisted = sorted(known - set(listed))
  if unlisted:
    print(f"warning: {len(unlisted)} class folders are in no split and are skipped, e.g. "
          f"{unlisted[:3]}", file=sys.stderr)
  names, ids = class_ids(listed)
  dtype = np.uint16 if max(ids.values()) > 254 else np.uint8
  specs = {}
  for s in SPLITS:
    items = []
    for name in split[s]:
      for stem, image_path, mask_path in class_pairs(os.path.join(root, name)):
        items.append((f"{name}/{stem}", image_path, mask_path, ids[name], dtype,
                      resize_masks))
    specs[s] = items
  extra = {"source": "FSS-1000", "split_classes": split,
           "split_source": split_file or f"builtin (seed {seed})", "eval_split": "test",
           "class_ids": "sorted class names numbered from 1, id 255 skipped (reserved for "
                        "ignore; its classes entry is a placeholder)"}
  return schema.write_dataset(
      out_dir, name="fss1000", classes=names, novel_folds=[[ids[c] for c in split["test"]]],
      scheme="fss1000",
      splits={s: schema.LazyItems(specs[s], _make_item, workers=workers) for s in SPLITS},
      num_shards=num_shards or {"train": 8, "val": 4, "test": 4}, progress=progress,
      extra=extra)


def class_ids(names: Sequence[str]) -> tuple[list[str], dict[str, int]]:
  """Numbers sorted class names from 1, skipping 255 (the ignore value).

  Returns (manifest class list, where entry 254 is a placeholder once there are more than
  254 classes, and name -> id).
  """
  ids, table = {}, []
  for name in sorted(names):
    if len(table) + 1 == schema.IGNORE_LABEL:
      table.append(IGNORE_PLACEHOLDER)
    table.append(name)
    ids[name] = len(table)
  return table, ids


def main(argv: Sequence[str] | None = None) -> schema.Manifest:
  parser = argparse.ArgumentParser(
      prog="python -m data_prep.fss1000", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--root", required=True, help="folder of class folders")
  parser.add_argument("--out_dir", required=True)
  parser.add_argument("--split_file", help="JSON split or folder of trn/val/test.txt")
  parser.add_argument("--seed", type=int, default=0, help="seed of the built-in split")
  parser.add_argument("--resize_masks", action="store_true",
                      help="resize masks whose size differs from the image (nearest)")
  parser.add_argument("--workers", type=int, default=0)
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  manifest = convert(root=args.root, out_dir=args.out_dir, split_file=args.split_file,
                     seed=args.seed, resize_masks=args.resize_masks, workers=args.workers,
                     progress=not args.no_progress)
  _cli.report(manifest)
  return manifest


if __name__ == "__main__":
  _cli.run(main)
