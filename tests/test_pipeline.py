"""Grain episode pipelines on a tiny generated synthetic dataset."""
import collections

import numpy as np
import pytest

from fss_jax.data import episodes
from fss_jax.data import pipeline as P
from fss_jax.data import schema
from fss_jax.data import synthetic
from fss_jax.data import transforms

SIZE = 65
# 97-px scenes are ~5x smaller than VOC images; scale the eligibility threshold with them.
MIN_PIXELS = 400


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic")
  synthetic.write_synthetic_dataset(str(out), num_train=60, num_val=40, image_size=97,
                                    seed=3)
  return str(out)


def _train(dataset_dir, **kw):
  args = dict(fold=0, shot=1, image_size=SIZE, seed=7, batch_size=4,
              min_pixels=MIN_PIXELS)
  args.update(kw)
  return P.train_dataset(dataset_dir, **args)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_train_batch_layout(dataset_dir):
  batch = next(iter(_train(dataset_dir, shot=2)))
  assert P.describe_batch(batch) == {
      "query": ((4, SIZE, SIZE, 3), "float32"),
      "query_label": ((4, SIZE, SIZE), "uint8"),
      "supp_images": ((4, 2, SIZE, SIZE, 3), "float32"),
      "supp_labels": ((4, 2, SIZE, SIZE), "uint8"),
      "class_id": ((4,), "int32"),
      "class_ids": ((4, 1), "int32"),
      "index": ((4,), "int64"),
      "query_record": ((4,), "int64"),
      "supp_records": ((4, 2), "int64"),
  }
  np.testing.assert_array_equal(batch["class_ids"][:, 0], batch["class_id"])
  np.testing.assert_array_equal(batch["index"], [0, 1, 2, 3])
  for key in ("query_label", "supp_labels"):
    assert set(np.unique(batch[key])) <= {0, 1, 255}


def test_same_seed_same_batches_other_seed_differs(dataset_dir):
  a = _take(iter(_train(dataset_dir)), 3)
  b = _take(iter(_train(dataset_dir)), 3)
  _assert_batches_equal(a, b)
  c = _take(iter(_train(dataset_dir, seed=8)), 3)
  assert not all(np.array_equal(x["query"], y["query"]) for x, y in zip(a, c))


def test_episode_is_pure_function_of_seed_and_index(dataset_dir):
  """Rebuild element 5 from scratch with the documented draw order."""
  manifest = schema.load_manifest(dataset_dir)
  sampler = episodes.train_sampler_for_fold(manifest, "train", 0, 1, MIN_PIXELS)
  batch = _take(iter(_train(dataset_dir)), 2)[1]
  j = 1  # position 5
  reader = manifest.source("train").reader
  rng = np.random.default_rng([7, 5])
  entry = int(np.flatnonzero(sampler.queries == batch["query_record"][j])[0])
  ep = sampler.sample(entry, rng)
  assert (ep.query, ep.class_id) == (batch["query_record"][j], batch["class_id"][j])
  assert ep.supports == tuple(batch["supp_records"][j])
  cfg = transforms.TrainAugConfig(size=SIZE)
  for rec, img_key, lab_key in [(ep.query, "query", "query_label"),
                                (ep.supports[0], "supp_images", "supp_labels")]:
    image, label = P.decode_record(reader[rec])
    want_img, want_lab = transforms.train_transform(
        image, transforms.binarize_label(label, ep.class_id), rng, cfg)
    got_img, got_lab = batch[img_key][j], batch[lab_key][j]
    if img_key == "supp_images":
      got_img, got_lab = got_img[0], got_lab[0]
    np.testing.assert_array_equal(got_img, want_img)
    np.testing.assert_array_equal(got_lab, want_lab)


def test_training_targets_supports_and_epochs(dataset_dir):
  manifest = schema.load_manifest(dataset_dir)
  novel = set(manifest.novel_folds[0])
  pixels = manifest.class_pixels("train")
  sampler = episodes.train_sampler_for_fold(manifest, "train", 0, 2, MIN_PIXELS)
  n = len(sampler)
  batches = _take(iter(_train(dataset_dir, shot=2)), (2 * n) // 4 + 1)
  records = np.concatenate([b["query_record"] for b in batches])
  classes = np.concatenate([b["class_id"] for b in batches])
  supps = np.concatenate([b["supp_records"] for b in batches])
  for q, c, ss in zip(records, classes, supps):
    assert c not in novel
    assert pixels[q].get(c, 0) >= MIN_PIXELS
    assert len(set(ss)) == 2 and q not in ss
    assert all(pixels[s].get(c, 0) >= MIN_PIXELS for s in ss)
  # Each epoch visits every query exactly once, in a new order.
  assert sorted(records[:n]) == sorted(sampler.queries)
  assert sorted(records[n:2 * n]) == sorted(sampler.queries)
  assert not np.array_equal(records[:n], records[n:2 * n])
  # Labels: novel pixels (and other classes) are background; the class survives mostly.
  frac = np.mean([(b["supp_labels"] == 1).any(axis=(2, 3)).mean() for b in batches])
  assert frac > 0.9


def test_resume_from_iterator_state(dataset_dir):
  it = iter(_train(dataset_dir))
  _take(it, 2)
  state = it.get_state()
  want = _take(it, 3)
  fresh = iter(_train(dataset_dir))
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 3), want)


