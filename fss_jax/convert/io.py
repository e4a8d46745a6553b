"""Our own variables format: flax.serialization msgpack (``.msgpack``), no pickle."""
import os
from typing import Any

import flax
import jax
import numpy as np

SUFFIX = ".msgpack"


def _check_suffix(path: str) -> str:
  path = os.fspath(path)
  if not path.endswith(SUFFIX):
    raise ValueError(f"{path}: variables files must end in {SUFFIX}")
  return path


def save_variables(path: str, variables: Any) -> None:
  """Writes a variables tree (nested dicts of arrays) as msgpack, atomically."""
  path = _check_suffix(path)
  tree = jax.tree_util.tree_map(np.asarray, jax.device_get(flax.core.unfreeze(variables)))
  data = flax.serialization.msgpack_serialize(tree)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def load_variables(path: str) -> dict[str, Any]:
  """Reads a tree written by ``save_variables`` (nested dicts of numpy arrays)."""
  path = _check_suffix(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"variables file not found: {path}")
  with open(path, "rb") as f:
    data = f.read()
  try:
    tree = flax.serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several unrelated types on corrupt input.
    raise ValueError(f"{path}: not a valid msgpack variables file: {e}") from e
  if not isinstance(tree, dict):
    raise ValueError(f"{path}: expected a dict of variable collections, got {type(tree).__name__}")
  return tree
