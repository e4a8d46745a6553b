"""BAM/MSANet data: the per-image (stage 1) datasets, the stage-2 additions to the episodic
pipeline (base-class query labels, BAM's novel-image exclusion), against oracles written here
from BAM's util/dataset.py, util/transform_tri.py and util/get_mulway_base_data.py."""
import collections
import dataclasses

import numpy as np
import pytest

from fss_jax.data import episodes
from fss_jax.data import pipeline as P
from fss_jax.data import schema
from fss_jax.data import synthetic
from fss_jax.data import transforms

SIZE = 33
MIN_PIXELS = 400
BIG, SMALL = episodes.MIN_CLASS_PIXELS, episodes.MIN_CLASS_PIXELS - 1


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic_sem")
  synthetic.write_synthetic_dataset(str(out), num_train=40, num_val=14, image_size=97, seed=3)
  return str(out)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b, keys=None):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    if keys is None:
      assert x.keys() == y.keys()
    for k in keys or x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _oracle_base_list(num_classes, novel):
  """BAM's sub_list: the classes 1..C not novel, ascending."""
  return [c for c in range(1, num_classes + 1) if c not in novel]


def _oracle_remap(label, sub_list, num_classes):
  """BaseData.__getitem__ / get_mulway_base_data.py, transcribed: a loop over the classes."""
  out = label.copy()
  for cls in range(1, num_classes + 1):
    ys, xs = np.where(label == cls)
    out[ys, xs] = sub_list.index(cls) + 1 if cls in sub_list else 0
  return out


def _base(data_dir, fold):
  m = schema.load_manifest(data_dir)
  return m, _oracle_base_list(m.num_classes, set(m.novel_folds[fold]))


# ----------------------------------------------------------------------------- remap


def test_base_label_matches_the_official_loop():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 21, (37, 41)).astype(np.uint8)
  label[rng.random(label.shape) < 0.1] = 255
  for fold in range(4):
    novel = set(range(5 * fold + 1, 5 * fold + 6))
    sub_list = _oracle_base_list(20, novel)
    want = _oracle_remap(label, sub_list, 20)
    shuffled = list(rng.permutation(sub_list))  # the base list is sorted, whatever the order
    got = transforms.base_label(label, shuffled)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(transforms.base_label_table(sub_list)[label], want)
    assert set(np.unique(got)) <= set(range(16)) | {255}
    for c in range(0, 21):
      assert transforms.base_index(c, sub_list) == (sub_list.index(c) + 1 if c in sub_list
                                                    else 0)
  # COCO interleaved fold 0: BAM builds sub_list as a set difference, ascending ints.
  novel = set(range(1, 78, 4))
  sub_list = list(set(range(1, 81)) - novel)
  coco = rng.integers(0, 81, (20, 30)).astype(np.uint8)
  np.testing.assert_array_equal(transforms.base_label(coco, sub_list),
                                _oracle_remap(coco, sorted(sub_list), 80))
  with pytest.raises(ValueError):
    transforms.base_label_table([0, 1])


def test_semantic_num_classes_and_sizes(data_dir):
  m = schema.load_manifest(data_dir)
  for fold in range(4):
    assert P.semantic_num_classes(m, fold) == 1 + 20 - len(m.novel_folds[fold]) == 16
  assert P.semantic_train_size(data_dir) == P.semantic_train_size(m) == 40
  assert P.semantic_eval_size(data_dir) == 14
  assert P.semantic_eval_size(data_dir, num_images=5) == 5
  assert P.semantic_eval_size(data_dir, num_images=99) == 14


# ----------------------------------------------------------------------------- stage 1


def _sem_train(data_dir, **kw):
  args = dict(fold=1, image_size=SIZE, seed=11, batch_size=4)
  args.update(kw)
  return P.semantic_train_dataset(data_dir, **args)


