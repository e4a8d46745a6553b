"""Episode sampling against hand-built class-pixel tables (reference §7-§8)."""
import collections

import numpy as np
import pytest

from fss_jax.data import episodes as E
from fss_jax.data import schema

BIG, SMALL = E.MIN_CLASS_PIXELS, E.MIN_CLASS_PIXELS - 1


def _images(table):
  """Manifest-style entries from a list of {class: pixels}."""
  return [{"id": f"im{i}", "height": 100, "width": 100,
           "classes": {str(c): n for c, n in px.items()}} for i, px in enumerate(table)]


def _random_table(n, num_classes=10, seed=0):
  rng = np.random.default_rng(seed)
  table = []
  for _ in range(n):
    cs = rng.choice(num_classes, size=rng.integers(1, 4), replace=False) + 1
    table.append({int(c): int(rng.choice([50, SMALL, BIG, 5000])) for c in cs})
  return table


def test_min_pixels_is_reference_threshold():
  assert E.MIN_CLASS_PIXELS == 2048


def test_build_class_index_hand_case():
  images = _images([{1: BIG, 2: SMALL}, {2: BIG}, {1: 10, 3: 9999}, {1: BIG + 5}])
  index = E.build_class_index(images, [1, 2, 3, 4])
  assert {c: v.tolist() for c, v in index.items()} == {1: [0, 3], 2: [1], 3: [2], 4: []}


def test_train_query_list_and_targets():
  base, novel = [1, 2, 3], [4, 5]
  table = [{1: BIG, 4: BIG}, {4: BIG}, {2: SMALL, 5: BIG}, {1: BIG, 2: BIG},
           {2: BIG, 3: BIG}, {3: BIG, 1: SMALL}, {1: BIG}, {2: BIG}, {3: BIG}]
  sampler = E.train_episode_sampler(_images(table), base, shot=1)
  # Images 1 (novel only) and 2 (base class too small) are not queries.
  assert sampler.queries.tolist() == [0, 3, 4, 5, 6, 7, 8]
  assert sampler.query_classes[0] == (1,)  # novel 4 never a target
  assert sampler.query_classes[2] == (2, 3)
  seen = collections.Counter()
  for pos in range(len(sampler)):
    for k in range(200):
      ep = sampler.sample(pos, np.random.default_rng([pos, k]))
      q = int(sampler.queries[pos])
      assert ep.query == q and ep.class_id in sampler.query_classes[pos]
      assert ep.class_id not in novel
      assert len(ep.supports) == 1 and q not in ep.supports
      for s in ep.supports:
        assert table[s].get(ep.class_id, 0) >= BIG
      if pos == 2:
        seen[ep.class_id] += 1
  # Uniform over the query's eligible classes (2 and 3): 200 draws, each ~100.
  assert 70 < seen[2] < 130 and seen[2] + seen[3] == 200


def test_train_supports_distinct_and_uniform():
  table = [{1: BIG} for _ in range(6)]
  sampler = E.train_episode_sampler(_images(table), [1], shot=3)
  counts = collections.Counter()
  for k in range(600):
    ep = sampler.sample(0, np.random.default_rng(k))
    assert len(set(ep.supports)) == 3 and 0 not in ep.supports
    counts.update(ep.supports)
  # 5 candidates, 3 picked: each ~ 600 * 3 / 5 = 360.
  assert set(counts) == {1, 2, 3, 4, 5}
  assert all(300 < v < 420 for v in counts.values())


def test_train_sample_is_deterministic_in_rng():
  table = _random_table(60)
  sampler = E.train_episode_sampler(_images(table), range(1, 8), shot=2)
  a = [sampler.sample(p, np.random.default_rng([7, p])) for p in range(50)]
  b = [E.sample_train_episode(sampler, p, np.random.default_rng([7, p])) for p in range(50)]
  assert a == b
  c = [sampler.sample(p, np.random.default_rng([8, p])) for p in range(50)]
  assert a != c


def test_train_classes_too_rare_for_shot_are_left_out(caplog):
  table = [{1: BIG}, {1: BIG, 2: BIG}, {2: BIG}, {2: BIG}, {3: 5}]
  sampler = E.train_episode_sampler(_images(table), [1, 2, 3], shot=2)
  assert "[1]" in caplog.text  # class 1: 2 images cannot give a query 2 others
  assert sampler.queries.tolist() == [1, 2, 3]
  assert sampler.query_classes == ((2,), (2,), (2,))
  assert set(sampler.class_images) == {2}
  with pytest.raises(ValueError, match="no image"):
    E.train_episode_sampler(_images([{3: BIG}]), [1, 2], shot=1)
  with pytest.raises(ValueError, match="no image"):
    E.train_episode_sampler(_images([{1: BIG}]), [1], shot=1)


