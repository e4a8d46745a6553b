"""Few-shot episode sampling (reference semantics, docs/reference_asgnet.md §7-§8).

Everything here works on record indices and the manifest's per-image class pixel counts;
no image is decoded. An episode names a query record, K support records and a class id;
`pipeline.py` turns it into arrays.

Training (§7): a class counts for an image only if it covers >= MIN_CLASS_PIXELS pixels.
The query list is every image with at least one such *base* class; novel classes are
never targets (their pixels end up background once the label is made binary). An episode
is (query, a class drawn uniformly among the query's eligible base classes, K distinct
support images != query drawn uniformly from the images where that class is eligible).

BAM/MSANet's training lists (`exclude_novel_images=True`; the generator `make_dataset(...,
filter_intersection=True)`, commented out in BAM's util/dataset.py, that wrote its
lists/*/fss_list/train files): an image is used at all, as a query or as a support, only if
*every* class labelled in it (any pixel count; 0 and 255 aside) is a base class; the rest of the
rule is the one above (a base class with >= MIN_CLASS_PIXELS pixels makes a query, and the
class index lists the images where each base class has that many). Images holding a novel
object are dropped instead of having it relabelled background.

Evaluation (§8): walk the split in record order over the images with at least one eligible
novel class, cycling, one episode per image; the class is drawn among all novel classes
*present* in the query (any pixel count), supports among the images where the class is
eligible. Episode i draws from `np.random.default_rng([seed, i])`, so an episode list is a
pure function of (dataset, novel classes, shot, seed, i) and a longer list extends a
shorter one. The reference's loop lets N+1 episodes through; here N means N.

N-way episodes (PANet, `way` > 1): the class drawn as above is the query's own; the other
N - 1 classes are drawn uniformly without replacement among the other usable classes (base
classes in training; in evaluation the novel classes with K supports other than the query),
the query's class takes a uniformly drawn way position, and each way gets K supports of its
class (query excluded), drawn way after way. Supports are way-major (way 0's K shots, then way
1's, ...), the official PANet order. This differs from PANet's own sampler, which draws the N
classes first and then the query from one of their lists (reference_panet.md §3); a 1-way
episode is drawn exactly as before (no extra draws).

Small datasets: a class eligible in too few images to give a query K *other* supports
cannot form an episode (the reference would loop forever or crash). Such a class is left
out of the draw (training: for every query; evaluation: for the queries where it lacks
supports), queries left without a class are skipped, and a warning names the classes.
Standard benchmarks never hit this.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Collection, Mapping, Sequence

import numpy as np

MIN_CLASS_PIXELS = 2 * 32 * 32


@dataclasses.dataclass(frozen=True)
class Episode:
  """One few-shot episode (record indices into one split).

  Attributes:
    query: record index of the query image.
    supports: N·K record indices, way-major (way w's shots are supports[w*K:(w+1)*K]); the K
      of one way are distinct and none equals query.
    class_id: way 0's class (a 1-way episode's class: label pixels of this id become 1).
    class_ids: every way's class, in way order (default: (class_id,)).
    query_way: the way whose class the query was drawn for (0 in a 1-way episode).
  """
  query: int
  supports: tuple[int, ...]
  class_id: int
  class_ids: tuple[int, ...] = ()
  query_way: int = 0

  def __post_init__(self):
    if not self.class_ids:
      object.__setattr__(self, "class_ids", (int(self.class_id),))
    if int(self.class_ids[0]) != int(self.class_id):
      raise ValueError(f"Episode: class_id {self.class_id} is not way 0's class "
                       f"{self.class_ids[0]}")
    if len(self.supports) % len(self.class_ids):
      raise ValueError(f"Episode: {len(self.supports)} supports for {len(self.class_ids)} ways")

  @property
  def way(self) -> int:
    return len(self.class_ids)

  @property
  def shot(self) -> int:
    return len(self.supports) // len(self.class_ids)


def class_pixels(image: Mapping[str, Any] | Mapping[int, int]) -> dict[int, int]:
  """Pixel counts of one image as {int class id: pixels}.

  Accepts a manifest image entry ({"classes": {"<id>": n}, ...}) or such a dict directly.
  """
  counts = image["classes"] if "classes" in image else image
  return {int(c): int(n) for c, n in counts.items()}


def _pixel_table(images: Sequence[Mapping]) -> list[dict[int, int]]:
  return [class_pixels(im) for im in images]


def eligible_classes(pixels: Mapping[int, int], classes: Collection[int],
                     min_pixels: int = MIN_CLASS_PIXELS) -> list[int]:
  """Classes of `classes` covering >= min_pixels in an image, ascending."""
  return sorted(c for c, n in pixels.items() if c in classes and n >= min_pixels)


def build_class_index(images: Sequence[Mapping], classes: Collection[int],
                      min_pixels: int = MIN_CLASS_PIXELS) -> dict[int, np.ndarray]:
  """Class id -> ascending int64 record indices of the images where it is eligible.

  Every class of `classes` gets an entry (possibly empty).
  """
  index = {int(c): [] for c in classes}
  for i, pixels in enumerate(_pixel_table(images)):
    for c in eligible_classes(pixels, index, min_pixels):
      index[c].append(i)
  return {c: np.asarray(v, np.int64) for c, v in index.items()}


def _draw_supports(class_images: np.ndarray, query: int, shot: int,
                   rng: np.random.Generator, class_id: int) -> tuple[int, ...]:
  """K distinct images of the class, query excluded, uniformly without replacement."""
  pos = int(np.searchsorted(class_images, query))
  if pos < len(class_images) and class_images[pos] == query:
    candidates = np.delete(class_images, pos)
  else:
    candidates = class_images
  if len(candidates) < shot:
    raise ValueError(
        f"class {class_id} is eligible in only {len(candidates)} images besides query "
        f"record {query}; a {shot}-shot episode needs {shot}")
  picks = rng.choice(len(candidates), size=shot, replace=False)
  return tuple(int(candidates[p]) for p in picks)


def _episode(query: int, class_id: int, pool, way: int, shot: int, class_images,
             rng: np.random.Generator) -> Episode:
  """The episode of (query, its class): 1-way, K supports; N-way, N - 1 more classes drawn
  from `pool` (ascending, class_id not in it), the query's way position, then K supports per
  way, way after way (see the module docstring)."""
  if way == 1:
    return Episode(query, _draw_supports(class_images[class_id], query, shot, rng, class_id),
                   class_id)
  if len(pool) < way - 1:
    raise ValueError(f"a {way}-way episode of query record {query} (class {class_id}) needs "
                     f"{way - 1} other classes with {shot}-shot supports; only {list(pool)}")
  others = [int(pool[i]) for i in rng.choice(len(pool), size=way - 1, replace=False)]
  position = int(rng.integers(way))
  class_ids = others[:position] + [int(class_id)] + others[position:]
  supports = ()
  for c in class_ids:
    supports += _draw_supports(class_images[c], query, shot, rng, c)
  return Episode(query, supports, class_ids[0], tuple(class_ids), position)


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class TrainSampler:
  """Training episodes over a split (see the module docstring).

  Attributes:
    queries: int64 (N,) record indices of the query list, ascending.
    query_classes: for each query, its eligible base classes (ascending).
    class_images: base class id -> int64 record indices where it is eligible.
    shot: K.
    way: N (classes per episode).
  """
  queries: np.ndarray
  query_classes: tuple[tuple[int, ...], ...]
  class_images: Mapping[int, np.ndarray]
  shot: int
  way: int = 1

  def __len__(self) -> int:
    return len(self.queries)

  def sample(self, position: int, rng: np.random.Generator) -> Episode:
    """Episode for query list entry `position` (mod N); draws: class, (N-way: the other
    classes and the query's way), then supports."""
    position = int(position) % len(self.queries)
    query = int(self.queries[position])
    choices = self.query_classes[position]
    class_id = choices[int(rng.integers(len(choices)))]
    pool = [c for c in self.class_images if c != class_id] if self.way > 1 else ()
    return _episode(query, class_id, pool, self.way, self.shot, self.class_images, rng)


def only_base_classes(pixels: Mapping[int, int], base_classes: Collection[int]) -> bool:
  """Whether every class labelled in an image (pixel count > 0) is a base class (BAM's
  ``set(label_class).issubset(set(sub_list))``)."""
  return all(c in base_classes for c, n in pixels.items() if n > 0)


def train_episode_sampler(images: Sequence[Mapping], base_classes: Collection[int],
                          shot: int, min_pixels: int = MIN_CLASS_PIXELS,
                          way: int = 1, exclude_novel_images: bool = False) -> TrainSampler:
  """Builds the training query list and class index from manifest image entries.

  Args:
    images: the split's manifest image entries (or {class id: pixels} dicts), record order.
    base_classes: the fold's base (training) class ids.
    shot: supports per episode.
    min_pixels: eligibility threshold (the reference's 2*32*32).
    way: classes per episode.
    exclude_novel_images: BAM/MSANet's lists: leave out (as queries and as supports) every
      image with a labelled class that is not a base class (module docstring). False: such
      images stay and their other classes become background (PFENet/ASGNet).
  Raises:
    ValueError: no image has a usable base class, or fewer than `way` classes are usable.
  """
  if shot < 1:
    raise ValueError(f"shot must be >= 1, got {shot}")
  if way < 1:
    raise ValueError(f"way must be >= 1, got {way}")
  base = {int(c) for c in base_classes}
  table = _pixel_table(images)
  if exclude_novel_images:
    table = [px if only_base_classes(px, base) else {} for px in table]
  class_images = build_class_index(table, base, min_pixels)
  short = {c: len(v) for c, v in class_images.items() if 0 < len(v) <= shot}
  if short:
    logging.warning(
        "base classes %s are eligible in only %s images; %d-shot episodes need %d: "
        "they are not used as training classes", sorted(short), short, shot, shot + 1)
  usable = {c for c, v in class_images.items() if len(v) > shot}
  queries, query_classes = [], []
  for i, pixels in enumerate(table):
    eligible = eligible_classes(pixels, usable, min_pixels)
    if eligible:
      queries.append(i)
      query_classes.append(tuple(eligible))
  if not queries:
    raise ValueError(f"no image{' without novel classes' if exclude_novel_images else ''} "
                     f"has a base class with >= {min_pixels} pixels that is eligible in at "
                     f"least {shot + 1} images")
  if len(usable) < way:
    raise ValueError(f"{way}-way episodes need {way} base classes eligible in more than "
                     f"{shot} images; only {sorted(usable)} are")
  return TrainSampler(np.asarray(queries, np.int64), tuple(query_classes),
                      {c: class_images[c] for c in sorted(usable)}, int(shot), int(way))


def sample_train_episode(sampler: TrainSampler, position: int,
                         rng: np.random.Generator) -> Episode:
  """Functional alias of `TrainSampler.sample`."""
  return sampler.sample(position, rng)


# ----------------------------------------------------------------------------- evaluation


def eval_episodes(images: Sequence[Mapping], novel: Collection[int], shot: int,
                  num_episodes: int, seed: int,
                  min_pixels: int = MIN_CLASS_PIXELS, way: int = 1) -> list[Episode]:
  """The evaluation episode list (§8), exactly `num_episodes` long.

  Args:
    images: the split's manifest image entries (or {class id: pixels} dicts), record order.
    novel: the fold's novel class ids.
    shot: supports per episode.
    num_episodes: N.
    seed: episode i draws from np.random.default_rng([seed, i]); other seeds give the
      independent sets of multi-seed evaluation.
    min_pixels: eligibility threshold.
    way: classes per episode (the others among the novel classes with `shot` supports
      besides the query).
  Returns:
    N episodes; episode i's query is the (i mod M)-th image with an eligible novel class.
  """
  if shot < 1:
    raise ValueError(f"shot must be >= 1, got {shot}")
  if way < 1:
    raise ValueError(f"way must be >= 1, got {way}")
  novel = {int(c) for c in novel}
  table = _pixel_table(images)
  class_images = build_class_index(images, novel, min_pixels)

  def others(c, q):  # eligible images of class c other than q
    arr = class_images[c]
    pos = int(np.searchsorted(arr, q))
    return len(arr) - int(pos < len(arr) and arr[pos] == q)

  queries, drawable, left_out = [], [], set()
  for q, px in enumerate(table):
    if not eligible_classes(px, novel, min_pixels):
      continue
    present = sorted(c for c, n in px.items() if c in novel and n > 0)
    ok = tuple(c for c in present if others(c, q) >= shot)
    left_out.update(set(present) - set(ok))
    if ok:
      queries.append(q)
      drawable.append(ok)
  if left_out:
    logging.warning("novel classes %s lack %d-shot supports for some queries and are "
                    "not drawn there", sorted(left_out), shot)
  if not queries:
    raise ValueError(f"no image has a novel class {sorted(novel)} with >= {min_pixels} "
                     f"pixels and {shot} other images to support it")
  episodes = []
  for i in range(int(num_episodes)):
    rng = np.random.default_rng([int(seed), i])
    query = queries[i % len(queries)]
    present = drawable[i % len(queries)]
    class_id = present[int(rng.integers(len(present)))]
    pool = ([c for c in sorted(novel) if c != class_id and others(c, query) >= shot]
            if way > 1 else ())
    episodes.append(_episode(query, class_id, pool, way, shot, class_images, rng))
  return episodes


def class_balanced_episodes(images: Sequence[Mapping], classes: Collection[int], shot: int,
                            num_episodes: int, seed: int, min_pixels: int = MIN_CLASS_PIXELS,
                            way: int = 1) -> list[Episode]:
  """PANet's evaluation sampler (``PairedDataset``, reference_panet.md §3), exactly N long.

  Episode i draws from `np.random.default_rng([seed, i])`: N distinct classes uniformly (way
  order = draw order), the query's way uniformly, then per way K distinct images of the
  class's list (the images where it is eligible), K + 1 for the query's way, whose last image
  is the query. Class-balanced, unlike `eval_episodes`' walk over the images. As in PANet an
  image may appear in two ways (never twice in one). Differences: PANet fixes the query's way
  once per run (`cnt_query`) and draws from Python's `random` over its shipped class lists;
  here the way is drawn per episode.
  """
  if shot < 1 or way < 1:
    raise ValueError(f"shot and way must be >= 1, got {shot}, {way}")
  class_images = build_class_index(images, classes, min_pixels)
  usable = sorted(c for c, v in class_images.items() if len(v) > shot)
  if len(usable) < way:
    raise ValueError(f"{way}-way episodes need {way} classes eligible in more than {shot} "
                     f"images; only {usable} of {sorted(class_images)} are")
  episodes = []
  for i in range(int(num_episodes)):
    rng = np.random.default_rng([int(seed), i])
    class_ids = [usable[j] for j in rng.choice(len(usable), size=way, replace=False)]
    query_way = int(rng.integers(way))
    supports, query = (), None
    for w, c in enumerate(class_ids):
      n = shot + (w == query_way)
      picks = [int(class_images[c][j]) for j in rng.choice(len(class_images[c]), size=n,
                                                            replace=False)]
      if w == query_way:
        query = picks.pop()
      supports += tuple(picks)
    episodes.append(Episode(query, supports, class_ids[0], tuple(class_ids), query_way))
  return episodes


def fold_classes(manifest, fold: int, which: str = "novel") -> list[int]:
  """The novel classes of `fold`, or (`which="base"`) every other class, sorted."""
  if not 0 <= fold < len(manifest.novel_folds):
    raise ValueError(f"{manifest.path}: fold {fold} out of range "
                     f"(dataset has {len(manifest.novel_folds)} folds)")
  novel = sorted(int(c) for c in manifest.novel_folds[fold])
  if which == "novel":
    return novel
  if which == "base":
    return [c for c in range(1, manifest.num_classes + 1) if c not in set(novel)]
  raise ValueError(f"which must be 'novel' or 'base', got {which!r}")


SAMPLERS = ("walk", "class_balanced")


def eval_episode_list(manifest, split: str, fold: int, shot: int, num_episodes: int,
                      seed: int, min_pixels: int = MIN_CLASS_PIXELS,
                      which: str = "novel", way: int = 1,
                      sampler: str = "walk") -> list[Episode]:
  """`eval_episodes` (sampler 'walk', PFENet/ASGNet) or `class_balanced_episodes` ('class_
  balanced', PANet) for fold `fold` of a loaded `schema.Manifest`.

  `which="base"` draws episodes of the fold's base classes instead (held-out base-class
  validation on the evaluation split, for model selection without looking at novel classes).
  """
  classes = fold_classes(manifest, fold, which)
  if sampler == "walk":
    return eval_episodes(manifest.images(split), classes, shot, num_episodes, seed,
                         min_pixels, way)
  if sampler == "class_balanced":
    return class_balanced_episodes(manifest.images(split), classes, shot, num_episodes, seed,
                                   min_pixels, way)
  raise ValueError(f"episode sampler must be one of {SAMPLERS}, got {sampler!r}")


def train_sampler_for_fold(manifest, split: str, fold: int, shot: int,
                           min_pixels: int = MIN_CLASS_PIXELS, way: int = 1,
                           exclude_novel_images: bool = False) -> TrainSampler:
  """`train_episode_sampler` with the base classes of fold `fold` of a Manifest."""
  return train_episode_sampler(manifest.images(split), fold_classes(manifest, fold, "base"),
                               shot, min_pixels, way, exclude_novel_images)
