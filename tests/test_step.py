"""train_step: only the head moves (frozen backbone), the update is SGD's, NaN keeps the state."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fss_jax.models import asgnet
from fss_jax.models import losses
from fss_jax.models import resnet
from fss_jax.train import step as step_lib

S = 33


def _setup():
  net = asgnet.ASGNet(backbone=resnet.ResNet(width=8, blocks=(1, 1, 1, 1)), bins=(1.0, 0.5),
                      reduce_dim=16)
  rng = np.random.default_rng(0)
  labels = (rng.uniform(size=(2, 1, S, S)) > 0.5).astype(np.int32)
  batch = {"query": jnp.asarray(rng.normal(size=(2, S, S, 3)), jnp.float32),
           "supp_images": jnp.asarray(rng.normal(size=(2, 1, S, S, 3)), jnp.float32),
           "supp_labels": jnp.asarray(labels),
           "query_label": jnp.asarray(labels[:, 0])}
  variables = jax.jit(lambda r: net.init(r, batch["query"], batch["supp_images"],
                                         batch["supp_labels"], train=False))(jax.random.key(0))
  return net, variables, batch


def test_train_step_is_sgd_on_the_head_only():
  net, variables, batch = _setup()
  tx = optax.sgd(0.1)
  state = step_lib.create_train_state(variables, tx)
  assert "backbone" in state.frozen and "backbone" not in state.trainable
  new, metrics = jax.jit(lambda s, b, r: step_lib.train_step(s, b, r, model=net, tx=tx))(
      state, batch, jax.random.key(1))

  def loss_fn(head):
    out = net.apply({**variables, "params": {**variables["params"], **head}},
                    batch["query"], batch["supp_images"], batch["supp_labels"], train=True,
                    rngs={"dropout": jax.random.fold_in(jax.random.key(1), 0)})
    return losses.main_aux_loss(out["logits"], out["aux_logits"], batch["query_label"])[0]

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(state.trainable)
  # One computation in two jitted graphs (XLA fuses them differently): measured 8e-8 relative on
  # the loss, 1.5e-8 absolute on the weights (float32 ulps of weights ~0.1); a wrong rate, a
  # missing term or an update of the backbone is >1e-3.
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  want = jax.tree.map(lambda p, g: p - 0.1 * g, state.trainable, grads)
  for a, b in zip(jax.tree.leaves(new.trainable), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert int(new.step) == 1 and bool(metrics["finite"])
  for a, b in zip(jax.tree.leaves(new.frozen), jax.tree.leaves(state.frozen)):
    np.testing.assert_array_equal(a, b)


def test_non_finite_loss_keeps_the_state():
  net, variables, batch = _setup()
  tx = optax.sgd(0.1)
  state = step_lib.create_train_state(variables, tx)
  bad = {**batch, "query": batch["query"].at[0, 0, 0, 0].set(jnp.nan)}
  new, metrics = jax.jit(lambda s, b, r: step_lib.train_step(s, b, r, model=net, tx=tx))(
      state, bad, jax.random.key(1))
  assert not bool(metrics["finite"])
  for a, b in zip(jax.tree.leaves(new.trainable), jax.tree.leaves(state.trainable)):
    np.testing.assert_array_equal(a, b)