def test_semantic_train_batches_follow_the_documented_recipe(data_dir):
  """Layout, labels in {0..C-1, 255}; every row rebuilt from scratch: position p's image is
  record (its shuffled list entry), augmented with default_rng([seed, p]) on the official
  remap, the crop keeping label value 1; an epoch visits every image once."""
  manifest, sub_list = _base(data_dir, 1)
  n = len(manifest.images("train"))
  batches = _take(iter(_sem_train(data_dir)), n // 4 + 1)
  assert P.describe_batch(batches[0]) == {
      "image": ((4, SIZE, SIZE, 3), "float32"),
      "label": ((4, SIZE, SIZE), "uint8"),
      "index": ((4,), "int64"),
      "record": ((4,), "int64"),
  }
  index = np.concatenate([b["index"] for b in batches])
  records = np.concatenate([b["record"] for b in batches])
  np.testing.assert_array_equal(index, np.arange(len(index)))
  assert sorted(records[:n]) == list(range(n))  # BaseData: no image filtered
  labels = np.stack([b["label"] for b in batches])
  assert set(np.unique(labels)) <= set(range(16)) | {255}
  assert len(set(np.unique(labels)) - {0, 255}) > 5
  reader = manifest.source("train").reader
  cfg = transforms.TrainAugConfig(size=SIZE)
  for b in (batches[0], batches[3]):
    for j in range(4):
      image, raw = P.decode_record(reader[int(b["record"][j])])
      rng = np.random.default_rng([11, int(b["index"][j])])
      want_img, want_lab = transforms.train_transform(
          image, _oracle_remap(raw, sub_list, 20), rng, cfg, keep_value=1)
      np.testing.assert_array_equal(b["image"][j], want_img)
      np.testing.assert_array_equal(b["label"][j], want_lab)


def test_semantic_train_threads_resume_and_processes(data_dir):
  want = _take(iter(_sem_train(data_dir)), 6)
  _assert_batches_equal(_take(iter(_sem_train(data_dir, read_threads=2)), 6), want)
  other = _take(iter(_sem_train(data_dir, seed=12)), 2)
  assert not np.array_equal(other[0]["image"], want[0]["image"])
  it = iter(_sem_train(data_dir, read_threads=2))
  _take(it, 2)
  state = it.get_state()
  fresh = iter(_sem_train(data_dir))
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 4), want[2:])
  # Two processes of batch 2 split the stream of one process of batch 4.
  rows = {}
  for p in range(2):
    for b in _take(iter(_sem_train(data_dir, batch_size=2, process_index=p,
                                   process_count=2)), 3):
      for j, idx in enumerate(b["index"]):
        assert idx % 2 == p and int(idx) not in rows
        rows[int(idx)] = {k: v[j] for k, v in b.items()}
  for b in want[:3]:
    for j, idx in enumerate(b["index"]):
      for k in b:
        np.testing.assert_array_equal(rows[int(idx)][k], b[k][j], err_msg=k)


def test_semantic_train_skips_bad_records_deterministically(data_dir, monkeypatch):
  want = _take(iter(_sem_train(data_dir)), 3)
  bad = int(want[1]["record"][2])
  real = P.load_record

  def load(reader, index):
    if index == bad:
      raise schema.BadRecordError("image", "shard", index, "id", "broken")
    return real(reader, index)

  monkeypatch.setattr(P, "load_record", load)
  with pytest.raises(schema.BadRecordError, match="skip_bad_records"):
    _take(iter(_sem_train(data_dir)), 3)
  got = _take(iter(_sem_train(data_dir, skip_bad_records=True)), 3)
  _assert_batches_equal(got[:1] + got[2:], want[:1] + want[2:])
  for k in want[1]:
    keep = [0, 1, 3]
    np.testing.assert_array_equal(got[1][k][keep], want[1][k][keep], err_msg=k)
  assert got[1]["record"][2] == (bad + 1) % 40 and got[1]["index"][2] == want[1]["index"][2]
  manifest, sub_list = _base(data_dir, 1)
  image, raw = P.decode_record(manifest.source("train").reader[(bad + 1) % 40])
  rng = np.random.default_rng([11, int(want[1]["index"][2]), 1])
  want_img, want_lab = transforms.train_transform(
      image, _oracle_remap(raw, sub_list, 20), rng, transforms.TrainAugConfig(size=SIZE))
  np.testing.assert_array_equal(got[1]["image"][2], want_img)
  np.testing.assert_array_equal(got[1]["label"][2], want_lab)