def test_two_processes_split_the_stream(dataset_dir):
  single = _take(iter(_train(dataset_dir, batch_size=4)), 4)
  parts = [_take(iter(_train(dataset_dir, batch_size=2, process_index=p,
                             process_count=2)), 4) for p in range(2)]
  by_index = {}
  for p, batches in enumerate(parts):
    for b in batches:
      for j, idx in enumerate(b["index"]):
        assert idx % 2 == p and idx not in by_index
        by_index[int(idx)] = {k: v[j] for k, v in b.items()}
  want = {int(i): (b, j) for b in single for j, i in enumerate(b["index"])}
  assert set(by_index) == set(want) == set(range(16))
  for idx, (b, j) in want.items():
    for k in b:
      np.testing.assert_array_equal(by_index[idx][k], b[k][j], err_msg=k)


def test_workers_match_in_process_and_resume(dataset_dir):
  want = _take(iter(_train(dataset_dir)), 5)
  it = iter(_train(dataset_dir, num_workers=2))
  try:
    got = _take(it, 3)
    state = it.get_state()
  finally:
    it.close()
  _assert_batches_equal(got, want[:3])
  it2 = iter(_train(dataset_dir, num_workers=2))
  try:
    it2.set_state(state)
    _assert_batches_equal(_take(it2, 2), want[3:])
  finally:
    it2.close()


def test_workers_reuse_slots_and_rewind(dataset_dir):
  # 2 workers x 12 batches: every worker's shared-memory slots are refilled; rewinding the
  # same iterator drops batches in flight, whose slots must come back (no stall, no reuse
  # of a slot whose batch is still to be copied out).
  want = _take(iter(_train(dataset_dir)), 24)
  it = iter(_train(dataset_dir, num_workers=2))
  try:
    _assert_batches_equal(_take(it, 4), want[:4])
    state = it.get_state()
    _assert_batches_equal(_take(it, 6), want[4:10])
    it.set_state(state)
    _assert_batches_equal(_take(it, 20), want[4:24])
  finally:
    it.close()


def test_eval_workers_match_in_process(dataset_dir):
  kw = dict(fold=1, shot=2, image_size=SIZE, seed=321, batch_size=3, num_episodes=19,
            min_pixels=MIN_PIXELS, original_label=True)
  want = list(P.eval_dataset(dataset_dir, **kw))
  got = list(P.eval_dataset(dataset_dir, num_workers=2, **kw))
  _assert_batches_equal(got, want)


def test_eval_dataset_exact_and_padded(dataset_dir):
  manifest = schema.load_manifest(dataset_dir)
  eps = episodes.eval_episode_list(manifest, "val", 1, 1, 10, 321, MIN_PIXELS)
  kw = dict(fold=1, shot=1, image_size=SIZE, seed=321, batch_size=4, num_episodes=10,
            min_pixels=MIN_PIXELS, original_label=True)
  batches = list(P.eval_dataset(dataset_dir, **kw))
  assert len(batches) == 3 == P.eval_batches_per_process(10, 4)
  valid = np.concatenate([b["valid"] for b in batches])
  assert valid.tolist() == [True] * 10 + [False] * 2
  idx = np.concatenate([b["index"] for b in batches])[:10]
  assert idx.tolist() == list(range(10))
  q = np.concatenate([b["query_record"] for b in batches])[:10]
  c = np.concatenate([b["class_id"] for b in batches])[:10]
  assert [(e.query, e.class_id) for e in eps] == list(zip(q.tolist(), c.tolist()))
  reader = manifest.source("val").reader
  side = max(max(im["height"], im["width"]) for im in manifest.images("val"))
  b = batches[0]
  for j in range(4):
    image, label = P.decode_record(reader[eps[j].query])
    binary = transforms.binarize_label(label, eps[j].class_id)
    want_img, want_lab = transforms.eval_resize(image, binary, SIZE)
    np.testing.assert_array_equal(b["query"][j], want_img)
    np.testing.assert_array_equal(b["query_label"][j], want_lab)
    np.testing.assert_array_equal(b["orig_size"][j], label.shape)
    np.testing.assert_array_equal(b["orig_label"][j], transforms.pad_label(binary, side))


def test_eval_two_processes_cover_each_episode_once(dataset_dir):
  kw = dict(fold=2, shot=1, image_size=SIZE, seed=1, batch_size=2, num_episodes=7,
            min_pixels=MIN_PIXELS)
  seen = collections.Counter()
  counts = []
  for p in range(2):
    batches = list(P.eval_dataset(dataset_dir, process_index=p, process_count=2, **kw))
    counts.append(len(batches))
    for b in batches:
      seen.update(int(i) for i, v in zip(b["index"], b["valid"]) if v)
  assert counts == [2, 2]
  assert seen == collections.Counter(range(7))
