"""Tests for fss_jax.train.metrics against hand counts and a transcription of the reference."""
import json

import jax
import numpy as np
import pytest

from fss_jax.train import metrics
from tests import panet_metric_ref

# ---- independent oracle: direct numpy transcription of the reference's evaluation ----


def _ref_intersection_and_union(output, target, k=2, ignore_index=255):
  """util.util.intersectionAndUnion (histogram over bins 0..K)."""
  output = output.reshape(output.size).copy()
  target = target.reshape(target.size)
  output[np.where(target == ignore_index)[0]] = ignore_index
  intersection = output[np.where(output == target)[0]]
  area_inter, _ = np.histogram(intersection, bins=np.arange(k + 1))
  area_output, _ = np.histogram(output, bins=np.arange(k + 1))
  area_target, _ = np.histogram(target, bins=np.arange(k + 1))
  return area_inter, area_output + area_target - area_inter


def _ref_evaluate(episodes, novel):
  """tool/test.py's accumulation: per-class fg sums, global bg/fg sums, eps 1e-10."""
  cls_inter = {c: 0 for c in novel}
  cls_union = {c: 0 for c in novel}
  inter_sum = np.zeros(2)
  union_sum = np.zeros(2)
  for cid, pred, label in episodes:
    inter, union = _ref_intersection_and_union(pred, label)
    inter_sum += inter
    union_sum += union
    cls_inter[cid] += inter[1]
    cls_union[cid] += union[1]
  miou = np.mean([cls_inter[c] / (cls_union[c] + 1e-10) for c in novel])
  fbiou = np.mean(inter_sum / (union_sum + 1e-10))
  return miou, fbiou


# Hand-built episodes; the counts below are worked out by hand.
_EPISODES = [
    # class 1: valid = all but (1,1). fg: pred 3, label 3, inter 2, union 4.
    #          bg: pred 2, label 2, inter 1, union 3.
    (1, np.array([[1, 0, 0], [1, 1, 1]]), np.array([[1, 1, 0], [0, 255, 1]])),
    # class 1 again: fg: pred 0, label 2, inter 0, union 2. bg: pred 4, label 2, inter 2, union 4.
    (1, np.array([[0, 0], [0, 0]]), np.array([[0, 0], [1, 1]])),
    # class 2: valid (0,0), (1,1). fg: pred 2, label 0, inter 0, union 2.
    #          bg: pred 0, label 2, inter 0, union 2.
    (2, np.array([[1, 1], [1, 1]]), np.array([[0, 255], [255, 0]])),
    # class 3: empty foreground union. bg: inter 4, union 4.
    (3, np.zeros((2, 2), int), np.zeros((2, 2), int)),
]
_HAND_STATS = [([1, 2], [3, 4]), ([2, 0], [4, 2]), ([0, 0], [2, 2]), ([4, 0], [4, 0])]


def test_episode_stats_hand_counts():
  for (_, pred, label), (inter, union) in zip(_EPISODES, _HAND_STATS):
    i, u = metrics.episode_stats(pred, label)
    np.testing.assert_array_equal(i, inter)
    np.testing.assert_array_equal(u, union)


def test_meter_hand_computed():
  meter = metrics.FewShotMeter(classes=[1, 2, 3, 4])  # class 4 never appears
  for cid, pred, label in _EPISODES:
    meter.update(cid, *metrics.episode_stats(pred, label))
  # Class 1 accumulates sums (2+0)/(4+2) = 1/3, not the mean of per-episode IoUs (0.25).
  assert meter.class_iou(1) == pytest.approx(1 / 3)
  assert meter.class_iou(2) == 0.0
  assert meter.class_iou(3) == 0.0  # empty union: 0 / (0 + 1e-10)
  assert meter.class_iou(4) == 0.0  # no episode: counts as 0 in the mean
  assert meter.miou() == pytest.approx((1 / 3) / 4)
  assert meter.miou([1, 2]) == pytest.approx((1 / 3) / 2)
  # FB: fg 2/8, bg 7/13.
  assert meter.fbiou() == pytest.approx((2 / 8 + 7 / 13) / 2)
  assert meter.num_episodes == 4
  table = meter.per_class()
  assert table[1] == {"iou": pytest.approx(1 / 3), "episodes": 2, "inter": 2, "union": 6}
  assert table[4]["episodes"] == 0
  s = meter.summary(prefix="val/")
  assert s["val/miou"] == pytest.approx(1 / 12) and s["val/episodes"] == 4
  assert set(s) == {"val/miou", "val/fbiou", "val/episodes"} | {
      f"val/class_iou/{c}" for c in (1, 2, 3, 4)}
  ref_miou, ref_fb = _ref_evaluate(_EPISODES, [1, 2, 3, 4])
  assert meter.miou() == pytest.approx(ref_miou, abs=1e-12)
  assert meter.fbiou() == pytest.approx(ref_fb, abs=1e-12)
  assert "mIoU 8.33" in meter.format_table()


