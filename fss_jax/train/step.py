"""Pure train/eval steps and the train state.

The parameters are split once, at state creation, into ``trainable`` (the head, and the backbone
when it is trained) and ``frozen`` (the pretrained backbone): the frozen part gets no gradient
computation and no optimiser state. ``batch_stats`` holds BatchNorm statistics, updated only when
the model runs BN in batch-statistics mode.
"""
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fss_jax.train import optim



def model_inputs(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
  """The batch entries the model's ``__call__`` takes (``model.inputs``), by name."""
  missing = [k for k in model.inputs if k not in batch]
  if missing:
    raise KeyError(f"{type(model).__name__} needs batch keys {list(model.inputs)}; "
                   f"missing {missing} (batch has {sorted(batch)})")
  return {k: batch[k] for k in model.inputs}


def device_keys(model: nn.Module) -> tuple[str, ...]:
  """The batch keys a train step reads: the model's inputs and its loss's targets."""
  return tuple(model.inputs) + tuple(model.targets)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  trainable: Any
  frozen: Any
  batch_stats: Any
  opt_state: Any

  @property
  def params(self):
    return {**self.frozen, **self.trainable}

  def variables(self):
    v = {"params": self.params}
    if self.batch_stats:
      v["batch_stats"] = self.batch_stats
    return v


def create_train_state(variables, tx: optax.GradientTransformation,
                       frozen_keys=("backbone",)) -> TrainState:
  trainable, frozen = optim.split_params(dict(variables["params"]), frozen_keys)
  return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                    batch_stats=dict(variables.get("batch_stats", {})),
                    opt_state=tx.init(trainable))


def train_step(state: TrainState, batch: Mapping[str, Any], rng: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation,
               deterministic: bool = False):
  """One SGD step on a batch of episodes, with the model's own loss (``model.loss``).

  batch: at least ``device_keys(model)``, e.g. query (B,H,W,3), supp_images (B,K,H,W,3),
  supp_labels (B,K,H,W), query_label (B,H,W).
  deterministic: dropout off (for gradient parity checks through this step).
  A non-finite loss leaves the state unchanged (the host stops the run on ``metrics['finite']``
  being False), so the last good state is never overwritten.
  Returns (new_state, metrics: 'loss', the loss's named terms, 'pixel_acc', 'finite').
  """
  rng = jax.random.fold_in(rng, state.step)
  mutable = ["batch_stats"] if state.batch_stats else False

  def loss_fn(trainable):
    variables = {"params": {**state.frozen, **trainable}}
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
    out = model.apply(variables, **model_inputs(model, batch), train=True,
                      deterministic=deterministic, rngs={"dropout": rng}, mutable=mutable)
    out, updates = out if mutable else (out, {})
    total, terms = model.loss(out, batch)
    pred = jnp.argmax(out["logits"], axis=-1)
    return total, (terms, updates.get("batch_stats", state.batch_stats), pred)

  (total, (terms, new_stats, pred)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.trainable)
  updates, new_opt = tx.update(grads, state.opt_state, state.trainable)
  new_trainable = optax.apply_updates(state.trainable, updates)
  finite = jnp.isfinite(total)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(step=state.step + 1,
                            trainable=keep(new_trainable, state.trainable),
                            batch_stats=keep(new_stats, state.batch_stats),
                            opt_state=keep(new_opt, state.opt_state))
  label = batch[model.targets[0]]  # the label of 'logits' (query_label; 'label' per image)
  valid = label != 255
  acc = jnp.sum((pred == label) & valid) / jnp.maximum(jnp.sum(valid), 1)
  return new_state, {"loss": total, **terms, "pixel_acc": acc, "finite": finite}


def eval_step(variables, batch: Mapping[str, Any], *, model: nn.Module):
  """Eval forward: (B,H,W) int32 predictions at input resolution."""
  out = model.apply(variables, **model_inputs(model, batch), train=False)
  return jnp.argmax(out["logits"], axis=-1).astype(jnp.int32)