def test_semantic_eval_covers_every_image_once(data_dir):
  manifest, sub_list = _base(data_dir, 2)
  reader = manifest.source("val").reader
  seen = collections.Counter()
  for p in range(2):
    batches = list(P.semantic_eval_dataset(data_dir, 2, SIZE, 3, process_index=p,
                                           process_count=2))
    assert len(batches) == 3 == P.eval_batches_per_process(14, 3, 2)
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.tolist() == [True] * 7 + [False] * 2
    for b in batches:
      assert P.describe_batch(b)["valid"] == ((3,), "bool")
      for j in range(3):
        idx = int(b["index"][j])
        if not b["valid"][j]:
          assert idx >= 14 and b["record"][j] == 0
          continue
        assert idx % 2 == p and b["record"][j] == idx
        seen[idx] += 1
        image, raw = P.decode_record(reader[idx])
        want_img, want_lab = transforms.eval_resize(image, _oracle_remap(raw, sub_list, 20),
                                                    SIZE)
        np.testing.assert_array_equal(b["image"][j], want_img)
        np.testing.assert_array_equal(b["label"][j], want_lab)
  assert seen == collections.Counter(range(14))  # BaseData val: no image filtered
  part = list(P.semantic_eval_dataset(data_dir, 2, SIZE, 4, num_images=5, read_threads=2))
  assert [b["index"].tolist() for b in part] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert np.concatenate([b["valid"] for b in part]).tolist() == [True] * 5 + [False] * 3


# ----------------------------------------------------------------------------- stage 2


def _joint_oracle(image, raw, class_id, sub_list, rng, cfg):
  """BAM's transform_tri on (image, binary label, base label) without a second label: one
  code map whose value 1 is exactly the binary foreground (so the crop rule and every draw
  are the same), the other values the base label + 2, 255 kept; decoded after."""
  binary = raw == class_id
  base = _oracle_remap(raw, sub_list, 20)
  code = np.where(base == 255, 255, base.astype(np.int32) + 2).astype(np.uint8)
  code[binary] = 1
  img, out = transforms.train_transform(image, code, rng, cfg)
  q = np.where(out == 1, 1, np.where(out == 255, 255, 0)).astype(np.uint8)
  b = np.where(out == 1, sub_list.index(class_id) + 1,
               np.where(out == 255, 255, out.astype(np.int32) - 2)).astype(np.uint8)
  return img, q, b


@pytest.mark.parametrize("aug", [transforms.TrainAugConfig(),
                                 transforms.TrainAugConfig(resize_longer=60, scale=(0.5, 2.0)),
                                 transforms.TrainAugConfig(scale=(0.2, 0.3))])  # padded crops
def test_train_query_base_label_is_joint_and_changes_nothing_else(data_dir, aug):
  kw = dict(fold=0, shot=2, image_size=SIZE, seed=5, batch_size=4, min_pixels=MIN_PIXELS,
            aug=aug)
  plain = _take(iter(P.train_dataset(data_dir, **kw)), 3)
  with_base = _take(iter(P.train_dataset(data_dir, base_label=True, read_threads=2, **kw)), 3)
  _assert_batches_equal(plain, with_base, keys=list(plain[0]))
  assert set(with_base[0]) - set(plain[0]) == {"query_base_label", "base_class"}
  manifest, sub_list = _base(data_dir, 0)
  reader = manifest.source("train").reader
  sampler = episodes.train_sampler_for_fold(manifest, "train", 0, 2, MIN_PIXELS)
  for b in with_base:
    assert b["query_base_label"].dtype == np.uint8 and b["base_class"].dtype == np.int32
    for j in range(4):
      c = int(b["class_id"][j])
      assert b["base_class"][j] == sub_list.index(c) + 1
      ql, qb = b["query_label"][j], b["query_base_label"][j]
      np.testing.assert_array_equal(ql == 1, qb == b["base_class"][j])
      np.testing.assert_array_equal(ql == 255, qb == 255)
      image, raw = P.decode_record(reader[int(b["query_record"][j])])
      rng = np.random.default_rng([5, int(b["index"][j])])  # the episode's draws first
      entry = int(np.searchsorted(sampler.queries, b["query_record"][j]))
      assert sampler.sample(entry, rng).supports == tuple(b["supp_records"][j])
      img, q, base = _joint_oracle(image, raw, c, sub_list, rng,
                                   dataclasses.replace(aug, size=SIZE))
      np.testing.assert_array_equal(b["query"][j], img)
      np.testing.assert_array_equal(ql, q)
      np.testing.assert_array_equal(qb, base)
      if aug.scale[1] < 0.5:  # the crop window reaches past the image: padding 255
        assert (b["query"][j] == 0).all(-1).any() and (qb == 255).any()


