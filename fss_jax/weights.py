"""PyTorch weights in and out of configured models: the one module that uses both
``fss_jax.models`` (what the variables are) and ``fss_jax.convert`` (how files are named).

  model_naming(config)                 the whole model's PyTorch key names and order
  backbone_naming(name, scheme)        a backbone's ('imagenet' file or 'model' checkpoint)
  read_backbone(path, config)          ImageNet backbone file (.pth/.pt/.safetensors/.msgpack)
  load_backbone(variables, config)     ... put in place of the model's backbone
  read_model(path, model, config)      a model checkpoint (the authors' or ours) → variables
  read_asgnet_as_prior(path, config)   an ASGNet checkpoint → the start of an ASGNet + prior
  model_state_dict(variables, config)  variables → the reference's state_dict
  backbone_state_dict(variables, name) bare backbone variables → its ImageNet file naming

The reference's checkpoints name the backbone's modules at the top level (``layer0.4.weight``);
ours keep them under ``backbone``. ``.pth`` files are read with ``torch.load(weights_only=True)``
(never unpickled), ``.safetensors`` without torch, ``.msgpack`` is our own variables format.
"""
import collections
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from fss_jax.convert import io
from fss_jax.convert import keymap
from fss_jax.convert import torch_export
from fss_jax.convert import torch_import
from fss_jax.models import backbones
from fss_jax.models import registry

BACKBONE_SCOPE = "backbone"


def backbone_naming(name: str, scheme: str = "imagenet") -> keymap.Naming:
  """The PyTorch naming of a bare backbone's variables (``layer0`` at the top of the tree)."""
  spec = backbones.get(name)
  return keymap.Naming(lambda path: spec.torch_module_path(path, scheme), spec.torch_order)


def model_naming(config) -> keymap.Naming:
  """The PyTorch naming of the model ``config.model`` describes: its backbone in the 'model'
  scheme, at the top level or under the model's ``torch_backbone_prefix`` (PANet:
  ``encoder.backbone.``), its head modules by the common rule, in registration order."""
  spec = backbones.get(config.model.backbone)
  model = registry.build_model(config)
  prefix = getattr(model, "torch_backbone_prefix", "")
  # Head modules whose torch names the common rule cannot give (BAM's ``ASPP_meta.layer6_0.0``:
  # an '_' before a digit that stays): Flax module path 'a/b' → torch module path.
  renames = dict(getattr(model, "torch_module_names", {}))
  head = lambda path: renames.get("/".join(path)) or keymap.dotted(path)
  module = keymap.scoped(
      {BACKBONE_SCOPE: lambda path: prefix + spec.torch_module_path(path, "model")}, head)
  return keymap.Naming(module, spec.torch_order + tuple(model.torch_order))


def reference_wrapping(config) -> str:
  """How the official training script of ``config.model`` saves its state_dict: 'state_dict'
  (``{'state_dict': {'module.' + key: ...}}``: ASGNet, PFENet) or 'module' (DataParallel's
  state_dict as it is, ``{'module.' + key: ...}``: PANet); see
  ``torch_export.save_state_dict``."""
  return getattr(registry.build_model(config), "torch_reference_wrapping", "state_dict")


def backbone_template(config) -> dict[str, Any]:
  """ShapeDtypeStruct variables of the configured backbone (all layers; nothing computed)."""
  module = backbones.build(config.model)
  x = jax.ShapeDtypeStruct((1, 33, 33, 3), jnp.float32)
  return jax.eval_shape(module.init, jax.random.key(0), x)


def backbone_from_state_dict(state_dict: Mapping[str, np.ndarray], config,
                             scheme: str = "imagenet", source: str = "state_dict") -> dict:
  """A backbone state_dict (ImageNet file naming, or the 'model' scheme) → its variables.

  The ImageNet file's classifier (``fc.*``, ``classifier.*``) is ignored; any other missing,
  unexpected or mis-shaped key raises ``torch_import.CheckpointMismatchError``.
  """
  name = config.model.backbone
  ignore = backbones.get(name).imagenet_ignored if scheme == "imagenet" else ()
  return torch_import.variables_from_torch(state_dict, backbone_template(config),
                                           backbone_naming(name, scheme), ignore, source)


