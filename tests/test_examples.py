"""scripts/export_episodes.py / fss_jax/data/examples.py: episodes written as image files."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np

import datagen
from fss_jax.data import dataset_dir as dataset_dir_lib
from fss_jax.data import episodes as episodes_lib
from fss_jax.data import pipeline
from fss_jax.data import schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_rgb(path):
  return cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_exported_episodes_are_the_evaluators_with_the_records_pixels(tiny_data_dir, tmp_path):
  config = datagen.tiny_config(tiny_data_dir)
  dataset_dir_lib.prepare(config)  # generated on first use
  min_pixels = int(config.data.min_class_pixels)
  out = tmp_path / "examples"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "export_episodes.py"),
       f"--data_dir={tiny_data_dir}", f"--out={out}", "--fold=0", "--shot=2", "--episodes=3",
       "--classes=base", "--seed=7", f"--min_pixels={min_pixels}"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  manifest = schema.load_manifest(tiny_data_dir)
  want = episodes_lib.eval_episode_list(manifest, "val", 0, 2, 3, 7, min_pixels, which="base")
  listed = json.load(open(out / "episodes.json"))["episodes"]
  assert [(e["query"]["record"], tuple(s["record"] for s in e["supports"]), e["class_id"])
          for e in listed] == [(e.query, e.supports, e.class_id) for e in want]
  reader = manifest.source("val").reader
  for i, ep in enumerate(want):
    folder = out / f"episode_{i}"
    image, label = pipeline.load_record(reader, ep.query)
    np.testing.assert_array_equal(_read_rgb(str(folder / "query.png")), image)
    truth = cv2.imread(str(folder / "query_truth.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(truth == 255, label == ep.class_id)
    np.testing.assert_array_equal(truth == 128, label == 255)
    for k, rec in enumerate(ep.supports):
      image, label = pipeline.load_record(reader, rec)
      np.testing.assert_array_equal(_read_rgb(str(folder / f"support_{k}.png")), image)
      mask = cv2.imread(str(folder / f"support_{k}_mask.png"), cv2.IMREAD_UNCHANGED)
      assert mask.ndim == 2 and (mask == 255).any()
      np.testing.assert_array_equal(mask == 255, label == ep.class_id)
  assert f"class {want[0].class_id}" in proc.stdout


def test_missing_dataset_is_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "scripts", "export_episodes.py"),
       f"--data_dir={tmp_path / 'nothing'}", f"--out={tmp_path / 'x'}"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr
  assert str(tmp_path / "nothing") in proc.stderr
