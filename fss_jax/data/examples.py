"""Episodes of a converted dataset written out as ordinary image files (numpy + OpenCV).

For trying ``scripts/predict.py`` and the demo on known data, and for comparing their masks with
the truth: ``write_episodes`` draws the evaluation episodes exactly as the evaluator does
(``episodes.eval_episode_list``: split, fold, shot, seed) and writes, per episode,

  episode_<i>/support_<k>.png        the k-th support image (RGB, as stored in the record)
  episode_<i>/support_<k>_mask.png   its mask for the episode's class: 255 object, 0 the rest
                                     (ignore pixels too: supports treat them as background)
  episode_<i>/query.png              the query image
  episode_<i>/query_truth.png        the query's truth: 255 object, 0 background, 128 ignore

and ``episodes.json`` listing each episode's class (id and name), record indices and image ids.
"""
import json
import os
from typing import Optional

import cv2
import numpy as np

from fss_jax.data import episodes as episodes_lib
from fss_jax.data import pipeline
from fss_jax.data import schema
from fss_jax.data import transforms

TRUTH_IGNORE = 128  # value of ignore pixels in query_truth.png


def _write(path: str, image: np.ndarray) -> None:
  if image.ndim == 3:
    image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
  if not cv2.imwrite(path, image):
    raise OSError(f"{path}: cannot write the PNG")


def write_episodes(dataset_dir: str, out_dir: str, *, fold: int, shot: int, num_episodes: int,
                   seed: int = 321, split: str = "val", classes: str = "novel",
                   min_pixels: Optional[int] = None) -> list[dict]:
  """Writes ``num_episodes`` evaluation episodes under ``out_dir``; returns their descriptions.

  Args:
    dataset_dir: converted dataset (manifest + TFRecords).
    out_dir: created if missing; existing episode folders are overwritten.
    fold, shot, num_episodes, seed, split, classes: as the evaluator's episodes
      (``pipeline.eval_dataset``); ``classes`` 'novel' or 'base'.
    min_pixels: the smallest class area of an eligible image (default: the pipeline's).
  Returns:
    One dict per episode: ``folder``, ``class_id``, ``class_name``, ``query`` / ``supports``
    (record index and image id).
  """
  manifest = schema.load_manifest(dataset_dir)
  kwargs = {} if min_pixels is None else {"min_pixels": int(min_pixels)}
  eps = episodes_lib.eval_episode_list(manifest, split, fold, shot, num_episodes, seed,
                                       which=classes, **kwargs)
  reader = manifest.source(split).reader
  images = manifest.images(split)
  out = []
  for i, ep in enumerate(eps):
    folder = os.path.join(out_dir, f"episode_{i}")
    os.makedirs(folder, exist_ok=True)
    supports = []
    for k, rec in enumerate(ep.supports):
      image, label = pipeline.load_record(reader, rec)
      _write(os.path.join(folder, f"support_{k}.png"), image)
      _write(os.path.join(folder, f"support_{k}_mask.png"),
             np.where(label == ep.class_id, 255, 0).astype(np.uint8))
      supports.append({"record": int(rec), "id": images[rec].get("id", "")})
    image, label = pipeline.load_record(reader, ep.query)
    _write(os.path.join(folder, "query.png"), image)
    truth = transforms.binarize_label(label, ep.class_id)
    _write(os.path.join(folder, "query_truth.png"),
           np.select([truth == 1, truth == schema.IGNORE_LABEL], [255, TRUTH_IGNORE], 0)
           .astype(np.uint8))
    out.append({"folder": folder, "class_id": int(ep.class_id),
                "class_name": manifest.classes[ep.class_id - 1],
                "query": {"record": int(ep.query), "id": images[ep.query].get("id", "")},
                "supports": supports})
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "episodes.json"), "w", encoding="utf-8") as f:
    json.dump({"dataset": os.path.abspath(dataset_dir), "split": split, "fold": int(fold),
               "shot": int(shot), "seed": int(seed), "classes": classes, "episodes": out},
              f, indent=2)
  return out
