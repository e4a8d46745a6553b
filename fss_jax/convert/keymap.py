"""Pure maps between Flax variable paths and PyTorch state_dict keys.

A ``Naming`` says how one tree of Flax variables is named in a PyTorch state_dict: a function
from a Flax *module* path to the torch module path, and the registration order of the torch
modules (for writing state_dicts in the reference's key order). The tensor (leaf) names are the
same for every model and are decided by the Flax leaf, never guessed from the torch key:
params ``kernel`` ↔ ``weight`` (conv HWIO ↔ OIHW; a 2-D Dense kernel (in,out) ↔ (out,in)),
params ``scale`` ↔ ``weight`` (BatchNorm), ``bias`` ↔ ``bias``; batch_stats ``mean`` ↔
``running_mean``, ``var`` ↔ ``running_var``, ``num_batches_tracked`` ↔ ``num_batches_tracked``.
Import goes through the same map (built from the model's variable template and inverted), so a
key is a BatchNorm key exactly when the model has a BatchNorm there.

The common rule (``dotted``) turns Flax module names into torch paths by making every '_'
before a run of digits a '.': ``beta_conv_2_0`` → ``beta_conv.2.0``, ``layer1_0/downsample_1`` →
``layer1.0.downsample.1``. Backbones whose torch names differ (the ResNet stem, torchvision's
``features.N``) provide their own functions (``fss_jax/models/resnet.py``, ``vgg.py``);
``scoped`` combines them into a whole-model naming.
"""
import dataclasses
import re
from typing import Any, Callable, Iterable, Mapping, Optional

import flax
import numpy as np

COLLECTIONS = ("params", "batch_stats")
ModulePath = tuple[str, ...]

_TO_TORCH_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
    ("batch_stats", "num_batches_tracked"): "num_batches_tracked",
}
# A module's tensors in PyTorch's registration order (parameters, then buffers).
LEAF_ORDER = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def module_name_to_torch(name: str) -> str:
  """One Flax module name → torch dotted path: 'layer1_0' → 'layer1.0', 'beta_conv_2_0' →
  'beta_conv.2.0', 'downsample_1' → 'downsample.1' (an '_' before a run of digits is a '.')."""
  return re.sub(r"_(?=\d+(?:_|$))", ".", name)


def dotted(path: ModulePath) -> str:
  """The common rule: each Flax module name through ``module_name_to_torch``, joined by '.'."""
  return ".".join(module_name_to_torch(m) for m in path)


@dataclasses.dataclass(frozen=True)
class Naming:
  """How a Flax variables tree is named in a PyTorch state_dict.

  Attributes:
    module: Flax module path (module names, no leaf) → torch module path ('layer0.4').
    order: torch module names in registration order. Keys are sorted segment by segment:
      numeric names numerically, names in ``order`` by their position, other names last
      alphabetically (names are compared only with their siblings, so one flat tuple can hold
      every level: top-level modules, a block's children, ...).
  """
  module: Callable[[ModulePath], str] = dotted
  order: tuple[str, ...] = ()

  def key(self, collection: str, path: ModulePath) -> str:
    """Flax variable (collection, module names + leaf) → torch state_dict key."""
    leaf = _TO_TORCH_LEAF.get((collection, path[-1]))
    if leaf is None:
      raise ValueError(f"no torch counterpart for {collection}/{'/'.join(path)}")
    if len(path) < 2:
      raise ValueError(f"variable {collection}/{'/'.join(path)} is not inside a module")
    return f"{self.module(tuple(path[:-1]))}.{leaf}"

  def sort_key(self, key: str) -> tuple:
    rank = {name: i for i, name in enumerate(self.order + LEAF_ORDER)}
    out = []
    for s in key.split("."):
      if s.isdigit():
        out.append((0, int(s), ""))
      elif s in rank:
        out.append((1, rank[s], ""))
      else:
        out.append((2, 0, s))
    return tuple(out)

  def sorted(self, keys: Iterable[str]) -> list[str]:
    return sorted(keys, key=self.sort_key)


def scoped(scopes: Mapping[str, Callable[[ModulePath], str]],
           default: Callable[[ModulePath], str] = dotted) -> Callable[[ModulePath], str]:
  """A module-path function that hands ``path[1:]`` to ``scopes[path[0]]`` when the first name
  is a scope (e.g. {'backbone': the backbone's naming}: the torch model has no 'backbone.'
  level), and the whole path to ``default`` otherwise."""
  scopes = dict(scopes)

  def module(path: ModulePath) -> str:
    fn = scopes.get(path[0]) if path else None
    return fn(path[1:]) if fn is not None else default(path)
  return module


def torch_shape(leaf: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of the torch tensor for a Flax leaf of ``flax_shape``."""
  if leaf == "kernel" and len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if leaf == "kernel" and len(flax_shape) == 2:
    return tuple(flax_shape[::-1])
  return tuple(flax_shape)


def to_torch_layout(leaf: str, x: np.ndarray) -> np.ndarray:
  """Flax leaf value → torch layout: conv kernel HWIO → OIHW, Dense (in,out) → (out,in)."""
  if leaf == "kernel" and x.ndim == 4:
    return np.transpose(x, (3, 2, 0, 1))
  if leaf == "kernel" and x.ndim == 2:
    return np.transpose(x)
  return x


def to_flax_layout(leaf: str, x: np.ndarray) -> np.ndarray:
  """Torch tensor → Flax layout for leaf ``leaf``: OIHW → HWIO, (out,in) → (in,out)."""
  if leaf == "kernel" and x.ndim == 4:
    return np.transpose(x, (2, 3, 1, 0))
  if leaf == "kernel" and x.ndim == 2:
    return np.transpose(x)
  return x


def flatten_variables(variables: Mapping[str, Any]) -> list[tuple[str, ModulePath, Any]]:
  """{'params': ..., 'batch_stats': ...} → [(collection, path, leaf)] (collections in
  ``COLLECTIONS`` only; anything else is an error)."""
  variables = flax.core.unfreeze(variables)
  unknown = sorted(set(variables) - set(COLLECTIONS))
  if unknown:
    raise ValueError(f"unsupported variable collections {unknown}; expected {COLLECTIONS}")
  out = []
  for collection in COLLECTIONS:
    for path, leaf in flax.traverse_util.flatten_dict(variables.get(collection, {})).items():
      out.append((collection, tuple(path), leaf))
  return out


def torch_key_map(variables: Mapping[str, Any], naming: Optional[Naming] = None
                  ) -> dict[str, tuple[str, ModulePath, Any]]:
  """torch key → (collection, path, leaf) for every variable, in the naming's key order."""
  naming = naming or Naming()
  mapping = {}
  for collection, path, leaf in flatten_variables(variables):
    key = naming.key(collection, path)
    if key in mapping:
      other = mapping[key]
      raise ValueError(f"torch key {key!r} comes from both {other[0]}/{'/'.join(other[1])} "
                       f"and {collection}/{'/'.join(path)}")
    mapping[key] = (collection, path, leaf)
  return {k: mapping[k] for k in naming.sorted(mapping)}
