"""Optimiser of the reference: SGD momentum 0.9, coupled weight decay 1e-4, poly schedule.

Reference (``tool/train.py``, ``util/util.py: poly_learning_rate``):
  * only the head's parameters are given to ``torch.optim.SGD``; the backbone has
    ``requires_grad=False``;
  * ``torch.optim.SGD`` adds ``weight_decay · p`` to the gradient *before* the momentum
    buffer (``buf = momentum · buf + g``, first step ``buf = g``; ``p -= lr · buf``). That is
    ``optax.chain(add_decayed_weights(wd), sgd(lr, momentum))``; the decay also applies to biases;
  * the rate is set before every step to ``base_lr · (1 − it / max_iter)^0.9 · 10`` with a 1-based
    ``it`` (the k-th update, k = 0, 1, ..., uses it = k + 1, so the last update uses rate 0). Our
    configs store the effective rate (``0.0025 × 10 = 0.025`` for PASCAL).

Frozen backbone: we split the parameter tree into a trainable head tree and a frozen tree (the
top-level ``'backbone'`` entry) instead of masking the full tree with ``optax.multi_transform``
and ``set_to_zero``. With the split, the train state keeps optimiser state (momentum) only for the
head, ``jax.grad`` is taken only with respect to the head (no backbone gradient is ever built,
not even zeros), and checkpoints hold no backbone momentum. Use ``split_params`` before creating
the optimiser state and ``merge_params`` to rebuild the model's ``params`` inside the loss.
"""
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax

FROZEN_KEYS = ("backbone",)


def poly_schedule(base_lr: float, max_steps: int, power: float = 0.9,
                  step_offset: int = 1) -> Callable[[Any], jax.Array]:
  """Poly learning-rate schedule: ``base_lr · (1 − (count + step_offset) / max_steps)^power``.

  Args:
    base_lr: the effective peak rate (already including the reference's ×10).
    max_steps: total number of updates (``epochs × steps_per_epoch``).
    power: 0.9 in the reference; 0 gives a constant rate.
    step_offset: 1 reproduces the reference's 1-based iteration counter (update k uses
      ``it = k + 1``); 0 gives the textbook schedule that starts at ``base_lr``.

  Returns:
    An optax schedule ``count -> lr`` (``count`` = number of updates applied so far). Values
    past the end are clipped to 0.
  """
  if max_steps <= 0:
    raise ValueError(f"poly_schedule: max_steps must be positive, got {max_steps}.")
  if base_lr < 0:
    raise ValueError(f"poly_schedule: base_lr must be non-negative, got {base_lr}.")

  def schedule(count):
    # float32, or float64 under jax_enable_x64 (the float64 parity tests).
    it = jnp.asarray(count, jnp.result_type(float)) + step_offset
    frac = jnp.clip(1.0 - it / max_steps, 0.0, 1.0)
    return base_lr * frac ** power

  return schedule


def multistep_schedule(base_lr: float, milestones: Sequence[int],
                       gamma: float = 0.1) -> Callable[[Any], jax.Array]:
  """PyTorch ``MultiStepLR`` stepped after every update (PANet's ``train.py``): update ``count``
  (0-based) uses ``base_lr · gamma^(number of milestones <= count)``; PANet's milestones
  10000, 20000, 30000 give 1e-3 for updates 0..9999, 1e-4 from 10000, 1e-5 from 20000."""
  if base_lr < 0:
    raise ValueError(f"multistep_schedule: base_lr must be non-negative, got {base_lr}.")
  marks = jnp.asarray(sorted(int(m) for m in milestones) or [2**31 - 1], jnp.int32)

  def schedule(count):
    passed = jnp.sum(jnp.asarray(count, jnp.int32) >= marks)
    return base_lr * jnp.asarray(gamma, jnp.result_type(float)) ** passed

  return schedule


SCHEDULES = ("poly", "multistep")


def total_steps_from_config(config, steps_per_epoch: Optional[int] = None) -> int:
  """``config.train.total_steps`` when positive, else ``epochs × steps_per_epoch``."""
  train = config.train
  total = int(train.get("total_steps", 0) or 0)
  if total > 0:
    return total
  epochs = int(train.get("epochs", 0) or 0)
  if epochs > 0 and steps_per_epoch:
    return epochs * int(steps_per_epoch)
  raise ValueError(
      "Cannot determine the number of training steps: set config.train.total_steps > 0, or "
      f"config.train.epochs > 0 (got {epochs}) and pass steps_per_epoch (got {steps_per_epoch}).")


def make_schedule(config, total_steps: Optional[int] = None,
                  steps_per_epoch: Optional[int] = None) -> Callable[[Any], jax.Array]:
  """The schedule described by ``config.train``: ``schedule`` 'poly' (lr, poly_power,
  poly_step_offset; the default) or 'multistep' (lr, milestones, gamma)."""
  train = config.train
  name = train.get("schedule", "poly")
  if name == "multistep":
    return multistep_schedule(float(train.lr), tuple(train.milestones), float(train.gamma))
  if name != "poly":
    raise ValueError(f"config.train.schedule = {name!r}: must be one of {SCHEDULES}.")
  if total_steps is None:
    total_steps = total_steps_from_config(config, steps_per_epoch)
  return poly_schedule(float(train.lr), int(total_steps), float(train.get("poly_power", 0.9)),
                       int(train.get("poly_step_offset", 1)))


