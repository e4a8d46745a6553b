"""Pure maps between PyTorch state_dict keys and Flax variable paths.

Flax names follow the torch module path with '.' → '_' (``layer1_0/downsample_1``,
``corr_conv_2_0``); only the backbone stem differs: its convs and BNs live under
``layer0/{conv,bn}{1,2,3}``, which is ``conv1``/``bn1``/... in the ImageNet files
(``naming='imagenet'``) and ``layer0.{0,1,3,4,6,7}`` inside ASGNet checkpoints
(``naming='asgnet'``). Everything is derived from the Flax variables tree, so the same code
serves any depth, any number of FEM bins and any head that keeps to the rule.

Leaves: params ``kernel`` ↔ ``weight`` (HWIO ↔ OIHW; a 2-D Dense kernel (in,out) ↔ (out,in)),
params ``scale`` ↔ ``weight`` (BN), ``bias`` ↔ ``bias``; batch_stats ``mean`` ↔ ``running_mean``,
``var`` ↔ ``running_var``, ``num_batches_tracked`` ↔ ``num_batches_tracked``.
"""
import re
from typing import Any, Iterable, Mapping, Optional

import flax
import numpy as np

NAMINGS = ("imagenet", "asgnet")
COLLECTIONS = ("params", "batch_stats")
# Stem child → its index in the reference's nn.Sequential layer0 (ReLUs at 2, 5, 8; pool at 9).
ASGNET_STEM_INDEX = {"conv1": "0", "bn1": "1", "conv2": "3", "bn2": "4", "conv3": "6",
                     "bn3": "7"}
_STEM_CHILD = {v: k for k, v in ASGNET_STEM_INDEX.items()}

_TO_TORCH_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
    ("batch_stats", "num_batches_tracked"): "num_batches_tracked",
}

# Sibling order in the reference's state_dicts (torch registration order). Names compare only
# with their siblings, so one table covers the ImageNet file (conv1, bn1, ..., layer1.., fc),
# the bottleneck children (conv1, bn1, ..., downsample), ASGNet's top level (layer0..layer4,
# then the head modules in the order asgnet.py registers them) and a module's tensors.
# Numeric names (Sequential / ModuleList indices) sort numerically; unknown names come last,
# alphabetically.
REFERENCE_ORDER = (
    "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample",
    "layer0", "layer1", "layer2", "layer3", "layer4", "fc",
    "cls", "down_conv", "corr_conv", "beta_conv", "inner_cls", "alpha_conv", "res1", "res2",
    "weight", "bias", "running_mean", "running_var", "num_batches_tracked",
)
_RANK = {name: i for i, name in enumerate(REFERENCE_ORDER)}


def _check_naming(naming: str) -> None:
  if naming not in NAMINGS:
    raise ValueError(f"naming must be one of {NAMINGS}, got {naming!r}")


def module_name_to_torch(name: str) -> str:
  """One Flax module name → torch dotted path: 'layer1_0' → 'layer1.0', 'beta_conv_2_0' →
  'beta_conv.2.0', 'downsample_1' → 'downsample.1' (an '_' before a run of digits is a '.')."""
  return re.sub(r"_(?=\d+(?:_|$))", ".", name)


def flax_to_torch_key(collection: str, path: tuple[str, ...], naming: str = "asgnet",
                      backbone_scope: Optional[str] = None) -> str:
  """Maps a Flax variable to its torch state_dict key.

  Args:
    collection: 'params' or 'batch_stats'.
    path: module names then the leaf name, e.g. ('backbone', 'layer0', 'bn2', 'scale').
    naming: stem naming, 'asgnet' (``layer0.4``) or 'imagenet' (``bn2``).
    backbone_scope: name of the ResNet submodule in a whole-model tree ('backbone'), stripped
      from the key; None when ``path`` is a bare ResNet path.

  Returns:
    e.g. 'layer0.4.weight' ('asgnet') / 'bn2.weight' ('imagenet').
  """
  _check_naming(naming)
  leaf = _TO_TORCH_LEAF.get((collection, path[-1]))
  if leaf is None:
    raise ValueError(f"no torch counterpart for {collection}/{'/'.join(path)}")
  modules = list(path[:-1])
  if backbone_scope is not None and modules and modules[0] == backbone_scope:
    modules = modules[1:]
  if not modules:
    raise ValueError(f"variable {collection}/{'/'.join(path)} is not inside a module")
  if modules[0] == "layer0":
    if len(modules) != 2 or modules[1] not in ASGNET_STEM_INDEX:
      raise ValueError(f"unexpected stem variable {collection}/{'/'.join(path)}")
    if naming == "asgnet":
      modules = ["layer0", ASGNET_STEM_INDEX[modules[1]]]
    else:
      modules = [modules[1]]
  else:
    modules = [module_name_to_torch(m) for m in modules]
  return ".".join(modules + [leaf])


