"""Tiny fake raw datasets on disk, in the layouts the data_prep converters read, and episode
label maps for the models' parity tests (``episode_masks``).

Every generator returns the ground truth it wrote (label maps, lists) so tests can compare the
converted records against it without going through the converters' own decoding.
"""
from __future__ import annotations

import json
import os
import struct
import zlib

import cv2
import numpy as np

# ----------------------------------------------------------------------------- files


def voc_colormap(n: int = 256) -> np.ndarray:
  """The PASCAL VOC palette (bit-interleaved), uint8 (n, 3) RGB."""
  cmap = np.zeros((n, 3), np.uint8)
  for i in range(n):
    r = g = b = 0
    c = i
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    cmap[i] = (r, g, b)
  return cmap


def _png_chunk(kind: bytes, body: bytes) -> bytes:
  return (struct.pack(">I", len(body)) + kind + body +
          struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))


def palette_png_bytes(index: np.ndarray, palette: np.ndarray | None = None) -> bytes:
  """An 8-bit palette PNG (colour type 3) of uint8 (H, W) indices, written by hand."""
  index = np.asarray(index, np.uint8)
  palette = voc_colormap() if palette is None else np.asarray(palette, np.uint8)
  h, w = index.shape
  raw = b"".join(b"\x00" + index[r].tobytes() for r in range(h))
  return (b"\x89PNG\r\n\x1a\n" +
          _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0)) +
          _png_chunk(b"PLTE", palette.tobytes()) +
          _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))


def write_jpeg(path, rgb: np.ndarray) -> bytes:
  ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
  assert ok
  _write(path, buf.tobytes())
  return buf.tobytes()


def write_png(path, array: np.ndarray) -> bytes:
  ok, buf = cv2.imencode(".png", array)
  assert ok
  _write(path, buf.tobytes())
  return buf.tobytes()