def make_optimizer(config, total_steps: Optional[int] = None,
                   steps_per_epoch: Optional[int] = None) -> optax.GradientTransformation:
  """SGD with momentum and torch-style (coupled) weight decay on the config's schedule.

  Apply it to the *head* parameters only (see ``split_params``).

  Args:
    config: ConfigDict with ``train.{lr, momentum, weight_decay, poly_power}`` and either
      ``train.total_steps > 0`` or ``train.epochs`` (with ``steps_per_epoch``).
    total_steps: overrides the config's step count.
    steps_per_epoch: used when the config gives epochs instead of total steps.
  """
  train = config.train
  schedule = make_schedule(config, total_steps, steps_per_epoch)
  momentum = float(train.get("momentum", 0.9))
  tx = optax.chain(
      optax.add_decayed_weights(float(train.get("weight_decay", 0.0))),
      optax.sgd(schedule, momentum=momentum if momentum > 0 else None, nesterov=False),
  )
  scale = float(train.get("backbone_lr_scale", 1.0))
  if scale != 1.0:
    # Per-group rates (BAM's stage 1: the encoder at base_lr, PPM and classifier at 10×): SGD's
    # update is −lr · buf with a buffer independent of lr, so scaling the backbone's updates
    # is exactly a backbone rate of scale × lr (weight decay and momentum unchanged).
    tx = optax.chain(tx, scale_subtree(BACKBONE_KEY, scale))
  frozen_layers = tuple((config.get("model") or {}).get("frozen_layers", ()))
  if not frozen_layers:
    return tx
  # Backbone layers a model runs without gradient inside a trained backbone (PANet's 'blog'
  # variant: layer0, layer1): their zero gradients pass through unchanged, so neither weight
  # decay nor momentum moves them (PyTorch's SGD skips parameters without a gradient).
  return optax.masked(tx, lambda params: backbone_layer_mask(params, frozen_layers))


BACKBONE_KEY = "backbone"


def scale_subtree(key: str, factor: float) -> optax.GradientTransformation:
  """Multiplies the updates under the top-level ``key`` by ``factor`` (others unchanged)."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    if key not in updates:
      return updates, state
    out = dict(updates)
    out[key] = jax.tree.map(lambda u: u * jnp.asarray(factor, u.dtype), updates[key])
    return out, state

  return optax.GradientTransformation(init, update)


def backbone_layer_mask(params: Mapping[str, Any], frozen_layers: Sequence[str]):
  """Pytree of bools with ``params``' structure: False for the leaves under
  ``backbone/<layer>`` or ``backbone/<layer>_<i>`` for a layer in ``frozen_layers``."""
  def trained(path, _):
    names = [getattr(p, "key", str(p)) for p in path]
    return not (len(names) > 1 and names[0] == "backbone"
                and names[1].split("_")[0] in frozen_layers)
  return jax.tree_util.tree_map_with_path(trained, params)


def split_params(params: Mapping[str, Any],
                 frozen_keys: Sequence[str] = FROZEN_KEYS) -> Tuple[dict, dict]:
  """Splits a Flax ``params`` tree into (trainable head, frozen backbone) by top-level key.

  Args:
    params: the model's ``variables['params']`` (dict or FrozenDict).
    frozen_keys: top-level entries that get no gradient and no optimiser state.

  Returns:
    (trainable, frozen) plain dicts; ``merge_params(trainable, frozen)`` restores ``params``.
  """
  if not isinstance(params, Mapping):
    raise TypeError(f"split_params: expected a mapping of parameters, got {type(params)}.")
  frozen = {k: v for k, v in params.items() if k in frozen_keys}
  trainable = {k: v for k, v in params.items() if k not in frozen_keys}
  if not trainable:
    raise ValueError(f"split_params: every top-level entry {sorted(params)} is frozen "
                     f"(frozen_keys={list(frozen_keys)}); nothing to train.")
  return trainable, frozen


def merge_params(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
  """Inverse of ``split_params``."""
  overlap = set(trainable) & set(frozen)
  if overlap:
    raise ValueError(f"merge_params: keys in both trees: {sorted(overlap)}.")
  return {**trainable, **frozen}


def trainable_mask(params: Mapping[str, Any], frozen_keys: Sequence[str] = FROZEN_KEYS):
  """Pytree of bools with ``params``' structure: False under ``frozen_keys``, True elsewhere.

  For ``optax.masked`` / ``multi_transform`` users and for counting; the trainer uses the split.
  """
  return {k: jax.tree.map(lambda _, t=(k not in frozen_keys): t, v) for k, v in params.items()}


def count_params(tree: Any) -> int:
  """Number of scalar parameters in a pytree."""
  return int(sum(x.size for x in jax.tree.leaves(tree)))