def test_random_episodes_match_reference_transcription():
  rng = np.random.default_rng(0)
  novel = [6, 7, 8, 9, 10]
  episodes = []
  for _ in range(40):
    label = rng.choice([0, 1, 255], size=(9, 11), p=[0.5, 0.35, 0.15])
    pred = rng.integers(0, 2, size=(9, 11))
    episodes.append((int(rng.choice(novel[:4])), pred, label))  # class 10 unseen
  meter = metrics.FewShotMeter(novel)
  for cid, pred, label in episodes:
    i, u = metrics.episode_stats(pred, label)
    ri, ru = _ref_intersection_and_union(pred, label)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_array_equal(u, ru)
    meter.update(cid, i, u)
  ref_miou, ref_fb = _ref_evaluate(episodes, novel)
  assert meter.miou() == pytest.approx(ref_miou, abs=1e-12)
  assert meter.fbiou() == pytest.approx(ref_fb, abs=1e-12)


def test_batch_stats_jit_matches_numpy():
  rng = np.random.default_rng(1)
  label = rng.choice([0, 1, 255], size=(5, 7, 6)).astype(np.uint8)
  pred = rng.integers(0, 2, size=(5, 7, 6)).astype(np.int32)
  inter, union = jax.jit(metrics.batch_stats)(pred, label)
  assert inter.shape == (5, 2) and union.shape == (5, 2)
  for b in range(5):
    i, u = metrics.episode_stats(pred[b], label[b])
    np.testing.assert_array_equal(np.asarray(inter[b]), i)
    np.testing.assert_array_equal(np.asarray(union[b]), u)


def test_update_batch_valid_mask_and_merge():
  rng = np.random.default_rng(2)
  label = rng.choice([0, 1, 255], size=(6, 5, 5))
  pred = rng.integers(0, 2, size=(6, 5, 5))
  cids = np.array([1, 2, 1, 3, 2, 1])
  inter, union = metrics.batch_stats(pred, label)
  valid = np.array([1, 1, 1, 1, 0, 0], bool)  # last two are padding
  batched = metrics.FewShotMeter([1, 2, 3])
  batched.update_batch(cids, inter, union, valid=valid)
  one_by_one = metrics.FewShotMeter([1, 2, 3])
  for b in range(4):
    one_by_one.update(cids[b], *metrics.episode_stats(pred[b], label[b]))
  assert batched.state_dict() == one_by_one.state_dict()
  # Two "hosts" with halves of the data merge to the whole.
  a, b = metrics.FewShotMeter([1, 2, 3]), metrics.FewShotMeter([1, 2, 3])
  a.update_batch(cids[:2], inter[:2], union[:2])
  b.update_batch(cids[2:4], inter[2:4], union[2:4])
  assert a.merge(b).state_dict() == batched.state_dict()


def test_state_roundtrip_dense_and_gather():
  meter = metrics.FewShotMeter([1, 2, 3, 4])
  for cid, pred, label in _EPISODES:
    meter.update(cid, *metrics.episode_stats(pred, label))
  state = json.loads(json.dumps(meter.state_dict()))
  again = metrics.FewShotMeter.from_state_dict(state)
  assert again.miou() == meter.miou() and again.fbiou() == meter.fbiou()
  dense = metrics.FewShotMeter.from_dense(meter.to_dense(4), meter.classes)
  assert dense.state_dict() == meter.state_dict()


def test_gather_meter_sums_processes(monkeypatch):
  """The multi-process path, with two simulated processes: every process gets the sum, the
  largest class id seen anywhere sizes the dense table, counts beyond int32 survive."""
  from jax.experimental import multihost_utils
  a, b = metrics.FewShotMeter([1, 2, 3, 4]), metrics.FewShotMeter([1, 2, 3, 4])
  for i, (cid, pred, label) in enumerate(_EPISODES):
    (a if i % 2 else b).update(cid, *metrics.episode_stats(pred, label))
  b.update(4, np.array([3_000_000_000, 5]), np.array([3_000_000_001, 9]))  # > 2^31
  want = metrics.FewShotMeter([1, 2, 3, 4]).merge(a).merge(b)
  max_id = max(a.seen_classes() + b.seen_classes())
  # process_allgather returns (this process's value, the other's): first the largest class
  # id, then the dense counts' high and low int32 halves.
  theirs = iter([np.int32(max(b.seen_classes())), *metrics.split_int64(b.to_dense(max_id))])
  monkeypatch.setattr(metrics.jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather",
                      lambda x: np.stack([np.asarray(x), next(theirs)]))
  got = metrics.gather_meter(a)
  assert got.state_dict() == want.state_dict() != a.state_dict()
  assert got.miou() == want.miou() and got.fbiou() == want.fbiou()
  with pytest.raises(ValueError, match="malformed"):
    metrics.FewShotMeter.from_state_dict({"counts": {"1": {"inter": [1, 2]}}})