def _write(path, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def _write_list(path, ids) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("".join(f"{i}\n" for i in ids))


def random_image(rng, h, w) -> np.ndarray:
  return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def random_label(rng, h, w, class_ids, ignore_border=False) -> np.ndarray:
  """Background with a few axis-aligned boxes of the given classes (uint8 (H, W))."""
  label = np.zeros((h, w), np.uint8)
  for c in class_ids:
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    y1, x1 = y0 + rng.integers(2, h // 2), x0 + rng.integers(2, w // 2)
    label[y0:y1, x0:x1] = c
    if ignore_border:
      label[y0, x0:x1] = 255
  return label


# ----------------------------------------------------------------------------- VOC + SBD


def make_voc_sbd(root, rng, *, with_aug=False):
  """VOC2012 + SBD (benchmark_RELEASE/dataset) with overlapping id sets.

  ids: v0..v3 VOC train only, w0..w2 VOC val (w0 also in SBD train, w1 in SBD val),
  s0..s3 SBD only (s0, s1 train; s2, s3 val), b0 in VOC train and SBD train (labels differ).

  Returns dict with voc_root, sbd_root, aug_root (if with_aug), and truth: id -> expected
  label for the converter's default choice, lists. Instance maps are written too
  (VOC SegmentationObject/<id>.png palette PNGs with VOC's 255 borders, SBD inst/<id>.mat
  GTinst structs): each 8-connected component of each class of the image's label from that
  source is one instance (`instances_of`); truth in voc_instances / sbd_instances.
  """
  import scipy.io  # pylint: disable=g-import-not-at-top

  voc = os.path.join(root, "VOC2012")
  sbd = os.path.join(root, "benchmark_RELEASE", "dataset")
  voc_train = ["v0", "v1", "v2", "v3", "b0"]
  voc_val = ["w0", "w1", "w2"]
  sbd_train = ["s0", "s1", "w0", "b0"]
  sbd_val = ["s2", "s3", "w1"]
  voc_labels, sbd_labels, voc_instances, sbd_instances = {}, {}, {}, {}
  all_ids = sorted(set(voc_train + voc_val + sbd_train + sbd_val))
  for k, i in enumerate(all_ids):
    h, w = 20 + 2 * k, 24 + k
    write_jpeg(os.path.join(voc, "JPEGImages", f"{i}.jpg"), random_image(rng, h, w))
    classes = rng.choice(np.arange(1, 21), size=2, replace=False)
    if i in voc_train or i in voc_val:
      lab = random_label(rng, h, w, classes, ignore_border=True)
      voc_labels[i] = lab
      _write(os.path.join(voc, "SegmentationClass", f"{i}.png"), palette_png_bytes(lab))
      voc_instances[i] = instances_of(lab)
      _write(os.path.join(voc, "SegmentationObject", f"{i}.png"),
             palette_png_bytes(voc_instances[i]))
    if i in sbd_train or i in sbd_val:
      lab = random_label(rng, h, w, rng.choice(np.arange(1, 21), size=2, replace=False))
      sbd_labels[i] = lab
      os.makedirs(os.path.join(sbd, "cls"), exist_ok=True)
      scipy.io.savemat(os.path.join(sbd, "cls", f"{i}.mat"), {
          "GTcls": {"Segmentation": lab, "Boundaries": np.zeros((1,), object),
                    "CategoriesPresent": np.unique(lab[lab > 0]).astype(np.uint8)}})
      sbd_instances[i] = instances_of(lab)
      os.makedirs(os.path.join(sbd, "inst"), exist_ok=True)
      scipy.io.savemat(os.path.join(sbd, "inst", f"{i}.mat"), {
          "GTinst": {"Segmentation": sbd_instances[i], "Boundaries": np.zeros((1,), object),
                     "Categories": np.zeros((1,), np.uint8)}})
  _write_list(os.path.join(voc, "ImageSets", "Segmentation", "train.txt"), voc_train)
  _write_list(os.path.join(voc, "ImageSets", "Segmentation", "val.txt"), voc_val)
  _write_list(os.path.join(sbd, "train.txt"), sbd_train)
  _write_list(os.path.join(sbd, "val.txt"), sbd_val)
  out = {"voc_root": voc, "sbd_root": sbd, "voc_labels": voc_labels, "sbd_labels": sbd_labels,
         "voc_instances": voc_instances, "sbd_instances": sbd_instances,
         "voc_train": voc_train, "voc_val": voc_val, "sbd_train": sbd_train,
         "sbd_val": sbd_val}
  if with_aug:
    aug = os.path.join(root, "SegmentationClassAug")
    aug_labels = {}
    for i in all_ids:
      lab = sbd_labels.get(i, voc_labels.get(i))
      aug_labels[i] = lab
      write_png(os.path.join(aug, f"{i}.png"), lab)  # grayscale ids, as in the Aug release
    out["aug_root"] = aug
    out["aug_labels"] = aug_labels
  return out


def instances_of(label: np.ndarray) -> np.ndarray:
  """uint8 instance map of a class map: the 8-connected components of each class (ascending),
  numbered 1, 2, ... (cv2's component order within a class), 255 where the label is 255."""
  inst = np.zeros(label.shape, np.uint8)
  n = 0
  for c in np.unique(label):
    if c in (0, 255):
      continue
    count, comp = cv2.connectedComponents((label == c).astype(np.uint8), connectivity=8)
    for k in range(1, count):
      n += 1
      inst[comp == k] = n
  inst[label == 255] = 255
  return inst


# ----------------------------------------------------------------------------- COCO


def rle_counts(mask: np.ndarray) -> list[int]:
  """Uncompressed COCO RLE: alternating run lengths (zeros first) in column-major order."""
  flat = np.asarray(mask, np.uint8).ravel(order="F")
  counts, current, run = [], 0, 0
  for v in flat:
    if v != current:
      counts.append(run)
      current, run = v, 0
    run += 1
  counts.append(run)
  return counts


def rle_string(counts) -> str:
  """COCO's compressed RLE string (pycocotools rleToString), written from the format spec:
  counts after the second are delta-coded against the count two back; each value is emitted
  as 5-bit groups, low first, +48, bit 0x20 = more groups follow, bit 0x10 of the last = sign."""
  out = []
  for i, c in enumerate(counts):
    x = int(c) - (int(counts[i - 2]) if i > 2 else 0)
    while True:
      group = x & 0x1F
      x >>= 5
      more = (x != -1) if (group & 0x10) else (x != 0)
      out.append(chr(48 + (group | (0x20 if more else 0))))
      if not more:
        break
  return "".join(out)


def make_coco(root, rng, *, category_ids=None):
  """COCO-2014-like layout: annotations/instances_{train,val}2014.json + images.

  Uses all 80 real category ids. Images:
    train: t0 (two polygons, overlap: big class A box with small class B box inside it),
           t1 (uncompressed RLE of class C + crowd RLE of class A),
           t2 (compressed RLE string of class D), t3 (no annotation)
    val:   e0 (polygon with two parts of class E)
  Returns dict with paths and expected label maps (contiguous ids).
  """
  from fss_jax.data import folds  # pylint: disable=g-import-not-at-top
  cat_ids = list(folds.COCO_CATEGORY_IDS) if category_ids is None else list(category_ids)
  categories = [{"id": c, "name": n, "supercategory": "x"}
                for c, n in zip(cat_ids, folds.COCO_CLASSES)]
  contiguous = {c: k + 1 for k, c in enumerate(cat_ids)}
  h, w = 24, 32
  expected = {}
  ann_id = [0]

  def ann(image_id, cat, seg, iscrowd=0, area=None):
    ann_id[0] += 1
    return {"id": ann_id[0], "image_id": image_id, "category_id": cat, "segmentation": seg,
            "iscrowd": iscrowd, "area": area or 0.0, "bbox": [0, 0, 1, 1]}

  def rect_poly(x0, y0, x1, y1):
    return [float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0),
            float(y1)]

  a, b, c, d, e = cat_ids[0], cat_ids[12], cat_ids[40], cat_ids[79], cat_ids[44]
  # t0: small box B listed first, big box A second -> larger-first painting keeps B visible.
  lab = np.zeros((h, w), np.uint8)
  lab[2:20, 3:30] = contiguous[a]
  lab[5:9, 6:12] = contiguous[b]
  expected["t0"] = lab
  t0 = [ann(1, b, [rect_poly(6, 5, 12, 9)]), ann(1, a, [rect_poly(3, 2, 30, 20)])]
  # t1: uncompressed RLE of class C, crowd region of class A overlapping it.
  mc = np.zeros((h, w), np.uint8)
  mc[rng.random((h, w)) < 0.3] = 1
  crowd = np.zeros((h, w), np.uint8)
  crowd[10:, 20:] = 1
  lab = np.where(crowd == 1, 255, 0).astype(np.uint8)
  lab[mc == 1] = contiguous[c]  # instances painted over the crowd ignore region
  expected["t1"] = lab
  t1 = [ann(2, a, {"counts": rle_counts(crowd), "size": [h, w]}, iscrowd=1),
        ann(2, c, {"counts": rle_counts(mc), "size": [h, w]})]
  # t2: compressed RLE string.
  md = np.zeros((h, w), np.uint8)
  md[rng.random((h, w)) < 0.5] = 1
  expected["t2"] = np.where(md == 1, contiguous[d], 0).astype(np.uint8)
  t2 = [ann(3, d, {"counts": rle_string(rle_counts(md)), "size": [h, w]})]
  expected["t3"] = np.zeros((h, w), np.uint8)
  # e0: one annotation, two polygon parts.
  lab = np.zeros((h, w), np.uint8)
  lab[1:4, 1:5] = contiguous[e]
  lab[10:20, 15:25] = contiguous[e]
  expected["e0"] = lab
  e0 = [ann(10, e, [rect_poly(1, 1, 5, 4), rect_poly(15, 10, 25, 20)])]

  names = {1: "t0", 2: "t1", 3: "t2", 4: "t3", 10: "e0"}
  paths = {}
  for split, image_ids, anns in (("train", [1, 2, 3, 4], t0 + t1 + t2), ("val", [10], e0)):
    images = []
    for iid in image_ids:
      fname = f"COCO_{split}2014_{iid:012d}.jpg"
      write_jpeg(os.path.join(root, f"{split}2014", fname), random_image(rng, h, w))
      images.append({"id": iid, "file_name": fname, "height": h, "width": w})
    path = os.path.join(root, "annotations", f"instances_{split}2014.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      json.dump({"images": images, "annotations": anns, "categories": categories}, f)
    paths[split] = path
  return {"root": root, "expected": expected, "names": names, "ann_paths": paths,
          "masks": {"t1_c": mc, "t1_crowd": crowd, "t2_d": md}}


# ----------------------------------------------------------------------------- FSS-1000


def make_fss1000(root, rng, class_names, per_class=3, size=(16, 16)):
  """FSS-1000 layout: <root>/<class>/<n>.jpg + <n>.png (binary mask, 0/255, 3 channels)."""
  masks = {}
  for name in class_names:
    for n in range(1, per_class + 1):
      write_jpeg(os.path.join(root, name, f"{n}.jpg"), random_image(rng, *size))
      mask = (rng.random(size) < 0.4).astype(np.uint8) * 255
      write_png(os.path.join(root, name, f"{n}.png"), np.stack([mask] * 3, -1))
      masks[(name, str(n))] = mask > 127
  return masks


# ----------------------------------------------------------------------------- plain folder


def make_folder(root, rng, num_images=8, num_classes=4, binary=False, classes_txt=True):
  """<root>/images/<stem>.jpg + <root>/masks/<stem>.png (+ classes.txt)."""
  labels = {}
  for k in range(num_images):
    stem = f"img{k:03d}"
    h, w = 18 + k, 20
    write_jpeg(os.path.join(root, "images", f"{stem}.jpg"), random_image(rng, h, w))
    if binary:
      lab = (rng.random((h, w)) < 0.3).astype(np.uint8)
      write_png(os.path.join(root, "masks", f"{stem}.png"), lab * 255)
    else:
      ids = rng.choice(np.arange(1, num_classes + 1), size=2, replace=False)
      lab = random_label(rng, h, w, ids)
      write_png(os.path.join(root, "masks", f"{stem}.png"), lab)
    labels[stem] = lab
  if classes_txt and not binary:
    with open(os.path.join(root, "classes.txt"), "w") as f:
      f.write("".join(f"class_{c}\n" for c in range(1, num_classes + 1)))
  return labels


# ----------------------------------------------------------------------------- episodes


def episode_masks(rng, b: int, k: int, size: int, empty=(), tiny=(),
                  tiny_radius: float = 0.02) -> np.ndarray:
  """Support labels (B,K,S,S) int64 in {0,1,255}: an ellipse of 1s per shot and a 3-row ignore
  border. (episode, shot) pairs in ``empty`` get no foreground, those in ``tiny`` a disc of
  radius tiny_radius·S (too small for ASGNet's clustering: its masked-average fallback)."""
  yy, xx = np.mgrid[:size, :size]
  labels = np.zeros((b, k, size, size), np.int64)
  for i in range(b):
    for j in range(k):
      cy, cx = rng.uniform(0.3, 0.7, 2) * size
      ry, rx = rng.uniform(0.15, 0.35, 2) * size
      if (i, j) in tiny:
        ry = rx = tiny_radius * size
      if (i, j) not in empty:
        labels[i, j][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
      labels[i, j, :3] = 255
  return labels


def tiny_config(data_dir: str, **train):
  """``configs/tiny_asgnet.py`` on ``data_dir`` with ``config.train`` overrides (trainer tests)."""
  from fss_jax import configs_lib  # pylint: disable=g-import-not-at-top
  config = configs_lib.load_config("configs/tiny_asgnet.py")
  config.data.data_dir = data_dir
  for k, v in train.items():
    config.train[k] = v
  return config
