"""Class folds of the few-shot benchmarks (which class ids are novel in each fold).

Class ids are 1-based (0 is background, 255 ignore) everywhere in fss_jax.
- PASCAL-5i: 20 VOC classes, fold i novel = 5i+1 .. 5i+5.
- COCO-20i: 80 classes in COCO category order. Two conventions exist:
  contiguous (fold i novel = 20i+1 .. 20i+20) and interleaved (PFENet's `use_split_coco`:
  fold i novel = i+1, i+5, ..., i+77).
"""
from __future__ import annotations

from typing import Iterable, Sequence

PASCAL_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")

# The 80 COCO "thing" categories in category-id order; contiguous id k+1 is COCO_CLASSES[k].
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")

# Original COCO category ids (1..90 with gaps) in the same order as COCO_CLASSES.
COCO_CATEGORY_IDS = tuple(
    i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))

PASCAL_NUM_FOLDS = 4
COCO_NUM_FOLDS = 4


def _check_fold(fold: int, num_folds: int) -> int:
  fold = int(fold)
  if not 0 <= fold < num_folds:
    raise ValueError(f"fold must be in [0, {num_folds}), got {fold}")
  return fold


def pascal5i_novel(fold: int) -> list[int]:
  """Novel class ids of PASCAL-5i fold `fold` (0..3): 5*fold+1 .. 5*fold+5."""
  fold = _check_fold(fold, PASCAL_NUM_FOLDS)
  return list(range(5 * fold + 1, 5 * fold + 6))


def coco20i_novel(fold: int, interleaved: bool) -> list[int]:
  """Novel class ids of COCO-20i fold `fold` (0..3), contiguous or interleaved convention."""
  fold = _check_fold(fold, COCO_NUM_FOLDS)
  if interleaved:
    return list(range(fold + 1, 81, 4))
  return list(range(20 * fold + 1, 20 * fold + 21))


def base_classes(num_classes: int, novel: Iterable[int]) -> list[int]:
  """Class ids 1..num_classes that are not novel, ascending."""
  novel = set(int(c) for c in novel)
  return [c for c in range(1, num_classes + 1) if c not in novel]


def scheme_novel_folds(scheme: str) -> list[list[int]]:
  """All folds' novel lists of a named benchmark scheme."""
  if scheme == "pascal5i":
    return [pascal5i_novel(f) for f in range(PASCAL_NUM_FOLDS)]
  if scheme == "coco20i":
    return [coco20i_novel(f, interleaved=False) for f in range(COCO_NUM_FOLDS)]
  if scheme == "coco20i_interleaved":
    return [coco20i_novel(f, interleaved=True) for f in range(COCO_NUM_FOLDS)]
  raise ValueError(f"scheme {scheme!r} has no fixed folds (known: pascal5i, coco20i, "
                   "coco20i_interleaved)")


def split_classes_into_folds(class_ids: Sequence[int], num_folds: int,
                             assignment: str = "contiguous") -> list[list[int]]:
  """Partitions class ids into `num_folds` novel sets.

  contiguous: consecutive blocks like PASCAL-5i (sizes differ by at most one, larger first);
  round_robin: class k goes to fold k mod num_folds (like COCO-20i interleaved).
  """
  ids = list(class_ids)
  if num_folds < 1 or num_folds > len(ids):
    raise ValueError(f"num_folds must be in [1, {len(ids)}] for {len(ids)} classes, "
                     f"got {num_folds}")
  if assignment == "round_robin":
    return [ids[f::num_folds] for f in range(num_folds)]
  if assignment == "contiguous":
    q, r = divmod(len(ids), num_folds)
    folds, start = [], 0
    for f in range(num_folds):
      size = q + (1 if f < r else 0)
      folds.append(ids[start:start + size])
      start += size
    return folds
  raise ValueError(f"unknown fold assignment {assignment!r} (contiguous or round_robin)")
