r"""PASCAL VOC2012 + SBD -> PASCAL-5i TFRecords (fss_jax format).

Inputs:
  --voc_root  VOC2012 folder: JPEGImages/, SegmentationClass/ (palette PNGs, index = class id,
              255 = object border), ImageSets/Segmentation/{train,val}.txt
  and one source of the extra SBD annotations:
  --sbd_root  benchmark_RELEASE/dataset: cls/<id>.mat (struct GTcls, field Segmentation, uint8
              class ids; read with scipy.io.loadmat), train.txt, val.txt
  --aug_root  a ready SegmentationClassAug folder of grayscale class-id PNGs (VOC + SBD merged)

Lists (the reference's construction):
  train = VOC train ∪ SBD train ∪ SBD val, minus every VOC val image (sorted ids);
          with --aug_root: VOC train ∪ every PNG in the Aug folder, minus VOC val.
  val   = VOC val, in the order of VOC's val.txt, with VOC labels.
  --train_list / --val_list override the lists with a file of ids (lines "id" or
  "JPEGImages/id.jpg SegmentationClassAug/id.png"); VOC val ids are still removed from train.
  Note: the reference PFENet/ASGNet list lists/pascal/voc_sbd_merge_noduplicate.txt holds 5953
  images, a subset of the full 10582-image union; pass it as --train_list to match it exactly.

Label choice for train images: SBD's label whenever SBD has the image, VOC's otherwise
(--prefer_voc_labels flips this for images that have both). Reason: the reference trains on
SegmentationClassAug, whose maps for SBD images come from SBD, so the default reproduces its
statistics; VOC's maps are finer (255 borders) and the flag is there for that choice.

Optional maps for PANet's weak supports (stored as the records' optional features, see
fss_jax/data/schema.py; the manifest's "optional_features" says which records have them):
  --instances     store each record's instance-id map, from the same source as its class label
                  (so both maps share their geometry): VOC SegmentationObject/<id>.png (palette
                  PNG, index = instance id, 255 = border) for VOC-labelled records, SBD
                  inst/<id>.mat (struct GTinst, field Segmentation) for SBD-labelled ones.
                  PANet's util/sbd_instance_process.py builds its SegmentationObjectAug folder
                  the other way round: VOC's SegmentationObject whenever VOC has the image,
                  SBD's inst otherwise, next to SegmentationClassAug's class maps (from SBD for
                  SBD images), so its box supports can pair an SBD class map with a VOC object
                  map; --prefer_voc_labels gives VOC's maps for both. Every record must have
                  its instance file. With --aug_root, give --inst_root.
  --inst_root     a folder of instance PNGs named <id>.png (e.g. PANet's SegmentationObjectAug)
                  used for every record instead (implies --instances; each record must have one).
  --scribble_dir  a folder of scribble PNGs named <id>.png (e.g. PANet's ScribbleAugAuto:
                  255 no scribble, 0 background scribble, other values object scribble ids;
                  palette PNGs are read as their indices). Records without a file are stored
                  without one (the counts per split are printed and kept in the manifest); a
                  folder matching no image is an error.

Usage:
  python -m data_prep.pascal5i --voc_root=VOCdevkit/VOC2012 \
      --sbd_root=benchmark_RELEASE/dataset --out_dir=data/pascal5i
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


def read_id_list(path: str) -> list[str]:
  """Image ids of a list file: first token of each line, basename without extension."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"list file not found: {path}")
  ids = []
  with open(path, "r", encoding="utf-8") as f:
    for line in f:
      tokens = line.split()
      if tokens:
        ids.append(os.path.splitext(os.path.basename(tokens[0]))[0])
  return ids


def _require_dir(path: str, what: str) -> str:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what} folder not found: {path}")
  return path


def _require_files(paths: Sequence[str], what: str) -> None:
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
    raise FileNotFoundError(f"{len(missing)} {what} missing, e.g. {missing[:3]}{more}")


