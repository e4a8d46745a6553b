"""Damaged data (issue 16, items 5 and 8): decode errors name shard, record and image id;
training can skip bad records deterministically; data_prep/folder.py names bad files and
refuses unknown mask ids; scripts/check_dataset.py; the image-size scale trap."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

import datagen
from data_prep import folder
from fss_jax import configs_lib
from fss_jax.data import dataset_dir as dataset_dir_lib
from fss_jax.data import pipeline as P
from fss_jax.data import schema
from fss_jax.data import synthetic
from fss_jax.data import tfrecord
from fss_jax.data import transforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 65
MIN_PIXELS = 400


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic")
  synthetic.write_synthetic_dataset(str(out), num_train=24, num_val=8, image_size=97, seed=3)
  return str(out)


@pytest.fixture
def data_dir(clean_dir, tmp_path):
  """A private copy of the clean dataset (tests damage it)."""
  import shutil
  dst = str(tmp_path / "data")
  shutil.copytree(clean_dir, dst)
  return dst


def _train(data_dir, **kw):
  args = dict(fold=0, shot=1, image_size=SIZE, seed=7, batch_size=4, min_pixels=MIN_PIXELS)
  args.update(kw)
  return P.train_dataset(data_dir, **args)


def _locate(data_dir, split, index):
  """(shard path, record number in it, record bytes) of a split's record `index`."""
  reader = schema.load_manifest(data_dir).source(split).reader
  k, j = reader.locate(index)
  return reader.paths[k], j, reader[index]


def _replace_record(path, j, new_record):
  records = list(tfrecord.TFRecordReader([path]))
  records[j] = new_record
  tfrecord.write_tfrecord(path, records)


def _flip_image_byte(path, j, record):
  """Flips one byte inside the image bytes of record j (the data CRC no longer matches)."""
  ex = schema.decode_example(record)
  offset = int(tfrecord.scan_tfrecord(path)[j, 0])
  pos = offset + record.find(ex["image_bytes"]) + len(ex["image_bytes"]) // 2
  with open(path, "r+b") as f:
    f.seek(pos)
    b = f.read(1)
    f.seek(pos)
    f.write(bytes([b[0] ^ 0x5A]))


def _with_bad_image(record, image_bytes=b"\x00" * 504):
  ex = schema.decode_example(record)
  return schema.encode_example(
      image_bytes=image_bytes, image_format="jpeg", image_id=ex["id"],
      height=ex["height"], width=ex["width"], label_png=ex["label_png"],
      class_pixels=ex["class_pixels"])


# ----------------------------------------------------------------------------- naming


def test_undecodable_image_mid_run_names_shard_record_and_id(data_dir):
  """User report: `cannot decode image (504 bytes)` with no file, record or image id."""
  first = next(iter(_train(data_dir)))
  bad = int(first["query_record"][2])
  path, j, record = _locate(data_dir, "train", bad)
  image_id = schema.decode_example(record)["id"]
  _replace_record(path, j, _with_bad_image(record))
  with pytest.raises(ValueError) as err:
    next(iter(_train(data_dir)))
  msg = str(err.value)
  assert path in msg and f"record {j}" in msg and repr(image_id) in msg, msg
  assert "cannot decode image (504 bytes)" in msg
  assert "data.skip_bad_records" in msg and "check_dataset.py" in msg


