"""Tests for fss_jax.train.logging: JSONL + TensorBoard writer, progress bar, config saving."""
import glob
import io
import json
import math
import os
import struct

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