def read_backbone(path: str, config) -> dict[str, Any]:
  """ImageNet weights of the configured backbone: ``.pth``/``.pt``/``.safetensors`` in the
  ImageNet file naming (``resnet50_v2.pth``, torchvision's ``vgg16_bn``) or a ``.msgpack``
  written by ``scripts/convert_backbone.py``."""
  if path.endswith(io.SUFFIX):
    return io.load_variables(path)
  return backbone_from_state_dict(torch_import.load_state_dict(path), config, source=path)


def _flat_shapes(tree) -> dict[str, tuple]:
  return {"/".join(k): tuple(np.shape(v))
          for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()}


def _check_like(got: Mapping[str, Any], want: Mapping[str, Any], what: str, hint: str):
  """Raises ValueError unless the two trees have the same paths and shapes."""
  g, w = _flat_shapes(got), _flat_shapes(want)
  if g != w:
    missing = sorted(set(w) - set(g))[:5]
    extra = sorted(set(g) - set(w))[:5]
    shape = [(k, g[k], w[k]) for k in sorted(set(g) & set(w)) if g[k] != w[k]][:5]
    raise ValueError(f"{what} do not match the configured model ({hint}): missing {missing}, "
                     f"unexpected {extra}, shape (file vs model) {shape}")


def load_backbone(variables: Mapping[str, Any], config,
                  path: str = "") -> dict[str, Any]:
  """Replaces the ``backbone`` params and batch_stats of ``variables`` with the weights in
  ``path`` (default ``config.model.backbone_weights``; see ``read_backbone``)."""
  path = path or config.model.backbone_weights
  loaded = read_backbone(path, config)
  out = {c: dict(v) for c, v in variables.items()}
  for collection in keymap.COLLECTIONS:
    want = out.get(collection, {}).get(BACKBONE_SCOPE)
    if want is None:
      continue
    got = loaded.get(collection)
    if got is None:
      raise ValueError(f"{path}: no {collection!r} collection for the backbone.")
    _check_like(got, want, f"{path}: backbone {collection}",
                "check config.model.backbone / depth / backbone_width / backbone_blocks")
    out[collection][BACKBONE_SCOPE] = jax.tree.map(jnp.asarray, got)
  return out


def read_model(path: str, model, config) -> dict[str, Any]:
  """A whole-model checkpoint → variables of ``model`` (validated against its shapes).

  ``path``: the reference's ``.pth``/``.pt``/``.safetensors`` (its training checkpoints as they
  are: ``{'state_dict': ...}`` with ``module.`` prefixes, or a bare state_dict) in the naming of
  ``model_naming(config)``, or a ``.msgpack`` written by ``scripts/import_checkpoint.py``.
  """
  template = registry.variables_template(model, config.data.image_size, config.data.shot)
  if path.endswith(io.SUFFIX):
    variables = io.load_variables(path)
    for collection in keymap.COLLECTIONS:
      if collection in template or collection in variables:
        _check_like(variables.get(collection, {}), template.get(collection, {}),
                    f"{path}: {collection}", f"config.model.name = {config.model.name!r}")
    return variables
  state_dict = resolve_aliases(torch_import.load_state_dict(path), model, path)
  return torch_import.variables_from_torch(state_dict, template, model_naming(config),
                                           source=path)


