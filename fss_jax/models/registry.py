"""Models by ``config.model.name``, and their initial variables.

Adding a model = its module file, its configs, and one line in ``MODELS``. A model module has:
  * ``model_config()``: its own ``config.model`` fields with defaults (the backbone fields
    every model shares are in ``fss_jax.configs_lib.base_config``);
  * ``from_config(config)``: the ``nn.Module`` the config describes;
and its module class has:
  * ``__call__(query, supp_images, supp_labels, *, train, deterministic=None)`` → a dict with
    at least ``logits`` (B,H,W,C) at input resolution (the evaluator's and metrics' input);
  * ``inputs``: the batch keys passed to ``__call__`` by name (``dummy_inputs`` must know how to
    build each); ``targets``: the other batch keys its loss reads, the first being the label of
    ``logits`` (the batch-dict contract of ``fss_jax/data/pipeline.py``);
  * optionally ``task``: 'episodes' (the default: few-shot episodes, ``__call__(query,
    supp_images, supp_labels, ...)``) or 'semantic' (per-image batches, ``__call__(image, ...)``:
    PSPNet, the base learner of BAM/MSANet's stage 1);
  * ``loss(out, batch)`` → (total, {name: scalar}) (the train step logs every term);
  * ``torch_order``: its PyTorch head modules in registration order, and a ``backbone``
    submodule of ``fss_jax.models.backbones`` (export names, ``fss_jax/weights.py``);
  * optionally ``torch_backbone_prefix``: where the backbone's 'model'-scheme names sit in the
    official state_dict (PANet: ``encoder.backbone.``; default '': at the top level), and
    ``torch_reference_wrapping``: how the official training script saves it ('state_dict':
    ``{'state_dict': {'module.' + key: ...}}``, the default; 'module': ``{'module.' + key: ...}``);
  * optionally ``way``: N of N-way episodes; the supports are then N·K images, way-major (the
    N-way batch contract), and the initial variables are built with N·K supports.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fss_jax.models import asgnet
from fss_jax.models import bam
from fss_jax.models import msanet
from fss_jax.models import panet
from fss_jax.models import pfenet
from fss_jax.models import pspnet

MODELS = {
    "asgnet": asgnet,
    "bam": bam,
    "msanet": msanet,
    "panet": panet,
    "pfenet": pfenet,
    "pspnet": pspnet,
}


def get(name: str):
  """The model module registered as ``name``."""
  if name not in MODELS:
    raise ValueError(f"config.model.name = {name!r}: must be one of {sorted(MODELS)}.")
  return MODELS[name]


def model_config(name: str) -> ml_collections.ConfigDict:
  """The model-specific ``config.model`` fields of ``name`` with their defaults."""
  return get(name).model_config()


def build_model(config) -> nn.Module:
  """The model described by ``config.model`` (and ``train`` for its frozen keys and loss)."""
  return get(config.model.name).from_config(config)


def task(model: nn.Module) -> str:
  """'episodes' (few-shot models: episode batches) or 'semantic' (per-image batches: PSPNet,
  the base learner of BAM/MSANet), the batch kind the model's ``inputs`` name."""
  return getattr(model, "task", "episodes")


def dummy_inputs(model: nn.Module, image_size: int, shot: int) -> dict[str, jax.Array]:
  """One example of each of ``model.inputs`` (zeros; support labels all foreground), S×S."""
  s = int(image_size)
  # N-way models take way·shot supports (their parameters do not depend on it).
  n = int(getattr(model, "way", 1)) * int(shot)
  known = {
      "query": lambda: jnp.zeros((1, s, s, 3), jnp.float32),
      "image": lambda: jnp.zeros((1, s, s, 3), jnp.float32),
      "supp_images": lambda: jnp.zeros((1, n, s, s, 3), jnp.float32),
      "supp_labels": lambda: jnp.ones((1, n, s, s), jnp.int32),
      "base_class": lambda: jnp.zeros((1,), jnp.int32),
  }
  unknown = [k for k in model.inputs if k not in known]
  if unknown:
    raise ValueError(f"{type(model).__name__}.inputs has keys {unknown} that "
                     "registry.dummy_inputs does not know how to build")
  return {k: known[k]() for k in model.inputs}


def _init_fn(model: nn.Module, image_size: int, shot: int):
  inputs = dummy_inputs(model, image_size, shot)
  return lambda rng: model.init({"params": rng, "dropout": rng}, **inputs, train=False)


def init_variables(model: nn.Module, image_size: int, shot: int,
                   rng: jax.Array) -> dict[str, Any]:
  """Random initial variables (PyTorch default init, see the modules) for S×S inputs."""
  return jax.device_get(dict(jax.jit(_init_fn(model, image_size, shot))(rng)))


def variables_template(model: nn.Module, image_size: int = 65,
                       shot: int = 1) -> dict[str, Any]:
  """The variables' structure as ``jax.ShapeDtypeStruct`` (nothing is computed).

  Parameter shapes do not depend on the input size, so a small one is the default.
  """
  return jax.eval_shape(_init_fn(model, image_size, shot), jax.random.key(0))


def head_param_count(params) -> int:
  """Number of learnable head parameters (everything outside the backbone)."""
  return sum(x.size for name, sub in params.items() if name != "backbone"
             for x in jax.tree.leaves(sub))
