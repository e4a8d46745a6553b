"""The field's evaluation protocols as named presets (``config.eval.protocol``).

A protocol fixes what the *reported* evaluation scores: how many episodes per run, which seeds
(one run per seed; several seeds → mean ± std), and whether predictions are scored against the
original-size labels or the labels resized with the image. ``protocol_settings(config)`` turns
the config into a ``Protocol``; the final evaluation of a training run (``final_metrics.json``)
and ``scripts/evaluate.py`` both read it. The in-training (model-selection) evaluation does not:
it stays cheap and unchanged, ``data.eval_episodes`` episodes of seed ``data.seed`` with
``data.original_label_eval`` (``selection_settings``).

======  ==================  ======================  ===============  ========================
name    episodes PASCAL     episodes COCO           seeds            labels
======  ==================  ======================  ===============  ========================
custom  data.eval_episodes  data.eval_episodes      data.eval_seeds  data.original_label_eval
asgnet  1001                20001                   321              original
pfenet  5001                20001                   321              original
bam     1000                1000                    510 365 382      original
                                                    322 988
hsnet   1000                1000                    0                resized (with the image)
panet   1000                1000                    1234..1238       resized; training split,
                                                                     class-balanced episodes,
                                                                     PANet's metric
======  ==================  ======================  ===============  ========================

Counts are keyed on ``config.data.dataset``: 'coco20i' takes the COCO column, every other
dataset ('pascal5i', 'synthetic', folder or FSS-1000 conversions) the PASCAL column.

What each preset reproduces, with its evidence:

* ``asgnet`` — Reagan1311/ASGNet ``tool/test.py``: seed reset to ``manual_seed`` 321 before the
  loop (lines 163-168, ``fix_random_seed_val: True``), ``test_num`` 1000 PASCAL / 20000 COCO
  (lines 172-178) and the stop test ``if (iter_num-1) * batch_size_val >= test_num: break``
  before ``iter_num += 1`` (lines 182-186), which lets test_num + 1 episodes through: 1001 /
  20001. Its yaml files (``data/config/{pascal,coco}/*.yaml`` line 51) set ``ori_resize: True``,
  so the logits are scored against the original-size label padded to its longer side (lines
  196-200). (Scoring resized labels would not be ASGNet's protocol: its official test scores
  the original labels, and so does this preset; 'custom' with data.original_label_eval=False
  scores resized ones.)
* ``pfenet`` — dvlab-research/PFENet ``test.py``: the same seed reset (lines 163-168), test_num
  5000 PASCAL / 20000 COCO (lines 172-178) and the same stop test (lines 182-186): 5001 / 20001;
  ``ori_resize: True`` in ``config/pascal/pascal_split0_resnet50.yaml`` line 48 and
  ``config/coco/coco_split0_*.yaml`` line 47.
* ``bam`` — chunbolang/BAM ``test.py`` (MSANet's is the same): ``val_manual_seed = 123``,
  ``val_num = 5``, ``seed_array = np.random.randint(0, 1000, val_num)`` → [510, 365, 382, 322,
  988]; each run re-seeds and scores ``test_num = 1000`` episodes for PASCAL and COCO alike,
  stopping at ``iter_num * batch_size_val >= test_num`` (exactly 1000); ``ori_resize: True``
  in its yaml files. It prints the mean (and best) over the five seeds; the std here is ours.
* ``hsnet`` — juhongm999/hsnet ``test.py``: ``utils.fix_randseed(0)`` before the loop, the
  datasets' ``__len__`` is 1000 in the test split (``data/pascal.py``, ``data/coco.py``), and
  ``--use_original_imgsize`` is a ``store_true`` flag (default off): the query label is resized
  (nearest) with the image and scored at that size. Its mIoU (``common/logger.py``
  ``AverageMeter.compute_iou``: per class Σ inter / Σ union of the foreground, mean over the
  fold's classes) and FB-IoU (mean over background/foreground of the inter and union summed
  over the fold's classes) are this project's definitions; PASCAL boundary pixels (255) are
  ignored there as here (``common/evaluation.py``). (Read from unchanged copies of these
  files in forks, NTAvanHoeffelen/hsnet and Whileherham/IMR-HSNet; the maintainer confirms the
  400×400 resized-label evaluation in juhongm999/hsnet issues #1 and #5.)

What no preset reproduces (a port reproduces a protocol, not the authors' episodes):

* Episode identity. Here episode i of seed s draws from ``np.random.default_rng([s, i])`` over
  the reference walk of the validation list (``fss_jax/data/episodes.py``); the authors' code
  draws from the global Python/NumPy/PyTorch generators (in DataLoader workers for BAM), so the
  same seed names a different, equally distributed episode set.
* The official loops' pass caps: ASGNet/PFENet stop after 20 passes over the validation list
  (a PASCAL fold with fewer than 251 eligible images would give PFENet fewer than 5001
  episodes); here the walk cycles until N.
* HSNet's input: a 400×400 resize that does not keep the aspect ratio, and its episode sampler
  (PASCAL: the (image, class) pairs of its fold list in order, supports from
  ``np.random.choice``; COCO: a uniformly drawn class, then a random query). Here the image
  goes through the config's ``data.image_size`` aspect-preserving resize and our episode walk;
  ``hsnet`` fixes its seed, count and label mode only. Its 5-shot vote is a model matter.
* The input size and the model's own test-time behaviour are the config's, not the preset's.
* ``panet`` — kaixin96/PANet ``test.py`` / ``config.py`` (reference_panet.md §9): ``n_runs`` 5 ×
  ``n_steps`` 1000 episodes, ``set_seed(1234 + run)`` per run, episodes from the *training*
  split (``data_split`` trainaug / train2014) sampled class-balanced (``PairedDataset``:
  classes first, then images of their lists; ``episodes.class_balanced_episodes``), scored
  on the labels resized with the image (417×417 without keeping the aspect with
  ``data.transform='panet'``) by ``util/metric.py`` (``metrics.FewShotMeter`` rule 'panet').
  Python's ``random`` draws are not replayed, and the query's way is drawn per episode where
  PANet fixes it per run.

Original labels are always available: every converted dataset stores each image's label at the
size the converter read it (``pipeline.EvalBatchFn`` pads it into the ``orig_label`` canvas), so
a preset that scores original labels works on any dataset directory, the procedural one too.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

CUSTOM = "custom"
DEFAULT_PROTOCOL = CUSTOM
BAM_SEEDS = (510, 365, 382, 322, 988)
PANET_SEEDS = (1234, 1235, 1236, 1237, 1238)


@dataclasses.dataclass(frozen=True)
class Protocol:
  """What an evaluation scores: ``episodes`` per run, one run per seed, label mode.

  Attributes:
    name: the preset ('custom', 'asgnet', 'pfenet', 'bam', 'hsnet') or 'selection' for the
      in-training evaluation.
    episodes: N, exactly, per seed.
    seeds: one run per seed (several: mean ± std).
    original_label: score against the original-size labels (else at ``data.image_size``).
    note: one line on where the numbers come from.
    metric: how episodes are reduced (``metrics.FewShotMeter`` rules): 'fss' (PFENet/ASGNet:
      every episode counts) or 'panet' (a class counts only in episodes whose label holds it).
    sampler: 'walk' (``episodes.eval_episodes``) or 'class_balanced' (PANet's).
    split: the manifest split episodes come from ('' = ``data.eval_split``).
  """
  name: str
  episodes: int
  seeds: tuple[int, ...]
  original_label: bool
  note: str = ""
  metric: str = "fss"
  sampler: str = "walk"
  split: str = ""

  def header(self) -> dict[str, Any]:
    """The entries written at the top of ``final_metrics.json`` / ``evaluate.py --output``."""
    return {"protocol": self.name, "episodes": self.episodes, "seeds": list(self.seeds),
            "original_label": self.original_label, "metric": self.metric,
            "sampler": self.sampler, "split": self.split}

  def describe(self) -> str:
    """'protocol bam: 1000 episodes x 5 seeds [510, ...], original labels'."""
    n = len(self.seeds)
    return (f"protocol {self.name}: {self.episodes} episodes x {n} seed{'s' if n != 1 else ''} "
            f"{list(self.seeds)}, {'original' if self.original_label else 'resized'} labels")


@dataclasses.dataclass(frozen=True)
class _Preset:
  pascal_episodes: int
  coco_episodes: int
  seeds: tuple[int, ...]
  original_label: bool
  note: str
  metric: str = "fss"
  sampler: str = "walk"
  split: str = ""  # '' = data.eval_split; 'train' = data.train_split


PRESETS: Mapping[str, _Preset] = {
    "asgnet": _Preset(
        1001, 20001, (321,), True,
        "ASGNet tool/test.py: seed 321, test_num 1000 / 20000 and a stop test that lets "
        "test_num + 1 through; ori_resize: True (original labels)"),
    "pfenet": _Preset(
        5001, 20001, (321,), True,
        "PFENet test.py: seed 321, test_num 5000 / 20000 and a stop test that lets "
        "test_num + 1 through; ori_resize: True (original labels)"),
    "bam": _Preset(
        1000, 1000, BAM_SEEDS, True,
        "BAM / MSANet test.py: 5 seeds drawn from numpy seed 123, exactly 1000 episodes "
        "each (PASCAL and COCO), ori_resize: True; mean ± std over the seeds"),
    "hsnet": _Preset(
        1000, 1000, (0,), False,
        "HSNet test.py: fix_randseed(0), 1000 test episodes (PASCAL and COCO), labels "
        "resized with the image (use_original_imgsize off); its 400x400 resize and sampler "
        "are not reproduced"),
    "panet": _Preset(
        1000, 1000, PANET_SEEDS, False,
        "PANet test.py: 5 runs x 1000 episodes, seeds 1234 + run, class-balanced episodes "
        "from the training split, resized labels, util/metric.py (a class counts only where "
        "the label holds it; binary IoU pooled over the classes); mean ± std over the runs",
        metric="panet", sampler="class_balanced", split="train"),
}
PROTOCOL_NAMES = (CUSTOM,) + tuple(PRESETS)


def protocol_name(config) -> str:
  """``config.eval.protocol``, checked; 'custom' for configs without an ``eval`` section (runs
  saved before it existed).

  Raises:
    ValueError: an unknown name (the message lists the valid ones).
  """
  section = config.get("eval") if hasattr(config, "get") else None
  name = section.get("protocol", DEFAULT_PROTOCOL) if section is not None else DEFAULT_PROTOCOL
  if name not in PROTOCOL_NAMES:
    raise ValueError(f"config.eval.protocol = {name!r}: unknown evaluation protocol; valid: "
                     f"{', '.join(PROTOCOL_NAMES)}.")
  return str(name)


def protocol_settings(config) -> Protocol:
  """The ``Protocol`` of ``config`` (see the module docstring for the presets).

  'custom' reads ``data.eval_episodes``, ``data.eval_seeds`` and ``data.original_label_eval``;
  a preset ignores those three fields and takes its counts from ``data.dataset`` ('coco20i':
  the COCO count, anything else: the PASCAL count).
  """
  name = protocol_name(config)
  d = config.data
  if name == CUSTOM:
    return Protocol(CUSTOM, int(d.eval_episodes), tuple(int(s) for s in d.eval_seeds),
                    bool(d.original_label_eval),
                    "data.eval_episodes / data.eval_seeds / data.original_label_eval")
  p = PRESETS[name]
  dataset = str(d.dataset)
  note = p.note
  if dataset not in ("pascal5i", "coco20i"):
    note += f" (dataset {dataset!r}: the PASCAL-5i count)"
  episodes = p.coco_episodes if dataset == "coco20i" else p.pascal_episodes
  split = str(d.train_split) if p.split == "train" else ""
  return Protocol(name, episodes, p.seeds, p.original_label, note, p.metric, p.sampler, split)


def selection_settings(config) -> Protocol:
  """The in-training (model-selection) evaluation: ``data.eval_episodes`` episodes of the
  single seed ``data.seed``, labels as ``data.original_label_eval``, whatever the protocol."""
  d = config.data
  return Protocol("selection", int(d.eval_episodes), (int(d.seed),),
                  bool(d.original_label_eval), "in-training evaluation (data.eval_episodes, "
                  "data.seed, data.original_label_eval)")
