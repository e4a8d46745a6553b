"""Example schema, label-image decoding, manifest loading and write_dataset."""
import json
import os

import cv2
import numpy as np
import pytest

import datagen
from fss_jax.data import folds
from fss_jax.data import schema
from fss_jax.data import tfrecord


def _items(n, rng, num_classes=5, fmt="jpeg"):
  items = []
  for k in range(n):
    h, w = 10 + k, 12 + 2 * k
    rgb = datagen.random_image(rng, h, w)
    ext = ".jpg" if fmt == "jpeg" else ".png"
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    label = datagen.random_label(rng, h, w, rng.choice(np.arange(1, num_classes + 1), 2),
                                 ignore_border=True)
    items.append({"image_bytes": buf.tobytes(), "image_format": fmt, "id": f"im{k}",
                  "label": label, "rgb": rgb})
  return items


def test_example_round_trip():
  rng = np.random.default_rng(0)
  label = datagen.random_label(rng, 9, 11, [3, 7], ignore_border=True)
  png = schema.encode_label_png(label)
  counts = schema.class_pixel_counts(label)
  record = schema.encode_example(image_bytes=b"\xff\xd8\xffjunk", image_format="jpeg",
                                 image_id="2008_000123", height=9, width=11, label_png=png,
                                 class_pixels=counts)
  ex = schema.decode_example(record)
  assert ex["image_bytes"] == b"\xff\xd8\xffjunk"
  assert ex["image_format"] == "jpeg" and ex["id"] == "2008_000123"
  assert (ex["height"], ex["width"]) == (9, 11)
  np.testing.assert_array_equal(schema.decode_label(ex["label_png"]), label)
  assert ex["class_pixels"] == {c: int((label == c).sum()) for c in (3, 7)
                                if (label == c).any()}


def test_example_is_a_tf_example_proto():
  # The record parses with the generic proto; keys and types as documented.
  from tensorflow_datasets.proto import tf_example_generated_pb2 as pb
  record = schema.encode_example(image_bytes=b"x", image_format="png", image_id="a",
                                 height=1, width=2, label_png=b"p",
                                 class_pixels={5: 3, 2: 1})
  feats = pb.Example.FromString(record).features.feature
  assert list(feats["label/classes"].int64_list.value) == [2, 5]
  assert list(feats["label/class_pixels"].int64_list.value) == [1, 3]
  assert feats["image/width"].int64_list.value[0] == 2


def test_decode_example_missing_feature_named():
  from tensorflow_datasets.proto import tf_example_generated_pb2 as pb
  record = pb.Example().SerializeToString()
  with pytest.raises(ValueError, match="label/classes"):
    schema.decode_example(record)


def test_class_pixel_counts_oracle():
  rng = np.random.default_rng(1)
  label = rng.choice(np.array([0, 1, 4, 20, 254, 255], np.uint8), size=(13, 17))
  want = {int(c): int((label == c).sum()) for c in (1, 4, 20, 254)}
  assert schema.class_pixel_counts(label) == want


def test_decode_image_rgb():
  rng = np.random.default_rng(2)
  rgb = datagen.random_image(rng, 7, 9)
  ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
  np.testing.assert_array_equal(schema.decode_image(buf.tobytes()), rgb)