def load_sbd_label(path: str) -> np.ndarray:
  """SBD cls/<id>.mat -> uint8 (H, W) class ids."""
  return _load_sbd_mat(path, "GTcls", "class-id")


def load_sbd_instances(path: str) -> np.ndarray:
  """SBD inst/<id>.mat -> uint8 (H, W) instance ids (0 none), as PANet's
  util/sbd_instance_process.py reads them (GTinst.Segmentation)."""
  return _load_sbd_mat(path, "GTinst", "instance-id")


def _load_sbd_mat(path: str, struct: str, what: str) -> np.ndarray:
  """The uint8 (H, W) `struct`.Segmentation map of an SBD .mat file."""
  try:
    import scipy.io  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading SBD .mat files needs scipy (pip install scipy), or convert "
                      "from a SegmentationClassAug folder with --aug_root") from e
  try:
    mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
  except Exception as e:  # scipy raises several types for broken files
    raise ValueError(f"{path}: cannot read MATLAB file ({e})") from e
  if struct not in mat:
    raise ValueError(f"{path}: no {struct!r} struct "
                     f"(keys {sorted(k for k in mat if k[0] != '_')})")
  try:
    seg = np.asarray(mat[struct].Segmentation)
  except AttributeError as e:
    raise ValueError(f"{path}: {struct} has no field 'Segmentation'") from e
  if seg.ndim != 2 or seg.dtype.kind not in "ui" or seg.min() < 0 or seg.max() > 255:
    raise ValueError(f"{path}: {struct}.Segmentation must be a 2-D {what} map, got "
                     f"{seg.dtype} {seg.shape}")
  return seg.astype(np.uint8)


def _read_map(path: str, kind: str, instances: bool = False) -> np.ndarray:
  if kind == "sbd":
    return load_sbd_instances(path) if instances else load_sbd_label(path)
  return schema.read_label_image(path)


def _make_item(spec: tuple) -> dict:
  """A build_specs entry -> write_dataset item: (id, image path, label path, label kind[,
  instance path or None, instance kind or None, scribble path or None]); kinds are "sbd"
  (an SBD .mat file) or "png"."""
  image_id, image_path, label_path, kind = spec[:4]
  inst_path, inst_kind, scribble_path = (tuple(spec[4:]) + (None, None, None))[:3]
  with open(image_path, "rb") as f:
    image_bytes = f.read()
  item = {"image_bytes": image_bytes, "id": image_id, "label": _read_map(label_path, kind)}
  if inst_path is not None:
    item["instance"] = _read_map(inst_path, inst_kind, instances=True)
  if scribble_path is not None:
    item["scribble"] = schema.read_label_image(scribble_path)
  return item


