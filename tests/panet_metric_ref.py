"""A numpy oracle of PANet's evaluation metric (kaixin96/PANet ``util/metric.py`` ``Metric``),
written from the facts (reference_panet.md §9), for the tests only.

Per recorded episode and per entry j of [0] + class ids: P_j = pixels predicted j outside the
void (255) label, T_j = label pixels equal to j; only when T_j is non-empty are TP, FP and FN of
the class stored, else the episode stores NaN for it. Per run: class IoU = nansum TP /
(nansum TP + nansum FP + nansum FN) over the episodes (NaN for a class never stored), mIoU =
plain mean over the asked classes; binary IoU = mean of the background IoU and the IoU of the
counts summed over every foreground class. Counting is done with Python sets of pixel
coordinates, as the official code does, not with the array arithmetic of fss_jax's meter.
"""
import numpy as np


class Metric:
  """TP/FP/FN per episode and class; one list of episodes per run."""

  def __init__(self, max_label=20, n_runs=1):
    self.labels = list(range(max_label + 1))
    self.n_runs = n_runs
    self.tp = [[] for _ in range(n_runs)]
    self.fp = [[] for _ in range(n_runs)]
    self.fn = [[] for _ in range(n_runs)]

  def record(self, pred, target, labels, n_run=0):
    """pred, target: (H, W) episode-local ids (0 = background, j = way j); labels: the
    episode's class ids in way order."""
    assert pred.shape == target.shape
    tp = np.full(len(self.labels), np.nan)
    fp = np.full(len(self.labels), np.nan)
    fn = np.full(len(self.labels), np.nan)
    for j, label in enumerate([0] + list(labels)):
      pred_j = set(zip(*[a.tolist() for a in np.where((pred == j) & (target != 255))]))
      target_j = set(zip(*[a.tolist() for a in np.where(target == j)]))
      if target_j:
        tp[label] = len(pred_j & target_j)
        fp[label] = len(pred_j - target_j)
        fn[label] = len(target_j - pred_j)
    self.tp[n_run].append(tp)
    self.fp[n_run].append(fp)
    self.fn[n_run].append(fn)

  def _sums(self, n_run):
    with np.errstate(invalid="ignore"):
      return [np.nansum(np.vstack(x[n_run]), axis=0) for x in (self.tp, self.fp, self.fn)]

  def get_miou(self, labels, n_run=0):
    """(class IoU over ``labels``, mIoU) of one run."""
    tp, fp, fn = (x.take(labels) for x in self._sums(n_run))
    with np.errstate(invalid="ignore", divide="ignore"):
      class_iou = tp / (tp + fp + fn)
    return class_iou, class_iou.mean()

  def get_miou_binary(self, n_run=0):
    """([background IoU, pooled foreground IoU], their mean) of one run."""
    tp, fp, fn = self._sums(n_run)
    pooled = [np.array([x[0], np.nansum(x[1:])]) for x in (tp, fp, fn)]
    with np.errstate(invalid="ignore", divide="ignore"):
      iou = pooled[0] / (pooled[0] + pooled[1] + pooled[2])
    return iou, iou.mean()
