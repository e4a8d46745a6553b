"""Few-shot evaluation: the reference protocol, original-label scoring, and multi-seed runs.

Protocol (reference ``tool/test.py``, see docs): a fixed list of N episodes drawn with a fixed
seed (``data.episodes.eval_episodes``), each scored by foreground/background intersection and
union; class-wise mIoU = mean over the fold's novel classes of Σ inter / Σ union, FB-IoU = mean
over {bg, fg} of the global Σ inter / Σ union. The multi-seed protocol repeats this with several
seeds and reports mean ± std. N, the seeds and the label mode of a reported evaluation come from
``config.eval.protocol`` (``protocol_settings``: the presets 'asgnet', 'pfenet', 'bam', 'hsnet'
or 'custom' = the ``data.eval_*`` fields; ``fss_jax/train/protocols.py``); the in-training
selection evaluation uses ``selection_settings`` (``data.eval_episodes``, ``data.seed``).

One batch: host-local episodes → global arrays sharded over ``"data"`` → jitted forward +
per-episode (inter, union) on device → this process's rows back to the host →
``FewShotMeter``; meters are summed over processes at the end (``metrics.gather_meter``).
Pictures of the first episodes (``run(..., num_rows=)``, ``prediction_rows``) come from the same
forward: the jitted function also returns the prediction, which is fetched only for the
batches being drawn.

Original-label evaluation (``data.original_label_eval``): the reference upsamples the logits
of the whole S×S canvas (bilinear, align_corners) to L×L, L = max(H, W) of the original label,
and scores against the original label padded with 255 to that square. Here the per-episode L
varies inside a batch, so the resize is written as a per-episode interpolation matrix onto a
fixed M×M canvas (M = the largest L of the split); rows and columns ≥ L fall on 255 padding.
"""
import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fss_jax import weights
from fss_jax.data import dataset_dir as dataset_dir_lib
from fss_jax.data import pipeline
from fss_jax.data import schema
from fss_jax.train import logging as logging_lib
from fss_jax.train import metrics as metrics_lib
from fss_jax.train import protocols
from fss_jax.train import sharding
from fss_jax.train import step as step_lib

# The evaluation protocols (re-exported: the evaluator is where callers look for them).
Protocol = protocols.Protocol
PROTOCOL_NAMES = protocols.PROTOCOL_NAMES
protocol_settings = protocols.protocol_settings
selection_settings = protocols.selection_settings


def _per_sample_ac_weights(in_size: int, out_sizes: jax.Array, canvas: int) -> jax.Array:
  """(B, canvas, in_size) align-corners interpolation rows onto out_sizes[b] outputs.

  Row i < L samples source coordinate i·(in−1)/(L−1) (0 when L == 1); rows ≥ L are zero.
  """
  L = out_sizes.astype(jnp.float32)[:, None]                     # (B,1)
  i = jnp.arange(canvas, dtype=jnp.float32)[None, :]              # (1,M)
  scale = jnp.where(L > 1, (in_size - 1) / jnp.maximum(L - 1, 1), 0.0)
  src = i * scale
  i0 = jnp.minimum(jnp.floor(src), in_size - 1)
  i1 = jnp.minimum(i0 + 1, in_size - 1)
  frac = src - i0
  cols = jnp.arange(in_size, dtype=jnp.float32)
  w = ((cols == i0[..., None]) * (1 - frac)[..., None]
       + (cols == i1[..., None]) * frac[..., None])               # (B,M,in)
  return jnp.where((i < L)[..., None], w, 0.0)


def resize_to_original(x: jax.Array, sizes: jax.Array, canvas: int) -> jax.Array:
  """Per-episode align-corners bilinear resize of a map to its own L×L, on an M×M canvas.

  Args:
    x: (B, S, S) map (e.g. foreground − background logit).
    sizes: (B,) int target side L_b ≤ canvas.
    canvas: M.
  Returns:
    (B, M, M): the top-left L_b×L_b block is ``F.interpolate(x_b, (L_b, L_b), 'bilinear',
    align_corners=True)``; the rest is 0.
  """
  s = x.shape[1]
  w = _per_sample_ac_weights(s, sizes, canvas)
  hi = jax.lax.Precision.HIGHEST
  y = jnp.einsum("bms,bst->bmt", w, x.astype(jnp.float32), precision=hi)
  return jnp.einsum("bnt,bmt->bmn", w, y, precision=hi)


