"""Per-image evaluation of a semantic-segmentation model (PSPNet, BAM's stage-1 base learner).

The protocol of BAM's ``train_base.py: validate`` (reference_msanet.md §1.1): every image of the
validation split, resized as the evaluation resize (longer side → S, top-left on a padded
canvas, labels nearest with 255 padding), labels remapped to the fold's base classes (base class
c → its index + 1, novel and background → 0); per class c the global Σ intersection /
(Σ union + 1e-10) over the images; the selection metric is the mean over the base classes
1..C−1 (background excluded; a class absent from the split counts as 0, as there). Also
reported: the mean over all C classes (background included) and the pixel accuracy.

One batch: host-local images → global arrays sharded over ``"data"`` → jitted forward +
per-image (inter, union, target) (B, C) on device → this process's valid rows summed on the
host; the sums are added over processes at the end.
"""
import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fss_jax.data import pipeline
from fss_jax.data import schema
from fss_jax.train import logging as logging_lib
from fss_jax.train import metrics as metrics_lib
from fss_jax.train import sharding
from fss_jax.train import step as step_lib

EPS = 1e-10  # train_base.py: intersection / (union + 1e-10)


@functools.partial(jax.jit, static_argnames=("model",))
def image_scores(model, variables, batch: Mapping[str, jax.Array]):
  """Forward + per-image (inter, union, target), each (B, C) int32 (column 0 background)."""
  out = model.apply(variables, **step_lib.model_inputs(model, batch), train=False)
  logits = out["logits"]
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return metrics_lib.batch_counts(pred, batch["label"], num_classes=logits.shape[-1])


@dataclasses.dataclass
class SemanticResult:
  """Summed (C,) intersection, union and target pixel counts over the scored images."""
  inter: np.ndarray
  union: np.ndarray
  target: np.ndarray
  num_images: int
  names: list  # C names: 'background', then the base classes' names
  seed: int = 0
  rows: list = dataclasses.field(default_factory=list)  # no pictures (interface of EvalResult)

  @property
  def class_iou(self) -> np.ndarray:
    return self.inter / (self.union + EPS)

  @property
  def miou(self) -> float:
    """Mean IoU over the base classes 1..C−1 (the reference's selection metric)."""
    return float(np.mean(self.class_iou[1:]))

  @property
  def miou_all(self) -> float:
    """Mean IoU over all C classes, background included."""
    return float(np.mean(self.class_iou))

  @property
  def pixel_acc(self) -> float:
    return float(np.sum(self.inter) / (np.sum(self.target) + EPS))

  def summary(self, prefix: str = "") -> dict:
    out = {f"{prefix}miou": self.miou, f"{prefix}miou_with_bg": self.miou_all,
           f"{prefix}pixel_acc": self.pixel_acc}
    for name, iou in zip(self.names[1:], self.class_iou[1:]):
      out[f"{prefix}iou/{name}"] = float(iou)
    return out

  def headline(self) -> str:
    return (f"base-class mIoU {100 * self.miou:.2f}  with background "
            f"{100 * self.miou_all:.2f}  pixel acc {100 * self.pixel_acc:.2f} "
            f"({self.num_images} images)")

  def table(self) -> str:
    lines = [f"{'class':<24}{'IoU %':>8}"]
    for name, iou in zip(self.names, self.class_iou):
      lines.append(f"{name:<24}{100 * iou:>8.2f}")
    lines.append(f"{'mean (base classes)':<24}{100 * self.miou:>8.2f}")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class SemanticProtocol:
  """What ``SemanticEvaluator.run_protocol`` runs: the whole split (or its first images)."""
  split: str
  num_images: int  # 0: all
  seeds: tuple = (0,)
  name: str = "semantic"

  def describe(self) -> str:
    count = "every image" if not self.num_images else f"the first {self.num_images} images"
    return f"{count} of split {self.split!r}, base-class mIoU (BAM's train_base.py validate)"

  def header(self) -> dict:
    return {"protocol": self.name, "split": self.split, "num_images": self.num_images}


