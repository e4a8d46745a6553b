"""Procedural dataset: determinism, class design, image/label agreement, writer and CLI."""
import collections
import itertools
import json

import cv2
import numpy as np

from data_prep import synthetic as synthetic_cli
from fss_jax.data import folds
from fss_jax.data import schema
from fss_jax.data import synthetic as S


def test_scene_is_pure_function_of_seed_split_index():
  a = S.render_scene(1, "train", 5, 97)
  b = S.render_scene(1, "train", 5, 97)
  np.testing.assert_array_equal(a.image, b.image)
  np.testing.assert_array_equal(a.label, b.label)
  for other in (S.render_scene(2, "train", 5, 97), S.render_scene(1, "val", 5, 97),
                S.render_scene(1, "train", 6, 97)):
    assert a.image.shape != other.image.shape or not np.array_equal(a.image, other.image)


def test_scene_shapes_and_label_values():
  for i in range(20):
    scene = S.render_scene(0, "train", i, 120)
    h, w = scene.label.shape
    assert max(h, w) == 120 and 0.74 * 120 <= min(h, w)
    assert scene.image.shape == (h, w, 3) and scene.image.dtype == np.uint8
    assert 1 <= len(scene.objects) <= 3
    present = {int(c) for c in np.unique(scene.label)} - {0, 255}
    assert present <= set(scene.objects)  # only pasted classes, occluded ones may vanish
    assert (scene.label == 255).any()  # boundary ignore band


def test_class_design_needs_appearance_not_one_cue():
  assert S.NUM_CLASSES == 20 and len(set(S.CLASS_NAMES)) == 20
  attrs = [(c.shape, c.texture, c.hue) for c in S.CLASSES]
  for k in range(3):  # every single attribute is shared by >= 2 classes
    counts = collections.Counter(a[k] for a in attrs)
    assert min(counts.values()) >= 2, counts
  for i, j in itertools.combinations(range(3), 2):  # every pair is unique
    assert len({(a[i], a[j]) for a in attrs}) == 20
  for fold in range(4):
    novel = S.novel_classes(fold)
    assert novel == folds.pascal5i_novel(fold)
    base = [attrs[c - 1] for c in range(1, 21) if c not in novel]
    # Each cue of a novel class is seen in training; only the combination is new.
    for c in novel:
      for k in range(3):
        assert attrs[c - 1][k] in {b[k] for b in base}, (fold, c, k)


def _circular_diff(a, b):
  d = abs(a - b) % 360
  return min(d, 360 - d)


def test_labelled_pixels_have_the_class_hue():
  """Image/label agreement: the visible pixels of class c carry c's hue."""
  checked = 0
  for i in range(40):
    scene = S.render_scene(4, "train", i, 160)
    hsv = cv2.cvtColor(scene.image, cv2.COLOR_RGB2HSV_FULL).astype(np.float64)
    for c in set(np.unique(scene.label).tolist()) - {0, 255}:
      mask = scene.label == c
      if mask.sum() < 300:
        continue
      hue = hsv[..., 0][mask] * 360.0 / 256.0
      mean = np.rad2deg(np.angle(np.exp(1j * np.deg2rad(hue)).mean())) % 360
      want, spread = S.HUES[S.CLASSES[c - 1].hue]
      assert _circular_diff(mean, want) < 3 * spread + 12, (i, c, mean, want)
      checked += 1
  assert checked > 30


def test_default_size_scenes_have_eligible_classes():
  with_class = 0
  for i in range(60):
    label = S.render_scene(0, "train", i).label
    counts = schema.class_pixel_counts(label)
    with_class += any(n >= 2 * 32 * 32 for n in counts.values())
  assert with_class >= 0.7 * 60


def test_generate_split_same_for_any_worker_count():
  a = list(S.generate_split(0, "val", 6, 97, workers=0))
  b = list(S.generate_split(0, "val", 6, 97, workers=2))
  assert [x["id"] for x in a] == [f"val_{i:06d}" for i in range(6)]
  for x, y in zip(a, b):
    assert x["image_bytes"] == y["image_bytes"]
    np.testing.assert_array_equal(x["label"], y["label"])