@functools.partial(jax.jit, static_argnames=("model", "original_label"))
def episode_scores(model, variables, batch: Mapping[str, jax.Array],
                   original_label: bool = False):
  """Forward + per-episode (inter, union, target), each (B, C) int32 [bg, way 1, ...] (C = 2,
  or 1 + N for N-way episodes; target = the label's pixel count of each class), and the
  (B, S, S) uint8 prediction at input resolution (for pictures; fetched only when drawn).
  Jitted; the model is a static argument, so every evaluator of an equal model shares the
  compiled function."""
  out = model.apply(variables, **step_lib.model_inputs(model, batch), train=False)
  logits = out["logits"]
  num_classes = logits.shape[-1]
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if not original_label:
    label, scored = batch["query_label"], pred
  else:
    label = batch["orig_label"]
    side = jnp.max(batch["orig_size"], axis=-1)
    resize = lambda x: resize_to_original(x, side, label.shape[-1])
    if num_classes == 2:
      # argmax over 2 classes: ties go to background
      scored = (resize(logits[..., 1] - logits[..., 0]) > 0).astype(jnp.int32)
    else:
      up = jax.vmap(resize, in_axes=-1, out_axes=-1)(logits)
      scored = jnp.argmax(up, axis=-1).astype(jnp.int32)
  inter, union, target = metrics_lib.batch_counts(scored, label, num_classes=num_classes)
  return inter, union, target, pred.astype(jnp.uint8)


@dataclasses.dataclass
class EvalResult:
  """One evaluation run: the (process-summed) meter and the classes it is averaged over."""
  meter: metrics_lib.FewShotMeter
  classes: list
  seed: int
  names: dict
  # Pictures of this process's first episodes (``run(..., num_rows=)``); empty by default.
  rows: list = dataclasses.field(default_factory=list)

  @property
  def miou(self) -> float:
    return self.meter.miou(self.classes)

  @property
  def fbiou(self) -> float:
    return self.meter.fbiou()

  def summary(self, prefix: str = "") -> dict:
    return self.meter.summary(self.classes, prefix=prefix)

  def table(self) -> str:
    return self.meter.format_table(self.classes, self.names)


