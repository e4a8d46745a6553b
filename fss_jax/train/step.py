"""Pure train/eval steps and the train state.

The parameters are split once, at state creation, into ``trainable`` (the head, and the backbone
when it is trained) and ``frozen`` (the pretrained backbone): the frozen part gets no gradient
computation and no optimiser state. ``batch_stats`` holds BatchNorm statistics, updated only when
the model runs BN in batch-statistics mode.
"""
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fss_jax.train import losses
from fss_jax.train import optim

BATCH_KEYS = ("query", "supp_images", "supp_labels")


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


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation, aux_weight: float = 1.0):
  """One SGD step on a batch of episodes.

  batch: query (B,H,W,3), supp_images (B,K,H,W,3), supp_labels (B,K,H,W), query_label (B,H,W).
  A non-finite loss leaves the state unchanged (the host stops the run on ``metrics['finite']``
  being False), so the last good state is never overwritten.
  Returns (new_state, metrics dict of scalars).
  """
  rng = jax.random.fold_in(rng, state.step)
  mutable = ["batch_stats"] if state.batch_stats else False

  def loss_fn(trainable):
    variables = {"params": {**state.frozen, **trainable}}
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
    out = model.apply(variables, *(batch[k] for k in BATCH_KEYS), train=True,
                      rngs={"dropout": rng}, mutable=mutable)
    out, updates = out if mutable else (out, {})
    total, main, aux = losses.asgnet_loss(out["logits"], out["aux_logits"],
                                          batch["query_label"], aux_weight=aux_weight)
    pred = jnp.argmax(out["logits"], axis=-1)
    return total, (main, aux, updates.get("batch_stats", state.batch_stats), pred)

  (total, (main, aux, new_stats, pred)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.trainable)
  updates, new_opt = tx.update(grads, state.opt_state, state.trainable)
  new_trainable = optax.apply_updates(state.trainable, updates)
  finite = jnp.isfinite(total)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(step=state.step + 1,
                            trainable=keep(new_trainable, state.trainable),
                            batch_stats=keep(new_stats, state.batch_stats),
                            opt_state=keep(new_opt, state.opt_state))
  label = batch["query_label"]
  valid = label != 255
  acc = jnp.sum((pred == label) & valid) / jnp.maximum(jnp.sum(valid), 1)
  return new_state, {"loss": total, "main_loss": main, "aux_loss": aux, "pixel_acc": acc,
                     "finite": finite}


def eval_step(variables, batch: dict, *, model: nn.Module):
  """Eval forward: (B,H,W) int32 predictions at input resolution."""
  out = model.apply(variables, *(batch[k] for k in BATCH_KEYS), train=False)
  return jnp.argmax(out["logits"], axis=-1).astype(jnp.int32)


def make_train_step(model, tx, aux_weight=1.0) -> Callable:
  return jax.jit(lambda s, b, r: train_step(s, b, r, model=model, tx=tx, aux_weight=aux_weight),
                 donate_argnums=(0,))
