"""Few-shot segmentation metrics: class-wise mIoU and FB-IoU (reference protocol).

Per episode we count, for background (0) and foreground (1):
  intersection_c = #{valid pixels with pred == c and label == c}
  union_c        = #{valid pred == c} + #{label == c} - intersection_c
where a pixel is valid when its label is not the ignore index (255). This is the reference's
``intersectionAndUnion`` with K = 2 (predictions on ignored pixels are dropped; label values other
than 0 and 1 are counted in neither class, as ``torch.histc`` over [0, 1] drops them).

Aggregation (reference ``tool/test.py``):
  * mIoU   = mean over the novel classes of  Σ_episodes(inter_fg) / (Σ_episodes(union_fg) + 1e-10)
    for the episodes of that class. A class with an empty union (no episode, or only episodes where
    neither prediction nor label has foreground) contributes 0 and still counts in the mean, exactly
    as the reference's fixed-length per-class arrays do.
  * FB-IoU = mean over {bg, fg} of  Σ_all(inter_c) / (Σ_all(union_c) + 1e-10).
The reference logs its per-class table rotated by one position (it indexes ``(subcls - 1) % 5``
with a 0-based ``subcls``); the mean is unaffected. Here per-class results are keyed by class id.

Counts are exact integers (Python ints / int64 on the host); device-side counts are int32, which
holds any single batch of images up to ~46k x 46k pixels.
"""
import dataclasses
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = 255
EPS = 1e-10  # The reference's epsilon in intersection / (union + eps).


def episode_stats(pred: np.ndarray, label: np.ndarray,
                  ignore_index: int = IGNORE_INDEX) -> Tuple[np.ndarray, np.ndarray]:
  """Background/foreground intersection and union of one episode (numpy, host side).

  Args:
    pred: (H, W) integer prediction in {0, 1}.
    label: (H, W) integer label in {0, 1, ignore_index}.
    ignore_index: label value whose pixels are excluded.

  Returns:
    (inter, union): int64 arrays of shape (2,), index 0 background, 1 foreground.
  """
  pred = np.asarray(pred)
  label = np.asarray(label)
  if pred.shape != label.shape:
    raise ValueError(f"episode_stats: pred shape {pred.shape} != label shape {label.shape}.")
  valid = label != ignore_index
  inter = np.empty(2, np.int64)
  union = np.empty(2, np.int64)
  for c in (0, 1):
    p = valid & (pred == c)
    t = label == c
    inter[c] = np.count_nonzero(p & t)
    union[c] = np.count_nonzero(p) + np.count_nonzero(t) - inter[c]
  return inter, union


def batch_stats(pred: jax.Array, label: jax.Array,
                ignore_index: int = IGNORE_INDEX) -> Tuple[jax.Array, jax.Array]:
  """Per-episode background/foreground intersection and union; jit-friendly.

  Args:
    pred: (B, H, W) integer prediction in {0, 1} (e.g. ``argmax(logits, -1)``).
    label: (B, H, W) integer label in {0, 1, ignore_index}.
    ignore_index: label value whose pixels are excluded.

  Returns:
    (inter, union): int32 arrays of shape (B, 2), column 0 background, column 1 foreground.
  """
  if pred.ndim != 3 or pred.shape != label.shape:
    raise ValueError(
        f"batch_stats: expected pred and label of equal shape (B, H, W), got {pred.shape} and "
        f"{label.shape}.")
  valid = label != ignore_index
  classes = jnp.arange(2, dtype=jnp.int32)
  p = valid[..., None] & (pred[..., None] == classes)  # (B, H, W, 2)
  t = label[..., None] == classes
  inter = jnp.sum(p & t, axis=(1, 2), dtype=jnp.int32)
  union = (jnp.sum(p, axis=(1, 2), dtype=jnp.int32) + jnp.sum(t, axis=(1, 2), dtype=jnp.int32)
           - inter)
  return inter, union


@dataclasses.dataclass
class _ClassCounts:
  episodes: int = 0
  inter: Tuple[int, int] = (0, 0)
  union: Tuple[int, int] = (0, 0)