@pytest.mark.parametrize("ext,params", [(".jpg", []), (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
                                        (".png", []), (".bmp", [])])
def test_image_size_from_header(ext, params):
  img = np.zeros((37, 53, 3), np.uint8)
  ok, buf = cv2.imencode(ext, img, params)
  assert schema.image_size(buf.tobytes()) == (37, 53)


def test_palette_png_indices_recovered():
  rng = np.random.default_rng(3)
  index = rng.integers(0, 21, (15, 19)).astype(np.uint8)
  index[0, :] = 255
  got = schema.decode_label_image(datagen.palette_png_bytes(index))
  np.testing.assert_array_equal(got, index)
  # A custom palette with duplicated black entries (index 0 wins for black pixels).
  pal = np.zeros((256, 3), np.uint8)
  pal[7] = (10, 20, 30)
  index = np.where(rng.random((5, 6)) < 0.5, 7, 0).astype(np.uint8)
  np.testing.assert_array_equal(
      schema.decode_label_image(datagen.palette_png_bytes(index, pal)), index)


def test_grayscale_and_equal_channel_labels():
  lab = np.arange(30, dtype=np.uint8).reshape(5, 6)
  ok, buf = cv2.imencode(".png", lab)
  np.testing.assert_array_equal(schema.decode_label_image(buf.tobytes()), lab)
  ok, buf = cv2.imencode(".png", np.stack([lab] * 3, -1))
  np.testing.assert_array_equal(schema.decode_label_image(buf.tobytes()), lab)
  rgb = np.stack([lab, lab, lab + 1], -1)
  ok, buf = cv2.imencode(".png", rgb)
  with pytest.raises(ValueError, match="mask.png"):
    schema.decode_label_image(buf.tobytes(), "mask.png")


@pytest.mark.parametrize("sized", [True, False])
def test_write_dataset_round_trip(tmp_path, sized):
  rng = np.random.default_rng(4)
  train, val = _items(7, rng), _items(3, rng, fmt="png")
  strip = lambda items: [{k: v for k, v in it.items() if k != "rgb"} for it in items]
  splits = {"train": strip(train), "val": strip(val)}
  if not sized:
    splits = {k: (x for x in v) for k, v in splits.items()}
  classes = [f"c{i}" for i in range(1, 6)]
  novel = [[1, 2], [3, 4, 5]]
  m = schema.write_dataset(tmp_path / "ds", name="toy", classes=classes, novel_folds=novel,
                           scheme="custom", splits=splits, num_shards={"train": 3},
                           progress=False, extra={"note": "x"})
  loaded = schema.load_manifest(tmp_path / "ds")
  assert loaded.to_json() == m.to_json()
  assert loaded.classes == classes and loaded.novel_folds == novel
  assert loaded.extra == {"note": "x"}
  files = loaded.split_files("train")
  assert [os.path.basename(f) for f in files] == [
      f"train-0000{k}-of-00003.tfrecord" for k in range(3)]
  assert [len(tfrecord.TFRecordReader([f])) for f in files] == [2, 2, 3]
  assert len(loaded.split_files("val")) == 1
  assert not [f for f in os.listdir(tmp_path / "ds") if ".tmp" in f]
  for split, items in (("train", train), ("val", val)):
    source = loaded.source(split)
    images = loaded.images(split)
    assert len(source) == len(items) == len(images)
    for i, item in enumerate(items):
      ex = schema.decode_example(source[i])
      assert ex["id"] == item["id"] == images[i]["id"]
      assert ex["image_bytes"] == item["image_bytes"]
      assert ex["image_format"] == item["image_format"]
      np.testing.assert_array_equal(schema.decode_label(ex["label_png"]), item["label"])
      want = {c: int((item["label"] == c).sum()) for c in range(1, 6)
              if (item["label"] == c).any()}
      assert ex["class_pixels"] == want
      assert images[i]["classes"] == {str(c): n for c, n in want.items()}
      assert loaded.class_pixels(split)[i] == want
      assert (images[i]["height"], images[i]["width"]) == item["label"].shape
      if item["image_format"] == "png":
        np.testing.assert_array_equal(schema.decode_image(ex["image_bytes"]), item["rgb"])


def test_write_dataset_more_shards_than_images_and_empty_split(tmp_path):
  rng = np.random.default_rng(5)
  items = [{k: v for k, v in it.items() if k != "rgb"} for it in _items(2, rng)]
  m = schema.write_dataset(tmp_path, name="t", classes=["a"] * 5, novel_folds=[[1]],
                           scheme="custom", splits={"train": items, "val": []}, num_shards=8,
                           progress=False)
  assert len(m.splits["train"]["files"]) == 2
  assert len(m.source("val")) == 0


def test_write_dataset_errors_name_image(tmp_path):
  rng = np.random.default_rng(6)
  item = {k: v for k, v in _items(1, rng)[0].items() if k != "rgb"}
  kw = dict(name="t", classes=["a", "b", "c", "d", "e"], novel_folds=[[1]], scheme="custom",
            progress=False)
  bad = dict(item, label=np.zeros((3, 3), np.uint8))
  with pytest.raises(ValueError, match=r"im0.*10x12.*3x3"):
    schema.write_dataset(tmp_path, splits={"train": [bad]}, **kw)
  bad = dict(item, label=np.full(item["label"].shape, 9, np.uint8))
  with pytest.raises(ValueError, match=r"im0.*\[9\]"):
    schema.write_dataset(tmp_path, splits={"train": [bad]}, **kw)
  with pytest.raises(ValueError, match="duplicate image id 'im0'"):
    schema.write_dataset(tmp_path, splits={"train": iter([item, item])}, **kw)
  assert os.listdir(tmp_path) == []  # nothing published, no temporaries left


def _assert_manifest_error(tmp_path, good, mutate, pattern):
  """A copy of manifest ``good`` changed by ``mutate`` fails to load with a ManifestError that
  names the file and matches ``pattern``."""
  path = tmp_path / "manifest.json"
  d = json.loads(json.dumps(good))
  mutate(d)
  path.write_text(json.dumps(d))
  with pytest.raises(schema.ManifestError) as err:
    schema.load_manifest(tmp_path)
  assert str(path) in str(err.value)
  assert __import__("re").search(pattern, str(err.value)), str(err.value)


def test_manifest_errors_name_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "manifest.json")):
    schema.load_manifest(tmp_path)
  path = tmp_path / "manifest.json"
  path.write_text("{not json")
  with pytest.raises(schema.ManifestError, match=str(path)):
    schema.load_manifest(tmp_path)
  good = {"name": "x", "version": 1, "classes": ["a", "b"],
          "folds": {"scheme": "custom", "novel": [[1]]},
          "splits": {"train": {"files": ["t.tfrecord"],
                               "images": [{"id": "i", "height": 1, "width": 1,
                                           "classes": {"2": 1}}]}}}
  path.write_text(json.dumps(good))
  m = schema.load_manifest(path)
  with pytest.raises(FileNotFoundError, match="t.tfrecord"):
    m.split_files("train")
  with pytest.raises(KeyError, match="'val'"):
    m.images("val")
  for mutate, pattern in [
      (lambda d: d.pop("splits"), "missing key 'splits'"),
      (lambda d: d["folds"].update(novel=[[3]]), r"folds.novel\[0\].*3"),
      (lambda d: d["folds"].update(scheme="nope"), "folds.scheme"),
      (lambda d: d.update(version=2), "version"),
      (lambda d: d["splits"]["train"]["images"][0].pop("height"), r"images\[0\]"),
      (lambda d: d["splits"]["train"]["images"][0]["classes"].update({"9": 1}), "'9'")]:
    _assert_manifest_error(tmp_path, good, mutate, pattern)