def test_train_base_label_resume_and_resize_flip(data_dir):
  kw = dict(fold=3, shot=1, image_size=SIZE, seed=9, batch_size=2, min_pixels=MIN_PIXELS,
            base_label=True)
  want = _take(iter(P.train_dataset(data_dir, **kw)), 5)
  it = iter(P.train_dataset(data_dir, **kw))
  _take(it, 3)
  fresh = iter(P.train_dataset(data_dir, **kw))
  fresh.set_state(it.get_state())
  _assert_batches_equal(_take(fresh, 2), want[3:])
  aug = transforms.TrainAugConfig(mode="resize_flip")
  kw.update(aug=aug, way=2, shot=1)
  plain = _take(iter(P.train_dataset(data_dir, **{**kw, "base_label": False})), 2)
  got = _take(iter(P.train_dataset(data_dir, **kw)), 2)
  _assert_batches_equal(plain, got, keys=list(plain[0]))
  manifest, sub_list = _base(data_dir, 3)
  reader = manifest.source("train").reader
  sampler = episodes.train_sampler_for_fold(manifest, "train", 3, 1, MIN_PIXELS, way=2)
  for b in got:
    for j in range(2):
      _, raw = P.decode_record(reader[int(b["query_record"][j])])
      # The episode's draws, then the query's one flip draw (PANet's resize + flip).
      rng = np.random.default_rng([9, int(b["index"][j])])
      entry = int(np.searchsorted(sampler.queries, b["query_record"][j]))
      assert sampler.sample(entry, rng).query == b["query_record"][j]
      want_b = transforms.eval_stretch_label(_oracle_remap(raw, sub_list, 20), SIZE)
      if rng.random() < 0.5:
        want_b = want_b[:, ::-1]
      np.testing.assert_array_equal(b["query_base_label"][j], want_b)
      assert b["base_class"][j] == sub_list.index(int(b["class_id"][j])) + 1


@pytest.mark.parametrize("classes,resize", [("novel", "pad"), ("base", "pad"),
                                            ("novel", "stretch")])
def test_eval_query_base_label(data_dir, classes, resize):
  kw = dict(fold=1, shot=1, image_size=SIZE, seed=321, batch_size=3, num_episodes=7,
            min_pixels=MIN_PIXELS, classes=classes, resize=resize,
            original_label=resize == "pad")
  plain = list(P.eval_dataset(data_dir, **kw))
  got = list(P.eval_dataset(data_dir, base_label=True, **kw))
  _assert_batches_equal(plain, got, keys=list(plain[0]))
  extra = {"query_base_label", "base_class"} | ({"orig_base_label"} if resize == "pad" else set())
  assert set(got[0]) - set(plain[0]) == extra
  manifest, sub_list = _base(data_dir, 1)
  reader = manifest.source("val").reader
  side = max(max(im["height"], im["width"]) for im in manifest.images("val"))
  for b in got:
    for j in range(3):
      c = int(b["class_id"][j])
      assert b["base_class"][j] == (sub_list.index(c) + 1 if classes == "base" else 0)
      _, raw = P.decode_record(reader[int(b["query_record"][j])])
      base = _oracle_remap(raw, sub_list, 20)
      if resize == "pad":
        want = transforms.eval_resize(np.zeros(raw.shape + (3,), np.uint8), base, SIZE)[1]
        np.testing.assert_array_equal(b["orig_base_label"][j], transforms.pad_label(base, side))
      else:
        want = transforms.eval_stretch_label(base, SIZE)
      np.testing.assert_array_equal(b["query_base_label"][j], want)
      np.testing.assert_array_equal(b["query_label"][j] == 255, b["query_base_label"][j] == 255)
      if classes == "base":
        np.testing.assert_array_equal(b["query_label"][j] == 1,
                                      b["query_base_label"][j] == b["base_class"][j])


# ----------------------------------------------------------------------------- BAM's list


def _images(table):
  return [{"id": f"im{i}", "height": 100, "width": 100,
           "classes": {str(c): n for c, n in px.items()}} for i, px in enumerate(table)]


def _oracle_fss_list(table, sub_list):
  """make_dataset(..., filter_intersection=True) of BAM's util/dataset.py, on pixel counts."""
  image_list, sub_class_file_list = [], {c: [] for c in sub_list}
  for i, px in enumerate(table):
    label_class = [c for c, n in px.items() if n > 0]
    new_label_class = []
    if set(label_class).issubset(set(sub_list)):
      for c in label_class:
        if c in sub_list and px[c] >= 2 * 32 * 32:
          new_label_class.append(c)
    if new_label_class:
      image_list.append(i)
      for c in new_label_class:
        sub_class_file_list[c].append(i)
  return image_list, sub_class_file_list


