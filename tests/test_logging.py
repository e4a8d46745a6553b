"""Tests for fss_jax.train.logging: JSONL + TensorBoard writer, progress bar, config saving."""
import glob
import io
import json
import math
import os
import struct
import sys

import google_crc32c
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fss_jax.train import logging as logging_lib


def _masked_crc(data: bytes) -> int:
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_events(path):
  """Minimal TFRecord reader (framing + CRC check) decoding tensorboardX Event protos."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  events = []
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (len_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    assert len_crc == _masked_crc(header)
    payload = data[pos + 12:pos + 12 + length]
    (data_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
    assert data_crc == _masked_crc(payload)
    event = event_pb2.Event()
    event.ParseFromString(payload)
    events.append(event)
    pos += 16 + length
  return events


def test_metric_writer_jsonl_and_events(tmp_path):
  workdir = str(tmp_path / "run")
  with logging_lib.MetricWriter(workdir) as w:
    w.write_scalars(1, {"train/loss": jnp.float32(0.5), "train/lr": np.float64(0.025),
                        "episodes": np.int64(8)})
    w.write_scalars(2, {"train/loss": 0.25, "val/miou": float("nan")})
    w.write_text(2, "note", "hello")
  rows = logging_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2]
  assert rows[0]["train/loss"] == 0.5 and rows[0]["train/lr"] == 0.025
  assert rows[0]["episodes"] == 8 and isinstance(rows[0]["episodes"], int)
  assert math.isnan(rows[1]["val/miou"])
  assert all(isinstance(r["wall_time"], float) for r in rows)

  files = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert len(files) == 1
  scalars = {}
  for e in _read_events(files[0]):
    for v in e.summary.value:
      if v.HasField("simple_value"):
        scalars[(v.tag, e.step)] = v.simple_value
  assert scalars[("train/loss", 1)] == pytest.approx(0.5)
  assert scalars[("train/loss", 2)] == pytest.approx(0.25)
  assert scalars[("train/lr", 1)] == pytest.approx(0.025)
  assert math.isnan(scalars[("val/miou", 2)])

  # A resumed run appends.
  with logging_lib.MetricWriter(workdir, tensorboard=False) as w:
    w.write_scalars(3, {"train/loss": 0.1})
  assert [r["step"] for r in logging_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))] == [
      1, 2, 3]


def read_images(workdir):
  """{(tag, step): (H, W, 3) uint8 RGB} of every image in ``workdir/tensorboard``'s event files
  (a later file's image of the same tag and step wins: a resumed run's)."""
  import cv2  # pylint: disable=g-import-not-at-top
  images = {}
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):
    for e in _read_events(path):
      for v in e.summary.value:
        if v.HasField("image"):
          png = np.frombuffer(v.image.encoded_image_string, np.uint8)
          bgr = cv2.imdecode(png, cv2.IMREAD_COLOR)
          assert bgr is not None, (v.tag, e.step)
          rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
          assert (v.image.height, v.image.width, v.image.colorspace) == (*rgb.shape[:2], 3)
          images[(v.tag, e.step)] = rgb
  return images


def test_write_images_round_trip_without_pillow(tmp_path, monkeypatch):
  """PNG images in the event file, read back pixel for pixel; tensorboardX's add_image would
  import Pillow, which the project does not install (a None entry makes that import fail)."""
  monkeypatch.setitem(sys.modules, "PIL", None)
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (20, 33, 3), dtype=np.uint8)
  b = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
  workdir = str(tmp_path / "run")
  with logging_lib.MetricWriter(workdir) as w:
    w.write_images(3, {"eval/episode_0": a, "eval/episode_1": b})
    w.write_images(5, {"eval/episode_0": b})
    w.write_images(6, {})
    with pytest.raises(TypeError, match="'bad'.*uint8"):
      w.write_images(7, {"bad": a.astype(np.float32)})
    with pytest.raises(TypeError, match="'grey'"):
      w.write_images(7, {"grey": a[..., 0]})
  got = read_images(workdir)
  assert sorted(got) == [("eval/episode_0", 3), ("eval/episode_0", 5), ("eval/episode_1", 3)]
  np.testing.assert_array_equal(got[("eval/episode_0", 3)], a)
  np.testing.assert_array_equal(got[("eval/episode_1", 3)], b)
  np.testing.assert_array_equal(got[("eval/episode_0", 5)], b)
  assert logging_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl")) == []  # images only
  # Disabled (processes other than 0) or without TensorBoard: nothing written, inputs checked.
  off = logging_lib.MetricWriter(str(tmp_path / "off"), enabled=False)
  off.write_images(1, {"eval/episode_0": a})
  with pytest.raises(TypeError, match="'bad'"):
    off.write_images(1, {"bad": a[..., :2]})
  off.close()
  assert not os.path.exists(tmp_path / "off")
  with logging_lib.MetricWriter(str(tmp_path / "no_tb"), tensorboard=False) as w:
    w.write_images(1, {"eval/episode_0": a})
  assert os.listdir(tmp_path / "no_tb") == ["metrics.jsonl"]


def test_metric_writer_errors_and_disabled(tmp_path):
  with logging_lib.MetricWriter(str(tmp_path / "a"), tensorboard=False) as w:
    with pytest.raises(ValueError, match="reserved"):
      w.write_scalars(1, {"step": 1})
    with pytest.raises(TypeError, match="'x'"):
      w.write_scalars(1, {"x": np.ones(3)})
    with pytest.raises(TypeError, match="'y'"):
      w.write_scalars(1, {"y": "abc"})
  off = logging_lib.MetricWriter(str(tmp_path / "b"), enabled=False)
  off.write_scalars(1, {"x": 1.0})
  off.close()
  assert not os.path.exists(tmp_path / "b")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"step": 1}\n{oops\n')
  with pytest.raises(ValueError, match="bad.jsonl:2"):
    logging_lib.read_jsonl(str(bad))


def test_progress_bar():
  buf = io.StringIO()  # not a TTY: disabled by default
  bar = logging_lib.ProgressBar(100, desc="eval", unit="ep", file=buf)
  assert not bar.enabled
  bar.update(10)
  assert bar.count == 10 and bar.rate > 0 and bar.eta_seconds is not None
  assert bar.describe().startswith("eval 10/100 ep, ")
  bar.close()
  assert buf.getvalue() == ""
  shown = logging_lib.ProgressBar(4, desc="train", unit="step", file=buf, enabled=True)
  shown.update(2, loss=jnp.float32(0.123456))
  shown.close()
  assert "train" in buf.getvalue() and "loss=0.1235" in buf.getvalue()
  assert logging_lib.ProgressBar(None, enabled=False).eta_seconds is None
  assert logging_lib._hms(3725) == "1:02:05"  # pylint: disable=protected-access


def test_save_config(tmp_path):
  config = ml_collections.ConfigDict(
      {"data": {"fold": 1, "scale_range": (0.9, 1.1)}, "train": {"lr": 0.025}})
  path = logging_lib.save_config(config, str(tmp_path))
  loaded = json.loads(open(path).read())
  assert loaded == {"data": {"fold": 1, "scale_range": [0.9, 1.1]}, "train": {"lr": 0.025}}
  assert "lr: 0.025" in (tmp_path / "config.txt").read_text()
  assert logging_lib.save_config(config, str(tmp_path / "x"), enabled=False) is None