def test_crc_error_names_record_and_skip_is_deterministic_and_resumable(data_dir):
  """User report: a CRC error found mid-run recurs at the same step on every restart."""
  clean = [next(it) for it in [iter(_train(data_dir))] for _ in range(3)]
  used0 = set(clean[0]["query_record"].tolist()) | set(clean[0]["supp_records"].ravel().tolist())
  bad = next(int(r) for r in clean[1]["query_record"] if int(r) not in used0)
  path, j, record = _locate(data_dir, "train", bad)
  image_id = schema.decode_example(record)["id"]
  _flip_image_byte(path, j, record)
  it = iter(_train(data_dir))
  next(it)
  with pytest.raises(ValueError) as err:
    next(it)
  msg = str(err.value)
  assert path in msg and f"record {j}" in msg and repr(image_id) in msg, msg
  assert "CRC mismatch" in msg

  a = iter(_train(data_dir, skip_bad_records=True))
  got = [next(a) for _ in range(3)]
  for batch in got:
    assert bad not in batch["query_record"] and bad not in batch["supp_records"]
  # Rows without the bad record are untouched; the skipped row is a different episode
  # with the same stream position.
  np.testing.assert_array_equal(got[0]["query"], clean[0]["query"])
  np.testing.assert_array_equal(got[1]["index"], clean[1]["index"])
  hit = [bad in clean[1]["supp_records"][r] or bad == clean[1]["query_record"][r]
         for r in range(4)]
  for r in range(4):
    same = np.array_equal(got[1]["query"][r], clean[1]["query"][r])
    assert same != hit[r], r
  # Deterministic and exactly resumable.
  b = iter(_train(data_dir, skip_bad_records=True))
  next(b)
  state = b.get_state()
  again = [next(b), next(b)]
  c = iter(_train(data_dir, skip_bad_records=True))
  c.set_state(state)
  for x, y, z in zip(got[1:], again, [next(c), next(c)]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
      np.testing.assert_array_equal(x[k], z[k], err_msg=k)


def test_missing_feature_and_label_errors_named(data_dir):
  path, j, record = _locate(data_dir, "val", 2)
  reader = schema.load_manifest(data_dir).source("val").reader
  ex = schema.decode_example(record)
  from tensorflow_datasets.proto import tf_example_generated_pb2 as pb
  proto = pb.Example.FromString(record)
  del proto.features.feature["label/encoded"]
  _replace_record(path, j, proto.SerializeToString())
  reader = schema.load_manifest(data_dir).source("val").reader
  with pytest.raises(schema.BadRecordError, match="label/encoded") as err:
    P.load_record(reader, 2)
  assert err.value.kind == "parse" and err.value.image_id == ex["id"]
  assert f"{path} record {j} (image id {ex['id']!r})" in str(err.value)


# ----------------------------------------------------------------------------- converters


def test_write_dataset_refuses_undecodable_image_bytes(tmp_path):
  # A valid PNG header (so the size reads) with a garbage body.
  ok, png = cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))
  body = png.tobytes()[:40] + b"\x00" * 30
  items = [{"image_bytes": body, "id": "broken", "label": np.zeros((8, 8), np.uint8)}]
  with pytest.raises(ValueError, match=r"image 'broken'.*cannot decode"):
    schema.write_dataset(tmp_path / "o", name="t", classes=["a"], novel_folds=[[1]],
                         scheme="custom", splits={"train": items}, progress=False)
  assert not os.path.exists(tmp_path / "o" / schema.MANIFEST_NAME)


def test_folder_zero_byte_and_undecodable_files_named(tmp_path):
  """User report: zero-byte image/mask files give an unnamed cv2.error."""
  root = tmp_path / "d"
  datagen.make_folder(str(root), np.random.default_rng(10), num_images=3)
  cases = [("images", "img001.jpg", b""), ("masks", "img002.png", b""),
           ("images", "img000.jpg", b"\xff\xd8\xff" + b"\x00" * 100)]
  for sub, name, data in cases:
    path = root / sub / name
    saved = path.read_bytes()
    path.write_bytes(data)
    with pytest.raises(ValueError) as err:
      folder.convert(root=str(root), out_dir=str(tmp_path / "o"), progress=False)
    assert str(path) in str(err.value), str(err.value)
    assert ("0 bytes" in str(err.value)) == (not data)
    path.write_bytes(saved)