def test_source_count_mismatch(tmp_path):
  tfrecord.write_tfrecord(tmp_path / "t.tfrecord", [b"a", b"b"])
  (tmp_path / "manifest.json").write_text(json.dumps(
      {"name": "x", "version": 1, "classes": ["a"], "folds": {"scheme": "custom", "novel": []},
       "splits": {"train": {"files": ["t.tfrecord"], "images": []}}}))
  with pytest.raises(schema.ManifestError, match="0 images but its shards hold 2"):
    schema.load_manifest(tmp_path).source("train")


def test_folds():
  assert folds.pascal5i_novel(0) == [1, 2, 3, 4, 5]
  assert folds.pascal5i_novel(3) == [16, 17, 18, 19, 20]
  assert folds.coco20i_novel(1, interleaved=False) == list(range(21, 41))
  assert folds.coco20i_novel(0, interleaved=True) == [1 + 4 * k for k in range(20)]
  assert folds.coco20i_novel(3, interleaved=True)[-1] == 80
  for interleaved in (False, True):
    allc = sorted(c for f in range(4) for c in folds.coco20i_novel(f, interleaved))
    assert allc == list(range(1, 81))
  assert folds.base_classes(20, folds.pascal5i_novel(1)) == [
      1, 2, 3, 4, 5] + list(range(11, 21))
  assert len(folds.PASCAL_CLASSES) == 20 and len(folds.COCO_CLASSES) == 80
  assert len(folds.COCO_CATEGORY_IDS) == 80 and folds.COCO_CATEGORY_IDS[-1] == 90
  assert folds.split_classes_into_folds(range(1, 8), 3) == [[1, 2, 3], [4, 5], [6, 7]]
  assert folds.split_classes_into_folds(range(1, 8), 3, "round_robin") == [
      [1, 4, 7], [2, 5], [3, 6]]
  with pytest.raises(ValueError):
    folds.pascal5i_novel(4)


