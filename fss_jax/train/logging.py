"""Run logging: ``metrics.jsonl`` + TensorBoard events, a progress bar, and the saved config.

Only process 0 writes (``enabled=None`` resolves to ``jax.process_index() == 0``), so multi-host
runs produce one set of files.

``metrics.jsonl`` holds one flat JSON object per ``write_scalars`` call:
``{"step": int, "wall_time": float (Unix seconds), "<name>": number, ...}``. Non-finite values are
written as ``NaN`` / ``Infinity`` (Python's json reads them back). The file is appended to, so a
resumed run continues it. TensorBoard event files (scalars, and images from
``write_images``) go to ``<workdir>/tensorboard`` through ``tensorboardX`` (no TensorFlow); it
is imported lazily because it pulls in torch when present.
"""
import json
import math
import os
import sys
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
import tqdm

_RESERVED = ("step", "wall_time")


def _is_lead_process() -> bool:
  return jax.process_index() == 0


def _to_number(key: str, value: Any):
  try:
    if hasattr(value, "item"):
      value = value.item()
  except (TypeError, ValueError) as e:
    raise TypeError(f"metric {key!r}: expected a scalar, got an array {value!r}.") from e
  if isinstance(value, bool):
    return int(value)
  if isinstance(value, int):
    return value
  try:
    return float(value)
  except (TypeError, ValueError) as e:
    raise TypeError(f"metric {key!r}: expected a scalar number, got {value!r}.") from e


class MetricWriter:
  """Writes scalar metrics to ``<workdir>/metrics.jsonl`` and TensorBoard event files."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: Optional[bool] = None,
               jsonl_name: str = "metrics.jsonl", tensorboard_subdir: str = "tensorboard"):
    """Args:
      workdir: run directory (created if missing).
      tensorboard: also write TensorBoard events.
      enabled: write at all; default: only on process 0.
      jsonl_name: file name of the JSON-lines log inside ``workdir``.
      tensorboard_subdir: folder for event files inside ``workdir``.
    """
    self.enabled = _is_lead_process() if enabled is None else enabled
    self.workdir = workdir
    self.jsonl_path = os.path.join(workdir, jsonl_name)
    self.tensorboard_dir = os.path.join(workdir, tensorboard_subdir)
    self._jsonl = None
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
      if tensorboard:
        import tensorboardX  # pylint: disable=g-import-not-at-top
        self._tb = tensorboardX.SummaryWriter(logdir=self.tensorboard_dir, flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs scalar values (python / numpy / 0-d jax) under ``step``."""
    if not self.enabled:
      return
    clash = [k for k in scalars if k in _RESERVED]
    if clash:
      raise ValueError(f"metric names {clash} are reserved in metrics.jsonl; rename them.")
    values = {str(k): _to_number(str(k), v) for k, v in scalars.items()}
    now = time.time()
    self._jsonl.write(json.dumps({"step": int(step), "wall_time": now, **values}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, global_step=int(step), walltime=now)

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Images in TensorBoard under ``step``: ``{tag: (H, W, 3) uint8 RGB}`` (the trainer's
    ``eval/episode_<i>``). Not in ``metrics.jsonl``; a no-op when disabled (processes other
    than 0) or without TensorBoard. Encoded as PNG with OpenCV (tensorboardX's own
    ``add_image`` needs Pillow, which the project does not require)."""
    checked = {}
    for tag, image in images.items():
      a = np.asarray(image)
      if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8 or not a.size:
        raise TypeError(f"image {tag!r}: expected an (H, W, 3) uint8 RGB array, got shape "
                        f"{a.shape} {a.dtype}.")
      checked[str(tag)] = a
    if not self.enabled or self._tb is None or not checked:
      return
    import cv2  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    values = []
    for tag, a in checked.items():
      ok, png = cv2.imencode(".png", cv2.cvtColor(a, cv2.COLOR_RGB2BGR))
      if not ok:
        raise ValueError(f"image {tag!r}: PNG encoding failed.")
      values.append(summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
          height=a.shape[0], width=a.shape[1], colorspace=3,
          encoded_image_string=png.tobytes())))
    self._tb.file_writer.add_summary(summary_pb2.Summary(value=values), int(step),
                                     time.time())

  def write_text(self, step: int, tag: str, text: str) -> None:
    """A text note in TensorBoard (e.g. the config or a per-class table)."""
    if self.enabled and self._tb is not None:
      self._tb.add_text(tag, text, global_step=int(step))

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_jsonl(path: str) -> list:
  """Reads ``metrics.jsonl`` back (one dict per line); names the line on bad JSON."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, start=1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{i}: invalid JSON line ({e}).") from e
  return rows


class ProgressBar:
  """Progress with rate and ETA. Draws (tqdm) only on an interactive terminal on process 0.

  ``rate``, ``eta_seconds`` and ``describe()`` work when not drawing, so loops can log a line.
  """

  def __init__(self, total: Optional[int], desc: str = "", unit: str = "it", initial: int = 0,
               enabled: Optional[bool] = None, file=None):
    file = file or sys.stderr
    if enabled is None:
      enabled = _is_lead_process() and hasattr(file, "isatty") and file.isatty()
    self.total = total
    self.desc = desc
    self.unit = unit
    self.count = initial
    self._initial = initial
    self._start = time.monotonic()
    self._bar = (tqdm.tqdm(total=total, desc=desc, unit=unit, initial=initial, file=file,
                           dynamic_ncols=True, smoothing=0.1) if enabled else None)

  @property
  def enabled(self) -> bool:
    return self._bar is not None

  def update(self, n: int = 1, **postfix) -> None:
    self.count += n
    if self._bar is not None:
      if postfix:
        self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
      self._bar.update(n)

  @property
  def elapsed(self) -> float:
    return time.monotonic() - self._start

  @property
  def rate(self) -> float:
    """Units per second since construction (units done in this session only)."""
    done = self.count - self._initial
    return done / self.elapsed if done > 0 and self.elapsed > 0 else 0.0

  @property
  def eta_seconds(self) -> Optional[float]:
    if self.total is None or self.rate <= 0:
      return None
    return max(0, self.total - self.count) / self.rate

  def describe(self) -> str:
    """e.g. ``'train 120/1000 it, 3.52 it/s, ETA 0:04:10'``."""
    total = f"/{self.total}" if self.total is not None else ""
    eta = self.eta_seconds
    eta_s = "?" if eta is None else _hms(eta)
    return (f"{self.desc} {self.count}{total} {self.unit}, {self.rate:.2f} {self.unit}/s, "
            f"ETA {eta_s}").strip()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _fmt(v: Any) -> str:
  try:
    v = float(v.item() if hasattr(v, "item") else v)
  except (TypeError, ValueError):
    return str(v)
  return f"{v:.4g}"


def _hms(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  s = int(round(seconds))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def save_config(config, workdir: str, enabled: Optional[bool] = None) -> Optional[str]:
  """Writes the resolved config as ``config.json`` and a readable ``config.txt`` (YAML-like).

  Returns the JSON path, or None on processes other than 0 (``enabled=None``).
  """
  if not (_is_lead_process() if enabled is None else enabled):
    return None
  os.makedirs(workdir, exist_ok=True)
  if hasattr(config, "to_json_best_effort"):
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    readable = str(config)
  else:
    text = json.dumps(config, indent=2, sort_keys=True, default=repr)
    readable = repr(config)
  path = os.path.join(workdir, "config.json")
  for name, content in ((path, text), (os.path.join(workdir, "config.txt"), readable)):
    tmp = name + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(content + "\n")
    os.replace(tmp, name)
  return path
