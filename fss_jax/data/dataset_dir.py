"""The dataset directory of a config: checked, or generated for the procedural default.

``prepare(config)`` is what ``train.py`` / ``evaluate.py`` call before building pipelines.
"""
import json
import os
import time
from typing import Optional

import jax
import numpy as np

from fss_jax.data import schema
from fss_jax.data import synthetic
from fss_jax.data import transforms


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _synthetic_settings(config) -> dict:
  s = config.data.synthetic
  out = {"num_train": int(s.num_train), "num_val": int(s.num_val),
         "image_size": int(s.source_size), "seed": int(s.seed)}
  if s.get("instances", False):  # instance maps (box supports); absent = off, as before
    out["instances"] = True
  return out


def prepare(config) -> str:
  """The dataset directory of ``config.data``; generates the procedural dataset on first use.

  For ``data.dataset == 'synthetic'`` the scenes are generated into ``data.data_dir`` (with a
  ``generator.json`` of the settings) when the directory holds no manifest yet; process 0
  generates while the others wait, and a process that still sees no data afterwards (no shared
  file system) generates its own identical copy. A directory generated with other settings is
  an error, not silently reused.
  """
  d = config.data
  if not d.data_dir:
    raise ValueError("config.data.data_dir is empty: set it to the converted dataset "
                     "(data_prep/*.py --out_dir) or, for 'synthetic', to a cache folder.")
  path = os.path.abspath(os.path.expanduser(d.data_dir))
  manifest = os.path.join(path, schema.MANIFEST_NAME)
  if d.dataset != "synthetic":
    if not os.path.isfile(manifest):
      raise FileNotFoundError(
          f"config.data.data_dir={d.data_dir!r}: no {schema.MANIFEST_NAME} in {path}. Convert "
          f"the dataset first (data_prep/{d.dataset}.py --out_dir {path}).")
    return path
  want = _synthetic_settings(config)
  if jax.process_index() == 0 and not os.path.isfile(manifest):
    _generate(path, want)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("fss_jax_prepare_dataset")
    if not os.path.isfile(manifest):
      _generate(path, want)
  gen_file = os.path.join(path, synthetic.GENERATOR_FILE)
  have = None
  if os.path.isfile(gen_file):
    with open(gen_file) as f:
      have = json.load(f)
  if have is not None and {k: have.get(k) for k in want} != want:
    raise ValueError(
        f"{path} holds a procedural dataset generated with {have}, but config.data.synthetic "
        f"asks for {want}. Delete the folder or set config.data.data_dir elsewhere.")
  return path


def _generate(path: str, settings: dict) -> None:
  t0 = time.time()
  log(f"Generating the procedural dataset {settings} into {path} ...")
  # Refuses a non-empty foreign folder before writing; a temporary folder next to `path`,
  # renamed into place, removed on failure (no copies left behind); keeps a concurrent copy.
  synthetic.generate_cache(path, settings, workers=min(4, os.cpu_count() or 1))
  log(f"  done in {time.time() - t0:.0f} s")


def train_aug(config) -> transforms.TrainAugConfig:
  """The training augmentation of ``config.data`` (``data.train_resize_longer``: see
  ``transforms.TrainAugConfig.resize_longer``; absent in older configs = 0, off;
  ``data.transform`` 'panet': PANet's resize + flip)."""
  d = config.data
  return transforms.TrainAugConfig(size=int(d.image_size), scale=tuple(d.scale),
                                   rotate=tuple(d.rotate),
                                   resize_longer=int(d.get("train_resize_longer", 0) or 0),
                                   mode=TRANSFORMS[d.get("transform", "fss")][0])


# data.transform -> (training TrainAugConfig.mode, evaluation resize of pipeline.eval_dataset)
TRANSFORMS = {"fss": ("fss", "pad"), "panet": ("resize_flip", "stretch")}


def eval_resize_mode(config) -> str:
  """``pipeline.eval_dataset``'s ``resize`` for ``config.data.transform``."""
  name = config.data.get("transform", "fss")
  if name not in TRANSFORMS:
    raise ValueError(f"config.data.transform = {name!r}: must be one of {sorted(TRANSFORMS)}.")
  return TRANSFORMS[name][1]


# Typical image side vs data.image_size beyond which scale_warning speaks.
SCALE_WARN_RATIO = 2.0


def scale_warning(config, manifest: schema.Manifest) -> Optional[str]:
  """A warning when the training images' typical size is far from ``data.image_size``.

  Training crops ``image_size`` windows from each image at its stored resolution (after
  ``data.train_resize_longer``, if set), while evaluation resizes whole images to
  ``image_size``: with images much larger than ``image_size`` the model trains on small
  windows at one scale and is scored on whole scenes at another (a folder of ~480-px photos at
  ``image_size=129`` learns nothing), with much smaller ones training crops are mostly padding.
  The typical size is the median longer side of the training split's manifest entries.

  Returns:
    None when the ratio is within [1 / SCALE_WARN_RATIO, SCALE_WARN_RATIO], else the message.
  """
  d = config.data
  try:
    images = manifest.images(d.train_split)
  except KeyError:
    return None
  sides = [max(int(im.get("height", 0)), int(im.get("width", 0))) for im in images]
  sides = [s for s in sides if s > 0]
  if not sides:
    return None
  size = int(d.image_size)
  median = float(np.median(sides))
  resize = int(d.get("train_resize_longer", 0) or 0)
  trained = resize if resize > 0 else median
  ratio = trained / size
  if 1.0 / SCALE_WARN_RATIO <= ratio <= SCALE_WARN_RATIO:
    return None
  if resize > 0:
    what = (f"data.train_resize_longer={resize} is {ratio:.1f}x data.image_size={size} "
            f"(training images' median longer side: {median:.0f} px)")
  else:
    what = (f"the training images' median longer side is {median:.0f} px, {ratio:.1f}x "
            f"data.image_size={size}")
  if ratio > 1:
    effect = (f"training crops {size}x{size} windows at that resolution (each covers about "
              f"{min(1.0, (size / trained) ** 2):.0%} of an image) while evaluation resizes whole "
              f"images to {size}: objects appear at very different scales in training and "
              "evaluation, and the model may learn nothing (predicting only background)")
  else:
    effect = (f"the images are much smaller than the {size}x{size} training crop, so crops "
              f"are mostly padding, while evaluation enlarges whole images to {size}")
  return (f"WARNING: {what}: {effect}. Set data.train_resize_longer={size} (resize each "
          "training image's longer side before the augmentation, as evaluation does), or "
          "convert with data_prep/folder.py --max_side, or set data.image_size nearer the "
          "images' size.")