def test_folder_stray_mask_id_refused_unless_allowed(tmp_path):
  """User report: a stray mask id (200) without classes.txt silently makes 200 classes."""
  root = tmp_path / "d"
  datagen.make_folder(str(root), np.random.default_rng(11), num_images=6, num_classes=4,
                      classes_txt=False)
  mask_path = root / "masks" / "img003.png"
  mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
  mask[0, 0] = 200
  cv2.imwrite(str(mask_path), mask)
  with pytest.raises(ValueError, match=r"200.*img003\.png.*classes\.txt"):
    folder.convert(root=str(root), out_dir=str(tmp_path / "o"), progress=False)
  m = folder.convert(root=str(root), out_dir=str(tmp_path / "o"), progress=False,
                     allow_unknown_ids=True)
  assert m.num_classes == 200
  # With classes.txt the id is unknown: refused, naming the mask; allowed -> 255 (ignore).
  (root / "classes.txt").write_text("".join(f"c{c}\n" for c in range(1, 5)))
  with pytest.raises(ValueError, match=r"img003\.png.*\[200\].*classes\.txt"):
    folder.convert(root=str(root), out_dir=str(tmp_path / "o2"), progress=False)
  m = folder.convert(root=str(root), out_dir=str(tmp_path / "o2"), progress=False,
                     allow_unknown_ids=True, val_fraction=0.0)
  assert m.num_classes == 4
  i = [im["id"] for im in m.images("train")].index("img003")
  label = schema.decode_label(schema.decode_example(m.source("train")[i])["label_png"])
  assert label[0, 0] == 255
  # The CLI flag.
  folder.main(["--root", str(root), "--out_dir", str(tmp_path / "o3"), "--no_progress",
               "--allow_unknown_ids"])


def test_folder_max_side_downscales(tmp_path):
  root = tmp_path / "d"
  labels = datagen.make_folder(str(root), np.random.default_rng(12), num_images=4)
  m = folder.main(["--root", str(root), "--out_dir", str(tmp_path / "o"), "--no_progress",
                   "--max_side", "12", "--val_fraction", "0"])
  for i, im in enumerate(m.images("train")):
    h, w = labels[im["id"]].shape
    assert max(im["height"], im["width"]) == 12
    assert (im["height"], im["width"]) == (round(h * 12 / max(h, w)), round(w * 12 / max(h, w)))
    ex = schema.decode_example(m.source("train")[i])
    assert schema.decode_image(ex["image_bytes"]).shape[:2] == (im["height"], im["width"])
  assert m.extra["max_side"] == 12


# ----------------------------------------------------------------------------- check_dataset


def test_check_dataset_finds_every_problem_kind(data_dir):
  from fss_jax.data import check as check_lib
  assert check_lib.check_dataset(data_dir).ok
  m = schema.load_manifest(data_dir)
  # CRC (train 3), undecodable image (train 5), label id beyond the classes (val 1).
  crc_at = _locate(data_dir, "train", 3)
  path, j, rec = _locate(data_dir, "train", 5)
  _replace_record(path, j, _with_bad_image(rec))
  _flip_image_byte(*crc_at)
  path, j, rec = _locate(data_dir, "val", 1)
  ex = schema.decode_example(rec)
  label = schema.decode_label(ex["label_png"])
  label[0, 0] = m.num_classes + 7
  _replace_record(path, j, schema.encode_example(
      image_bytes=ex["image_bytes"], image_format=ex["image_format"], image_id=ex["id"],
      height=ex["height"], width=ex["width"], label_png=schema.encode_label_png(label),
      class_pixels=ex["class_pixels"]))
  report = check_lib.check_dataset(data_dir)
  assert not report.ok
  assert report.counts == {"crc": 1, "image": 1, "label_values": 1}, report.counts
  assert report.records == len(m.images("train")) + len(m.images("val"))
  script = os.path.join(REPO, "scripts", "check_dataset.py")
  out = subprocess.run([sys.executable, script, "--data_dir", data_dir, "--max_listed", "2"],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=REPO))
  assert out.returncode == 1, out.stderr
  assert "crc: 1" in out.stdout and "image: 1" in out.stdout and "label_values: 1" in out.stdout
  assert out.stdout.count(".tfrecord record ") == 2, out.stdout
  assert "... and 1 more" in out.stdout