# ----------------------------------------------------------------------------- optional maps


def _plain(items):
  return [{k: v for k, v in it.items() if k != "rgb"} for it in items]


def test_optional_features_round_trip(tmp_path):
  rng = np.random.default_rng(7)
  items = _plain(_items(4, rng))
  shape = lambda it: it["label"].shape
  # Record 0: instance array (uint8) + scribble array; 1: instance as uint16 PNG bytes only;
  # 2: scribble PNG bytes only; 3: none.
  inst0 = rng.integers(0, 4, shape(items[0])).astype(np.uint8)
  inst0[0, 0] = 255
  scr0 = np.full(shape(items[0]), 255, np.uint8)
  scr0[2, 1:5], scr0[4, 3] = 0, 2
  inst1 = rng.integers(0, 300, shape(items[1])).astype(np.uint16)
  scr2 = np.full(shape(items[2]), 255, np.uint8)
  scr2[1, 1] = 1
  items[0].update(instance=inst0, scribble=scr0)
  items[1].update(instance_png=schema.encode_label_png(inst1), scribble=None)
  items[2].update(scribble_png=schema.encode_label_png(scr2))
  m = schema.write_dataset(tmp_path / "ds", name="t", classes=[f"c{i}" for i in range(1, 6)],
                           novel_folds=[[1]], scheme="custom",
                           splits={"train": items[:3], "val": items[3:]}, progress=False)
  loaded = schema.load_manifest(tmp_path / "ds")
  assert loaded.to_json() == m.to_json()
  assert loaded.optional_features == {"instance": {"train": 2}, "scribble": {"train": 2}}
  assert [im.get("features") for im in loaded.images("train")] == [
      ["instance", "scribble"], ["instance"], ["scribble"]]
  assert "features" not in loaded.images("val")[0]
  assert loaded.records_with("instance", "train") == [True, True, False]
  assert loaded.records_with("scribble", "val") == [False]
  assert loaded.has_feature("instance") and loaded.has_feature("scribble", "train")
  assert not loaded.has_feature("instance", "val")
  want = [(inst0, scr0), (inst1, None), (None, scr2)]
  reader = loaded.source("train").reader
  for i, (inst, scr) in enumerate(want):
    ex, _, label = schema.read_record(reader, i)
    for got in (schema.decode_extras(ex, label.shape), schema.read_extras(reader, i, ex)):
      assert set(got) == {"instance", "scribble"}
      for name, arr in (("instance", inst), ("scribble", scr)):
        if arr is None:
          assert got[name] is None and ex[f"{name}_png"] is None
        else:
          assert got[name].dtype == arr.dtype
          np.testing.assert_array_equal(got[name], arr)
  ex = schema.decode_example(loaded.source("val")[0])
  assert schema.decode_extras(ex) == {"instance": None, "scribble": None}


def test_datasets_without_optional_maps_are_unchanged(tmp_path):
  rng = np.random.default_rng(8)
  items = _plain(_items(2, rng))
  m = schema.write_dataset(tmp_path, name="t", classes=["a"] * 5, novel_folds=[[1]],
                           scheme="custom", splits={"train": items}, progress=False)
  with open(tmp_path / "manifest.json") as f:
    obj = json.load(f)
  assert "optional_features" not in obj
  assert all(set(im) == {"id", "height", "width", "classes"}
             for im in obj["splits"]["train"]["images"])
  assert m.optional_features == {} and not m.has_feature("instance")
  assert m.records_with("scribble", "train") == [False, False]
  # The record is byte-for-byte what the encoder wrote before the optional features existed:
  # the same features, nothing more.
  from tensorflow_datasets.proto import tf_example_generated_pb2 as pb
  feats = pb.Example.FromString(m.source("train")[0]).features.feature
  assert sorted(feats) == ["image/encoded", "image/format", "image/height", "image/id",
                           "image/width", "label/class_pixels", "label/classes",
                           "label/encoded"]


