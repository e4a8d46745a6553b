"""PyTorch checkpoints (.pth/.pt via torch.load(weights_only=True), .safetensors) → Flax variables.

Nothing here unpickles arbitrary objects: ``.pth`` files go through PyTorch's restricted
weights-only unpickler (tensors and plain containers), ``.safetensors`` through
``safetensors.numpy`` (no torch needed).
"""
import json
import os
from typing import Any, Iterable, Mapping, Optional

import flax
import numpy as np

from fss_jax.convert import keymap

TORCH_SUFFIXES = (".pth", ".pt")
SAFETENSORS_SUFFIX = ".safetensors"
# Metadata entry in which our exporter records the state_dict order (safetensors sorts keys).
ORDER_METADATA_KEY = "fss_jax.key_order"


class CheckpointMismatchError(ValueError):
  """A state_dict does not fit the model: lists missing, unexpected and mis-shaped keys."""

  def __init__(self, missing: Mapping[str, tuple], unexpected: Mapping[str, tuple],
               mismatched: Mapping[str, tuple[tuple, tuple]], source: str = "state_dict"):
    self.missing = dict(missing)
    self.unexpected = dict(unexpected)
    self.mismatched = dict(mismatched)
    lines = [f"{source} does not match the model: {len(self.missing)} missing, "
             f"{len(self.unexpected)} unexpected, {len(self.mismatched)} mismatched key(s)"]
    if self.missing:
      lines.append("missing keys (expected shape):")
      lines += [f"  {k} {_fmt(s)}" for k, s in self.missing.items()]
    if self.unexpected:
      lines.append("unexpected keys (shape):")
      lines += [f"  {k} {_fmt(s)}" for k, s in self.unexpected.items()]
    if self.mismatched:
      lines.append("mismatched keys (checkpoint vs model, torch layout):")
      lines += [f"  {k} {g} vs {e}" for k, (g, e) in self.mismatched.items()]
    super().__init__("\n".join(lines))


def _fmt(shape) -> str:
  return str(tuple(shape)) if isinstance(shape, (tuple, list)) else str(shape)


# ---- Reading state_dicts ----

def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a torch state_dict as numpy arrays (insertion order kept).

  ``.pth``/``.pt``: ``torch.load(weights_only=True, map_location='cpu')``; a ``{'state_dict':
  ...}`` wrapper (the reference's training checkpoints) is unwrapped. ``.safetensors``:
  ``safetensors.numpy`` (order from our exporter's metadata when present). A leading
  ``module.`` (DataParallel) is stripped from every key. bfloat16/float16 tensors become float32.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if path.endswith(SAFETENSORS_SUFFIX):
    raw = _load_safetensors(path)
  elif path.endswith(TORCH_SUFFIXES):
    raw = _load_torch(path)
  else:
    raise ValueError(f"{path}: unknown checkpoint suffix; expected one of "
                     f"{TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,)}")
  out = {}
  for key, value in raw.items():
    key = key[len("module."):] if key.startswith("module.") else key
    if key in out:
      raise ValueError(f"{path}: key {key!r} appears twice (with and without 'module.')")
    out[key] = value
  return out


def _load_torch(path: str) -> dict[str, np.ndarray]:
  import pickle  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise ValueError(
        f"{path}: refusing to load: the file holds objects that torch.load(weights_only=True) "
        f"will not unpickle (only tensors and plain containers are allowed). Re-save its "
        f"state_dict from trusted code, or convert it to .safetensors.\n{e}") from e
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a state_dict (a mapping of tensors), "
                     f"got {type(obj).__name__}")
  out = {}
  for key, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; "
                       f"top-level keys: {sorted(map(str, obj))[:10]}")
    value = value.detach().cpu()
    if value.dtype in (torch.bfloat16, torch.float16):
      value = value.float()
    out[str(key)] = value.numpy()
  return out


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(path, framework="numpy") as f:
    metadata = f.metadata() or {}
    keys = list(f.keys())
    order = metadata.get(ORDER_METADATA_KEY)
    if order is not None:
      order = json.loads(order)
      if sorted(order) == sorted(keys):
        keys = order
    return {k: f.get_tensor(k) for k in keys}


# ---- state_dict → variables ----

def variables_from_torch(state_dict: Mapping[str, np.ndarray], template_variables: Any,
                         naming: Optional[keymap.Naming] = None,
                         ignore_prefixes: Iterable[str] = (),
                         source: str = "state_dict") -> dict[str, Any]:
  """Fills a Flax variables tree from a torch state_dict, checking it fits exactly.

  Args:
    state_dict: torch key → array (NCHW/OIHW layout), e.g. from ``load_state_dict``.
    template_variables: {'params', 'batch_stats'} tree whose leaves have .shape/.dtype
      (arrays or jax.ShapeDtypeStruct from jax.eval_shape(model.init, ...)).
    naming: the torch names of the template's variables (``keymap.Naming``; the model's and
      backbone's namings come from ``fss_jax.weights``).
    ignore_prefixes: state_dict keys starting with one of these are dropped silently (an
      ImageNet file's classifier).
    source: name of the checkpoint for error messages.

  Returns:
    {'params', 'batch_stats'} of numpy arrays with the template's structure, shapes and dtypes.
    A missing BatchNorm ``num_batches_tracked`` (files from before PyTorch 0.4.1) is 0, as
    PyTorch loads it.

  Raises:
    CheckpointMismatchError: listing every missing, unexpected and mis-shaped key.
  """
  ignore_prefixes = tuple(ignore_prefixes)
  mapping = keymap.torch_key_map(template_variables, naming)
  given = {k: v for k, v in state_dict.items() if not k.startswith(ignore_prefixes)}
  missing, mismatched, flat = {}, {}, {}
  for key, (collection, path, leaf) in mapping.items():
    expected = keymap.torch_shape(path[-1], tuple(leaf.shape))
    if key not in given and path[-1] == "num_batches_tracked":
      # Files saved before PyTorch 0.4.1 (torchvision's vgg16_bn-6c64b313.pth among them) have
      # no counters; PyTorch's BatchNorm loads them as 0, and so do we.
      flat.setdefault(collection, {})[path] = np.zeros(leaf.shape, np.dtype(leaf.dtype))
      continue
    if key not in given:
      missing[key] = expected
      continue
    value = np.asarray(given[key])
    dtype = np.dtype(leaf.dtype)
    if tuple(value.shape) != expected:
      mismatched[key] = (tuple(value.shape), expected)
      continue
    if np.issubdtype(dtype, np.floating) != np.issubdtype(value.dtype, np.floating):
      mismatched[key] = (f"{tuple(value.shape)} {value.dtype}", f"{expected} {dtype}")
      continue
    flat.setdefault(collection, {})[path] = keymap.to_flax_layout(path[-1], value).astype(dtype)
  unexpected = {k: tuple(np.shape(v)) for k, v in given.items() if k not in mapping}
  if missing or unexpected or mismatched:
    raise CheckpointMismatchError(missing, unexpected, mismatched, source)
  return {c: flax.traverse_util.unflatten_dict(flat[c]) for c in keymap.COLLECTIONS if c in flat}