class FewShotMeter:
  """Accumulates per-episode (class id, intersection, union) and reduces them the reference's way.

  Usage:
    meter = FewShotMeter(classes=novel_ids)
    meter.update_batch(class_ids, inter, union, valid=mask)   # from ``batch_stats``
    meter.miou(), meter.fbiou(), meter.per_class(), meter.summary()
  """

  def __init__(self, classes: Optional[Sequence[int]] = None):
    """Args: classes: default class ids for ``miou``/``per_class`` (e.g. the fold's novel ids)."""
    self.classes = None if classes is None else [int(c) for c in classes]
    self._counts: Dict[int, _ClassCounts] = {}

  # ---- accumulation ----
  def update(self, class_id: int, inter: Sequence[int], union: Sequence[int]) -> None:
    """Adds one episode. inter/union: (2,) counts [background, foreground]."""
    inter = _as_pair(inter, "inter")
    union = _as_pair(union, "union")
    c = self._counts.setdefault(int(class_id), _ClassCounts())
    c.episodes += 1
    c.inter = (c.inter[0] + inter[0], c.inter[1] + inter[1])
    c.union = (c.union[0] + union[0], c.union[1] + union[1])

  def update_batch(self, class_ids: Any, inter: Any, union: Any, valid: Any = None) -> None:
    """Adds a batch of episodes: class_ids (B,), inter/union (B, 2), valid (B,) bool or None.

    ``valid`` drops padding episodes (e.g. the last, padded evaluation batch).
    """
    class_ids = np.asarray(class_ids).reshape(-1)
    inter = np.asarray(inter).reshape(-1, 2)
    union = np.asarray(union).reshape(-1, 2)
    if not inter.shape[0] == union.shape[0] == class_ids.shape[0]:
      raise ValueError(f"update_batch: batch sizes differ: class_ids {class_ids.shape}, inter "
                       f"{inter.shape}, union {union.shape}.")
    valid = (np.ones(class_ids.shape, bool) if valid is None
             else np.asarray(valid, bool).reshape(-1))
    for cid, i, u, v in zip(class_ids, inter, union, valid):
      if v:
        self.update(int(cid), i, u)

  def merge(self, other: "FewShotMeter") -> "FewShotMeter":
    """Adds another meter's counts into this one (e.g. from another host); returns self."""
    for cid, oc in other._counts.items():  # pylint: disable=protected-access
      c = self._counts.setdefault(cid, _ClassCounts())
      c.episodes += oc.episodes
      c.inter = (c.inter[0] + oc.inter[0], c.inter[1] + oc.inter[1])
      c.union = (c.union[0] + oc.union[0], c.union[1] + oc.union[1])
    return self

  def reset(self) -> None:
    self._counts = {}

  # ---- reductions ----
  @property
  def num_episodes(self) -> int:
    return sum(c.episodes for c in self._counts.values())

  def seen_classes(self):
    return sorted(self._counts)

  def class_iou(self, class_id: int) -> float:
    """Σ inter_fg / (Σ union_fg + 1e-10) over the episodes of one class (0.0 when none)."""
    c = self._counts.get(int(class_id), _ClassCounts())
    return c.inter[1] / (c.union[1] + EPS)

  def miou(self, classes: Optional[Sequence[int]] = None) -> float:
    """Mean class IoU over ``classes`` (default: the meter's classes, else the seen classes).

    Classes without episodes count as 0, as in the reference.
    """
    classes = self._resolve(classes)
    if not classes:
      return float("nan")
    return float(np.mean([self.class_iou(c) for c in classes]))

  def fbiou(self) -> float:
    """Mean over {background, foreground} of global Σ inter / (Σ union + 1e-10)."""
    inter = [sum(c.inter[k] for c in self._counts.values()) for k in (0, 1)]
    union = [sum(c.union[k] for c in self._counts.values()) for k in (0, 1)]
    return float(np.mean([inter[k] / (union[k] + EPS) for k in (0, 1)]))

  def per_class(self, classes: Optional[Sequence[int]] = None) -> Dict[int, Dict[str, float]]:
    """{class_id: {'iou', 'episodes', 'inter', 'union'}} (foreground counts)."""
    out = {}
    for cid in self._resolve(classes):
      c = self._counts.get(cid, _ClassCounts())
      out[cid] = {"iou": self.class_iou(cid), "episodes": c.episodes,
                  "inter": c.inter[1], "union": c.union[1]}
    return out

  def summary(self, classes: Optional[Sequence[int]] = None, prefix: str = "") -> Dict[str, float]:
    """Flat dict: ``miou``, ``fbiou``, ``episodes`` and ``class_iou/<id>`` (keys prefixed)."""
    out = {f"{prefix}miou": self.miou(classes), f"{prefix}fbiou": self.fbiou(),
           f"{prefix}episodes": self.num_episodes}
    for cid, row in self.per_class(classes).items():
      out[f"{prefix}class_iou/{cid}"] = row["iou"]
    return out

  def format_table(self, classes: Optional[Sequence[int]] = None,
                   names: Optional[Mapping[int, str]] = None) -> str:
    """Human-readable per-class table plus the mIoU / FB-IoU lines."""
    lines = [f"{'class':>6} {'name':<24} {'episodes':>8} {'IoU %':>7}"]
    for cid, row in self.per_class(classes).items():
      name = (names or {}).get(cid, "")
      lines.append(f"{cid:>6} {name:<24} {row['episodes']:>8} {100 * row['iou']:>7.2f}")
    lines.append(f"mIoU {100 * self.miou(classes):.2f}  FB-IoU {100 * self.fbiou():.2f}  "
                 f"({self.num_episodes} episodes)")
    return "\n".join(lines)

  # ---- (de)serialisation ----
  def state_dict(self) -> Dict[str, Any]:
    """JSON-serialisable state."""
    return {"classes": self.classes,
            "counts": {str(k): {"episodes": c.episodes, "inter": list(c.inter),
                                "union": list(c.union)}
                       for k, c in sorted(self._counts.items())}}

  @classmethod
  def from_state_dict(cls, state: Mapping[str, Any]) -> "FewShotMeter":
    try:
      meter = cls(state.get("classes"))
      for k, c in state["counts"].items():
        meter._counts[int(k)] = _ClassCounts(  # pylint: disable=protected-access
            int(c["episodes"]), _as_pair(c["inter"], "inter"), _as_pair(c["union"], "union"))
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"FewShotMeter.from_state_dict: malformed state ({e!r}).") from e
    return meter

  def to_dense(self, max_class_id: int) -> np.ndarray:
    """(max_class_id + 1, 5) int64 rows [episodes, inter_bg, inter_fg, union_bg, union_fg]."""
    dense = np.zeros((max_class_id + 1, 5), np.int64)
    for cid, c in self._counts.items():
      if cid > max_class_id:
        raise ValueError(f"to_dense: class id {cid} > max_class_id {max_class_id}.")
      dense[cid] = (c.episodes, *c.inter, *c.union)
    return dense

  @classmethod
  def from_dense(cls, dense: np.ndarray,
                 classes: Optional[Sequence[int]] = None) -> "FewShotMeter":
    meter = cls(classes)
    for cid, row in enumerate(np.asarray(dense, np.int64)):
      if row[0]:
        meter._counts[cid] = _ClassCounts(  # pylint: disable=protected-access
            int(row[0]), (int(row[1]), int(row[2])), (int(row[3]), int(row[4])))
    return meter

  def _resolve(self, classes):
    if classes is not None:
      return [int(c) for c in classes]
    if self.classes is not None:
      return list(self.classes)
    return self.seen_classes()