def build_specs(*, voc_root: str, sbd_root: str | None = None, aug_root: str | None = None,
                train_list: str | None = None, val_list: str | None = None,
                prefer_voc_labels: bool = False, instances: bool = False,
                inst_root: str | None = None,
                scribble_dir: str | None = None) -> dict[str, list[tuple]]:
  """Resolves the train/val lists to (id, image path, label path, label kind, instance path,
  instance kind, scribble path) tuples (see the module docstring; None = not stored).

  Raises FileNotFoundError naming the missing folder, list or files.
  """
  if (sbd_root is None) == (aug_root is None):
    raise ValueError("give exactly one of sbd_root / aug_root")
  instances = instances or inst_root is not None
  if instances and aug_root is not None and inst_root is None:
    raise ValueError("instance maps with --aug_root need --inst_root (a folder of instance "
                     "PNGs such as PANet's SegmentationObjectAug): SegmentationClassAug's "
                     "labels have no instance source of their own")
  _require_dir(voc_root, "VOC2012 root")
  jpeg_dir = _require_dir(os.path.join(voc_root, "JPEGImages"), "VOC JPEGImages")
  voc_seg_dir = _require_dir(os.path.join(voc_root, "SegmentationClass"),
                             "VOC SegmentationClass")
  sets = os.path.join(voc_root, "ImageSets", "Segmentation")
  voc_train = read_id_list(os.path.join(sets, "train.txt"))
  voc_val = read_id_list(os.path.join(sets, "val.txt"))
  voc_val_set = set(voc_val)

  if sbd_root is not None:
    _require_dir(sbd_root, "SBD dataset")
    sbd_cls = _require_dir(os.path.join(sbd_root, "cls"), "SBD cls")
    extra_ids = (read_id_list(os.path.join(sbd_root, "train.txt")) +
                 read_id_list(os.path.join(sbd_root, "val.txt")))
    extra_label = lambda i: (os.path.join(sbd_cls, f"{i}.mat"), "sbd")
  else:
    _require_dir(aug_root, "SegmentationClassAug")
    extra_ids = sorted(os.path.splitext(f)[0] for f in os.listdir(aug_root)
                       if f.lower().endswith(".png"))
    extra_label = lambda i: (os.path.join(aug_root, f"{i}.png"), "png")
  extra_set = set(extra_ids)

  if train_list:
    train_ids = sorted(set(read_id_list(train_list)) - voc_val_set)
  else:
    train_ids = sorted((set(voc_train) | extra_set) - voc_val_set)
  val_ids = read_id_list(val_list) if val_list else voc_val

  sbd_img_dir = os.path.join(sbd_root, "img") if sbd_root else None

  def image_path(i):
    path = os.path.join(jpeg_dir, f"{i}.jpg")
    if not os.path.isfile(path) and sbd_img_dir and os.path.isfile(
        os.path.join(sbd_img_dir, f"{i}.jpg")):
      return os.path.join(sbd_img_dir, f"{i}.jpg")
    return path

  def train_label(i):
    voc_png = os.path.join(voc_seg_dir, f"{i}.png")
    if i in extra_set and not (prefer_voc_labels and os.path.isfile(voc_png)):
      return extra_label(i)
    return voc_png, "png"

  specs = {"train": [(i, image_path(i)) + train_label(i) for i in train_ids],
           "val": [(i, image_path(i), os.path.join(voc_seg_dir, f"{i}.png"), "png")
                   for i in val_ids]}
  for split, items in specs.items():
    _require_files([s[1] for s in items], f"{split} images")
    _require_files([s[2] for s in items], f"{split} label files")

  if inst_root is not None:
    _require_dir(inst_root, "instance PNG (--inst_root)")
    inst_of = lambda s: (os.path.join(inst_root, f"{s[0]}.png"), "png")
  elif instances:
    voc_obj_dir = os.path.join(voc_root, "SegmentationObject")
    sbd_inst_dir = os.path.join(sbd_root, "inst")

    def inst_of(s):  # the class label's own source (module docstring)
      if s[3] == "sbd":
        return os.path.join(sbd_inst_dir, f"{s[0]}.mat"), "sbd"
      return os.path.join(voc_obj_dir, f"{s[0]}.png"), "png"
  else:
    inst_of = lambda s: (None, None)
  scribbles = set()
  if scribble_dir is not None:
    _require_dir(scribble_dir, "scribble PNG (--scribble_dir)")
    scribbles = {os.path.splitext(f)[0] for f in os.listdir(scribble_dir)
                 if f.lower().endswith(".png")}
    if not scribbles & {s[0] for items in specs.values() for s in items}:
      raise FileNotFoundError(f"--scribble_dir {scribble_dir} holds no <id>.png of any "
                              "train or val image")
  scribble_of = lambda i: os.path.join(scribble_dir, f"{i}.png") if i in scribbles else None
  specs = {split: [s + inst_of(s) + (scribble_of(s[0]),) for s in items]
           for split, items in specs.items()}
  if instances:
    for split, items in specs.items():
      _require_files([s[4] for s in items], f"{split} instance files")
  return specs