def _oracle_eval(table, novel, shot, n, seed):
  """Straight transcription of §8 with per-episode generators."""
  eligible = {c: [i for i, px in enumerate(table) if px.get(c, 0) >= BIG] for c in novel}
  queries = [i for i, px in enumerate(table)
             if any(px.get(c, 0) >= BIG for c in novel)]
  out = []
  for i in range(n):
    rng = np.random.default_rng([seed, i])
    q = queries[i % len(queries)]
    present = sorted(c for c in novel if table[q].get(c, 0) > 0)
    c = present[rng.integers(len(present))]
    cands = [j for j in eligible[c] if j != q]
    picks = rng.choice(len(cands), size=shot, replace=False)
    out.append(E.Episode(q, tuple(cands[p] for p in picks), c))
  return out


@pytest.mark.parametrize("shot", [1, 5])
def test_eval_episodes_walk_and_oracle(shot):
  novel = [6, 7, 8, 9, 10]
  table = _random_table(120, seed=3)
  eps = E.eval_episodes(_images(table), novel, shot, 173, seed=321)
  assert len(eps) == 173
  assert eps == _oracle_eval(table, novel, shot, 173, 321)
  queries = [i for i, px in enumerate(table) if any(px.get(c, 0) >= BIG for c in novel)]
  assert [e.query for e in eps] == [queries[i % len(queries)] for i in range(173)]
  for e in eps:
    assert e.class_id in novel and table[e.query].get(e.class_id, 0) > 0
    assert len(set(e.supports)) == shot and e.query not in e.supports
    assert all(table[s][e.class_id] >= BIG for s in e.supports)


def test_eval_class_drawn_among_present_not_only_eligible():
  # Query 0: novel 4 eligible, novel 5 present but small -> both drawn.
  table = [{4: BIG, 5: 100}, {4: BIG}, {5: BIG}, {5: BIG}, {1: BIG}]
  eps = E.eval_episodes(_images(table), [4, 5], 1, 200, seed=0)
  classes0 = collections.Counter(e.class_id for e in eps if e.query == 0)
  assert set(classes0) == {4, 5}
  assert 4 not in {e.query for e in eps}  # no novel class: never a query


def test_eval_deterministic_seeds_and_prefix():
  table = _random_table(80, seed=1)
  images = _images(table)
  a = E.eval_episodes(images, [1, 2, 3], 1, 100, seed=321)
  assert a == E.eval_episodes(images, [1, 2, 3], 1, 100, seed=321)
  assert a[:40] == E.eval_episodes(images, [1, 2, 3], 1, 40, seed=321)
  assert a != E.eval_episodes(images, [1, 2, 3], 1, 100, seed=322)


def test_eval_episode_list_from_manifest():
  table = _random_table(50, seed=2)
  manifest = schema.Manifest(
      name="t", classes=[f"c{i}" for i in range(1, 11)],
      novel_folds=[[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]],
      splits={"val": {"files": [], "images": _images(table)}})
  eps = E.eval_episode_list(manifest, "val", 1, 1, 30, seed=5)
  assert eps == E.eval_episodes(_images(table), [6, 7, 8, 9, 10], 1, 30, 5)
  sampler = E.train_sampler_for_fold(manifest, "val", 0, 1)
  assert set(sampler.class_images) <= set(range(6, 11))
  with pytest.raises(ValueError, match="fold 2"):
    E.eval_episode_list(manifest, "val", 2, 1, 30, seed=5)


def test_eval_classes_without_supports_are_not_drawn(caplog):
  # Query 0 has 4 (eligible, 2 other images) and 5 (present; no other image of 5).
  table = [{4: BIG, 5: BIG}, {4: BIG}, {4: BIG}, {1: BIG}]
  eps = E.eval_episodes(_images(table), [4, 5], 1, 30, seed=0)
  assert "[5]" in caplog.text
  assert {e.class_id for e in eps} == {4}
  assert [e.query for e in eps[:3]] == [0, 1, 2]
  with pytest.raises(ValueError, match="no image"):
    E.eval_episodes(_images([{4: BIG}, {1: BIG}]), [4], 1, 3, seed=0)


# ----------------------------------------------------------------------------- N-way


