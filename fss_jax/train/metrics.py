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


def episode_stats(pred: np.ndarray, label: np.ndarray, ignore_index: int = IGNORE_INDEX,
                  num_classes: int = 2) -> Tuple[np.ndarray, np.ndarray]:
  """Per-class intersection and union of one episode (numpy, host side).

  Args:
    pred: (H, W) integer prediction in [0, C).
    label: (H, W) integer label in [0, C) or ignore_index (other values count in no class).
    ignore_index: label value whose pixels are excluded.
    num_classes: C: 2 (background, foreground) or 1 + N for an N-way episode.

  Returns:
    (inter, union): int64 arrays of shape (C,), index 0 background, j the j-th way.
  """
  inter, union, _ = episode_counts(pred, label, ignore_index, num_classes)
  return inter, union


def episode_counts(pred: np.ndarray, label: np.ndarray, ignore_index: int = IGNORE_INDEX,
                   num_classes: int = 2) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``episode_stats`` plus the label's pixel count of each class, (C,) int64 each."""
  pred = np.asarray(pred)
  label = np.asarray(label)
  if pred.shape != label.shape:
    raise ValueError(f"episode_stats: pred shape {pred.shape} != label shape {label.shape}.")
  valid = label != ignore_index
  inter = np.empty(num_classes, np.int64)
  union = np.empty(num_classes, np.int64)
  target = np.empty(num_classes, np.int64)
  for c in range(num_classes):
    p = valid & (pred == c)
    t = label == c
    inter[c] = np.count_nonzero(p & t)
    target[c] = np.count_nonzero(t)
    union[c] = np.count_nonzero(p) + target[c] - inter[c]
  return inter, union, target