def convert(*, voc_root: str, out_dir: str, sbd_root: str | None = None,
            aug_root: str | None = None, train_list: str | None = None,
            val_list: str | None = None, prefer_voc_labels: bool = False,
            instances: bool = False, inst_root: str | None = None,
            scribble_dir: str | None = None,
            num_shards: dict[str, int] | int | None = None, workers: int = 0,
            progress: bool = True) -> schema.Manifest:
  """Builds the PASCAL-5i dataset in `out_dir`; returns its manifest."""
  specs = build_specs(voc_root=voc_root, sbd_root=sbd_root, aug_root=aug_root,
                      train_list=train_list, val_list=val_list,
                      prefer_voc_labels=prefer_voc_labels, instances=instances,
                      inst_root=inst_root, scribble_dir=scribble_dir)
  label_sources = {k: sum(1 for s in specs["train"] if s[3] == k) for k in ("sbd", "png")}
  extra = {
      "source": "VOC2012 + " + ("SBD" if sbd_root else "SegmentationClassAug"),
      "train_list": train_list or "VOC train + extra - VOC val",
      "val_list": val_list or "VOC val",
      "prefer_voc_labels": bool(prefer_voc_labels),
      "train_label_files": {"sbd_mat": label_sources["sbd"], "png": label_sources["png"]},
  }
  if instances or inst_root is not None:
    extra["instances"] = (inst_root if inst_root is not None else
                          "the class label's source: VOC SegmentationObject / SBD inst")
  if scribble_dir is not None:
    extra["scribbles"] = {"dir": scribble_dir, **{
        s: sum(1 for x in specs[s] if x[6] is not None) for s in ("train", "val")}}
  return schema.write_dataset(
      out_dir, name="pascal5i", classes=folds.PASCAL_CLASSES,
      novel_folds=folds.scheme_novel_folds("pascal5i"), scheme="pascal5i",
      splits={s: schema.LazyItems(specs[s], _make_item, workers=workers) for s in ("train", "val")},
      num_shards=num_shards or {"train": 8, "val": 2}, progress=progress, extra=extra)


def main(argv: Sequence[str] | None = None) -> schema.Manifest:
  parser = argparse.ArgumentParser(
      prog="python -m data_prep.pascal5i", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--voc_root", required=True, help="VOC2012 folder")
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument("--sbd_root", help="SBD benchmark_RELEASE/dataset folder")
  src.add_argument("--aug_root", help="SegmentationClassAug folder of class-id PNGs")
  parser.add_argument("--out_dir", required=True, help="output dataset folder")
  parser.add_argument("--train_list", help="override the train id list")
  parser.add_argument("--val_list", help="override the val id list")
  parser.add_argument("--prefer_voc_labels", action="store_true",
                      help="use VOC's label for train images annotated by both")
  parser.add_argument("--instances", action="store_true",
                      help="store instance maps (VOC SegmentationObject / SBD inst, following "
                      "each record's label source) for PANet's box supports")
  parser.add_argument("--inst_root", help="folder of instance PNGs <id>.png (e.g. PANet's "
                      "SegmentationObjectAug) used for every record; implies --instances")
  parser.add_argument("--scribble_dir", help="folder of scribble PNGs <id>.png (e.g. PANet's "
                      "ScribbleAugAuto) stored with the records that have one")
  parser.add_argument("--train_shards", type=int, default=8)
  parser.add_argument("--val_shards", type=int, default=2)
  parser.add_argument("--workers", type=int, default=0, help="decode processes (0: inline)")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  manifest = convert(voc_root=args.voc_root, out_dir=args.out_dir, sbd_root=args.sbd_root,
                     aug_root=args.aug_root, train_list=args.train_list,
                     val_list=args.val_list, prefer_voc_labels=args.prefer_voc_labels,
                     instances=args.instances, inst_root=args.inst_root,
                     scribble_dir=args.scribble_dir,
                     num_shards={"train": args.train_shards, "val": args.val_shards},
                     workers=args.workers, progress=not args.no_progress)
  _cli.report(manifest)
  return manifest


if __name__ == "__main__":
  _cli.run(main)