def _check_nway(ep, table, way, shot, classes):
  assert ep.way == way and ep.shot == shot and len(ep.supports) == way * shot
  assert len(set(ep.class_ids)) == way and set(ep.class_ids) <= set(classes)
  assert ep.class_id == ep.class_ids[0]
  assert table[ep.query].get(ep.class_ids[ep.query_way], 0) > 0  # the query's own class
  for w, c in enumerate(ep.class_ids):
    shots = ep.supports[w * shot:(w + 1) * shot]  # way-major
    assert len(set(shots)) == shot and ep.query not in shots
    for s in shots:
      assert table[s].get(c, 0) >= BIG


@pytest.mark.parametrize("way,shot", [(2, 1), (3, 2)])
def test_nway_train_episodes(way, shot):
  """Distinct classes, the query's class at a uniform way position, K eligible supports of
  each way's class (query excluded), way-major; the other classes uniform over the base
  classes; deterministic in the generator."""
  table = _random_table(300, num_classes=8, seed=way)
  base = [1, 2, 3, 4, 5, 6]
  sampler = E.train_episode_sampler(_images(table), base, shot, way=way)
  positions, others = collections.Counter(), collections.Counter()
  for pos in range(200):
    ep = sampler.sample(pos, np.random.default_rng([9, pos]))
    _check_nway(ep, table, way, shot, base)
    assert ep.class_ids[ep.query_way] in sampler.query_classes[pos % len(sampler)]
    assert ep == sampler.sample(pos, np.random.default_rng([9, pos]))
    positions[ep.query_way] += 1
    others.update(c for w, c in enumerate(ep.class_ids) if w != ep.query_way)
  assert set(positions) == set(range(way))
  assert min(positions.values()) > 200 / way * 0.6
  assert set(others) == set(base)


def test_nway_one_way_draws_are_unchanged():
  """way=1 spends the generator exactly as before: the same episodes as a 1-way sampler."""
  table = _random_table(80, seed=4)
  a = E.train_episode_sampler(_images(table), [1, 2, 3, 4, 5], 2)
  b = E.train_episode_sampler(_images(table), [1, 2, 3, 4, 5], 2, way=1)
  for pos in range(30):
    ea, eb = (s.sample(pos, np.random.default_rng([1, pos])) for s in (a, b))
    assert ea == eb and ea.class_ids == (ea.class_id,) and ea.query_way == 0


@pytest.mark.parametrize("way,shot", [(2, 1), (2, 5)])
def test_nway_eval_episodes(way, shot):
  table = _random_table(400, num_classes=10, seed=7)
  novel = [6, 7, 8, 9, 10]
  eps = E.eval_episodes(_images(table), novel, shot, 60, seed=3, way=way)
  assert len(eps) == 60
  for ep in eps:
    _check_nway(ep, table, way, shot, novel)
  one_way = E.eval_episodes(_images(table), novel, shot, 60, seed=3)
  # the query walk is the same; the query's class is drawn first, as in 1-way
  assert [e.query for e in eps] == [e.query for e in one_way]
  assert [e.class_ids[e.query_way] for e in eps] == [e.class_id for e in one_way]
  assert eps == E.eval_episodes(_images(table), novel, shot, 60, seed=3, way=way)


def test_nway_needs_enough_classes():
  table = _random_table(60, num_classes=3, seed=1)
  with pytest.raises(ValueError, match="4-way episodes need 4 base classes"):
    E.train_episode_sampler(_images(table), [1, 2, 3], 1, way=4)
  with pytest.raises(ValueError, match="needs 3 other classes"):
    E.eval_episodes(_images(table), [1, 2, 3], 1, 5, seed=0, way=4)
  with pytest.raises(ValueError, match="way must be >= 1"):
    E.eval_episodes(_images(table), [1, 2, 3], 1, 5, seed=0, way=0)


@pytest.mark.parametrize("way,shot", [(1, 1), (2, 3)])
def test_class_balanced_episodes(way, shot):
  """PANet's sampler: classes uniform (not weighted by how many images hold them), the query
  and its way's supports distinct images of its class list, deterministic per (seed, i)."""
  table = [{1: BIG} for _ in range(200)] + [{c: BIG} for c in (2, 3, 4) for _ in range(8)]
  eps = E.class_balanced_episodes(_images(table), [1, 2, 3, 4], shot, 400, seed=1234, way=way)
  assert eps == E.class_balanced_episodes(_images(table), [1, 2, 3, 4], shot, 400, seed=1234,
                                          way=way)
  counts = collections.Counter(c for e in eps for c in e.class_ids)
  assert all(abs(counts[c] - 100 * way) < 40 * way for c in (1, 2, 3, 4)), counts
  for ep in eps:
    _check_nway(ep, table, way, shot, [1, 2, 3, 4])
  other = E.class_balanced_episodes(_images(table), [1, 2, 3, 4], shot, 400, seed=1235, way=way)
  assert other != eps
