"""Tests for fss_jax.train.optim: torch.optim.SGD parity, poly schedule, head/backbone split."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch

from fss_jax.train import optim
import numerics


def _config(lr=0.025, momentum=0.9, weight_decay=1e-4, total_steps=8, **extra):
  return ml_collections.ConfigDict({"train": dict(
      lr=lr, momentum=momentum, weight_decay=weight_decay, poly_power=0.9,
      total_steps=total_steps, epochs=0, **extra)})


def test_poly_schedule_formula():
  """The schedule is a float32 scalar: equal to the float64 formula within a few float32 ulps
  (one pow and one division, ~1e-7 relative); rel 1e-6 is 8 ulps."""
  sched = optim.poly_schedule(0.025, 10, 0.9)
  for k in range(12):
    # Update k uses the reference's 1-based iteration it = k + 1; clipped to 0 past the end.
    expected = 0.025 * max(0.0, 1 - (k + 1) / 10) ** 0.9
    assert float(sched(k)) == pytest.approx(expected, rel=1e-6, abs=1e-12)
  assert float(sched(9)) == 0.0
  textbook = optim.poly_schedule(0.1, 4, 2.0, step_offset=0)
  np.testing.assert_allclose([float(textbook(k)) for k in range(5)],
                             [0.1, 0.1 * 0.5625, 0.1 * 0.25, 0.1 * 0.0625, 0.0], rtol=1e-6)
  assert float(optim.poly_schedule(0.3, 5, power=0.0)(2)) == pytest.approx(0.3)
  with pytest.raises(ValueError, match="max_steps"):
    optim.poly_schedule(0.1, 0)


@pytest.mark.parametrize("weight_decay", [1e-4, 0.2])
def test_sgd_matches_torch(weight_decay):
  """optax chain == torch.optim.SGD(momentum, weight_decay) with the lr set before each step."""
  rng = np.random.default_rng(0)
  shapes = {"conv": (3, 3, 4, 5), "bias": (5,), "dense": (7, 2)}
  params0 = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  steps, total = 6, 8
  grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
           for _ in range(steps)]
  base_lr = 0.05
  config = _config(lr=base_lr, weight_decay=weight_decay, total_steps=total)

  def ours(dtype):
    tx = optim.make_optimizer(config)
    params = jax.tree.map(lambda v: jnp.asarray(v, dtype), params0)
    state = tx.init(params)
    traj = []
    for g in grads:
      updates, state = tx.update(jax.tree.map(lambda v: jnp.asarray(v, dtype), g), state, params)
      params = optax.apply_updates(params, updates)
      traj.append(jax.tree.map(np.asarray, params))
    return traj

  def reference(dtype):
    tparams = {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in params0.items()}
    opt = torch.optim.SGD(list(tparams.values()), lr=base_lr, momentum=0.9,
                          weight_decay=weight_decay)
    traj = []
    for k, g in enumerate(grads):
      for group in opt.param_groups:  # the reference's poly_learning_rate, 1-based iteration
        group["lr"] = base_lr * (1 - (k + 1) / total) ** 0.9
      for name, p in tparams.items():
        p.grad = torch.tensor(g[name], dtype=dtype)
      opt.step()
      traj.append({name: p.detach().numpy().copy() for name, p in tparams.items()})
    return traj

  want64, want32 = reference(torch.float64), reference(torch.float32)
  with jax.enable_x64(True):
    got64 = ours(jnp.float64)
  got32 = ours(jnp.float32)
  for k in range(steps):
    for name in shapes:
      numerics.assert_exact(got64[k][name], want64[k][name], f"step {k + 1} {name}")
      numerics.assert_parity(got32[k][name], want64[k][name], want32[k][name],
                             f"step {k + 1} {name}")


def test_multistep_matches_torch_multisteplr():
  """'multistep' = torch.optim.lr_scheduler.MultiStepLR stepped after every update (PANet):
  the rate of each update, and the SGD trajectory with weight decay 5e-4."""
  config = _config(lr=1e-3, weight_decay=5e-4, schedule="multistep", milestones=(3, 5, 9),
                   gamma=0.1)
  rng = np.random.default_rng(1)
  p0 = rng.normal(size=(4, 3)).astype(np.float64)
  grads = [rng.normal(size=(4, 3)) for _ in range(8)]
  tp = torch.tensor(p0, requires_grad=True)
  opt = torch.optim.SGD([tp], lr=1e-3, momentum=0.9, weight_decay=5e-4)
  sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 5, 9], gamma=0.1)
  rates, want = [], []
  for g in grads:
    rates.append(opt.param_groups[0]["lr"])
    tp.grad = torch.tensor(g)
    opt.step()
    sched.step()
    want.append(tp.detach().numpy().copy())
  with jax.enable_x64(True):
    ours = optim.make_schedule(config)
    np.testing.assert_allclose([float(ours(k)) for k in range(8)], rates, rtol=1e-12)
    tx = optim.make_optimizer(config)
    params = jnp.asarray(p0)
    state = tx.init(params)
    for k, g in enumerate(grads):
      updates, state = tx.update(jnp.asarray(g), state, params)
      params = optax.apply_updates(params, updates)
      numerics.assert_exact(np.asarray(params), want[k], f"update {k}")
  with pytest.raises(ValueError, match="schedule"):
    optim.make_schedule(_config(schedule="cosine"))


def test_decoupled_decay_would_differ():
  """Guards the ordering: decay after momentum gives a different trajectory at wd 0.2."""
  p = {"w": jnp.ones((3,))}
  g = {"w": jnp.array([1.0, -2.0, 0.5])}
  coupled = optim.make_optimizer(_config(lr=0.1, weight_decay=0.2, total_steps=100))
  decoupled = optax.chain(optax.sgd(optim.make_schedule(
      _config(lr=0.1, total_steps=100)), momentum=0.9), optax.add_decayed_weights(0.2))
  outs = []
  for tx in (coupled, decoupled):
    params, state = p, tx.init(p)
    for _ in range(3):
      u, state = tx.update(g, state, params)
      params = optax.apply_updates(params, u)
    outs.append(np.asarray(params["w"]))
  assert np.abs(outs[0] - outs[1]).max() > 1e-4


def test_total_steps_resolution():
  assert optim.total_steps_from_config(_config(total_steps=50)) == 50
  cfg = _config(total_steps=0)
  cfg.train.epochs = 3
  assert optim.total_steps_from_config(cfg, steps_per_epoch=7) == 21
  with pytest.raises(ValueError, match="steps_per_epoch"):
    optim.total_steps_from_config(cfg)
  sched = optim.make_schedule(cfg, steps_per_epoch=7)
  assert float(sched(0)) == pytest.approx(0.025 * (1 - 1 / 21) ** 0.9, rel=1e-6)


def _model_like_params():
  return {
      "backbone": {"layer0_0": {"kernel": jnp.ones((3, 3, 3, 8))},
                   "layer1_0": {"bn1": {"scale": jnp.ones((8,)), "bias": jnp.zeros((8,))}}},
      "down_conv_0": {"kernel": jnp.ones((1, 1, 8, 4))},
      "cls_3": {"kernel": jnp.ones((1, 1, 4, 2)), "bias": jnp.zeros((2,))},
  }


def test_split_merge_and_mask():
  params = _model_like_params()
  head, frozen = optim.split_params(params)
  assert set(head) == {"down_conv_0", "cls_3"} and set(frozen) == {"backbone"}
  merged = optim.merge_params(head, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  mask = optim.trainable_mask(params)
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  assert not any(jax.tree.leaves(mask["backbone"]))
  assert all(jax.tree.leaves(mask["cls_3"]))
  assert optim.count_params(head) == 32 + 8 + 2
  with pytest.raises(ValueError, match="nothing to train"):
    optim.split_params({"backbone": {}})
  with pytest.raises(ValueError, match="both trees"):
    optim.merge_params(head, {"cls_3": 1})


def test_head_only_training_step():
  """Gradients and optimiser state exist only for the head; the backbone stays bit-identical."""
  params = _model_like_params()
  head, frozen = optim.split_params(params)
  tx = optim.make_optimizer(_config(total_steps=10))
  opt_state = tx.init(head)
  n_state = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
  assert n_state == optim.count_params(head)  # momentum only for the head

  def loss_fn(h, fz):
    p = optim.merge_params(h, fz)
    return (jnp.sum(p["cls_3"]["kernel"] ** 2) + jnp.sum(p["down_conv_0"]["kernel"])
            + jnp.sum(p["backbone"]["layer0_0"]["kernel"]))

  @jax.jit
  def step(h, fz, s):
    grads = jax.grad(loss_fn)(h, fz)
    u, s = tx.update(grads, s, h)
    return optax.apply_updates(h, u), s

  before = jax.tree.map(np.array, params)  # copies: the step must not touch the backbone
  new_head, new_state = step(head, frozen, opt_state)
  assert not np.allclose(new_head["cls_3"]["kernel"], head["cls_3"]["kernel"])
  assert set(new_head) == {"down_conv_0", "cls_3"}  # the step returns no backbone
  assert jax.tree.structure(new_state) == jax.tree.structure(opt_state)  # head-only state
  merged = optim.merge_params(new_head, frozen)
  for a, b in zip(jax.tree.leaves(merged["backbone"]), jax.tree.leaves(before["backbone"])):
    np.testing.assert_array_equal(a, b)
  # The backbone did have a gradient to give (a trainable copy would have moved).
  grads = jax.grad(loss_fn, argnums=1)(head, frozen)
  assert np.abs(np.asarray(grads["backbone"]["layer0_0"]["kernel"])).min() > 0


def test_backbone_lr_scale_matches_torch_param_groups():
  """BAM's stage 1 (train_base.py, poly_learning_rate with index_split 0): the encoder's group at
  base_lr, PPM and classifier at 10 x base_lr, weight decay and momentum in every group. Ours:
  train.lr = 10 x base_lr and train.backbone_lr_scale = 0.1, in float64 to 1e-10."""
  rng = np.random.default_rng(3)
  shapes = {"backbone": {"conv": (3, 3, 2, 4)}, "ppm": {"kernel": (1, 1, 4, 2)},
            "cls_4": {"bias": (5,)}}
  params0 = jax.tree.map(lambda s: rng.normal(size=s), shapes,
                         is_leaf=lambda x: isinstance(x, tuple))
  steps, total, base_lr = 5, 7, 0.01
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape), params0) for _ in range(steps)]
  config = _config(lr=10 * base_lr, weight_decay=1e-4, total_steps=total,
                   backbone_lr_scale=0.1)
  with jax.enable_x64(True):
    tx = optim.make_optimizer(config)
    params, state, got = params0, None, []
    state = tx.init(params)
    for g in grads:
      updates, state = tx.update(g, state, params)
      params = optax.apply_updates(params, updates)
      got.append(jax.tree.map(np.asarray, params))
  names = {"backbone": [("backbone", "conv")], "ppm": [("ppm", "kernel")],
           "cls": [("cls_4", "bias")]}
  t = {path: torch.tensor(params0[path[0]][path[1]], requires_grad=True)
       for group in names.values() for path in group}
  opt = torch.optim.SGD([{"params": [t[p] for p in names[n]]} for n in names], lr=base_lr,
                        momentum=0.9, weight_decay=1e-4)
  for k, g in enumerate(grads):
    lr = base_lr * (1 - (k + 1) / total) ** 0.9
    for i, group in enumerate(opt.param_groups):
      group["lr"] = lr if i <= 0 else 10 * lr  # index <= index_split: base_lr, else 10x
    for path, p in t.items():
      p.grad = torch.tensor(g[path[0]][path[1]])
    opt.step()
    for path, p in t.items():
      numerics.assert_exact(got[k][path[0]][path[1]], p.detach().numpy(), f"{k} {path}")