def gather_meter(meter: FewShotMeter) -> FewShotMeter:
  """Sums meters over all JAX processes (every process gets the total). No-op on one process.

  Counts travel as pairs of int32 (high, low 31 bits) because JAX without x64 truncates int64.
  """
  if jax.process_count() == 1:
    return meter
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  local_max = max(meter.seen_classes(), default=0)
  max_id = int(np.max(multihost_utils.process_allgather(np.int32(local_max))))
  hi, lo = split_int64(meter.to_dense(max_id))
  hi = np.asarray(multihost_utils.process_allgather(hi)).astype(np.int64).sum(0)
  lo = np.asarray(multihost_utils.process_allgather(lo)).astype(np.int64).sum(0)
  return FewShotMeter.from_dense(join_int64(hi, lo), meter.classes)


def split_int64(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Non-negative int64 → (high, low) int32 with x = high · 2^31 + low."""
  x = np.asarray(x, np.int64)
  if np.any(x < 0):
    raise ValueError("split_int64: counts must be non-negative.")
  return (x >> 31).astype(np.int32), (x & (2**31 - 1)).astype(np.int32)


def join_int64(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
  """Inverse of ``split_int64`` (also valid for sums of split values)."""
  return (np.asarray(hi, np.int64) << 31) + np.asarray(lo, np.int64)


def mean_std(results: Sequence[Any], ddof: int = 0) -> Any:
  """Mean and standard deviation over runs (e.g. evaluation seeds).

  Args:
    results: list of floats, or list of flat dicts with the same numeric keys.
    ddof: 0 (population std, default) or 1 (sample std).

  Returns:
    ``{"mean", "std", "n"}`` for floats; for dicts ``{key: {"mean", "std", "n"}}``.
  """
  results = list(results)
  if not results:
    raise ValueError("mean_std: no results.")
  if isinstance(results[0], Mapping):
    keys = list(results[0])
    for i, r in enumerate(results):
      if list(r) != keys and set(r) != set(keys):
        raise ValueError(f"mean_std: result {i} has keys {sorted(r)}, expected {sorted(keys)}.")
    return {k: mean_std([r[k] for r in results], ddof) for k in keys}
  values = np.asarray(results, np.float64)
  std = float(np.std(values, ddof=ddof)) if len(values) > ddof else float("nan")
  return {"mean": float(np.mean(values)), "std": std, "n": len(values)}


def _as_pair(x: Iterable[Any], what: str) -> Tuple[int, int]:
  x = np.asarray(x).reshape(-1)
  if x.shape != (2,):
    raise ValueError(f"{what} must have 2 entries [background, foreground], got shape {x.shape}.")
  if not np.all(np.isfinite(x)) or np.any(x < 0) or np.any(x != np.round(x)):
    raise ValueError(f"{what} must be non-negative integer counts, got {x.tolist()}.")
  return int(x[0]), int(x[1])