class Evaluator:
  """Evaluates variables of a model on a dataset's fold with the few-shot protocol.

  Args:
    model: a registered model (``fss_jax.models.registry``): ``model.apply(variables,
      **{k: batch[k] for k in model.inputs}, train=False)`` → dict with ``logits``.
    mesh: the ``"data"`` mesh.
    dataset_dir: converted dataset (manifest + TFRecords).
    fold, shot, image_size: the task.
    batch_size: global evaluation batch (divisible by the device count).
    num_episodes: N.
    classes: 'novel' (protocol) or 'base' (held-out base-class episodes, for selection).
    split: manifest split ('val').
    original_label: score against the original-size labels (see module docstring).
    num_workers, read_threads, min_pixels: data-pipeline settings.
    protocol: the ``Protocol`` N and original_label came from (``from_config`` sets it; its
      ``seeds`` are what ``run_protocol`` runs), or None.
    way: classes per episode (N-way episodes; the model's logits have 1 + way channels).
    metric: the meter's rule, 'fss' (PFENet/ASGNet) or 'panet' (``metrics.FewShotMeter``).
    resize: the evaluation resize, 'pad' or 'stretch' (``pipeline.eval_dataset``).
    sampler: the episode sampler, 'walk' or 'class_balanced' (``pipeline.eval_dataset``).
    support_annotation, scribble_dilation: dense, box or scribble supports
      (``pipeline.eval_dataset``).
  """

  def __init__(self, model, mesh, dataset_dir: str, *, fold: int, shot: int, image_size: int,
               batch_size: int, num_episodes: int, classes: str = "novel", split: str = "val",
               original_label: bool = False, num_workers: int = 0, read_threads: int = 1,
               min_pixels: int = 2 * 32 * 32, protocol: Optional[Protocol] = None,
               way: int = 1, metric: str = "fss", resize: str = "pad",
               sampler: str = "walk", support_annotation: str = "dense",
               scribble_dilation: int = 0):
    self.model = model
    self.mesh = mesh
    self.dataset_dir = dataset_dir
    self.fold, self.shot, self.image_size = int(fold), int(shot), int(image_size)
    self.global_batch = int(batch_size)
    self.local_batch = sharding.local_batch_size(self.global_batch, mesh)
    self.num_episodes = int(num_episodes)
    self.which = classes
    self.split = split
    self.original_label = bool(original_label)
    self.num_workers, self.read_threads, self.min_pixels = num_workers, read_threads, min_pixels
    self.protocol = protocol
    self.way = int(way)
    if metric not in metrics_lib.RULES:
      raise ValueError(f"metric must be one of {metrics_lib.RULES}, got {metric!r}")
    self.metric = metric
    self.resize = resize
    self.sampler = sampler
    self.support_annotation = support_annotation
    self.scribble_dilation = int(scribble_dilation)
    manifest = schema.load_manifest(dataset_dir)
    from fss_jax.data import episodes  # pylint: disable=g-import-not-at-top
    self.classes = episodes.fold_classes(manifest, self.fold, classes)
    self.names = {c: manifest.classes[c - 1] for c in self.classes}

  def num_batches(self, num_episodes: Optional[int] = None) -> int:
    return pipeline.eval_batches_per_process(
        self.num_episodes if num_episodes is None else num_episodes, self.local_batch,
        jax.process_count())

  def run(self, variables: Any, seed: int, progress: bool = False, desc: str = "eval",
          num_rows: int = 0) -> EvalResult:
    """Evaluates ``variables`` (replicated on the mesh) on the episodes of ``seed``.

    ``num_rows`` > 0 also draws this process's first ``num_rows`` episodes
    (``EvalResult.rows``, as ``prediction_rows``) from the predictions being scored, with no
    extra forward. Every process must call ``run`` (the forward is sharded over all of them);
    ``num_rows`` may differ between processes (the trainer draws on process 0 only).
    """
    return self._evaluate(variables, seed, self.num_episodes, self.num_workers,
                          progress=progress, desc=desc, num_rows=num_rows)

  def prediction_rows(self, variables: Any, seed: int, count: int = 8) -> list:
    """Pictures (``data.visualize.episode_row``: supports with mask | query truth | query
    prediction, the prediction's foreground IoU at the input resolution and the class in the
    title) of this process's first ``count`` episodes of ``seed`` (episodes i ≡ process index
    mod process count, as in ``run``). Every process must call it; each gets its own rows."""
    num_episodes = min(self.num_episodes, int(count) * jax.process_count())
    return self._evaluate(variables, seed, num_episodes, 0, progress=False, desc="predictions",
                          num_rows=count).rows

  def _evaluate(self, variables: Any, seed: int, num_episodes: int, num_workers: int, *,
                progress: bool, desc: str, num_rows: int) -> EvalResult:
    ds = pipeline.eval_dataset(
        self.dataset_dir, self.fold, self.shot, self.image_size, int(seed), self.local_batch,
        num_episodes, jax.process_index(), jax.process_count(), num_workers,
        split=self.split, original_label=self.original_label, min_pixels=self.min_pixels,
        read_threads=self.read_threads, classes=self.which, way=self.way,
        resize=self.resize, sampler=self.sampler, support_annotation=self.support_annotation,
        scribble_dilation=self.scribble_dilation,
        base_label="base_class" in self.model.inputs)
    keys = list(self.model.inputs) + (
        ["orig_label", "orig_size"] if self.original_label else ["query_label"])
    meter = metrics_lib.FewShotMeter(self.classes, self.metric)
    rows = []
    bar = logging_lib.ProgressBar(self.num_batches(num_episodes), desc=desc, unit="batch",
                                  enabled=None if progress else False)
    batches = iter(ds)
    try:
      for batch in batches:
        device_batch = sharding.host_batch_to_global({k: batch[k] for k in keys}, self.mesh)
        inter, union, target, pred = episode_scores(self.model, variables, device_batch,
                                                    self.original_label)
        meter.update_batch(batch["class_ids"], sharding.local_rows(inter), sharding.local_rows(union),
                           batch["valid"], sharding.local_rows(target))
        if len(rows) < num_rows:
          rows += self._draw(batch, sharding.local_rows(pred), num_rows - len(rows))
        bar.update(1)
    finally:
      bar.close()
      batches.close()  # stops worker processes now, not at garbage collection
    meter = metrics_lib.gather_meter(meter)
    if meter.num_episodes != num_episodes:
      raise RuntimeError(f"evaluation scored {meter.num_episodes} episodes, expected "
                         f"{num_episodes} (seed {seed}).")
    return EvalResult(meter, list(self.classes), int(seed), self.names, rows)

  def _draw(self, batch: Mapping[str, np.ndarray], pred: np.ndarray, count: int) -> list:
    """``visualize.episode_row`` of up to ``count`` valid episodes of a host batch."""
    from fss_jax.data import visualize  # pylint: disable=g-import-not-at-top
    rows = []
    for j in np.flatnonzero(batch["valid"])[:count]:
      label, p = batch["query_label"][j], pred[j].astype(np.int64)
      # foreground IoU (N-way: pooled over the ways, a pixel counting where its way is right)
      fg_pred, fg_true = (p >= 1) & (label != 255), (label >= 1) & (label != 255)
      inter = np.sum(fg_pred & fg_true & (p == label))
      iou = inter / max(np.sum(fg_pred) + np.sum(fg_true) - inter, 1)
      names = "/".join(str(self.names.get(int(c), int(c))) for c in batch["class_ids"][j])
      rows.append(visualize.episode_row(
          batch["query"][j], label, batch["supp_images"][j], batch["supp_labels"][j], p,
          title=f"IoU {100 * iou:.0f}% {names}"))
    return rows

  def run_seeds(self, variables: Any, seeds: Sequence[int], progress: bool = False,
                log: Optional[Callable[[str], None]] = None) -> dict:
    """Multi-seed protocol: one run per seed; returns {'runs', 'miou', 'fbiou'} with mean/std.

    ``miou`` / ``fbiou`` are ``metrics.mean_std`` dicts; ``runs`` the ``EvalResult`` list.
    """
    runs = []
    for seed in seeds:
      r = self.run(variables, seed, progress=progress, desc=f"eval seed {seed}")
      if log is not None:
        log(f"seed {seed}: mIoU {100 * r.miou:.2f}  FB-IoU {100 * r.fbiou:.2f}")
      runs.append(r)
    return {"runs": runs,
            "miou": metrics_lib.mean_std([r.miou for r in runs]),
            "fbiou": metrics_lib.mean_std([r.fbiou for r in runs])}

  def run_protocol(self, variables: Any, progress: bool = False,
                   log: Optional[Callable[[str], None]] = None) -> dict:
    """``run_seeds`` over the seeds of ``self.protocol`` (an evaluator of ``from_config``)."""
    if self.protocol is None:
      raise ValueError("This Evaluator has no protocol (build it with from_config, or call "
                       "run_seeds with the seeds).")
    return self.run_seeds(variables, self.protocol.seeds, progress=progress, log=log)


