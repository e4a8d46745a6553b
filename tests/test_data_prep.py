"""data_prep converters on tiny generated raw datasets (tests/datagen.py)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import datagen
from data_prep import coco20i
from data_prep import folder
from data_prep import fss1000
from data_prep import pascal5i
from fss_jax.data import folds
from fss_jax.data import schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(manifest, split):
  """id -> decoded example (label decoded) of a converted split."""
  out = {}
  source = manifest.source(split)
  for i, meta in enumerate(manifest.images(split)):
    ex = schema.decode_example(source[i])
    assert ex["id"] == meta["id"]
    ex["label"] = schema.decode_label(ex["label_png"])
    assert (meta["height"], meta["width"]) == ex["label"].shape
    out[ex["id"]] = ex
  return out


def _check_counts(manifest, split, records):
  """Stored class pixel counts equal a direct numpy count on the stored label."""
  for meta in manifest.images(split):
    label = records[meta["id"]]["label"]
    want = {str(c): int(np.sum(label == c)) for c in np.unique(label) if c not in (0, 255)}
    assert meta["classes"] == want, meta["id"]
    assert records[meta["id"]]["class_pixels"] == {int(c): n for c, n in want.items()}


# ----------------------------------------------------------------------------- PASCAL


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
  root = tmp_path_factory.mktemp("voc")
  return datagen.make_voc_sbd(str(root), np.random.default_rng(0), with_aug=True)


def test_pascal_sbd_lists_labels_folds(voc, tmp_path):
  m = pascal5i.main(["--voc_root", voc["voc_root"], "--sbd_root", voc["sbd_root"],
                     "--out_dir", str(tmp_path), "--train_shards", "3", "--no_progress"])
  m = schema.load_manifest(tmp_path)
  want_train = sorted((set(voc["voc_train"]) | set(voc["sbd_train"]) | set(voc["sbd_val"]))
                      - set(voc["voc_val"]))
  train_ids = [im["id"] for im in m.images("train")]
  assert train_ids == want_train
  assert not set(train_ids) & set(voc["voc_val"])  # w0 (SBD train), w1 (SBD val) removed
  assert [im["id"] for im in m.images("val")] == voc["voc_val"]
  assert m.scheme == "pascal5i" and m.novel_folds == [folds.pascal5i_novel(f) for f in range(4)]
  assert m.classes == list(folds.PASCAL_CLASSES)
  train, val = _records(m, "train"), _records(m, "val")
  for i, ex in train.items():
    want = voc["sbd_labels"][i] if i in voc["sbd_labels"] else voc["voc_labels"][i]
    np.testing.assert_array_equal(ex["label"], want, err_msg=i)
  assert not np.array_equal(voc["sbd_labels"]["b0"], voc["voc_labels"]["b0"])
  for i, ex in val.items():
    np.testing.assert_array_equal(ex["label"], voc["voc_labels"][i], err_msg=i)
    assert (ex["label"] == 255).any()  # VOC borders kept
  with open(os.path.join(voc["voc_root"], "JPEGImages", "s0.jpg"), "rb") as f:
    assert train["s0"]["image_bytes"] == f.read()
  _check_counts(m, "train", train)
  _check_counts(m, "val", val)
  assert m.extra["train_label_files"] == {"sbd_mat": 5, "png": 4}


def test_pascal_prefer_voc_and_train_list(voc, tmp_path):
  lst = tmp_path / "list.txt"
  lst.write_text("JPEGImages/b0.jpg SegmentationClassAug/b0.png\n"
                 "JPEGImages/w2.jpg SegmentationClassAug/w2.png\ns1\n")
  m = pascal5i.convert(voc_root=voc["voc_root"], sbd_root=voc["sbd_root"],
                       out_dir=str(tmp_path / "out"), train_list=str(lst),
                       prefer_voc_labels=True, progress=False)
  assert [im["id"] for im in m.images("train")] == ["b0", "s1"]  # VOC val w2 dropped
  train = _records(m, "train")
  np.testing.assert_array_equal(train["b0"]["label"], voc["voc_labels"]["b0"])
  np.testing.assert_array_equal(train["s1"]["label"], voc["sbd_labels"]["s1"])


def test_pascal_aug_root(voc, tmp_path):
  m = pascal5i.convert(voc_root=voc["voc_root"], aug_root=voc["aug_root"],
                       out_dir=str(tmp_path), progress=False)
  train = _records(m, "train")
  assert sorted(train) == sorted(set(voc["aug_labels"]) - set(voc["voc_val"]))
  for i, ex in train.items():
    np.testing.assert_array_equal(ex["label"], voc["aug_labels"][i])
  np.testing.assert_array_equal(_records(m, "val")["w0"]["label"], voc["voc_labels"]["w0"])


def test_pascal_missing_inputs_named(voc, tmp_path):
  with pytest.raises(FileNotFoundError, match="VOC2012 root folder not found: .*nowhere"):
    pascal5i.convert(voc_root=str(tmp_path / "nowhere"), sbd_root=voc["sbd_root"],
                     out_dir=str(tmp_path / "o"), progress=False)
  sbd = tmp_path / "sbd"
  os.makedirs(sbd / "cls")
  for f in ("train.txt", "val.txt"):
    (sbd / f).write_text(open(os.path.join(voc["sbd_root"], f)).read())
  with pytest.raises(FileNotFoundError, match=r"train label files missing.*s0\.mat"):
    pascal5i.convert(voc_root=voc["voc_root"], sbd_root=str(sbd), out_dir=str(tmp_path / "o"),
                     progress=False)
  with pytest.raises(FileNotFoundError, match="list file not found: .*val.txt"):
    os.remove(sbd / "val.txt")
    pascal5i.convert(voc_root=voc["voc_root"], sbd_root=str(sbd), out_dir=str(tmp_path / "o"),
                     progress=False)


def test_pascal_size_mismatch_named(voc, tmp_path):
  import shutil
  root = tmp_path / "VOC2012"
  shutil.copytree(voc["voc_root"], root)
  datagen.write_jpeg(str(root / "JPEGImages" / "w2.jpg"), np.zeros((5, 5, 3), np.uint8))
  with pytest.raises(ValueError, match=r"'w2'.*5x5"):
    pascal5i.convert(voc_root=str(root), sbd_root=voc["sbd_root"], out_dir=str(tmp_path / "o"),
                     progress=False)
  assert not os.path.exists(tmp_path / "o" / "manifest.json")


def _extras(manifest, split):
  """id -> {"instance": array or None, "scribble": array or None} of a converted split."""
  out = {}
  reader = manifest.source(split).reader
  for i, meta in enumerate(manifest.images(split)):
    ex, _, label = schema.read_record(reader, i)
    out[ex["id"]] = schema.read_extras(reader, i, ex, label.shape)
  return out


def test_pascal_instances_follow_the_label_source(voc, tmp_path):
  m = pascal5i.main(["--voc_root", voc["voc_root"], "--sbd_root", voc["sbd_root"],
                     "--out_dir", str(tmp_path / "a"), "--instances", "--no_progress"])
  m = schema.load_manifest(tmp_path / "a")
  n_train, n_val = len(m.images("train")), len(m.images("val"))
  assert m.optional_features == {"instance": {"train": n_train, "val": n_val}}
  assert m.records_with("instance", "train") == [True] * n_train
  assert "SegmentationObject" in m.extra["instances"]
  train, val = _extras(m, "train"), _extras(m, "val")
  for i, ex in train.items():  # SBD's instance map where SBD gave the label, VOC's otherwise
    want = voc["sbd_instances"][i] if i in voc["sbd_labels"] else voc["voc_instances"][i]
    np.testing.assert_array_equal(ex["instance"], want, err_msg=i)
    assert ex["scribble"] is None
  assert not np.array_equal(train["b0"]["instance"], voc["voc_instances"]["b0"])
  for i, ex in val.items():
    np.testing.assert_array_equal(ex["instance"], voc["voc_instances"][i], err_msg=i)
    assert (ex["instance"] == 255).any()  # VOC's borders kept
  m = pascal5i.convert(voc_root=voc["voc_root"], sbd_root=voc["sbd_root"],
                       out_dir=str(tmp_path / "b"), instances=True, prefer_voc_labels=True,
                       progress=False)
  np.testing.assert_array_equal(_extras(m, "train")["b0"]["instance"],
                                voc["voc_instances"]["b0"])
  # The labels are those of a conversion without instance maps.
  plain = pascal5i.convert(voc_root=voc["voc_root"], sbd_root=voc["sbd_root"],
                           out_dir=str(tmp_path / "c"), progress=False)
  assert plain.optional_features == {} and "instances" not in plain.extra
  assert [im["classes"] for im in plain.images("train")] == [
      im["classes"] for im in schema.load_manifest(tmp_path / "a").images("train")]


def test_pascal_inst_root_and_scribble_dir(voc, tmp_path):
  inst_root, scr_dir = tmp_path / "SegmentationObjectAug", tmp_path / "ScribbleAugAuto"
  want_inst, want_scr = {}, {}
  for k, (i, lab) in enumerate(sorted(voc["aug_labels"].items())):
    inst = datagen.instances_of(lab)
    want_inst[i] = inst
    if k % 2:  # palette PNGs (as PANet's SegmentationObjectAug) and grayscale ones
      datagen._write(str(inst_root / f"{i}.png"), datagen.palette_png_bytes(inst))
    else:
      datagen.write_png(str(inst_root / f"{i}.png"), inst)
    if k % 3 != 2:  # some images have no scribble file
      scr = np.full(lab.shape, 255, np.uint8)
      scr[0, :3] = 0
      scr[lab == lab.max()] = 1
      want_scr[i] = scr
      datagen._write(str(scr_dir / f"{i}.png"), datagen.palette_png_bytes(scr))
  with pytest.raises(ValueError, match="need --inst_root"):
    pascal5i.convert(voc_root=voc["voc_root"], aug_root=voc["aug_root"], instances=True,
                     out_dir=str(tmp_path / "o"), progress=False)
  m = pascal5i.main(["--voc_root", voc["voc_root"], "--aug_root", voc["aug_root"],
                     "--inst_root", str(inst_root), "--scribble_dir", str(scr_dir),
                     "--out_dir", str(tmp_path / "o"), "--no_progress"])
  m = schema.load_manifest(tmp_path / "o")
  for split in ("train", "val"):
    got = _extras(m, split)
    for i, ex in got.items():
      np.testing.assert_array_equal(ex["instance"], want_inst[i], err_msg=i)
      if i in want_scr:
        np.testing.assert_array_equal(ex["scribble"], want_scr[i], err_msg=i)
      else:
        assert ex["scribble"] is None, i
    n = sum(i in want_scr for i in got)
    assert 0 < n < len(got)
    assert m.optional_features["scribble"][split] == n == m.extra["scribbles"][split]
    assert m.records_with("scribble", split) == [im["id"] in want_scr
                                                 for im in m.images(split)]
  assert m.extra["instances"] == str(inst_root)


def test_pascal_optional_map_errors_named(voc, tmp_path):
  import shutil
  root = tmp_path / "VOC2012"
  shutil.copytree(voc["voc_root"], root)
  os.remove(root / "SegmentationObject" / "v1.png")
  with pytest.raises(FileNotFoundError, match=r"train instance files missing.*v1\.png"):
    pascal5i.convert(voc_root=str(root), sbd_root=voc["sbd_root"], instances=True,
                     out_dir=str(tmp_path / "o"), progress=False)
  scr = tmp_path / "scr"
  os.makedirs(scr)
  (scr / "unrelated.png").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="holds no <id>.png"):
    pascal5i.convert(voc_root=voc["voc_root"], sbd_root=voc["sbd_root"],
                     scribble_dir=str(scr), out_dir=str(tmp_path / "o"), progress=False)
  datagen.write_png(str(scr / "w2.png"), np.zeros((4, 4), np.uint8))
  with pytest.raises(ValueError, match=r"'w2'.*scribble map is 4x4"):
    pascal5i.convert(voc_root=voc["voc_root"], sbd_root=voc["sbd_root"],
                     scribble_dir=str(scr), out_dir=str(tmp_path / "o"), progress=False)
  h, w = voc["voc_labels"]["w2"].shape
  datagen.write_png(str(scr / "w2.png"), np.dstack([np.zeros((h, w), np.uint8),
                                                   np.ones((h, w), np.uint8),
                                                   np.zeros((h, w), np.uint8)]))
  with pytest.raises(ValueError, match=r"w2\.png: colour label image"):
    pascal5i.convert(voc_root=voc["voc_root"], sbd_root=voc["sbd_root"],
                     scribble_dir=str(scr), out_dir=str(tmp_path / "o"), progress=False)
  assert not os.path.exists(tmp_path / "o" / "manifest.json")


# ----------------------------------------------------------------------------- COCO


def _numpy_rle_decode(counts, h, w):
  """Direct transcription: runs alternate 0, 1, 0, ...; pixels in column-major order."""
  flat = np.zeros(h * w, np.uint8)
  pos = 0
  for k, c in enumerate(counts):
    if k % 2:
      flat[pos:pos + c] = 1
    pos += c
  assert pos == h * w
  return flat.reshape((h, w), order="F").astype(bool)


def test_rle_decode_against_numpy():
  rng = np.random.default_rng(0)
  for h, w, p in [(7, 5, 0.5), (16, 9, 0.05), (4, 4, 1.0), (3, 6, 0.0)]:
    mask = rng.random((h, w)) < p
    counts = datagen.rle_counts(mask)
    want = _numpy_rle_decode(counts, h, w)
    np.testing.assert_array_equal(want, mask)
    np.testing.assert_array_equal(coco20i.rle_decode(counts, h, w), want)
    string = datagen.rle_string(counts)
    assert coco20i.rle_string_to_counts(string) == counts
    np.testing.assert_array_equal(coco20i.rle_decode(string, h, w), want)
  with pytest.raises(ValueError, match="covers 5 pixels"):
    coco20i.rle_decode([2, 3], 2, 3)


def test_rle_string_hand_computed():
  # [0, 40, 10, 50]: 0 -> '0'; 40 = 8 + 1*32 -> chr(48+8+32)='X', chr(48+1)='1'; 10 -> ':';
  # 50 is coded as 50 - 40 = 10 -> ':'.
  assert coco20i.rle_string_to_counts("0X1::") == [0, 40, 10, 50]
  # [5, 10, 3, 2]: the last is 2 - 10 = -8 = 0b11000 with sign bit -> chr(48+24)='H'.
  assert coco20i.rle_string_to_counts("5:3H") == [5, 10, 3, 2]
  assert datagen.rle_string([0, 40, 10, 50]) == "0X1::"
  assert datagen.rle_string([5, 10, 3, 2]) == "5:3H"


def _point_in_polygon_oracle(xy, h, w):
  """Brute force: each pixel centre, crossing-number test with a ray to the right."""
  out = np.zeros((h, w), bool)
  n = len(xy)
  for r in range(h):
    for c in range(w):
      px, py = c + 0.5, r + 0.5
      inside = False
      for k in range(n):
        (ax, ay), (bx, by) = xy[k], xy[(k + 1) % n]
        if (ay <= py) != (by <= py):
          x = ax + (py - ay) * (bx - ax) / (by - ay)
          if x > px - 1e-12 or abs(x - px) < 1e-12:
            inside = not inside
      out[r, c] = inside
  return out


def test_polygon_mask():
  m = coco20i.polygon_mask([[3, 2, 30, 2, 30, 20, 3, 20]], 24, 32)
  want = np.zeros((24, 32), bool)
  want[2:20, 3:30] = True
  np.testing.assert_array_equal(m, want)
  rng = np.random.default_rng(1)
  for _ in range(5):
    # Star-shaped random polygons, partly outside the image.
    k = int(rng.integers(3, 9))
    ang = np.sort(rng.uniform(0, 2 * np.pi, k))
    rad = rng.uniform(2, 12, k)
    xy = np.stack([10 + rad * np.cos(ang), 8 + rad * np.sin(ang)], 1)
    got = coco20i.polygon_mask([xy.ravel().tolist()], 16, 20)
    np.testing.assert_array_equal(got, _point_in_polygon_oracle(xy, 16, 20))
  # Two parts of one annotation are united, not XOR-ed.
  m = coco20i.polygon_mask([[0, 0, 4, 0, 4, 4, 0, 4], [2, 2, 6, 2, 6, 6, 2, 6]], 8, 8)
  assert m.sum() == 16 + 16 - 4


@pytest.mark.parametrize("scheme", ["contiguous", "interleaved"])
def test_coco_conversion(tmp_path, scheme):
  data = datagen.make_coco(str(tmp_path / "coco"), np.random.default_rng(2))
  m = coco20i.main(["--coco_root", data["root"], "--out_dir", str(tmp_path / "out"),
                    "--fold_scheme", scheme, "--no_progress"])
  m = schema.load_manifest(tmp_path / "out")
  assert m.classes == list(folds.COCO_CLASSES)
  interleaved = scheme == "interleaved"
  assert m.scheme == ("coco20i_interleaved" if interleaved else "coco20i")
  assert m.novel_folds == [folds.coco20i_novel(f, interleaved) for f in range(4)]
  assert [im["id"] for im in m.images("train")] == ["1", "2", "3", "4"]
  assert [im["id"] for im in m.images("val")] == ["10"]
  recs = {**_records(m, "train"), **_records(m, "val")}
  for image_id, name in data["names"].items():
    np.testing.assert_array_equal(recs[str(image_id)]["label"], data["expected"][name],
                                  err_msg=name)
  # Crowd region -> 255 where no instance covers it; smaller box B survives on top of A.
  t1 = recs["2"]["label"]
  crowd_only = (data["masks"]["t1_crowd"] == 1) & (data["masks"]["t1_c"] == 0)
  assert crowd_only.any() and (t1[crowd_only] == 255).all()
  assert (recs["1"]["label"][5:9, 6:12] == 13).all()  # category id 14 -> class 13
  assert "1" not in m.images("train")[1]["classes"]  # the crowd's class is not counted
  _check_counts(m, "train", recs)


def test_coco_errors_named(tmp_path):
  data = datagen.make_coco(str(tmp_path / "coco"), np.random.default_rng(3))
  os.remove(os.path.join(data["root"], "val2014", "COCO_val2014_000000000010.jpg"))
  with pytest.raises(FileNotFoundError, match="COCO_val2014_000000000010.jpg"):
    coco20i.convert(coco_root=data["root"], out_dir=str(tmp_path / "o"), progress=False)
  path = data["ann_paths"]["train"]
  with open(path) as f:
    ann = json.load(f)
  ann["annotations"][2]["segmentation"]["size"] = [5, 5]
  with open(path, "w") as f:
    json.dump(ann, f)
  datagen.write_jpeg(os.path.join(data["root"], "val2014", "COCO_val2014_000000000010.jpg"),
                     np.zeros((24, 32, 3), np.uint8))
  with pytest.raises(ValueError, match=r"image 2 annotation 3: RLE size \[5, 5\]"):
    coco20i.convert(coco_root=data["root"], out_dir=str(tmp_path / "o"), progress=False)
  with pytest.raises(FileNotFoundError, match="instances_train2014.json"):
    coco20i.convert(coco_root=str(tmp_path), out_dir=str(tmp_path / "o"), progress=False)


# ----------------------------------------------------------------------------- FSS-1000


def test_fss1000_builtin_split(tmp_path):
  names = [f"cls{k:02d}" for k in range(10)]
  masks = datagen.make_fss1000(str(tmp_path / "fss"), np.random.default_rng(4), names)
  m = fss1000.main(["--root", str(tmp_path / "fss"), "--out_dir", str(tmp_path / "out"),
                    "--no_progress"])
  m = schema.load_manifest(tmp_path / "out")
  split = m.extra["split_classes"]
  assert [len(split[s]) for s in ("train", "val", "test")] == [5, 2, 3]
  assert sorted(sum(split.values(), [])) == names
  assert split == fss1000.builtin_split(names, 0)  # deterministic
  assert m.classes == names and m.scheme == "fss1000"
  assert m.novel_folds == [[names.index(c) + 1 for c in split["test"]]]
  for s in ("train", "val", "test"):
    recs = _records(m, s)
    assert sorted(recs) == sorted(f"{c}/{n}" for c in split[s] for n in (1, 2, 3))
    for image_id, ex in recs.items():
      cls, stem = image_id.split("/")
      want = np.where(masks[(cls, stem)], names.index(cls) + 1, 0)
      np.testing.assert_array_equal(ex["label"], want)
    _check_counts(m, s, recs)


def test_fss1000_split_files(tmp_path):
  names = ["a", "b", "c", "d"]
  datagen.make_fss1000(str(tmp_path / "fss"), np.random.default_rng(5), names, per_class=1)
  (tmp_path / "split.json").write_text(json.dumps(
      {"trn": ["a", "b"], "val": ["c"], "test": ["d"]}))
  m = fss1000.convert(root=str(tmp_path / "fss"), out_dir=str(tmp_path / "o1"),
                      split_file=str(tmp_path / "split.json"), progress=False)
  assert [im["id"] for im in m.images("test")] == ["d/1"] and m.novel_folds == [[4]]
  lists = tmp_path / "lists"
  lists.mkdir()
  for f, c in (("trn.txt", "a\nc\n"), ("val.txt", "b\n"), ("test.txt", "d\n")):
    (lists / f).write_text(c)
  m = fss1000.convert(root=str(tmp_path / "fss"), out_dir=str(tmp_path / "o2"),
                      split_file=str(lists), progress=False)
  assert [im["id"] for im in m.images("train")] == ["a/1", "c/1"]
  (lists / "test.txt").write_text("d\nzebra\n")
  with pytest.raises(FileNotFoundError, match="zebra"):
    fss1000.convert(root=str(tmp_path / "fss"), out_dir=str(tmp_path / "o3"),
                    split_file=str(lists), progress=False)
  os.remove(tmp_path / "fss" / "b" / "1.png")
  with pytest.raises(FileNotFoundError, match=r"fss.b: images without masks \['1'\]"):
    fss1000.convert(root=str(tmp_path / "fss"), out_dir=str(tmp_path / "o4"), progress=False)


def test_fss1000_many_classes_use_16bit_labels_and_skip_255(tmp_path):
  names = [f"c{k:03d}" for k in range(256)]
  masks = datagen.make_fss1000(str(tmp_path / "fss"), np.random.default_rng(6), names,
                               per_class=1, size=(4, 4))
  split = {"train": names[:250], "val": names[250:253], "test": names[253:]}
  (tmp_path / "s.json").write_text(json.dumps(split))
  m = fss1000.convert(root=str(tmp_path / "fss"), out_dir=str(tmp_path / "o"),
                      split_file=str(tmp_path / "s.json"), progress=False)
  assert len(m.classes) == 257 and m.classes[254] == fss1000.IGNORE_PLACEHOLDER
  assert m.classes[253] == "c253" and m.classes[255] == "c254"
  assert m.novel_folds == [[254, 256, 257]]
  recs = _records(m, "test")
  assert recs["c255/1"]["label"].dtype == np.uint16
  np.testing.assert_array_equal(recs["c255/1"]["label"],
                                np.where(masks[("c255", "1")], 257, 0))
  assert all("255" not in im["classes"] for s in m.splits for im in m.images(s))


# ----------------------------------------------------------------------------- folder


def test_folder_ids_with_classes_txt(tmp_path):
  labels = datagen.make_folder(str(tmp_path / "d"), np.random.default_rng(7), num_images=10,
                               num_classes=5)
  m = folder.main(["--root", str(tmp_path / "d"), "--out_dir", str(tmp_path / "o"),
                   "--val_fraction", "0.3", "--num_folds", "2", "--no_progress"])
  m = schema.load_manifest(tmp_path / "o")
  assert m.classes == [f"class_{c}" for c in range(1, 6)]
  assert m.novel_folds == [[1, 2, 3], [4, 5]] and m.scheme == "custom"
  train, val = [im["id"] for im in m.images("train")], [im["id"] for im in m.images("val")]
  assert len(val) == 3 and sorted(train + val) == sorted(labels)
  assert train == sorted(train) and val == sorted(val)
  assert (train, val) == folder.split_stems(list(labels), 0.3, 0)
  for s in ("train", "val"):
    recs = _records(m, s)
    for stem, ex in recs.items():
      np.testing.assert_array_equal(ex["label"], labels[stem])
    _check_counts(m, s, recs)


def test_folder_binary_inferred_and_workers(tmp_path):
  labels = datagen.make_folder(str(tmp_path / "b"), np.random.default_rng(8), num_images=4,
                               binary=True)
  m = folder.convert(root=str(tmp_path / "b"), out_dir=str(tmp_path / "ob"),
                     mask_mode="binary", val_fraction=0.0, progress=False, workers=2)
  assert m.classes == ["foreground"] and m.novel_folds == [[1]]
  recs = _records(m, "train")
  assert list(recs) == sorted(labels)  # pool keeps order
  for stem, ex in recs.items():
    np.testing.assert_array_equal(ex["label"], labels[stem])
  # No classes.txt: C = largest id; a .bmp image is re-encoded as PNG.
  labels = datagen.make_folder(str(tmp_path / "n"), np.random.default_rng(9), num_images=3,
                               num_classes=6, classes_txt=False)
  import cv2
  img = cv2.imread(str(tmp_path / "n" / "images" / "img000.jpg"))
  os.remove(tmp_path / "n" / "images" / "img000.jpg")
  cv2.imwrite(str(tmp_path / "n" / "images" / "img000.bmp"), img)
  m = folder.convert(root=str(tmp_path / "n"), out_dir=str(tmp_path / "on"), val_fraction=0.0,
                     num_folds=1, progress=False)
  top = max(int(labels[s][labels[s] != 255].max()) for s in labels)
  assert m.classes == [f"class_{c}" for c in range(1, top + 1)]
  rec = _records(m, "train")["img000"]
  assert rec["image_format"] == "png"
  np.testing.assert_array_equal(schema.decode_image(rec["image_bytes"])[..., ::-1], img)


def test_folder_errors_named(tmp_path):
  datagen.make_folder(str(tmp_path / "d"), np.random.default_rng(10), num_images=3)
  os.remove(tmp_path / "d" / "masks" / "img001.png")
  with pytest.raises(FileNotFoundError, match=r"images without masks.*img001\.jpg"):
    folder.convert(root=str(tmp_path / "d"), out_dir=str(tmp_path / "o"), progress=False)
  with pytest.raises(FileNotFoundError, match=r"folder not found: .*nothing.images"):
    os.makedirs(tmp_path / "nothing")
    folder.convert(root=str(tmp_path / "nothing"), out_dir=str(tmp_path / "o"), progress=False)


# ----------------------------------------------------------------------------- CLIs


def test_cli_entry_points(tmp_path):
  for mod in (pascal5i, coco20i, fss1000, folder):
    with pytest.raises(SystemExit) as exit_info:
      mod.main(["--help"])
    assert exit_info.value.code == 0
  env = dict(os.environ, PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, "-m", "data_prep.pascal5i", "--help"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0 and "--sbd_root" in out.stdout, out.stderr
  # Script form from another directory; a missing input folder is a one-line error.
  out = subprocess.run([sys.executable, os.path.join(REPO, "data_prep", "folder.py"),
                        "--root", str(tmp_path / "missing"), "--out_dir", str(tmp_path / "o")],
                       cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
  assert out.returncode == 1
  assert out.stderr.strip() == f"error: folder not found: {tmp_path / 'missing'}"