def test_exclude_novel_images_is_bams_list_rule():
  base = [1, 2, 3]
  table = [{1: BIG}, {1: BIG, 4: 1}, {2: BIG, 5: BIG}, {2: BIG, 3: SMALL}, {3: BIG},
           {1: SMALL, 2: BIG}, {4: BIG}, {1: BIG, 2: BIG}, {3: BIG, 1: 7}, {2: SMALL},
           {3: BIG, 5: 3}, {1: BIG, 3: BIG}, {}]
  want_list, want_index = _oracle_fss_list(table, base)
  assert want_list == [0, 3, 4, 5, 7, 8, 11]
  sampler = episodes.train_episode_sampler(_images(table), base, shot=1,
                                           exclude_novel_images=True)
  assert sampler.queries.tolist() == want_list
  assert {c: v.tolist() for c, v in sampler.class_images.items()} == want_index
  for pos in range(len(sampler)):
    for k in range(20):
      ep = sampler.sample(pos, np.random.default_rng([pos, k]))
      assert ep.query in want_list and set(ep.supports) <= set(want_index[ep.class_id])
  # Off (the default): novel-holding images stay (their novel pixels become background).
  default = episodes.train_episode_sampler(_images(table), base, shot=1)
  assert default.queries.tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 10, 11]
  assert default.class_images[2].tolist() == [2, 3, 5, 7]
  with pytest.raises(ValueError, match="without novel classes"):
    episodes.train_episode_sampler(_images([{1: BIG, 4: 5}, {1: BIG, 5: 5}]), [1], 1,
                                   exclude_novel_images=True)
  manifest = schema.Manifest(name="t", classes=[f"c{i}" for i in range(1, 6)],
                             novel_folds=[[4, 5], [1, 2]],
                             splits={"train": {"files": [], "images": _images(table)}})
  from_fold = episodes.train_sampler_for_fold(manifest, "train", 0, 1,
                                              exclude_novel_images=True)
  assert from_fold.queries.tolist() == want_list


def test_train_dataset_exclude_novel_images(data_dir):
  manifest = schema.load_manifest(data_dir)
  pixels = manifest.class_pixels("train")
  novel = set(manifest.novel_folds[0])
  kw = dict(fold=0, shot=1, image_size=SIZE, seed=3, batch_size=4, min_pixels=MIN_PIXELS)
  batches = _take(iter(P.train_dataset(data_dir, exclude_novel_images=True, **kw)), 4)
  used = set()
  for b in batches:
    used.update(b["query_record"].tolist() + b["supp_records"].ravel().tolist())
  assert used and all(not set(pixels[r]) & novel for r in used)
  assert any(set(px) & novel for px in pixels)  # the rule had something to exclude
  plain = _take(iter(P.train_dataset(data_dir, **kw)), 4)
  assert any(set(pixels[r]) & novel
             for b in plain for r in b["query_record"].tolist())


def test_semantic_workers_match_in_process(data_dir):
  """A Grain worker process builds the same batches (shared-memory slots of the per-image
  layout, and of episodes with the stage-2 keys) and resumes from its state."""
  want = _take(iter(_sem_train(data_dir)), 4)
  it = iter(_sem_train(data_dir, num_workers=1))
  try:
    _assert_batches_equal(_take(it, 2), want[:2])
    state = it.get_state()
  finally:
    it.close()
  it = iter(_sem_train(data_dir, num_workers=1))
  try:
    it.set_state(state)
    _assert_batches_equal(_take(it, 2), want[2:])
  finally:
    it.close()
  want = list(P.semantic_eval_dataset(data_dir, 0, SIZE, 4))
  _assert_batches_equal(list(P.semantic_eval_dataset(data_dir, 0, SIZE, 4, num_workers=1)),
                        want)
  # Episodes with the stage-2 keys, built by a worker.
  kw = dict(fold=0, shot=1, image_size=SIZE, seed=2, batch_size=3, min_pixels=MIN_PIXELS,
            base_label=True, exclude_novel_images=True)
  want = _take(iter(P.train_dataset(data_dir, **kw)), 2)
  it = iter(P.train_dataset(data_dir, num_workers=1, **kw))
  try:
    _assert_batches_equal(_take(it, 2), want)
  finally:
    it.close()