def test_write_dataset_roundtrip_png(tmp_path):
  manifest = S.write_synthetic_dataset(str(tmp_path), num_train=5, num_val=3,
                                       image_size=97, seed=9, image_format="png")
  loaded = schema.load_manifest(str(tmp_path))
  assert loaded.classes == list(S.CLASS_NAMES) and loaded.scheme == "pascal5i"
  assert loaded.novel_folds == [folds.pascal5i_novel(f) for f in range(4)]
  assert len(manifest.images("train")) == 5 and len(manifest.images("val")) == 3
  reader = loaded.source("val").reader
  for i in range(3):
    ex = schema.decode_example(reader[i])
    scene = S.render_scene(9, "val", i, 97)
    np.testing.assert_array_equal(schema.decode_image(ex["image_bytes"]), scene.image)
    np.testing.assert_array_equal(schema.decode_label(ex["label_png"]), scene.label)
    assert ex["class_pixels"] == schema.class_pixel_counts(scene.label)
  with open(tmp_path / S.GENERATOR_FILE) as f:
    assert json.load(f) == {"num_train": 5, "num_val": 3, "image_size": 97, "seed": 9,
                            "image_format": "png"}


def test_scene_instance_maps():
  seen_two_of_a_class = False
  for i in range(30):
    scene = S.render_scene(0, "train", i, 120)
    inst, label = scene.instance, scene.label
    assert inst.dtype == np.uint8 and inst.shape == label.shape
    np.testing.assert_array_equal(inst == 255, label == 255)  # the same ignore band
    np.testing.assert_array_equal(inst == 0, label == 0)
    for k in set(np.unique(inst).tolist()) - {0, 255}:
      assert 1 <= k <= len(scene.objects)
      assert (label[inst == k] == scene.objects[k - 1]).all(), (i, k)
    ids = set(np.unique(inst).tolist()) - {0, 255}
    seen_two_of_a_class |= len(ids) > len(set(np.unique(label).tolist()) - {0, 255})
  assert seen_two_of_a_class  # instances separate objects of one class


def test_dataset_with_instances(tmp_path):
  manifest = S.write_synthetic_dataset(str(tmp_path / "a"), num_train=3, num_val=2,
                                       image_size=97, seed=9, instances=True)
  assert manifest.optional_features == {"instance": {"train": 3, "val": 2}}
  reader = manifest.source("val").reader
  for i in range(2):
    ex, _, label = schema.read_record(reader, i)
    scene = S.render_scene(9, "val", i, 97)
    np.testing.assert_array_equal(label, scene.label)  # the scenes are unchanged
    np.testing.assert_array_equal(schema.read_extras(reader, i, ex, label.shape)["instance"],
                                  scene.instance)
  with open(tmp_path / "a" / S.GENERATOR_FILE) as f:
    assert json.load(f)["instances"] is True
  plain = S.write_synthetic_dataset(str(tmp_path / "b"), num_train=1, num_val=1,
                                    image_size=97, seed=9)
  assert plain.optional_features == {}
  with open(tmp_path / "b" / S.GENERATOR_FILE) as f:
    assert "instances" not in json.load(f)  # settings of datasets made before the option
  synthetic_cli.main([f"--out_dir={tmp_path / 'c'}", "--num_train=1", "--num_val=1",
                      "--image_size=97", "--workers=0", "--instances", "--no_progress"])
  assert schema.load_manifest(str(tmp_path / "c")).has_feature("instance", "train")


def test_cli_writes_dataset_and_preview(tmp_path):
  out, preview = tmp_path / "ds", tmp_path / "preview.png"
  synthetic_cli.main([f"--out_dir={out}", "--num_train=3", "--num_val=2",
                      "--image_size=97", "--workers=0", f"--preview={preview}",
                      "--no_progress"])
  manifest = schema.load_manifest(str(out))
  assert len(manifest.images("train")) == 3
  ex = schema.decode_example(manifest.source("train").reader[0])
  assert ex["image_format"] == "jpeg"
  grid = cv2.imread(str(preview))
  assert grid is not None and grid.shape == (3 * 224, 8 * 224, 3)