def test_int64_split_roundtrip_and_sums():
  x = np.array([0, 1, 2**31 - 1, 2**31, 8_200_000_000, 2**40 + 12345], np.int64)
  y = np.array([5, 2**31 - 1, 2**31 - 1, 3, 8_200_000_000, 7], np.int64)
  (hx, lx), (hy, ly) = metrics.split_int64(x), metrics.split_int64(y)
  assert hx.dtype == np.int32 and lx.dtype == np.int32
  np.testing.assert_array_equal(metrics.join_int64(hx, lx), x)
  summed = metrics.join_int64(hx.astype(np.int64) + hy, lx.astype(np.int64) + ly)
  np.testing.assert_array_equal(summed, x + y)


def test_bad_inputs():
  meter = metrics.FewShotMeter()
  with pytest.raises(ValueError, match="inter must have 2 entries"):
    meter.update(1, [1, 2, 3], [1, 2])
  with pytest.raises(ValueError, match="needs target"):
    metrics.FewShotMeter(rule="panet").update(1, [1, 2], [1, 2])
  with pytest.raises(ValueError, match="rule must be"):
    metrics.FewShotMeter(rule="oslsm")
  with pytest.raises(ValueError, match="non-negative integer"):
    meter.update(1, [1, -2], [1, 2])
  with pytest.raises(ValueError, match="shape"):
    metrics.episode_stats(np.zeros((2, 2)), np.zeros((2, 3)))
  with pytest.raises(ValueError, match="B, H, W"):
    metrics.batch_stats(np.zeros((2, 2)), np.zeros((2, 2)))
  assert np.isnan(meter.miou())


def test_mean_std():
  r = metrics.mean_std([0.5, 0.7, 0.6])
  assert r["mean"] == pytest.approx(0.6) and r["n"] == 3
  assert r["std"] == pytest.approx(np.sqrt(((0.1) ** 2 * 2) / 3))
  assert metrics.mean_std([0.5, 0.7], ddof=1)["std"] == pytest.approx(np.sqrt(0.02))
  d = metrics.mean_std([{"miou": 0.5, "fbiou": 0.7}, {"miou": 0.7, "fbiou": 0.7}])
  assert d["miou"]["mean"] == pytest.approx(0.6) and d["fbiou"]["std"] == 0.0
  with pytest.raises(ValueError, match="keys"):
    metrics.mean_std([{"miou": 0.5}, {"fbiou": 0.5}])
  with pytest.raises(ValueError, match="no results"):
    metrics.mean_std([])


# ---- N-way episodes and PANet's rule (util/metric.py; oracle: tests/panet_metric_ref.py) ----

# Hand-built 2-way episodes (class ids in way order, pred, label; 0 bg, j = way j, 255 void).
_NWAY = [
    # classes 3 and 5 both in the label.
    ((3, 5), np.array([[1, 1, 0], [2, 0, 2]]), np.array([[1, 0, 0], [2, 255, 2]])),
    # class 6 absent from the label: a false positive of way 2 is not counted under 'panet'.
    ((5, 6), np.array([[1, 2, 2], [0, 0, 1]]), np.array([[1, 0, 0], [0, 0, 1]])),
    # only void and way 1: the background is absent from the label.
    ((6, 3), np.array([[1, 0], [1, 1]]), np.array([[1, 1], [255, 1]])),
]


