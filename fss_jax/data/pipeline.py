"""Grain pipelines of few-shot episodes (and of single images, for BAM/MSANet's stage 1):
TFRecord records -> augmented, batched arrays.

Training: `MapDataset.range(N).shuffle(seed).repeat()` over the training query list
(a new permutation each epoch), tagged with its global position p, sliced per process
(`[process_index::process_count]`), batched as positions, then each batch is built in place
(episodes are written straight into the batch arrays) and each position becomes an
episode drawn from
`np.random.default_rng([seed, p])`: episode class and supports first (episodes.py), then
the query's augmentation, then each support's (transforms.py). A batch is therefore a pure
function of (dataset, fold, shot, size, seed, batch number, process slice): the same for
any worker count, and resumable from the iterator's `get_state()` (which holds only the
next batch number, plus per-worker positions with `mp_prefetch`). A record that cannot be read
stops the stream with a `schema.BadRecordError` naming shard, record and image id, or with
`skip_bad_records` its episode is replaced by a deterministic substitute (`TrainBatchFn`). Batches are built
in-process (`read_threads` threads) or by `num_workers` processes that hand them over
through reusable shared-memory slots (shm_slots.py).

Evaluation: the fixed list of `episodes.eval_episodes` (exactly N), sliced per process and
padded so that every process yields the same number of full batches; padding rows repeat
episode 0 and carry `valid == False`.

Element layout, the batch contract between data, train steps and evaluator: models name the
entries they read (``model.inputs``, passed to ``__call__`` by name, and ``model.targets``, read
by their loss; fss_jax/models/registry.py). Batched, B = per-process batch size, N = way
(``data.way``, 1 but for PANet), K = shot, S = image size:
  query        float32 (B, S, S, 3)   normalised RGB
  query_label  uint8   (B, S, S)      {0 background, j + 1 = way j's class, 255 ignore}
                                      (1-way: {0, 1, 255})
  supp_images  float32 (B, N·K, S, S, 3)  way-major: support i is way i // K, shot i % K
  supp_labels  uint8   (B, N·K, S, S) relative to the support's own way: 1 its class, 0
                                      background, 254 neither (another class of the
                                      episode; transforms.NEITHER), 255 ignore
                                      (1-way: {0, 1, 255})
  class_id     int32   (B,)           way 0's class (1-way: the episode's class)
  class_ids    int32   (B, N)         every way's class
  index        int64   (B,)           global episode index (train: stream position)
  query_record int64   (B,)           record index of the query in its split
  supp_records int64   (B, N·K)
and for evaluation also
  valid        bool    (B,)
With weak supports in evaluation (`support_annotation` 'box' / 'scribble', PANet's test-time
box and scribble supports, reference_panet.md §11), supp_labels hold `weak.py`'s labels: 1 the
box / the scribble, 0 background, 254 neither (another own-class box; unscribbled pixels;
the padding of the 'pad' resize), no 255.
  orig_label   uint8   (B, M, M)      (optional) query label at the original size,
                                      top-left, padded with 255 (the reference compares
                                      against the max(H, W) square: crop [:L, :L])
  orig_size    int32   (B, 2)         (optional) original (H, W)
With `base_label=True` (BAM/MSANet stage 2; off by default, and then absent) also
  query_base_label uint8 (B, S, S)    the query's base-class label (`transforms.base_label`:
                                      base class c -> its index in the fold's ascending base
                                      list + 1, novel classes and 0 -> 0, 255 kept), given
                                      the query's own geometric steps with the same draws
                                      (training: nearest, 255 padding, BAM's transform_tri;
                                      evaluation: the same resize as query_label). The
                                      other keys are byte-identical with and without it.
  base_class   int32   (B,)           class_id's index in the base list + 1; 0 when class_id
                                      is not a base class (novel-class evaluation episodes)
  orig_base_label uint8 (B, M, M)     (evaluation with orig_label) the base-class label at the
                                      original size, padded as orig_label
`exclude_novel_images=True` (training) samples from BAM's list instead: no image holding a
novel class is a query or a support (`episodes.train_episode_sampler`).

Per-image datasets (BAM/MSANet stage 1: PSPNet trained as semantic segmentation of the fold's
base classes; `semantic_train_dataset`, `semantic_eval_dataset`). The list is every image of
the split, unfiltered (BAM's BaseData, train and val alike). Training is built like the
episodes above: `MapDataset.range(N).shuffle(seed).repeat()`, positions tagged, sliced per
process, batched, each image augmented in place with `np.random.default_rng([seed, p])`
(`transforms.train_transform` on the base-class label; the crop's keep rule counts label value
1, i.e. only the first base class, as BAM's Crop does on its multi-class label), so batches
are the same for any worker count and resume exactly from get_state(); `skip_bad_records`
substitutes image (record + a) mod N with `default_rng([seed, p, a])`. Evaluation: every image
once (`transforms.eval_resize`), sliced per process and padded to full batches as above.
Batched, B = per-process batch size, S = image size, C = `semantic_num_classes` (1 + number of
base classes):
  image        float32 (B, S, S, 3)   normalised RGB
  label        uint8   (B, S, S)      base-class label {0 background, 1..C-1 base classes in
                                      ascending id order, 255 ignore}
  index        int64   (B,)           train: stream position; eval: image index in the split
  record       int64   (B,)           record index of the image in its split
and for evaluation also
  valid        bool    (B,)
An epoch is `semantic_train_size(...) // (B * process_count)` batches (BAM's drop_last).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from absl import flags
from absl import logging
import cv2
import grain
import numpy as np

from fss_jax.data import episodes as episodes_lib
from fss_jax.data import schema
from fss_jax.data import shm_slots
from fss_jax.data import tfrecord
from fss_jax.data import transforms
from fss_jax.data import weak

PER_WORKER_BUFFER = 2


def decode_record(record: bytes) -> tuple[np.ndarray, np.ndarray]:
  """Record bytes -> (image uint8 (H, W, 3) RGB, label uint8 (H, W) class ids)."""
  ex = schema.decode_example(record)
  image = schema.decode_image(ex["image_bytes"])
  label = schema.decode_label(ex["label_png"])
  if image.shape[:2] != label.shape:
    raise ValueError(f"record {ex['id']!r}: image {image.shape[:2]} and label "
                     f"{label.shape} differ in size")
  return image, label


def load_record(reader: tfrecord.TFRecordReader, index: int) -> tuple[np.ndarray, np.ndarray]:
  """`decode_record` of record `index`; errors are `schema.BadRecordError`s naming the shard
  file, the record number in it and the image id."""
  _, image, label = schema.read_record(reader, index)
  return image, label


SKIP_HINT = ("; set data.skip_bad_records=True to skip such records in training (resuming a "
             "run: with --config.train.accept_changes=data.skip_bad_records), and run "
             "scripts/check_dataset.py --data_dir DIR to list every damaged record")

SUPPORT_ANNOTATIONS = ("dense", "box", "scribble")

# Substitute episodes tried for one stream position before giving up (skip_bad_records).
MAX_SKIPS_PER_EPISODE = 64


# The batch slots of this process when it is a Grain worker (see shm_slots); None in-process.
_WORKER_SLOTS: shm_slots.WorkerPools | None = None


@dataclasses.dataclass(frozen=True)
class _WorkerInit:
  """Runs in each Grain worker process before it builds batches."""
  num_slots: int

  def __call__(self, worker_index: int, worker_count: int) -> None:
    del worker_index, worker_count
    global _WORKER_SLOTS
    _WORKER_SLOTS = shm_slots.WorkerPools(self.num_slots)
    # Workers already split the cores between them; OpenCV's own pool would oversubscribe.
    cv2.setNumThreads(1)


def _identity(batch):
  return batch


# Batches in flight in-process: Grain's read-ahead, the one being built, those the consumer
# holds. Arrays of batches beyond that are reused once released.
_IN_PROCESS_KEEP = 6


def _new_batch(specs: dict[str, tuple[tuple[int, ...], Any]],
               recycler: shm_slots.ArrayRecycler):
  """(uninitialised batch arrays, finish): episodes are written straight into the arrays
  (no stacking); `finish(arrays)` is what the batch function returns. In-process the arrays
  come from `recycler`; in a worker they are a reusable shared-memory slot and finish
  returns its handle."""
  if _WORKER_SLOTS is None:
    return ({k: recycler.empty(shape, dtype) for k, (shape, dtype) in specs.items()},
            _identity)
  return _WORKER_SLOTS.new_batch(specs)


def _recycler_field():
  return dataclasses.field(default_factory=lambda: shm_slots.ArrayRecycler(_IN_PROCESS_KEEP),
                           compare=False, repr=False)


def _as_list(items):
  return list(items)


def _episode_specs(batch: int, shot: int, size: int, way: int = 1,
                   base_label: bool = False) -> dict[str, tuple[tuple[int, ...], Any]]:
  n = way * shot
  specs = {
      "query": ((batch, size, size, 3), np.float32),
      "query_label": ((batch, size, size), np.uint8),
      "supp_images": ((batch, n, size, size, 3), np.float32),
      "supp_labels": ((batch, n, size, size), np.uint8),
      "class_id": ((batch,), np.int32),
      "class_ids": ((batch, way), np.int32),
      "index": ((batch,), np.int64),
      "query_record": ((batch,), np.int64),
      "supp_records": ((batch, n), np.int64),
  }
  if base_label:
    specs["query_base_label"] = ((batch, size, size), np.uint8)
    specs["base_class"] = ((batch,), np.int32)
  return specs


def _fill_episode_ids(out, j: int, ep: episodes_lib.Episode, index: int,
                     base_classes: tuple[int, ...] | None = None) -> None:
  out["class_id"][j] = ep.class_id
  out["class_ids"][j] = ep.class_ids
  out["index"][j] = index
  out["query_record"][j] = ep.query
  out["supp_records"][j] = ep.supports
  if base_classes is not None:
    out["base_class"][j] = transforms.base_index(ep.class_id, base_classes)


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class _TagPosition:
  """(global position, query-list entry): the position seeds the episode."""

  def __call__(self, position: int, entry: int) -> tuple[int, int]:
    return int(position), int(entry)


@dataclasses.dataclass(frozen=True)
class TrainBatchFn:
  """[(position, query-list entry), ...] -> one batch of augmented training episodes.

  A record that cannot be read or decoded (`schema.BadRecordError`) stops training with a
  message naming it, or, with `skip_bad_records`, is logged and the whole episode of that
  stream position is replaced: attempt a = 1, 2, ... draws the episode of query-list entry
  (entry + a) mod N with `np.random.default_rng([seed, position, a])`, until one reads. The
  substitute is a pure function of (seed, position, dataset), so batches stay deterministic
  and resume exactly from the iterator state (nothing about skips is stored in it); episodes
  at other positions are untouched.

  With `base_classes` (the fold's base classes, ascending) the batch also holds the query's
  base-class label, transformed jointly with the query (no extra draw), and `base_class`.
  """
  sampler: episodes_lib.TrainSampler
  reader: tfrecord.TFRecordReader
  aug: transforms.TrainAugConfig
  seed: int
  skip_bad_records: bool = False
  base_classes: tuple[int, ...] | None = None
  recycler: shm_slots.ArrayRecycler = _recycler_field()

  def __call__(self, items: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    with_base = self.base_classes is not None
    out, finish = _new_batch(
        _episode_specs(len(items), self.sampler.shot, self.aug.size, self.sampler.way,
                       with_base), self.recycler)
    for j, (position, entry) in enumerate(items):
      for attempt in range(MAX_SKIPS_PER_EPISODE + 1):
        seed = [self.seed, position] + ([attempt] if attempt else [])
        rng = np.random.default_rng(seed)
        ep = self.sampler.sample((entry + attempt) % len(self.sampler), rng)
        try:
          self._load(ep.query, transforms.query_label, ep.class_ids, rng, out["query"][j],
                     out["query_label"][j], keep_value=ep.query_way + 1,
                     out_base=out["query_base_label"][j] if with_base else None)
          for k, s in enumerate(ep.supports):
            self._load(s, functools.partial(transforms.support_label, way=k // ep.shot),
                       ep.class_ids, rng, out["supp_images"][j, k], out["supp_labels"][j, k])
        except schema.BadRecordError as e:
          if not self.skip_bad_records:
            raise schema.BadRecordError(e.kind, e.path, e.record, e.image_id,
                                        e.detail + SKIP_HINT) from e
          logging.warning("skipping bad record (data.skip_bad_records): %s; training "
                          "position %d gets a substitute episode (attempt %d)",
                          e, position, attempt + 1)
          continue
        break
      else:
        raise RuntimeError(f"training position {position}: {MAX_SKIPS_PER_EPISODE + 1} "
                           "episodes in a row hit bad records; check the dataset with "
                           "scripts/check_dataset.py")
      _fill_episode_ids(out, j, ep, position, self.base_classes)
    return finish(out)

  def _load(self, record_index, label_fn, class_ids, rng, out_image, out_label,
            keep_value=1, out_base=None):
    """Reads a record, makes its label episode-local (`label_fn(label, class_ids)`) and
    augments it into the batch slots; with `out_base`, also its base-class label, jointly."""
    image, label = load_record(self.reader, record_index)
    base = None if out_base is None else transforms.base_label(label, self.base_classes)
    transforms.train_transform(image, label_fn(label, class_ids), rng, self.aug,
                               out=(out_image, out_label), keep_value=keep_value,
                               extra=base, extra_out=out_base)


def _read_options(threads: int) -> grain.ReadOptions:
  # Grain's default (16 threads, 500 elements ahead) would hold hundreds of batches.
  return grain.ReadOptions(num_threads=max(int(threads), 1),
                           prefetch_buffer_size=max(2 * int(threads), 2))


# Batches a worker can have handed over but not yet copied out, plus one: its read-ahead
# (WORKER_READ_AHEAD), the one it is building, its output queue and the main process's
# per-worker buffer (PER_WORKER_BUFFER each), the one being copied out, and one to spare.
WORKER_READ_AHEAD = 1
WORKER_SLOTS = WORKER_READ_AHEAD + 1 + 2 * PER_WORKER_BUFFER + 2


def _prefetch(ds: grain.MapDataset, num_workers: int, read_threads: int):
  """Batches built in-process by `read_threads` threads, or by `num_workers` processes
  (each builds one batch at a time into reusable shared-memory slots, see shm_slots)."""
  if num_workers <= 0:
    return ds.to_iter_dataset(_read_options(read_threads))
  if not flags.FLAGS.is_parsed():
    # Grain's worker processes read absl flags; outside absl.app (tests, notebooks,
    # plain scripts) nothing parsed them, so accept the defaults.
    flags.FLAGS.mark_as_parsed()
  # One read thread per worker: slots are recycled in the order batches are handed over.
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                               prefetch_buffer_size=WORKER_READ_AHEAD))
  it_ds = it_ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=int(num_workers),
                                   per_worker_buffer_size=PER_WORKER_BUFFER),
      worker_init_fn=_WorkerInit(WORKER_SLOTS))
  return shm_slots.ReceiveSlots(it_ds)


def _check_seed(seed: int) -> int:
  if int(seed) < 0:
    raise ValueError(f"seed must be >= 0 (it seeds np.random.default_rng), got {seed}")
  return int(seed)


def _check_process(process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got {process_index}, "
                     f"{process_count}")


def _train_positions(dataset_dir, fold, shot, image_size, seed, process_index,
                     process_count, split, aug, min_pixels, skip_bad_records=False, way=1,
                     base_label=False, exclude_novel_images=False):
  """(MapDataset of (global position, query-list entry) for this process, batch fn)."""
  _check_process(process_index, process_count)
  seed = _check_seed(seed)
  transforms.check_size(image_size)
  aug = dataclasses.replace(aug or transforms.TrainAugConfig(), size=image_size)
  manifest = schema.load_manifest(dataset_dir)
  sampler = episodes_lib.train_sampler_for_fold(manifest, split, fold, shot, min_pixels, way,
                                                bool(exclude_novel_images))
  reader = manifest.source(split).reader
  base = (tuple(episodes_lib.fold_classes(manifest, fold, "base")) if base_label else None)
  ds = grain.MapDataset.range(len(sampler)).shuffle(seed=seed % 2**32).repeat()
  ds = ds.map_with_index(_TagPosition())
  ds = ds[process_index::process_count]
  return ds, TrainBatchFn(sampler, reader, aug, int(seed), bool(skip_bad_records), base)


def train_dataset(dataset_dir: str, fold: int, shot: int, image_size: int, seed: int,
                  batch_size: int, process_index: int = 0, process_count: int = 1,
                  num_workers: int = 0, *, split: str = "train",
                  aug: transforms.TrainAugConfig | None = None,
                  min_pixels: int = episodes_lib.MIN_CLASS_PIXELS,
                  read_threads: int = 1,
                  skip_bad_records: bool = False, way: int = 1, base_label: bool = False,
                  exclude_novel_images: bool = False) -> grain.IterDataset:
  """Infinite stream of training batches (see the module docstring for the layout).

  Args:
    dataset_dir: converted dataset (manifest.json + shards).
    fold: which novel classes to hold out (manifest folds).
    shot: supports per episode.
    image_size: S, 8k+1.
    seed: shuffling and every episode's randomness.
    batch_size: episodes per batch on this process (the global batch is
      batch_size * process_count).
    process_index, process_count: this host's disjoint slice of the episode stream.
    num_workers: Grain `mp_prefetch` worker processes (0: in-process). Each builds one
      batch at a time into reusable shared-memory slots (shm_slots; WORKER_SLOTS batches
      per worker stay allocated in /dev/shm).
    split: manifest split to sample from.
    aug: augmentation settings (size is overridden by image_size).
    min_pixels: class eligibility threshold.
    read_threads: with num_workers=0, threads building batches concurrently (decoding and
      OpenCV release the GIL, so threads scale with cores); ignored with workers.
    skip_bad_records: replace episodes that hit an unreadable record (logged; see
      `TrainBatchFn`) instead of stopping with a `schema.BadRecordError` naming it.
    way: classes per episode (N-way episodes, `episodes.py`).
    base_label: also `query_base_label` (the query's base-class label, transformed jointly
      with it) and `base_class` (BAM/MSANet stage 2; module docstring). Other keys unchanged.
    exclude_novel_images: BAM/MSANet's training list: no image holding a novel class is used
      (as query or support; `episodes.train_episode_sampler`). False: PFENet/ASGNet's rule.
  Returns:
    IterDataset; `iter()` gives a DatasetIterator with get_state()/set_state().
  """
  ds, fn = _train_positions(dataset_dir, fold, shot, image_size, seed, process_index,
                            process_count, split, aug, min_pixels, skip_bad_records, way,
                            base_label, exclude_novel_images)
  # Batch the (cheap) positions, then build each batch's arrays in place.
  ds = ds.batch(int(batch_size), drop_remainder=True, batch_fn=_as_list).map(fn)
  return _prefetch(ds, num_workers, read_threads)


# ----------------------------------------------------------------------------- evaluation


@dataclasses.dataclass(frozen=True)
class EvalBatchFn:
  """[local slot, ...] -> one batch of evaluation episodes of this process's slice."""
  episodes: tuple[episodes_lib.Episode, ...]
  reader: tfrecord.TFRecordReader
  shot: int
  image_size: int
  process_index: int
  process_count: int
  orig_label_size: int | None
  way: int = 1
  resize: str = "pad"
  support_annotation: str = "dense"
  scribble_dilation: int = 0
  seed: int = 0
  base_classes: tuple[int, ...] | None = None
  recycler: shm_slots.ArrayRecycler = _recycler_field()

  def __call__(self, slots: list[int]) -> dict[str, np.ndarray]:
    with_base = self.base_classes is not None
    specs = _episode_specs(len(slots), self.shot, self.image_size, self.way, with_base)
    specs["valid"] = ((len(slots),), np.bool_)
    if self.orig_label_size is not None:
      m = self.orig_label_size
      specs["orig_label"] = ((len(slots), m, m), np.uint8)
      specs["orig_size"] = ((len(slots), 2), np.int32)
      if with_base:
        specs["orig_base_label"] = ((len(slots), m, m), np.uint8)
    out, finish = _new_batch(specs, self.recycler)
    for j, slot in enumerate(slots):
      index = self.process_index + self.process_count * int(slot)
      valid = index < len(self.episodes)
      ep = self.episodes[index if valid else 0]
      label, base = self._load(ep.query, transforms.query_label, ep.class_ids, out["query"][j],
                               out["query_label"][j],
                               out["query_base_label"][j] if with_base else None)
      for k, s in enumerate(ep.supports):
        if self.support_annotation == "dense":
          self._load(s, functools.partial(transforms.support_label, way=k // ep.shot),
                     ep.class_ids, out["supp_images"][j, k], out["supp_labels"][j, k])
        else:
          self._load_weak(s, ep.class_ids[k // ep.shot], np.random.default_rng(
              [self.seed, index, k]), out["supp_images"][j, k], out["supp_labels"][j, k])
      _fill_episode_ids(out, j, ep, index, self.base_classes)
      out["valid"][j] = valid
      if self.orig_label_size is not None:
        out["orig_label"][j] = transforms.pad_label(label, self.orig_label_size)
        out["orig_size"][j] = label.shape
        if with_base:
          out["orig_base_label"][j] = transforms.pad_label(base, self.orig_label_size)
    return finish(out)

  def _load(self, record_index, label_fn, class_ids, out_image, out_label, out_base=None):
    """Reads a record, makes its label episode-local (`label_fn(label, class_ids)`), resizes
    both into the batch slots (with `out_base`, the base-class label too, resized as the
    label); returns the episode-local label and the base-class label (None without
    `out_base`) at the original size."""
    image, raw = load_record(self.reader, record_index)
    label = label_fn(raw, class_ids)
    if self.resize == "stretch":
      transforms.eval_stretch(image, label, self.image_size, out=(out_image, out_label))
    else:
      transforms.eval_resize(image, label, self.image_size, out=(out_image, out_label))
    base = None
    if out_base is not None:
      base = transforms.base_label(raw, self.base_classes)
      if self.resize == "stretch":
        out_base[:] = transforms.eval_stretch_label(base, self.image_size)
      else:
        transforms.eval_resize_label(base, self.image_size, out=out_base)
    return label, base

  def _load_weak(self, record_index, class_id, rng, out_image, out_label) -> None:
    """A box or scribble support (PANet's test.py): the image resized as a dense one; the
    class, instance and scribble maps resized with the label's nearest rule, then the weak rule
    on them (as PANet applies it after its Resize), the 'pad' padding 254 (neither)."""
    ex, image, label = schema.read_record(self.reader, record_index)
    extras = schema.read_extras(self.reader, record_index, ex, label.shape)
    own = (label == class_id).astype(np.uint8)
    if self.resize == "stretch":
      transforms.eval_stretch(image, own, self.image_size, out=(out_image, out_label))
      size = lambda x: transforms.eval_stretch_label(x, self.image_size)
      region = (slice(None), slice(None))
    else:
      transforms.eval_resize(image, own, self.image_size, out=(out_image, out_label))
      new_h, new_w = transforms.eval_hw(*label.shape, self.image_size)
      size = lambda x: cv2.resize(x, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
      region = (slice(0, new_h), slice(0, new_w))
    own_r = size(own).astype(bool)
    if self.support_annotation == "box":
      if extras["instance"] is None:
        shard, record = self.reader.locate(record_index)
        raise schema.BadRecordError(
            "instance", self.reader.paths[shard], record, ex.get("id"),
            "box supports need instance maps, and this record has none; convert the dataset "
            "with --instances (data_prep/pascal5i.py), or data.synthetic.instances=True")
      weak_label = weak.box_support_label(size(extras["instance"]), own_r)
    else:
      scribble = extras["scribble"]
      if scribble is None:  # no precomputed scribbles: generated, deterministic per episode
        scribble = weak.generate_scribbles(label, rng, instance=extras["instance"])
      scribble = size(scribble)
      if self.scribble_dilation > 1:
        scribble = weak.dilate_scribble(scribble, self.scribble_dilation)
      weak_label = weak.scribble_support_label(scribble, own_r, rng)
    out_label.fill(transforms.NEITHER)
    out_label[region] = weak_label


def eval_batches_per_process(num_episodes: int, batch_size: int,
                             process_count: int = 1) -> int:
  """Batches every process yields for N episodes (the same on all processes)."""
  per_process = math.ceil(num_episodes / process_count)
  return math.ceil(per_process / batch_size)


def eval_dataset(dataset_dir: str, fold: int, shot: int, image_size: int, seed: int,
                 batch_size: int, num_episodes: int, process_index: int = 0,
                 process_count: int = 1, num_workers: int = 0, *, split: str = "val",
                 original_label: bool = False, orig_label_size: int | None = None,
                 min_pixels: int = episodes_lib.MIN_CLASS_PIXELS,
                 read_threads: int = 1, classes: str = "novel",
                 way: int = 1, resize: str = "pad",
                 sampler: str = "walk", support_annotation: str = "dense",
                 scribble_dilation: int = 0, base_label: bool = False) -> grain.IterDataset:
  """Finite stream of evaluation batches over exactly `num_episodes` episodes.

  Episode i (of `episodes.eval_episodes(..., seed)`) goes to process i % process_count.
  Every process yields `eval_batches_per_process(...)` full batches; rows past the end have
  valid == False.

  Args:
    dataset_dir, fold, shot, image_size, seed, batch_size, process_index, process_count,
    num_workers, split, min_pixels, read_threads: as in `train_dataset` (seed picks the
      episode set; the reference uses 321).
    num_episodes: N (the reference: 1000 PASCAL, 20000 COCO).
    original_label: also return orig_label / orig_size for original-size evaluation.
    orig_label_size: side M of orig_label; default: the largest side in the split.
    classes: 'novel' (the protocol) or 'base' (held-out base-class episodes of the split).
    way: classes per episode (N-way episodes, `episodes.py`).
    resize: 'pad' (`transforms.eval_resize`: aspect kept, 255 padding; PFENet/ASGNet) or
      'stretch' (`transforms.eval_stretch`: S x S, PANet); original labels need 'pad'.
    sampler: 'walk' (`episodes.eval_episodes`) or 'class_balanced' (PANet's,
      `episodes.class_balanced_episodes`).
    support_annotation: 'dense' masks, or PANet's weak supports: 'box' (the largest own-class
      instance's box; needs instance maps in the records) or 'scribble' (the records' scribble
      maps, else scribbles generated per episode, `weak.generate_scribbles`, seeded by
      [seed, episode, support]).
    scribble_dilation: PANet's DilateScribble window for scribbles (0: none, its default).
    base_label: also `query_base_label` (the query's base-class label, resized as query_label)
      and `base_class` (0 for a novel class), and with `original_label` `orig_base_label`
      (BAM/MSANet; module docstring). Other keys unchanged.
  """
  _check_process(process_index, process_count)
  transforms.check_size(image_size)
  if resize not in ("pad", "stretch"):
    raise ValueError(f"resize must be 'pad' or 'stretch', got {resize!r}")
  if support_annotation not in SUPPORT_ANNOTATIONS:
    raise ValueError(f"support_annotation must be one of {SUPPORT_ANNOTATIONS}, got "
                     f"{support_annotation!r}")
  if resize == "stretch" and original_label:
    raise ValueError("original-size labels are scored with the 'pad' resize only (the "
                     "evaluator undoes an aspect-keeping resize); PANet scores resized labels")
  manifest = schema.load_manifest(dataset_dir)
  eps = episodes_lib.eval_episode_list(manifest, split, fold, shot, num_episodes, seed,
                                       min_pixels, which=classes, way=way, sampler=sampler)
  reader = manifest.source(split).reader
  size = None
  if original_label:
    size = orig_label_size or max(max(im["height"], im["width"])
                                  for im in manifest.images(split))
  slots = eval_batches_per_process(num_episodes, batch_size, process_count) * batch_size
  base = tuple(episodes_lib.fold_classes(manifest, fold, "base")) if base_label else None
  fn = EvalBatchFn(tuple(eps), reader, int(shot), image_size, process_index, process_count,
                   size, int(way), resize, support_annotation, int(scribble_dilation),
                   int(seed), base)
  ds = grain.MapDataset.range(slots).batch(int(batch_size), batch_fn=_as_list).map(fn)
  return _prefetch(ds, num_workers, read_threads)


# ----------------------------------------------------------------------------- per-image
# Stage 1 of BAM/MSANet: the base learner (PSPNet) trained as plain semantic segmentation of a
# fold's base classes (module docstring).


def semantic_num_classes(manifest: schema.Manifest, fold: int) -> int:
  """Classes of the fold's per-image segmentation: background + the base classes."""
  return 1 + len(episodes_lib.fold_classes(manifest, fold, "base"))


def _manifest(dataset_dir) -> schema.Manifest:
  if isinstance(dataset_dir, schema.Manifest):
    return dataset_dir
  return schema.load_manifest(dataset_dir)


def semantic_train_size(dataset_dir, split: str = "train") -> int:
  """Images in the per-image training list (every image of the split): an epoch is
  semantic_train_size // (batch_size * process_count) batches (BAM's drop_last)."""
  return len(_manifest(dataset_dir).images(split))


def semantic_eval_size(dataset_dir, split: str = "val", num_images: int = 0) -> int:
  """Images `semantic_eval_dataset` evaluates: the split's first `num_images` (0: all)."""
  n = len(_manifest(dataset_dir).images(split))
  if num_images < 0:
    raise ValueError(f"num_images must be >= 0 (0: all), got {num_images}")
  return min(int(num_images), n) if num_images else n


def _semantic_specs(batch: int, size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
  return {
      "image": ((batch, size, size, 3), np.float32),
      "label": ((batch, size, size), np.uint8),
      "index": ((batch,), np.int64),
      "record": ((batch,), np.int64),
  }


@dataclasses.dataclass(frozen=True)
class SemanticTrainBatchFn:
  """[(position, record), ...] -> one batch of augmented images with base-class labels.

  Position p's image is augmented with `np.random.default_rng([seed, p])`
  (`transforms.train_transform`, crop rule on label value 1). With `skip_bad_records` an
  unreadable record is logged and replaced: attempt a = 1, 2, ... takes record
  (record + a) mod N with `np.random.default_rng([seed, p, a])`, as `TrainBatchFn` does.
  """
  reader: tfrecord.TFRecordReader
  aug: transforms.TrainAugConfig
  seed: int
  base_classes: tuple[int, ...]
  num_records: int
  skip_bad_records: bool = False
  recycler: shm_slots.ArrayRecycler = _recycler_field()

  def __call__(self, items: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    out, finish = _new_batch(_semantic_specs(len(items), self.aug.size), self.recycler)
    table = transforms.base_label_table(self.base_classes)
    for j, (position, entry) in enumerate(items):
      for attempt in range(MAX_SKIPS_PER_EPISODE + 1):
        rng = np.random.default_rng([self.seed, position] + ([attempt] if attempt else []))
        record = (entry + attempt) % self.num_records
        try:
          image, label = load_record(self.reader, record)
        except schema.BadRecordError as e:
          if not self.skip_bad_records:
            raise schema.BadRecordError(e.kind, e.path, e.record, e.image_id,
                                        e.detail + SKIP_HINT) from e
          logging.warning("skipping bad record (data.skip_bad_records): %s; training "
                          "position %d gets a substitute image (attempt %d)",
                          e, position, attempt + 1)
          continue
        # The official crop rule counts label == 1: only the first base class (a quirk kept).
        transforms.train_transform(image, table[label], rng, self.aug,
                                   out=(out["image"][j], out["label"][j]), keep_value=1)
        break
      else:
        raise RuntimeError(f"training position {position}: {MAX_SKIPS_PER_EPISODE + 1} "
                           "records in a row were bad; check the dataset with "
                           "scripts/check_dataset.py")
      out["index"][j] = position
      out["record"][j] = record
    return finish(out)


def semantic_train_dataset(dataset_dir: str, fold: int, image_size: int, seed: int,
                           batch_size: int, process_index: int = 0, process_count: int = 1,
                           num_workers: int = 0, *, split: str = "train",
                           aug: transforms.TrainAugConfig | None = None,
                           read_threads: int = 1,
                           skip_bad_records: bool = False) -> grain.IterDataset:
  """Infinite stream of per-image training batches of the fold's base classes (stage 1 of
  BAM/MSANet; module docstring for the layout).

  The list is every image of the split, unfiltered (BAM's BaseData: images without a base
  class train as all background). `MapDataset.range(N).shuffle(seed).repeat()`, positions
  tagged, sliced per process, batched, each batch built in place (`SemanticTrainBatchFn`): a
  pure function of (dataset, fold, size, seed, batch number, process slice), the same for any
  worker count, resumable from the iterator's get_state().

  Args:
    dataset_dir, fold, image_size, seed, batch_size, process_index, process_count,
    num_workers, split, read_threads, skip_bad_records: as in `train_dataset`.
    aug: augmentation settings (size is overridden by image_size; BAM's stage 1 uses
      scale (0.5, 2.0) at 417).
  """
  _check_process(process_index, process_count)
  seed = _check_seed(seed)
  transforms.check_size(image_size)
  aug = dataclasses.replace(aug or transforms.TrainAugConfig(), size=image_size)
  manifest = schema.load_manifest(dataset_dir)
  base = tuple(episodes_lib.fold_classes(manifest, fold, "base"))
  reader = manifest.source(split).reader
  n = len(manifest.images(split))
  if n == 0:
    raise ValueError(f"{manifest.path}: split {split!r} has no images")
  fn = SemanticTrainBatchFn(reader, aug, seed, base, n, bool(skip_bad_records))
  ds = grain.MapDataset.range(n).shuffle(seed=seed % 2**32).repeat()
  ds = ds.map_with_index(_TagPosition())
  ds = ds[process_index::process_count]
  ds = ds.batch(int(batch_size), drop_remainder=True, batch_fn=_as_list).map(fn)
  return _prefetch(ds, num_workers, read_threads)


@dataclasses.dataclass(frozen=True)
class SemanticEvalBatchFn:
  """[local slot, ...] -> one batch of evaluation images (base-class labels) of this
  process's slice; rows past the end repeat image 0 with valid == False."""
  reader: tfrecord.TFRecordReader
  image_size: int
  base_classes: tuple[int, ...]
  num_images: int
  process_index: int
  process_count: int
  recycler: shm_slots.ArrayRecycler = _recycler_field()

  def __call__(self, slots: list[int]) -> dict[str, np.ndarray]:
    specs = _semantic_specs(len(slots), self.image_size)
    specs["valid"] = ((len(slots),), np.bool_)
    out, finish = _new_batch(specs, self.recycler)
    table = transforms.base_label_table(self.base_classes)
    for j, slot in enumerate(slots):
      index = self.process_index + self.process_count * int(slot)
      valid = index < self.num_images
      record = index if valid else 0
      image, label = load_record(self.reader, record)
      transforms.eval_resize(image, table[label], self.image_size,
                             out=(out["image"][j], out["label"][j]))
      out["index"][j] = index
      out["record"][j] = record
      out["valid"][j] = valid
    return finish(out)


def semantic_eval_dataset(dataset_dir: str, fold: int, image_size: int, batch_size: int,
                          process_index: int = 0, process_count: int = 1,
                          num_workers: int = 0, *, split: str = "val", read_threads: int = 1,
                          num_images: int = 0) -> grain.IterDataset:
  """Finite stream over every image of the split (or its first `num_images`; 0: all), each
  once, with base-class labels, resized by `transforms.eval_resize` (BAM's BaseData val with
  `resized_val`: no filtering). Image i goes to process i % process_count; every process
  yields `eval_batches_per_process(semantic_eval_size(...), batch_size, process_count)` full
  batches, padding rows valid == False (module docstring for the layout).
  """
  _check_process(process_index, process_count)
  transforms.check_size(image_size)
  manifest = schema.load_manifest(dataset_dir)
  n = semantic_eval_size(manifest, split, num_images)
  if n == 0:
    raise ValueError(f"{manifest.path}: split {split!r} has no images")
  base = tuple(episodes_lib.fold_classes(manifest, fold, "base"))
  reader = manifest.source(split).reader
  slots = eval_batches_per_process(n, batch_size, process_count) * batch_size
  fn = SemanticEvalBatchFn(reader, image_size, base, n, process_index, process_count)
  ds = grain.MapDataset.range(slots).batch(int(batch_size), batch_fn=_as_list).map(fn)
  return _prefetch(ds, num_workers, read_threads)


def describe_batch(batch: dict[str, Any]) -> dict[str, tuple]:
  """{key: (shape, dtype)} of a batch, for logs."""
  return {k: (tuple(v.shape), str(v.dtype)) for k, v in batch.items()}