def resolve_aliases(state_dict: Mapping[str, np.ndarray], model, source: str = "state_dict"
                    ) -> dict[str, np.ndarray]:
  """Folds the second copies a reference checkpoint holds of the same tensors into the first
  (``model.torch_aliases``: (alias prefix, key prefix) pairs; PSPNet's ``encoder.N.`` =
  ``layerN.``). An alias whose tensor differs from its key's raises ValueError naming both: the
  file was edited, or is not what it claims."""
  aliases = tuple(getattr(model, "torch_aliases", ()))
  if not aliases:
    return dict(state_dict)
  out = {}
  for key, value in state_dict.items():
    for alias, target in aliases:
      if key.startswith(alias):
        out.setdefault(target + key[len(alias):], None)
        break
    else:
      out[key] = value
  for key, value in state_dict.items():
    for alias, target in aliases:
      if key.startswith(alias):
        real = target + key[len(alias):]
        if state_dict.get(real) is None:
          out[real] = value  # only the alias copy is present
        elif not np.array_equal(np.asarray(state_dict[real]), np.asarray(value)):
          raise ValueError(f"{source}: {key!r} and {real!r} are the same tensor in the "
                           "reference model but differ in this file")
        break
  return out


def add_aliases(state_dict: Mapping[str, np.ndarray], model, naming: keymap.Naming
                ) -> "collections.OrderedDict[str, np.ndarray]":
  """The state_dict with each ``model.torch_aliases`` copy added, in the reference's order."""
  out = dict(state_dict)
  for alias, target in tuple(getattr(model, "torch_aliases", ())):
    for key, value in state_dict.items():
      if key.startswith(target):
        out[alias + key[len(target):]] = value
  return collections.OrderedDict((k, out[k]) for k in naming.sorted(out))


def read_asgnet_as_prior(path: str, config) -> dict[str, Any]:
  """A plain ASGNet checkpoint (the authors' ``.pth`` or ours) as the starting variables of the
  ASGNet + prior that ``config`` describes (``model.prior`` True): read with ASGNet's naming and
  shapes, then each ``corr_conv`` gets a zero prior column (``asgnet.seed_prior_from_asgnet``),
  so the seeded model starts out computing exactly what the ASGNet did."""
  from fss_jax.models import asgnet  # pylint: disable=g-import-not-at-top
  if config.model.name != "asgnet" or not config.model.prior:
    raise ValueError(f"read_asgnet_as_prior: the config must describe an ASGNet + prior "
                     f"(model.name='asgnet', model.prior=True); got model.name="
                     f"{config.model.name!r}, prior={config.model.get('prior')!r}")
  plain = config.copy_and_resolve_references()
  plain.model.prior = False
  variables = read_model(path, registry.build_model(plain), plain)
  return asgnet.seed_prior_from_asgnet(variables, num_bins=len(config.model.bins))


def model_state_dict(variables: Mapping[str, Any], config
                     ) -> "collections.OrderedDict[str, np.ndarray]":
  """Whole-model variables → the reference checkpoint's state_dict (its keys, in its order),
  which its model loads with ``load_state_dict(strict=True)``."""
  naming = model_naming(config)
  state_dict = torch_export.state_dict_from_variables(variables, naming)
  return add_aliases(state_dict, registry.build_model(config), naming)


# ----------------------------------------------------------------------------- stage 1 → 2

# The stage-1 model's parts that BAM/MSANet keep (frozen): backbone, and PSPNet's ppm + cls as
# their learner_base (an nn.Sequential(ppm, cls): ppm → '0', cls_k → '1_k').
_BASE_LEARNER_PARTS = {"ppm": "0", "cls_0": "1_0", "cls_1": "1_1", "cls_4": "1_4"}


class BaseLearnerError(ValueError):
  """The stage-1 base learner a stage-2 model needs is missing or does not fit."""


def stage1_config(config):
  """The PSPNet config of a BAM/MSANet config's stage 1 (same data, backbone and head)."""
  from fss_jax import configs_lib  # pylint: disable=g-import-not-at-top
  c = configs_lib.base_config("pspnet")
  c.data = config.data.copy_and_resolve_references()
  for field in ("backbone", "depth", "backbone_dtype", "backbone_width", "backbone_blocks",
                "classes", "ppm_bins", "cls_dim"):
    c.model[field] = config.model[field]
  return c


