"""Pictures of episodes and predictions (numpy + OpenCV; no model code).

``episode_row`` lays out one evaluation episode as [support 1..K with mask | query with ground
truth | query with prediction]; ``write_grid`` stacks rows into a PNG.
"""
from typing import Optional, Sequence

import cv2
import numpy as np

from fss_jax.data import transforms

GT_COLOUR = (0, 200, 0)
PRED_COLOUR = (230, 40, 40)


def denormalize(image: np.ndarray) -> np.ndarray:
  """(H,W,3) normalised float RGB (transforms' ImageNet normalisation) → uint8 RGB."""
  x = image * np.asarray(transforms.STD_255, np.float32) + np.asarray(transforms.MEAN_255,
                                                                      np.float32)
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray, colour: Sequence[int],
            alpha: float = 0.55) -> np.ndarray:
  """Tints foreground pixels (1..253: the class, or any way's class of an N-way query), greys
  out ``mask == 255`` and outlines the mask. uint8 RGB."""
  out = image.astype(np.float32)
  fg = (mask >= 1) & (mask < transforms.NEITHER)
  out[fg] = (1 - alpha) * out[fg] + alpha * np.asarray(colour, np.float32)
  out[mask == 255] = 0.3 * out[mask == 255] + 0.7 * 128
  out = out.astype(np.uint8)
  contours, _ = cv2.findContours(fg.astype(np.uint8), cv2.RETR_EXTERNAL,
                                 cv2.CHAIN_APPROX_NONE)
  cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), 1)
  return out


def episode_row(query: np.ndarray, query_label: np.ndarray, supp_images: np.ndarray,
                supp_labels: np.ndarray, pred: np.ndarray, title: str = "",
                cell: int = 160) -> np.ndarray:
  """One episode as a strip of K + 2 panels, each ``cell`` pixels square. uint8 RGB.

  Args:
    query: (S,S,3) normalised; query_label, pred: (S,S) in {0,1,255} / {0,1} (N-way: way ids
    1..N); supp_images: (K,S,S,3); supp_labels: (K,S,S) (N-way: N·K, relative to each
    support's way); title: written on the prediction panel.
  """
  panels = [overlay(denormalize(im), lab, GT_COLOUR) for im, lab in zip(supp_images, supp_labels)]
  q = denormalize(query)
  panels.append(overlay(q, query_label, GT_COLOUR))
  panels.append(overlay(q, np.where(query_label == 255, 255, pred), PRED_COLOUR))
  panels = [cv2.resize(p, (cell, cell), interpolation=cv2.INTER_AREA) for p in panels]
  names = [f"support {k + 1}" for k in range(len(panels) - 2)] + ["query: truth",
                                                                   title or "prediction"]
  for p, text in zip(panels, names):
    cv2.putText(p, text, (3, 12), cv2.FONT_HERSHEY_PLAIN, 0.8, (255, 255, 255), 1,
                cv2.LINE_AA)
  gap = np.full((cell, 4, 3), 40, np.uint8)
  out = []
  for p in panels:
    out += [p, gap]
  return np.concatenate(out[:-1], axis=1)


def write_grid(path: str, rows: Sequence[np.ndarray], max_rows: Optional[int] = None) -> None:
  """Stacks equally wide rows (padding narrower ones) and writes a PNG."""
  rows = list(rows)[:max_rows]
  if not rows:
    raise ValueError("write_grid: no rows to write.")
  width = max(r.shape[1] for r in rows)
  padded = []
  for r in rows:
    pad = np.full((r.shape[0] + 4, width, 3), 40, np.uint8)
    pad[:r.shape[0], :r.shape[1]] = r
    padded.append(pad)
  grid = np.concatenate(padded, axis=0)
  if not cv2.imwrite(path, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
    raise OSError(f"could not write {path}")