def batch_counts(pred: jax.Array, label: jax.Array, ignore_index: int = IGNORE_INDEX,
                 num_classes: int = 2) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Per-episode, per-class intersection, union and label pixel count; jit-friendly.

  Args:
    pred: (B, H, W) integer prediction in [0, C) (e.g. ``argmax(logits, -1)``).
    label: (B, H, W) integer label in [0, C) or ignore_index.
    ignore_index: label value whose pixels are excluded.
    num_classes: C (2, or 1 + N for N-way episodes).

  Returns:
    (inter, union, target): int32 arrays of shape (B, C), column 0 background.
  """
  if pred.ndim != 3 or pred.shape != label.shape:
    raise ValueError(
        f"batch_stats: expected pred and label of equal shape (B, H, W), got {pred.shape} and "
        f"{label.shape}.")
  valid = label != ignore_index
  classes = jnp.arange(num_classes, dtype=jnp.int32)
  p = valid[..., None] & (pred[..., None] == classes)  # (B, H, W, C)
  t = label[..., None] == classes
  inter = jnp.sum(p & t, axis=(1, 2), dtype=jnp.int32)
  target = jnp.sum(t, axis=(1, 2), dtype=jnp.int32)
  union = jnp.sum(p, axis=(1, 2), dtype=jnp.int32) + target - inter
  return inter, union, target


def batch_stats(pred: jax.Array, label: jax.Array, ignore_index: int = IGNORE_INDEX,
                num_classes: int = 2) -> Tuple[jax.Array, jax.Array]:
  """(inter, union) of ``batch_counts``: (B, C) int32 each."""
  inter, union, _ = batch_counts(pred, label, ignore_index, num_classes)
  return inter, union


RULES = ("fss", "panet")


@dataclasses.dataclass
class _Counts:
  """Summed counts of one class (or of the background).

  episodes: episodes the class was a way of (background: every episode); scored: those whose
  counts were added (rule 'fss': all; 'panet': those whose label holds the class).
  """
  episodes: int = 0
  scored: int = 0
  inter: int = 0
  union: int = 0

  def add(self, inter: int, union: int, scored: bool) -> None:
    self.episodes += 1
    if scored:
      self.scored += 1
      self.inter += int(inter)
      self.union += int(union)

  def merge(self, other: "_Counts") -> None:
    self.episodes += other.episodes
    self.scored += other.scored
    self.inter += other.inter
    self.union += other.union

  def row(self) -> Tuple[int, int, int, int]:
    return (self.episodes, self.scored, self.inter, self.union)


class FewShotMeter:
  """Accumulates per-episode (way classes, intersection, union) and reduces them by a rule.

  An episode has N ways (N = 1 but for PANet's N-way episodes): counts are per episode-local
  index, 0 = background, j = way j's class ``class_ids[j - 1]``; way j's counts add to its
  class, index 0's to the background.

  Rules:
    'fss' (PFENet/ASGNet ``tool/test.py``, the module docstring): every episode adds its counts;
      class IoU = Σ inter / (Σ union + 1e-10), a class without episodes counts 0 in the mean;
      FB-IoU = mean over {background, pooled foreground} of Σ inter / (Σ union + 1e-10).
    'panet' (kaixin96/PANet ``util/metric.py``, reference_panet.md §9): an episode adds class j's
      counts only if its label holds class j (``target`` > 0), background included; class IoU =
      Σ TP / Σ (TP + FP + FN) = Σ inter / Σ union over those episodes, NaN for a class never
      scored (and then a NaN mIoU, as ``get_mIoU``'s plain mean); binary IoU = mean of the
      background IoU and the IoU of the counts pooled over all foreground classes.

  Usage:
    meter = FewShotMeter(classes=novel_ids)
    meter.update_batch(class_ids, inter, union, valid=mask, target=target)  # ``batch_counts``
    meter.miou(), meter.fbiou(), meter.per_class(), meter.summary()
  """

  def __init__(self, classes: Optional[Sequence[int]] = None, rule: str = "fss"):
    """Args: classes: default class ids for ``miou``/``per_class`` (e.g. the fold's novel ids);
    rule: 'fss' or 'panet' (see the class docstring)."""
    if rule not in RULES:
      raise ValueError(f"FewShotMeter: rule must be one of {RULES}, got {rule!r}.")
    self.classes = None if classes is None else [int(c) for c in classes]
    self.rule = rule
    self._bg = _Counts()
    self._counts: Dict[int, _Counts] = {}

  # ---- accumulation ----
  def update(self, class_ids: Any, inter: Sequence[int], union: Sequence[int],
             target: Optional[Sequence[int]] = None) -> None:
    """Adds one episode.

    Args:
      class_ids: the episode's class (int) or its N way classes.
      inter, union: (1 + N,) counts [background, way 1, ..., way N].
      target: (1 + N,) label pixel counts of the same classes (needed by rule 'panet').
    """
    class_ids = [int(c) for c in np.asarray(class_ids).reshape(-1)]
    n = 1 + len(class_ids)
    inter = _as_counts(inter, n, "inter")
    union = _as_counts(union, n, "union")
    if target is None:
      if self.rule == "panet":
        raise ValueError("FewShotMeter(rule='panet').update needs target (label pixel counts).")
      present = [True] * n
    else:
      present = [t > 0 or self.rule == "fss" for t in _as_counts(target, n, "target")]
    self._bg.add(inter[0], union[0], present[0])
    for j, cid in enumerate(class_ids, start=1):
      self._counts.setdefault(cid, _Counts()).add(inter[j], union[j], present[j])

  def update_batch(self, class_ids: Any, inter: Any, union: Any, valid: Any = None,
                   target: Any = None) -> None:
    """Adds a batch of episodes: class_ids (B,) or (B, N), inter/union/target (B, 1 + N),
    valid (B,) bool or None.

    ``valid`` drops padding episodes (e.g. the last, padded evaluation batch).
    """
    inter = np.asarray(inter)
    b = inter.shape[0] if inter.ndim else 0
    class_ids = np.asarray(class_ids).reshape(b, -1) if b else np.asarray(class_ids)
    union = np.asarray(union)
    if not (inter.ndim == 2 and union.shape == inter.shape and class_ids.shape[0] == b
            and inter.shape[1] == 1 + class_ids.shape[1]):
      raise ValueError(f"update_batch: shapes differ: class_ids {class_ids.shape}, inter "
                       f"{inter.shape}, union {union.shape} (want (B, N) and (B, 1 + N)).")
    valid = np.ones(b, bool) if valid is None else np.asarray(valid, bool).reshape(-1)
    target = [None] * b if target is None else np.asarray(target)
    for cid, i, u, t, v in zip(class_ids, inter, union, target, valid):
      if v:
        self.update(cid, i, u, t)

  def merge(self, other: "FewShotMeter") -> "FewShotMeter":
    """Adds another meter's counts into this one (e.g. from another host); returns self."""
    if other.rule != self.rule:
      raise ValueError(f"merge: rules differ ({self.rule!r}, {other.rule!r}).")
    self._bg.merge(other._bg)  # pylint: disable=protected-access
    for cid, oc in other._counts.items():  # pylint: disable=protected-access
      self._counts.setdefault(cid, _Counts()).merge(oc)
    return self

  def reset(self) -> None:
    self._bg = _Counts()
    self._counts = {}

  # ---- reductions ----
  @property
  def num_episodes(self) -> int:
    return self._bg.episodes

  def seen_classes(self):
    return sorted(self._counts)

  def _iou(self, inter: int, union: int, scored: int) -> float:
    if self.rule == "panet":
      return inter / union if scored and union else float("nan")
    return inter / (union + EPS)

  def class_iou(self, class_id: int) -> float:
    """The class's IoU by the meter's rule ('fss': 0.0 when it has no episode; 'panet': NaN
    when it was never scored)."""
    c = self._counts.get(int(class_id), _Counts())
    return self._iou(c.inter, c.union, c.scored)

  def miou(self, classes: Optional[Sequence[int]] = None) -> float:
    """Mean class IoU over ``classes`` (default: the meter's classes, else the seen classes).

    Rule 'fss': classes without episodes count as 0, as in the reference; 'panet': a class
    never scored makes the mean NaN, as PANet's ``get_mIoU``.
    """
    classes = self._resolve(classes)
    if not classes:
      return float("nan")
    return float(np.mean([self.class_iou(c) for c in classes]))

  def fbiou(self) -> float:
    """Mean over {background, pooled foreground} of Σ inter / Σ union (the rule's form)."""
    fg = _Counts()
    for c in self._counts.values():
      fg.merge(c)
    return float(np.mean([self._iou(x.inter, x.union, x.scored) for x in (self._bg, fg)]))

  def per_class(self, classes: Optional[Sequence[int]] = None) -> Dict[int, Dict[str, float]]:
    """{class_id: {'iou', 'episodes', 'inter', 'union'}} (foreground counts; rule 'panet'
    adds 'scored', the episodes whose label held the class)."""
    out = {}
    for cid in self._resolve(classes):
      c = self._counts.get(cid, _Counts())
      out[cid] = {"iou": self.class_iou(cid), "episodes": c.episodes,
                  "inter": c.inter, "union": c.union}
      if self.rule == "panet":
        out[cid]["scored"] = c.scored
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
    fb = "binary IoU" if self.rule == "panet" else "FB-IoU"
    lines.append(f"mIoU {100 * self.miou(classes):.2f}  {fb} {100 * self.fbiou():.2f}  "
                 f"({self.num_episodes} episodes)")
    return "\n".join(lines)

  # ---- (de)serialisation ----
  def state_dict(self) -> Dict[str, Any]:
    """JSON-serialisable state."""
    row = lambda c: {"episodes": c.episodes, "scored": c.scored, "inter": c.inter,
                     "union": c.union}
    return {"classes": self.classes, "rule": self.rule, "background": row(self._bg),
            "counts": {str(k): row(c) for k, c in sorted(self._counts.items())}}

  @classmethod
  def from_state_dict(cls, state: Mapping[str, Any]) -> "FewShotMeter":
    try:
      meter = cls(state.get("classes"), state.get("rule", "fss"))
      read = lambda c: _Counts(*_as_counts(
          [c["episodes"], c["scored"], c["inter"], c["union"]], 4, "counts"))
      meter._bg = read(state["background"])  # pylint: disable=protected-access
      for k, c in state["counts"].items():
        meter._counts[int(k)] = read(c)  # pylint: disable=protected-access
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"FewShotMeter.from_state_dict: malformed state ({e!r}).") from e
    return meter

  def to_dense(self, max_class_id: int) -> np.ndarray:
    """(max_class_id + 1, 4) int64 rows [episodes, scored, inter, union]; row 0 is the
    background, row c class c."""
    dense = np.zeros((max_class_id + 1, 4), np.int64)
    dense[0] = self._bg.row()
    for cid, c in self._counts.items():
      if not 0 < cid <= max_class_id:
        raise ValueError(f"to_dense: class id {cid} not in 1..max_class_id {max_class_id}.")
      dense[cid] = c.row()
    return dense

  @classmethod
  def from_dense(cls, dense: np.ndarray, classes: Optional[Sequence[int]] = None,
                 rule: str = "fss") -> "FewShotMeter":
    meter = cls(classes, rule)
    dense = np.asarray(dense, np.int64)
    meter._bg = _Counts(*(int(x) for x in dense[0]))  # pylint: disable=protected-access
    for cid, row in enumerate(dense[1:], start=1):
      if row[0]:
        meter._counts[cid] = _Counts(*(int(x) for x in row))  # pylint: disable=protected-access
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
  return FewShotMeter.from_dense(join_int64(hi, lo), meter.classes, meter.rule)


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


def _as_counts(x: Iterable[Any], n: int, what: str) -> Tuple[int, ...]:
  x = np.asarray(x).reshape(-1)
  if x.shape != (n,):
    raise ValueError(f"{what} must have {n} entries [background, way 1, ...], got shape "
                     f"{x.shape}.")
  if not np.all(np.isfinite(x)) or np.any(x < 0) or np.any(x != np.round(x)):
    raise ValueError(f"{what} must be non-negative integer counts, got {x.tolist()}.")
  return tuple(int(v) for v in x)