def test_panet_rule_hand_computed():
  """Counts worked out by hand, per class, for the episodes above."""
  meter = metrics.FewShotMeter([3, 5, 6, 7], rule="panet")
  fss = metrics.FewShotMeter([3, 5, 6, 7])
  for cids, pred, label in _NWAY:
    inter, union, target = metrics.episode_counts(pred, label, num_classes=3)
    meter.update(cids, inter, union, target)
    fss.update(cids, inter, union)
  # class 3: ep 1 way 1 (TP 1, FP 1, FN 0) + ep 3 way 2 (absent from the label: skipped).
  assert meter.per_class([3])[3] == {"iou": 0.5, "episodes": 2, "inter": 1, "union": 2,
                                     "scored": 1}
  # class 5: ep 1 way 2 (TP 2, FP 0, FN 0) + ep 2 way 1 (TP 2, FP 0, FN 0): 4 / 4.
  assert meter.class_iou(5) == 1.0
  # class 6: ep 2 way 2 absent (FP 2 ignored) + ep 3 way 1 (pred {(0,0),(1,1)}, label
  # {(0,0),(0,1),(1,1)}: TP 2, FP 0, FN 1): 2 / 3.
  assert meter.class_iou(6) == pytest.approx(2 / 3)
  assert np.isnan(meter.class_iou(7)) and np.isnan(meter.miou())  # never scored: NaN mean
  assert meter.miou([3, 5, 6]) == pytest.approx((0.5 + 1 + 2 / 3) / 3)
  # background: ep 1 (pred {(0,2),(1,1)->void dropped}: TP 1, FP 0, FN 1), ep 2 (TP 2, FP 0,
  # FN 2), ep 3 absent. Pooled fg: TP 1+2+2+2 = 7, FP 1+0+0 = 1, FN 1.
  assert meter.fbiou() == pytest.approx((3 / 6 + 7 / 9) / 2)
  # The 'fss' rule counts the absent class 6's false positives (union 2 in ep 2) and ep 3's
  # background (union 1: one predicted background pixel, no label background).
  assert fss.per_class([6])[6] == {"iou": pytest.approx(2 / 5), "episodes": 2, "inter": 2,
                                   "union": 5}
  assert "binary IoU" in meter.format_table()


@pytest.mark.parametrize("way", [1, 2, 3])
def test_panet_rule_matches_the_official_metric_transcription(way):
  """Random N-way episodes in 2 runs, classes often absent from the label: per run, the class
  IoUs, mIoU and binary IoU equal ``Metric``'s (set-based counting) to 1e-12."""
  rng = np.random.default_rng(way)
  novel = [6, 7, 8, 9, 10]
  oracle = panet_metric_ref.Metric(max_label=20, n_runs=2)
  for run in range(2):
    meter = metrics.FewShotMeter(novel, rule="panet")
    batch_pred, batch_label, batch_cids = [], [], []
    for _ in range(30):
      cids = [int(c) for c in rng.choice(novel, size=way, replace=False)]
      # each way's class present with probability 0.6, background with 0.8
      present = [rng.random() < 0.8] + [rng.random() < 0.6 for _ in range(way)]
      values = [v for v, p in zip(range(way + 1), present) if p] + [255]
      label = rng.choice(values, size=(7, 9))
      pred = rng.integers(0, way + 1, size=(7, 9))
      oracle.record(pred, label, cids, run)
      batch_pred.append(pred), batch_label.append(label), batch_cids.append(cids)
    inter, union, target = jax.jit(metrics.batch_counts, static_argnums=(2, 3))(
        np.stack(batch_pred), np.stack(batch_label).astype(np.uint8), 255, way + 1)
    meter.update_batch(np.array(batch_cids), inter, union, target=target)
    class_iou, miou = oracle.get_miou(novel, run)
    np.testing.assert_allclose([meter.class_iou(c) for c in novel], class_iou, rtol=1e-12)
    assert (np.isnan(miou) and np.isnan(meter.miou())) or meter.miou() == pytest.approx(
        miou, rel=1e-12)
    _, binary = oracle.get_miou_binary(run)
    assert meter.fbiou() == pytest.approx(binary, rel=1e-12)
    # the dense form (multi-process gather) keeps the rule and the counts
    dense = metrics.FewShotMeter.from_dense(meter.to_dense(10), novel, "panet")
    assert dense.state_dict() == meter.state_dict()


def test_nway_fss_rule_is_the_sum_of_one_way_scores():
  """Under the 'fss' rule an N-way episode adds each way's counts to its class exactly as N
  one-way episodes scored on 'way j vs. everything else' would, and its background once."""
  rng = np.random.default_rng(5)
  meter = metrics.FewShotMeter([1, 2, 3])
  for _ in range(10):
    cids = rng.choice([1, 2, 3], size=2, replace=False)
    label = rng.choice([0, 1, 2, 255], size=(6, 6))
    pred = rng.integers(0, 3, size=(6, 6))
    inter, union = metrics.episode_stats(pred, label, num_classes=3)
    meter.update(cids, inter, union)
    for j, c in enumerate(cids, start=1):
      i1, u1 = metrics.episode_stats((pred == j).astype(int),
                                     np.where(label == 255, 255, label == j))
      assert (i1[1], u1[1]) == (inter[j], union[j])
  assert meter.num_episodes == 10
  assert sum(meter.per_class()[c]["episodes"] for c in (1, 2, 3)) == 20