def test_check_dataset_optional_maps(tmp_path):
  from fss_jax.data import check as check_lib
  out = str(tmp_path / "data")
  synthetic.write_synthetic_dataset(out, num_train=4, num_val=2, image_size=64, seed=1,
                                    instances=True)
  assert check_lib.check_dataset(out).ok
  # train 1: an instance map of the wrong size; train 2: its instance map dropped (the
  # manifest still lists it).
  for index, instance_png in ((1, schema.encode_label_png(np.zeros((3, 3), np.uint8))),
                              (2, None)):
    path, j, rec = _locate(out, "train", index)
    ex = schema.decode_example(rec)
    _replace_record(path, j, schema.encode_example(
        image_bytes=ex["image_bytes"], image_format=ex["image_format"], image_id=ex["id"],
        height=ex["height"], width=ex["width"], label_png=ex["label_png"],
        class_pixels=ex["class_pixels"], instance_png=instance_png))
  report = check_lib.check_dataset(out)
  assert report.counts == {"instance": 1, "manifest": 1}, report.counts
  by_kind = {p.kind: p for p in report.problems}
  assert by_kind["instance"].image_id == "train_000001"
  assert "instance/encoded is 3x3 but the label is" in str(by_kind["instance"])
  assert ".tfrecord record " in str(by_kind["instance"])
  assert "optional features [] vs manifest ['instance']" in by_kind["manifest"].detail


# ----------------------------------------------------------------------------- scale trap


def _manifest_with_sides(h, w, n=9):
  images = [{"id": f"i{k}", "height": h, "width": w, "classes": {}} for k in range(n)]
  return schema.Manifest(name="x", classes=["a"], novel_folds=[[1]],
                         splits={"train": {"files": [], "images": images}})


def test_scale_warning_for_photographs_at_small_image_size():
  """User report: ~477-px photographs trained at data.image_size=129 learn nothing, silently."""
  config = configs_lib.base_config()
  config.data.image_size = 129
  msg = dataset_dir_lib.scale_warning(config, _manifest_with_sides(360, 477))
  assert msg is not None and "3.7" in msg and "data.train_resize_longer=129" in msg
  assert "evaluation" in msg and "--max_side" in msg
  config.data.image_size = 473
  assert dataset_dir_lib.scale_warning(config, _manifest_with_sides(375, 500)) is None
  assert "smaller" in dataset_dir_lib.scale_warning(config, _manifest_with_sides(100, 120))
  config.data.image_size = 129
  config.data.train_resize_longer = 129
  assert dataset_dir_lib.scale_warning(config, _manifest_with_sides(360, 477)) is None


def test_trainer_logs_the_scale_warning(tmp_path, monkeypatch, capsys):
  """The trainer warns at start-up, before the model is built, when the images are far larger
  than data.image_size (the tiny dataset's ~80 px scenes trained at 17 px: ~4.7x)."""
  from fss_jax.train import trainer  # pylint: disable=g-import-not-at-top

  class Stop(Exception):
    pass

  def stop(*_):
    raise Stop()
  config = configs_lib.load_config("configs/tiny_asgnet.py")
  config.data.data_dir = str(tmp_path / "data")
  config.data.image_size = 17
  monkeypatch.setattr(trainer.registry, "build_model", stop)
  with pytest.raises(Stop):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
  out = capsys.readouterr()
  assert "data.train_resize_longer" in out.out + out.err
  config.data.image_size = 65  # ~1.2x: no warning
  with pytest.raises(Stop):
    trainer.train_and_evaluate(config, str(tmp_path / "run2"))
  out = capsys.readouterr()
  assert "data.train_resize_longer" not in out.out + out.err


def test_train_resize_longer_option():
  config = configs_lib.base_config()
  assert config.data.train_resize_longer == 0 and config.data.skip_bad_records is False
  assert dataset_dir_lib.train_aug(config).resize_longer == 0
  config.data.train_resize_longer = 65
  aug = dataset_dir_lib.train_aug(config)
  assert aug.resize_longer == 65
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (120, 200, 3), np.uint8)
  label = (rng.random((120, 200)) < 0.5).astype(np.uint8)
  small_img = cv2.resize(image.astype(np.float32), (65, 39), interpolation=cv2.INTER_LINEAR)
  small_lab = cv2.resize(label, (65, 39), interpolation=cv2.INTER_NEAREST)
  aug = transforms.TrainAugConfig(size=33, resize_longer=65)
  got = transforms.train_transform(image, label, np.random.default_rng(5), aug)
  want = transforms.train_transform(small_img, small_lab, np.random.default_rng(5),
                                    transforms.TrainAugConfig(size=33))
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