def stage1_command(config) -> str:
  """The command that trains ``config``'s stage 1 (for error messages)."""
  d, m = config.data, config.model
  name = {"pascal5i": "pascal", "coco20i": "coco"}.get(d.dataset, d.dataset)
  arg = f"fold={d.fold}"
  if name in ("pascal", "coco"):
    arg += ",backbone=" + {"resnet": f"resnet{m.depth}"}.get(m.backbone, m.backbone)
  return f"python scripts/train.py --config=configs/{name}_bam_base.py:{arg} --workdir=<stage-1 workdir>"


def read_base_learner(path: str, config) -> dict[str, Any]:
  """The stage-1 PSPNet of a BAM/MSANet ``config`` → {'params'/'batch_stats': {'backbone',
  'learner_base'}}.

  ``path``: a stage-1 ``train.py`` workdir (its best checkpoint; its config must have the same
  dataset, fold and backbone), BAM's released ``best.pth`` (both key copies, ``module.``
  prefixes accepted), or our ``.safetensors``/``.msgpack`` of a PSPNet.
  Raises BaseLearnerError naming the file and the stage-1 command when it is missing or does
  not fit.
  """
  import os  # pylint: disable=g-import-not-at-top
  hint = f"train it with: {stage1_command(config)}"
  if not path:
    raise BaseLearnerError(
        f"config.model.base_weights is empty: {config.model.name} trains on a stage-1 base "
        f"learner (a PSPNet on the fold's base classes); {hint}, then pass "
        "--config.model.base_weights=<that workdir> (or BAM's released best.pth)")
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise BaseLearnerError(f"config.model.base_weights = {path!r} does not exist; {hint}")
  c1 = stage1_config(config)
  psp = registry.build_model(c1)
  try:
    if os.path.isdir(path):
      from fss_jax import configs_lib  # pylint: disable=g-import-not-at-top
      from fss_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
      run = configs_lib.load_run_config(path)
      mine = (config.data.dataset, int(config.data.fold))
      theirs = (run.data.dataset, int(run.data.fold))
      if run.model.name != "pspnet" or mine != theirs:
        raise BaseLearnerError(
            f"{path} is a run of model {run.model.name!r} on {theirs[0]} fold {theirs[1]}, not "
            f"the stage-1 PSPNet of {mine[0]} fold {mine[1]}; {hint}")
      variables, _ = ckpt_lib.load_model_variables(path, "best")
      _check_like(variables["params"], registry.variables_template(psp)["params"],
                  f"{path}: stage-1 params", "model.backbone / depth / classes")
    else:
      variables = read_model(path, psp, c1)
  except (ValueError, FileNotFoundError) as e:
    if isinstance(e, BaseLearnerError):
      raise
    raise BaseLearnerError(f"config.model.base_weights = {path!r} is not a stage-1 PSPNet "
                           f"of this config: {e}\n{hint}") from e
  out = {}
  for collection, tree in variables.items():
    if collection not in keymap.COLLECTIONS:
      continue
    part = {"backbone": tree["backbone"]}
    part["learner_base"] = {new: tree[old] for old, new in _BASE_LEARNER_PARTS.items()
                            if old in tree}
    out[collection] = part
  return out


def load_base_learner(variables: Mapping[str, Any], config) -> dict[str, Any]:
  """``variables`` with ``backbone`` and ``learner_base`` replaced by the stage-1 model of
  ``config.model.base_weights`` (``read_base_learner``), shapes checked."""
  loaded = read_base_learner(config.model.base_weights, config)
  out = {c: dict(v) for c, v in variables.items()}
  for collection in keymap.COLLECTIONS:
    for part in ("backbone", "learner_base"):
      want = out.get(collection, {}).get(part)
      if want is None:
        continue
      got = loaded.get(collection, {}).get(part)
      _check_like(got or {}, want, f"{config.model.base_weights}: {part} {collection}",
                  "check config.model.backbone / depth / classes")
      out[collection][part] = jax.tree.map(jnp.asarray, got)
  return out


def backbone_state_dict(variables: Mapping[str, Any], name: str
                        ) -> "collections.OrderedDict[str, np.ndarray]":
  """Bare backbone variables → its ImageNet file naming (no classifier)."""
  return torch_export.state_dict_from_variables(variables, backbone_naming(name, "imagenet"))
