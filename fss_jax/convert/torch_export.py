"""Flax variables → PyTorch state_dicts with the reference's key names and order.

Floating tensors are written as float32 and ``num_batches_tracked`` as int64, as PyTorch holds
them. ``.pth`` output needs torch (imported lazily); ``.safetensors`` output does not.
"""
import collections
import json
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np

from fss_jax.convert import keymap
from fss_jax.convert.torch_import import ORDER_METADATA_KEY, SAFETENSORS_SUFFIX, TORCH_SUFFIXES


def state_dict_from_variables(variables: Mapping[str, Any],
                              naming: Optional[keymap.Naming] = None
                              ) -> "collections.OrderedDict[str, np.ndarray]":
  """{'params', 'batch_stats'} → OrderedDict torch key → numpy array (torch layout), keys in
  the naming's order (the reference's, for the namings of ``fss_jax.weights``)."""
  mapping = keymap.torch_key_map(variables, naming)
  out = collections.OrderedDict()
  for key, (_, path, leaf) in mapping.items():
    value = np.asarray(jax.device_get(leaf))
    if path[-1] == "num_batches_tracked":
      value = value.astype(np.int64)
    elif np.issubdtype(value.dtype, np.integer):
      raise ValueError(f"{'/'.join(path)}: integer array where a float tensor is expected")
    else:
      value = value.astype(np.float32)
    out[key] = np.array(keymap.to_torch_layout(path[-1], value), order="C", copy=True)
  return out


def reference_checkpoint(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Wraps a state_dict as the reference's training script saves it (``{'state_dict'}`` with
  DataParallel's ``module.`` prefix), which its test script loads directly."""
  return {"state_dict": collections.OrderedDict(("module." + k, v)
                                                for k, v in state_dict.items())}


WRAPPINGS = ("state_dict", "module")


def save_state_dict(state_dict: Mapping[str, Any], path: str,
                    reference_wrapping: "bool | str" = False) -> None:
  """Writes ``.pth``/``.pt`` (torch.save of tensors) or ``.safetensors`` (no torch needed).

  ``reference_wrapping``: how the reference's training script saves its checkpoints, so that its
  test script loads the file directly. True or 'state_dict' (ASGNet, PFENet; ``.pth`` only):
  ``{'state_dict': {'module.' + key: ...}}``; 'module' (PANet: DataParallel's state_dict as it
  is): ``{'module.' + key: ...}``. False: the keys as given.
  safetensors files keep the key order in their metadata (``ORDER_METADATA_KEY``).
  """
  if reference_wrapping is True:
    reference_wrapping = "state_dict"
  if reference_wrapping and reference_wrapping not in WRAPPINGS:
    raise ValueError(f"reference_wrapping = {reference_wrapping!r}: must be False, True or one "
                     f"of {WRAPPINGS}")
  if reference_wrapping == "module":
    state_dict = collections.OrderedDict(("module." + k, v) for k, v in state_dict.items())
    reference_wrapping = False
  path = os.fspath(path)
  arrays = collections.OrderedDict(
      (k, np.array(np.asarray(v), order="C", copy=True)) for k, v in state_dict.items())
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith(SAFETENSORS_SUFFIX):
    if reference_wrapping:
      raise ValueError("reference_wrapping 'state_dict' applies to .pth files only")
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file(dict(arrays), path,
              metadata={"format": "pt", ORDER_METADATA_KEY: json.dumps(list(arrays))})
  elif path.endswith(TORCH_SUFFIXES):
    import torch  # pylint: disable=g-import-not-at-top
    tensors = collections.OrderedDict((k, torch.from_numpy(v)) for k, v in arrays.items())
    torch.save(reference_checkpoint(tensors) if reference_wrapping else tensors, path)
  else:
    raise ValueError(f"{path}: unknown output suffix; expected one of "
                     f"{TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,)}")
