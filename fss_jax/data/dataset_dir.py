"""The dataset directory of a config: checked, or generated for the procedural default.

``prepare(config)`` is what ``train.py`` / ``evaluate.py`` call before building pipelines.
"""
import json
import os
import time

import jax

from fss_jax.data import schema
from fss_jax.data import synthetic
from fss_jax.data import transforms



def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _synthetic_settings(config) -> dict:
  s = config.data.synthetic
  return {"num_train": int(s.num_train), "num_val": int(s.num_val),
          "image_size": int(s.source_size), "seed": int(s.seed)}


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
  tmp = f"{path}.tmp-{os.getpid()}"
  synthetic.write_synthetic_dataset(tmp, workers=min(4, os.cpu_count() or 1), progress=False,
                                    **settings)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  try:
    os.rename(tmp, path)
  except OSError:
    # Someone else finished first (or an empty folder exists): keep theirs if complete.
    if not os.path.isfile(os.path.join(path, schema.MANIFEST_NAME)):
      if os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)
        os.rename(tmp, path)
      else:
        raise
  log(f"  done in {time.time() - t0:.0f} s")


def train_aug(config) -> transforms.TrainAugConfig:
  d = config.data
  return transforms.TrainAugConfig(size=int(d.image_size), scale=tuple(d.scale),
                                   rotate=tuple(d.rotate))
