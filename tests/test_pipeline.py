"""Grain episode pipelines on a tiny generated synthetic dataset."""
import collections

import cv2
import numpy as np
import pytest

from fss_jax.data import episodes
from fss_jax.data import pipeline as P
from fss_jax.data import schema
from fss_jax.data import synthetic
from fss_jax.data import transforms
from fss_jax.data import weak

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


# ----------------------------------------------------------------------------- N-way


def _nearest(x, size):
  """Pillow's nearest resize to size x size (source floor((dst + 0.5) * in / out))."""
  from fractions import Fraction  # exact: (dst + 0.5) * in / out can be an integer
  h, w = x.shape
  rows = [min(int((d + Fraction(1, 2)) * h / size), h - 1) for d in range(size)]
  cols = [min(int((d + Fraction(1, 2)) * w / size), w - 1) for d in range(size)]
  return x[rows][:, cols]


@pytest.mark.parametrize("resize", ["stretch", "pad"])
def test_nway_eval_batch_follows_panet_masks(dataset_dir, resize):
  """2-way 2-shot evaluation batches: supports way-major; each support's label read as
  PANet's getMask (fg = its way's class; bg = every other pixel except the episode's other
  classes, void included) and the query's as its fewShot target (class_ids[j] -> j + 1, 255
  kept, else 0), both computed here from the raw labels."""
  manifest = schema.load_manifest(dataset_dir)
  eps = episodes.eval_episode_list(manifest, "val", 0, 2, 6, 5, MIN_PIXELS, way=2)
  batches = list(P.eval_dataset(dataset_dir, fold=0, shot=2, image_size=SIZE, seed=5,
                                batch_size=3, num_episodes=6, min_pixels=MIN_PIXELS, way=2,
                                resize=resize))
  reader = manifest.source("val").reader
  b = batches[0]
  assert b["supp_images"].shape == (3, 4, SIZE, SIZE, 3)
  assert b["supp_labels"].shape == (3, 4, SIZE, SIZE) and b["class_ids"].shape == (3, 2)
  for j in range(3):
    ep = eps[j]
    assert b["class_ids"][j].tolist() == list(ep.class_ids)
    assert b["supp_records"][j].tolist() == list(ep.supports)
    _, raw = P.decode_record(reader[ep.query])
    want = np.zeros(raw.shape, np.uint8)
    want[raw == 255] = 255
    for w, c in enumerate(ep.class_ids):
      want[raw == c] = w + 1
    if resize == "stretch":
      np.testing.assert_array_equal(b["query_label"][j], _nearest(want, SIZE))
    for k, record in enumerate(ep.supports):
      _, raw = P.decode_record(reader[record])
      c = ep.class_ids[k // 2]
      fg = raw == c
      bg = (raw != c) & ~np.isin(raw, ep.class_ids)
      got = b["supp_labels"][j, k]
      if resize == "stretch":
        fg, bg = _nearest(fg, SIZE), _nearest(bg, SIZE)
        np.testing.assert_array_equal(got == 1, fg)
        np.testing.assert_array_equal((got == 0) | (got == 255), bg)
      assert fg.any() and set(np.unique(got)) <= {0, 1, transforms.NEITHER, 255}
      # pad: the same classes, on the aspect-keeping canvas (255 padding outside the image)
      assert (got == 1).any()


def test_nway_train_batches_panet_transform(dataset_dir):
  """2-way training batches with PANet's resize + flip: deterministic, labels in their value
  sets, the query holding its own way's class, supports of their way's class."""
  aug = transforms.TrainAugConfig(mode="resize_flip")
  a = _take(iter(_train(dataset_dir, shot=2, way=2, aug=aug)), 2)
  b = _take(iter(_train(dataset_dir, shot=2, way=2, aug=aug)), 2)
  _assert_batches_equal(a, b)
  manifest = schema.load_manifest(dataset_dir)
  sampler = episodes.train_sampler_for_fold(manifest, "train", 0, 2, MIN_PIXELS, way=2)
  for batch in a:
    assert batch["supp_images"].shape == (4, 4, SIZE, SIZE, 3)
    assert set(np.unique(batch["query_label"])) <= {0, 1, 2, 255}
    for j in range(4):
      entry = int(np.searchsorted(sampler.queries, batch["query_record"][j]))
      ep = sampler.sample(entry, np.random.default_rng([7, int(batch["index"][j])]))
      assert batch["class_ids"][j].tolist() == list(ep.class_ids)
      assert (batch["query_label"][j] == ep.query_way + 1).any()
      for k in range(4):
        assert (batch["supp_labels"][j, k] == 1).any()
        assert set(np.unique(batch["supp_labels"][j, k])) <= {0, 1, transforms.NEITHER, 255}


def test_stretch_resize_and_flip():
  """eval_stretch: Pillow's nearest for labels and OpenCV bilinear for the image; the flip
  mirrors both, drawn from one rng.random()."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (30, 60, 3)).astype(np.uint8)
  label = rng.integers(0, 4, (30, 60)).astype(np.uint8)
  for n_in in (60, 97, 30):  # 60 -> 65 has exact ties (x = 6: 6.5 * 60 / 65 = 6)
    np.testing.assert_array_equal(_nearest(np.arange(n_in)[None], 65)[0],
                                  transforms.nearest_indices(n_in, 65))
  img, lab = transforms.eval_stretch(image, label, 17)
  np.testing.assert_array_equal(lab, _nearest(label, 17))
  np.testing.assert_allclose(
      img, transforms.normalize(cv2.resize(image.astype(np.float32), (17, 17))), atol=1e-5)
  cfg = transforms.TrainAugConfig(size=17, mode="resize_flip")
  for seed in range(4):
    flip = np.random.default_rng(seed).random() < 0.5
    i2, l2 = transforms.train_transform(image, label, np.random.default_rng(seed), cfg)
    np.testing.assert_array_equal(l2, lab[:, ::-1] if flip else lab)
    np.testing.assert_array_equal(i2, img[:, ::-1] if flip else img)
  with pytest.raises(ValueError, match="original-size labels"):
    P.eval_dataset("unused", 0, 1, 17, 0, 1, 1, original_label=True, resize="stretch")


# ----------------------------------------------------------------------------- weak supports


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic_instances")
  synthetic.write_synthetic_dataset(str(out), num_train=10, num_val=40, image_size=97, seed=3,
                                    instances=True)
  return str(out)


def _weak_batches(data, annotation, resize="stretch", seed=5):
  return list(P.eval_dataset(data, fold=0, shot=2, image_size=SIZE, seed=seed, batch_size=3,
                             num_episodes=6, min_pixels=MIN_PIXELS, way=2, resize=resize,
                             support_annotation=annotation))


@pytest.mark.parametrize("resize", ["stretch", "pad"])
def test_box_supports_follow_the_box_rule_on_the_resized_maps(instance_dir, resize):
  """Box supports: the images are the dense episode's; each support label is PANet's box rule
  on the instance and own-class maps resized as the label is (the 'pad' canvas outside the
  image is neither); the foreground is one filled rectangle."""
  dense = _weak_batches(instance_dir, "dense", resize)
  boxes = _weak_batches(instance_dir, "box", resize)
  manifest = schema.load_manifest(instance_dir)
  reader = manifest.source("val").reader
  eps = episodes.eval_episode_list(manifest, "val", 0, 2, 6, 5, MIN_PIXELS, way=2)
  for bd, bb in zip(dense, boxes):
    np.testing.assert_array_equal(bd["supp_images"], bb["supp_images"])
    for j in range(3):
      ep = eps[int(bb["index"][j])]
      for k, record in enumerate(ep.supports):
        ex, _, raw = schema.read_record(reader, record)
        inst = schema.read_extras(reader, record, ex, raw.shape)["instance"]
        own = (raw == ep.class_ids[k // 2]).astype(np.uint8)
        if resize == "stretch":
          want = weak.box_support_label(transforms.eval_stretch_label(inst, SIZE),
                                        transforms.eval_stretch_label(own, SIZE))
        else:
          h, w = transforms.eval_hw(*raw.shape, SIZE)
          near = lambda x: cv2.resize(x, (w, h), interpolation=cv2.INTER_NEAREST)
          want = np.full((SIZE, SIZE), transforms.NEITHER, np.uint8)
          want[:h, :w] = weak.box_support_label(near(inst), near(own))
        got = bb["supp_labels"][j, k]
        np.testing.assert_array_equal(got, want)
        ys, xs = np.nonzero(got == 1)
        assert len(ys) == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)


def test_scribble_supports_are_deterministic_and_inside(instance_dir):
  """Generated scribble supports: the same for the same seed, other for another; object
  scribbles inside the support's own class, background scribbles on background pixels."""
  a = _weak_batches(instance_dir, "scribble")
  b = _weak_batches(instance_dir, "scribble")
  c = _weak_batches(instance_dir, "scribble", seed=6)
  _assert_batches_equal(a, b)
  assert not all(np.array_equal(x["supp_labels"], y["supp_labels"]) for x, y in zip(a, c))
  manifest = schema.load_manifest(instance_dir)
  reader = manifest.source("val").reader
  for batch in a:
    for j in range(3):
      for k in range(4):
        _, raw = P.decode_record(reader[int(batch["supp_records"][j, k])])
        raw = transforms.eval_stretch_label(raw, SIZE)
        got = batch["supp_labels"][j, k]
        assert set(np.unique(got)) <= {0, 1, transforms.NEITHER} and (got == 1).any()
        assert np.all(raw[got == 1] == batch["class_ids"][j, k // 2])
        assert np.all(raw[got == 0] == 0)


def test_box_supports_need_instance_maps(dataset_dir):
  with pytest.raises(schema.BadRecordError, match=r"record \d+ .*need instance maps"):
    _weak_batches(dataset_dir, "box")
  with pytest.raises(ValueError, match="support_annotation must be one of"):
    _weak_batches(dataset_dir, "polygon")