def test_optional_feature_errors_name_image_and_record(tmp_path):
  rng = np.random.default_rng(9)
  item = _plain(_items(1, rng))[0]
  h, w = item["label"].shape
  kw = dict(name="t", classes=["a"] * 5, novel_folds=[[1]], scheme="custom", progress=False)
  for bad, pattern in [
      (dict(item, instance=np.zeros((3, 3), np.uint8)), rf"im0.*instance map is 3x3.*{h}x{w}"),
      (dict(item, instance=np.zeros((h, w), np.int32)), r"im0.*instance map must be uint8"),
      (dict(item, scribble=np.zeros((h, w), np.uint16)), r"im0.*scribble map must be uint8"),
      (dict(item, scribble_png=b"junk"), r"im0.*scribble/encoded \(4 bytes\)"),
      (dict(item, instance_png=schema.encode_label_png(np.zeros((2, 2), np.uint8))),
       r"im0.*instance/encoded is 2x2"),
      (dict(item, scribble=np.zeros((h, w), np.uint8), scribble_png=b"x"), "both")]:
    with pytest.raises(ValueError, match=pattern):
      schema.write_dataset(tmp_path / "o", splits={"train": [bad]}, **kw)
  assert not os.path.exists(tmp_path / "o" / "manifest.json")
  # A damaged optional map in a written record: read_extras names shard, record and id.
  png = schema.encode_label_png(item["label"])
  good = schema.encode_example(image_bytes=item["image_bytes"], image_format="jpeg",
                               image_id="im0", height=h, width=w, label_png=png,
                               class_pixels=schema.class_pixel_counts(item["label"]))
  bad = schema.encode_example(image_bytes=item["image_bytes"], image_format="jpeg",
                              image_id="im1", height=h, width=w, label_png=png,
                              class_pixels=schema.class_pixel_counts(item["label"]),
                              instance_png=schema.encode_label_png(np.zeros((h, 2), np.uint8)),
                              scribble_png=b"\x89PNG broken")
  path = str(tmp_path / "s.tfrecord")
  tfrecord.write_tfrecord(path, [good, bad])
  reader = tfrecord.TFRecordReader([path])
  ex, _, label = schema.read_record(reader, 1)
  with pytest.raises(schema.BadRecordError) as err:
    schema.read_extras(reader, 1, ex, label.shape)
  assert err.value.kind == "instance" and err.value.record == 1 and err.value.image_id == "im1"
  assert str(err.value).startswith(f"{path} record 1 (image id 'im1'): instance/encoded is "
                                   f"{h}x2 but the label is {h}x{w}")
  with pytest.raises(schema.BadRecordError, match="scribble/encoded .*not a single-channel"):
    schema.read_extras(reader, 1, ex)  # no size check: the broken scribble PNG is next
  with pytest.raises(ValueError, match="image 'im1': scribble/encoded"):
    schema.decode_extra(ex, "scribble")
  with pytest.raises(ValueError, match="unknown optional feature"):
    schema.decode_extra(ex, "depth")
  assert schema.read_extras(reader, 0, schema.read_record(reader, 0)[0]) == {
      "instance": None, "scribble": None}


def test_manifest_optional_feature_errors(tmp_path):
  path = tmp_path / "manifest.json"
  good = {"name": "x", "version": 1, "classes": ["a", "b"],
          "folds": {"scheme": "custom", "novel": [[1]]},
          "optional_features": {"instance": {"train": 1}},
          "splits": {"train": {"files": ["t.tfrecord"],
                               "images": [{"id": "i", "height": 1, "width": 1,
                                           "classes": {"2": 1}, "features": ["instance"]},
                                          {"id": "j", "height": 1, "width": 1,
                                           "classes": {}}]}}}
  path.write_text(json.dumps(good))
  m = schema.load_manifest(path)
  assert m.records_with("instance", "train") == [True, False]
  assert m.to_json()["optional_features"] == {"instance": {"train": 1}}
  for mutate, pattern in [
      (lambda d: d["optional_features"].update(depth={"train": 1}), "unknown feature 'depth'"),
      (lambda d: d["optional_features"].update(instance={"train": 2}),
       r"optional_features.instance.train is 2 but 1 images"),
      (lambda d: d.pop("optional_features"), r"instance.train is 0 but 1 images"),
      (lambda d: d["optional_features"].update(instance={"val": 1}), "split names"),
      (lambda d: d["splits"]["train"]["images"][1].update(features=["x"]),
       r"images\[1\] \(j\) features")]:
    _assert_manifest_error(tmp_path, good, mutate, pattern)