class SemanticEvaluator:
  """Scores a per-image model on the base classes of a fold (module docstring).

  Args:
    model: a registered model whose ``task`` is 'semantic' (inputs ``image``).
    mesh: the ``"data"`` mesh.
    dataset_dir: converted dataset; fold, image_size: the task; batch_size: global.
    split: manifest split; num_images: 0 for all of them.
  """

  def __init__(self, model, mesh, dataset_dir: str, *, fold: int, image_size: int,
               batch_size: int, split: str = "val", num_images: int = 0,
               num_workers: int = 0, read_threads: int = 1):
    self.model = model
    self.mesh = mesh
    self.dataset_dir = dataset_dir
    self.fold, self.image_size = int(fold), int(image_size)
    self.local_batch = sharding.local_batch_size(int(batch_size), mesh)
    self.num_workers, self.read_threads = int(num_workers), int(read_threads)
    self.protocol = SemanticProtocol(split, int(num_images))
    manifest = schema.load_manifest(dataset_dir)
    from fss_jax.data import episodes  # pylint: disable=g-import-not-at-top
    base = episodes.fold_classes(manifest, self.fold, "base")
    self.names = ["background"] + [manifest.classes[c - 1] for c in base]

  def run(self, variables: Any, seed: int = 0, progress: bool = False, desc: str = "eval",
          num_rows: int = 0) -> SemanticResult:
    """Scores ``variables`` on the protocol's images (``seed`` and ``num_rows`` are accepted
    for the episodic evaluator's interface; nothing here is random and nothing is drawn)."""
    del num_rows
    ds = pipeline.semantic_eval_dataset(
        self.dataset_dir, self.fold, self.image_size, self.local_batch, jax.process_index(),
        jax.process_count(), self.num_workers, split=self.protocol.split,
        read_threads=self.read_threads, num_images=self.protocol.num_images)
    c = len(self.names)
    sums = np.zeros((3, c), np.int64)
    count = 0
    keys = list(self.model.inputs) + ["label"]
    batches = iter(ds)
    bar = logging_lib.ProgressBar(None, desc=desc, unit="batch",
                                  enabled=None if progress else False)
    try:
      for batch in batches:
        device_batch = sharding.host_batch_to_global({k: batch[k] for k in keys}, self.mesh)
        counts = image_scores(self.model, variables, device_batch)
        valid = np.asarray(batch["valid"], bool)
        for i, x in enumerate(counts):
          sums[i] += sharding.local_rows(x)[valid].sum(axis=0)
        count += int(valid.sum())
        bar.update(1)
    finally:
      bar.close()
      batches.close()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      gathered = multihost_utils.process_allgather(np.concatenate([sums.ravel(), [count]]))
      total = np.asarray(gathered).reshape((jax.process_count(), -1)).sum(axis=0)
      sums, count = total[:-1].reshape((3, c)), int(total[-1])
    return SemanticResult(sums[0], sums[1], sums[2], count, list(self.names), int(seed))

  def run_protocol(self, variables: Any, progress: bool = False,
                   log: Optional[Callable[[str], None]] = None) -> dict:
    """One run (nothing is random): {'runs': [result], 'miou', 'fbiou'} as ``run_seeds`` of
    the episodic evaluator returns; 'fbiou' holds the mIoU with background here."""
    r = self.run(variables, progress=progress, desc="eval")
    if log is not None:
      log(r.headline())
    return {"runs": [r], "miou": metrics_lib.mean_std([r.miou]),
            "fbiou": metrics_lib.mean_std([r.miou_all])}


def from_config(config, model, mesh, dataset_dir: str) -> SemanticEvaluator:
  """The semantic evaluator of ``config``: ``data.eval_split``, ``data.eval_images`` images
  (0: all), batches of ``data.eval_batch_size``."""
  d = config.data
  return SemanticEvaluator(model, mesh, dataset_dir, fold=d.fold, image_size=d.image_size,
                           batch_size=d.eval_batch_size, split=d.eval_split,
                           num_images=int(d.get("eval_images", 0)),
                           num_workers=int(d.num_workers), read_threads=int(d.read_threads))


def results_json(result: SemanticResult, **header) -> dict:
  """The JSON form of a result (``final_metrics.json``, ``evaluate.py --output``): ``header``
  entries, the base-class mIoU, the mIoU with background, pixel accuracy and per class the IoU
  and summed counts."""
  return {
      **header,
      "miou": metrics_lib.mean_std([result.miou]),
      "miou_with_bg": result.miou_all, "pixel_acc": result.pixel_acc,
      "images": result.num_images,
      "per_class": {name: {"iou": float(iou), "inter": int(i), "union": int(u)}
                    for name, iou, i, u in zip(result.names, result.class_iou, result.inter,
                                               result.union)},
  }


def check_classes(config, manifest) -> None:
  """Raises ValueError unless ``config.model.classes`` = 1 + the fold's base classes."""
  from fss_jax.data import episodes  # pylint: disable=g-import-not-at-top
  want = 1 + len(episodes.fold_classes(manifest, int(config.data.fold), "base"))
  if int(config.model.classes) != want:
    raise ValueError(f"config.model.classes = {config.model.classes}: fold "
                     f"{config.data.fold} of {manifest.path} has {want - 1} base classes, so "
                     f"the base learner needs {want} outputs (background + base classes)")