def format_seeds(result: Mapping[str, Any]) -> str:
  """'mIoU 55.20 ± 0.41  FB-IoU 70.10 ± 0.30 (5 seeds)' from ``run_seeds``' result."""
  m, f = result["miou"], result["fbiou"]
  std = lambda d: "" if d["n"] < 2 or math.isnan(d["std"]) else f" ± {100 * d['std']:.2f}"
  return (f"mIoU {100 * m['mean']:.2f}{std(m)}  FB-IoU {100 * f['mean']:.2f}{std(f)} "
          f"({m['n']} seed{'s' if m['n'] != 1 else ''})")


def results_json(result: Mapping[str, Any], **header) -> dict:
  """The JSON form of a ``run_seeds`` result (``final_metrics.json``, ``evaluate.py --output``):
  ``header`` entries first (what was evaluated; callers pass ``**protocol.header()``: protocol,
  episodes, seeds, original_label), then mIoU / FB-IoU mean ± std and, per seed, mIoU, FB-IoU,
  the number of episodes scored and each class's IoU, episode count and summed foreground
  counts."""
  return {
      **header,
      "miou": result["miou"], "fbiou": result["fbiou"],
      "per_seed": [{"seed": r.seed, "miou": r.miou, "fbiou": r.fbiou,
                    "episodes": r.meter.num_episodes,
                    "per_class": {str(c): v for c, v in r.meter.per_class(r.classes).items()}}
                   for r in result["runs"]],
  }


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as indented JSON atomically (a temporary file, then a rename)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def eval_shot(config) -> int:
  """Shots of the evaluation episodes: ``data.eval_shot``, or ``data.shot`` when it is 0 (PFENet
  reports 5-shot results of its 1-shot-trained models: ``eval_shot=5`` with ``shot=1``)."""
  return int(config.data.eval_shot) or int(config.data.shot)