def _is_batchnorm(torch_modules: list[str], naming: str) -> bool:
  last = torch_modules[-1]
  if naming == "asgnet" and len(torch_modules) == 2 and torch_modules[0] == "layer0":
    return _STEM_CHILD.get(last, "").startswith("bn")
  return (re.fullmatch(r"bn\d*", last) is not None
          or torch_modules[-2:] == ["downsample", "1"])


def torch_to_flax_path(key: str, naming: str = "asgnet",
                       backbone_scope: Optional[str] = None) -> tuple[str, tuple[str, ...]]:
  """Inverse of ``flax_to_torch_key`` for the documented namings.

  Backbone keys (stem, ``layerN.i.*``) become ResNet paths (under ``backbone_scope`` if given);
  any other key is a head module whose dotted path joins into one name with '_'. BatchNorm
  modules are recognised by name (``bn*``, ``downsample.1``, the stem's BN indices).

  Returns:
    (collection, path), e.g. 'layer1.0.downsample.1.running_mean' →
    ('batch_stats', ('backbone', 'layer1_0', 'downsample_1', 'mean')).
  """
  _check_naming(naming)
  parts = key.split(".")
  if len(parts) < 2:
    raise ValueError(f"torch key {key!r} has no module path")
  modules, leaf = parts[:-1], parts[-1]
  scope = (backbone_scope,) if backbone_scope else ()
  stem_imagenet = naming == "imagenet" and len(modules) == 1 and modules[0] in ASGNET_STEM_INDEX
  stem_asgnet = naming == "asgnet" and modules[0] == "layer0"
  if stem_imagenet or stem_asgnet:
    child = modules[0] if stem_imagenet else _STEM_CHILD.get(modules[-1] if len(modules) == 2
                                                             else "")
    if child is None:
      raise ValueError(f"torch key {key!r}: not a stem conv/BN")
    module_path = scope + ("layer0", child)
    is_bn = child.startswith("bn")
  elif re.fullmatch(r"layer[1-4]", modules[0]) and len(modules) >= 3:
    module_path = scope + (f"{modules[0]}_{modules[1]}", "_".join(modules[2:]))
    is_bn = _is_batchnorm(modules, naming)
  else:
    module_path = ("_".join(modules),)
    is_bn = False
  if leaf in ("running_mean", "running_var", "num_batches_tracked"):
    name = {"running_mean": "mean", "running_var": "var"}.get(leaf, leaf)
    return "batch_stats", module_path + (name,)
  if leaf == "weight":
    return "params", module_path + ("scale" if is_bn else "kernel",)
  if leaf == "bias":
    return "params", module_path + ("bias",)
  raise ValueError(f"torch key {key!r}: unknown tensor name {leaf!r}")


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


def flatten_variables(variables: Mapping[str, Any]) -> list[tuple[str, tuple[str, ...], Any]]:
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


def torch_key_map(variables: Mapping[str, Any], naming: str = "asgnet",
                  backbone_scope: Optional[str] = None
                  ) -> dict[str, tuple[str, tuple[str, ...], Any]]:
  """torch key → (collection, path, leaf) for every variable, in reference state_dict order."""
  mapping = {}
  for collection, path, leaf in flatten_variables(variables):
    key = flax_to_torch_key(collection, path, naming, backbone_scope)
    if key in mapping:
      other = mapping[key]
      raise ValueError(f"torch key {key!r} comes from both {other[0]}/{'/'.join(other[1])} "
                       f"and {collection}/{'/'.join(path)}")
    mapping[key] = (collection, path, leaf)
  return {k: mapping[k] for k in sort_torch_keys(mapping)}


def _segment_rank(name: str) -> tuple:
  if name.isdigit():
    return (0, int(name), "")
  if name in _RANK:
    return (1, _RANK[name], "")
  return (2, 0, name)


def reference_sort_key(key: str) -> tuple:
  """Sort key giving the reference's state_dict order (see ``REFERENCE_ORDER``)."""
  return tuple(_segment_rank(s) for s in key.split("."))


def sort_torch_keys(keys: Iterable[str]) -> list[str]:
  return sorted(keys, key=reference_sort_key)
