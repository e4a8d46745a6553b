"""Config → model, initial variables and pretrained backbone weights.

The one place that reads ``config.model`` (see ``fss_jax/configs_lib.py``):
  * ``build_model(config)``: an ``ASGNet`` with the configured backbone, head and BN mode;
  * ``init_variables(model, config, rng)``: {'params', 'batch_stats'} for (1, S, S, 3) inputs;
  * ``load_backbone(variables, path, depth)``: the ImageNet ResNet of ``model.backbone_weights``
    (PyTorch ``.pth`` / safetensors in the ImageNet naming, or our ``.msgpack``) put in place.
"""
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from fss_jax.models import asgnet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FAMILIES = ("resnet", "resnet_small")


def train_backbone(config) -> bool:
  """Whether gradients reach the backbone: it is not among ``train.frozen_keys``."""
  return "backbone" not in tuple(config.train.frozen_keys)


def build_model(config) -> asgnet.ASGNet:
  """The ASGNet described by ``config.model`` (and ``train.frozen_keys`` for the backbone)."""
  m = config.model
  if m.name != "asgnet":
    raise ValueError(f"config.model.name = {m.name!r}: only 'asgnet' is implemented.")
  if m.backbone not in FAMILIES:
    raise ValueError(f"config.model.backbone = {m.backbone!r}: must be one of {FAMILIES}.")
  blocks = tuple(int(b) for b in m.backbone_blocks) or None
  if blocks is not None and len(blocks) != 4:
    raise ValueError(f"config.model.backbone_blocks = {m.backbone_blocks!r}: four stage "
                     "counts, or () for the standard depth.")
  return asgnet.ASGNet(
      depth=int(m.depth), bins=tuple(m.bins), reduce_dim=int(m.reduce_dim),
      max_sp=int(m.max_sp), train_iters=int(m.train_iters), eval_iters=int(m.eval_iters),
      bn_batch_stats=m.bn_mode == "batch_stats", backbone_dtype=DTYPES[m.backbone_dtype],
      backbone_width=int(m.backbone_width), backbone_blocks=blocks,
      train_backbone=train_backbone(config))


def _init_fn(model: asgnet.ASGNet, image_size: int, shot: int):
  s = int(image_size)
  query = jnp.zeros((1, s, s, 3), jnp.float32)
  supp = jnp.zeros((1, shot, s, s, 3), jnp.float32)
  labels = jnp.ones((1, shot, s, s), jnp.int32)
  return lambda rng: model.init({"params": rng, "dropout": rng}, query, supp, labels,
                                train=False)


def init_variables(model: asgnet.ASGNet, image_size: int, shot: int,
                   rng: jax.Array) -> dict[str, Any]:
  """Random initial variables (PyTorch default init, see the modules) for S×S inputs."""
  return jax.device_get(dict(jax.jit(_init_fn(model, image_size, shot))(rng)))


def variables_template(model: asgnet.ASGNet, image_size: int = 65,
                       shot: int = 1) -> dict[str, Any]:
  """The variables' structure as ``jax.ShapeDtypeStruct`` (nothing is computed).

  Parameter shapes do not depend on the input size, so a small one is the default.
  """
  return jax.eval_shape(_init_fn(model, image_size, shot), jax.random.key(0))


def load_backbone(variables: Mapping[str, Any], path: str, depth: int) -> dict[str, Any]:
  """Replaces the ``backbone`` params and batch_stats of ``variables`` with those in ``path``.

  ``path``: an ImageNet ResNet as PyTorch ``.pth``/``.pt`` (read with ``weights_only=True``) or
  ``.safetensors`` (the reference's ``resnet{50,101}_v2.pth`` naming), or a ``.msgpack`` written
  by ``scripts/convert_backbone.py``. Shapes must match the configured backbone.
  """
  from fss_jax.convert import io  # pylint: disable=g-import-not-at-top
  from fss_jax.convert import torch_import  # pylint: disable=g-import-not-at-top
  if path.endswith(io.SUFFIX):
    loaded = io.load_variables(path)
  else:
    loaded = torch_import.backbone_variables_from_torch(
        torch_import.load_state_dict(path), depth, source=path)
  out = {c: dict(v) for c, v in variables.items()}
  for collection in ("params", "batch_stats"):
    want = out.get(collection, {}).get("backbone")
    got = loaded.get(collection)
    if want is None:
      continue
    if got is None:
      raise ValueError(f"{path}: no {collection!r} collection for the backbone.")
    want_shapes = jax.tree.map(jnp.shape, want)
    got_shapes = jax.tree.map(jnp.shape, got)
    if want_shapes != got_shapes:
      raise ValueError(
          f"{path}: backbone {collection} do not match the configured backbone "
          f"(depth {depth}); check config.model.depth / backbone_width / backbone_blocks.")
    out[collection]["backbone"] = jax.tree.map(jnp.asarray, got)
  return out