def from_config(config, model, mesh, dataset_dir: str, classes: str = "novel",
                protocol: Optional[Protocol] = None) -> Evaluator:
  """The ``Evaluator`` of ``config`` (fold, shot, size, batch from ``config.data``).

  N and the label mode come from ``protocol``: by default ``protocol_settings(config)`` (the
  reported evaluation: final evaluation, ``scripts/evaluate.py``); the trainer passes
  ``selection_settings(config)`` for its in-training evaluation. The evaluator keeps it as
  ``.protocol`` (its seeds: ``run_protocol``).
  """
  d = config.data
  if protocol is None:
    protocol = protocol_settings(config)
  return Evaluator(
      model, mesh, dataset_dir, fold=d.fold, shot=eval_shot(config), image_size=d.image_size,
      batch_size=d.eval_batch_size, num_episodes=protocol.episodes, classes=classes,
      split=protocol.split or d.eval_split, original_label=protocol.original_label,
      num_workers=int(d.num_workers), read_threads=int(d.read_threads),
      min_pixels=int(d.min_class_pixels), protocol=protocol, way=int(d.get("way", 1)),
      metric=protocol.metric, resize=dataset_dir_lib.eval_resize_mode(config),
      sampler=protocol.sampler, support_annotation=d.get("support_annotation", "dense"),
      scribble_dilation=int(d.get("scribble_dilation", 0)))


def load_variables(model, config, *, workdir: Optional[str] = None,
                   checkpoint: Optional[str] = None, step: Any = "best") -> tuple:
  """Variables to evaluate: a run's Orbax checkpoint, a PyTorch file, or our msgpack file.

  Args:
    model: the configured model (its shapes validate imported weights).
    config: the config (the model's PyTorch naming, image size and shot for the template).
    workdir: a ``train.py`` run directory; ``step`` picks 'best', 'latest' or an int.
    checkpoint: instead, a ``.pth``/``.pt``/``.safetensors`` file in the reference's naming
      (e.g. the authors' trained model, ``module.`` prefixes and ``{'state_dict': ...}``
      accepted) or a ``.msgpack`` written by ``scripts/import_checkpoint.py``.

  Weights holding NaN or ±inf raise ``checkpoint.NonFiniteWeightsError`` naming the parameter;
  a damaged run checkpoint raises ``checkpoint.CheckpointRestoreError`` naming step and file.

  Returns:
    (variables, description of the source).
  """
  from fss_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  if (workdir is None) == (checkpoint is None):
    raise ValueError("Give exactly one of workdir (a training run) or checkpoint (a file).")
  if workdir is not None:
    variables, read = ckpt_lib.load_model_variables(workdir, step)  # refuses NaN/inf weights
    return variables, f"{workdir} step {read}"
  variables = weights.read_model(checkpoint, model, config)
  ckpt_lib.check_finite_variables(variables, checkpoint)
  return variables, checkpoint
