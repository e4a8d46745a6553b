"""Tests for fss_jax.train.checkpoint (Orbax manager wrapper, Grain iterator state, NaN guard)."""
import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fss_jax.train import checkpoint as ckpt


def _state(offset=0.0):
  params = {"head": {"kernel": jnp.arange(6.0).reshape(2, 3) + offset, "bias": jnp.ones(3)}}
  tx = optax.sgd(0.1, momentum=0.9)
  return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(offset)}


def _iterator():
  return iter(grain.MapDataset.range(50).shuffle(seed=7).batch(2).to_iter_dataset())


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_state_iterator_metadata(tmp_path):
  state = _state(3.0)
  it = _iterator()
  for _ in range(3):
    next(it)
  with ckpt.CheckpointManager(str(tmp_path), max_to_keep=2) as mgr:
    assert mgr.latest_step() is None
    assert mgr.save(3, state, it, metrics={"loss": np.float32(0.25)},
                    extra_metadata={"epoch": 1})
    expected_next = [next(it) for _ in range(4)]  # moves on while the save may be in flight
    mgr.wait()
    fresh = _iterator()
    restored = mgr.restore(state_template=_state(), data_iterator=fresh)
  assert restored.step == 3
  _assert_trees_equal(restored.state, state)
  assert isinstance(restored.state["opt_state"][0], optax.TraceState)
  assert restored.metadata["metrics"] == {"loss": 0.25} and restored.metadata["epoch"] == 1
  for e in expected_next:
    np.testing.assert_array_equal(next(fresh), e)
  # The iterator state is a per-process JSON file written by Grain's handler.
  files = os.listdir(tmp_path / "checkpoints" / "3" / "data_iter")
  assert "process_0-of-1.json" in files


def test_max_to_keep_and_restore_latest_with_new_instance(tmp_path):
  mgr = ckpt.CheckpointManager(str(tmp_path), max_to_keep=2, async_save=False)
  for step in (10, 20, 30, 40):
    mgr.save(step, _state(step))
  mgr.wait()
  assert mgr.all_steps() == [30, 40]
  assert mgr.best_step() is None
  mgr.close()
  again = ckpt.CheckpointManager(str(tmp_path), max_to_keep=2)
  assert again.latest_step() == 40
  restored = again.restore(state_template=_state())
  _assert_trees_equal(restored.state, _state(40))
  # Without a template the saved structure comes back as arrays.
  raw = again.restore(30)
  np.testing.assert_array_equal(raw.state["params"]["head"]["kernel"],
                                np.asarray(_state(30)["params"]["head"]["kernel"]))
  with pytest.raises(FileNotFoundError, match="step 10"):
    again.restore(10)
  with pytest.raises(FileNotFoundError, match="no data-iterator state"):
    again.restore(40, data_iterator=_iterator())
  again.close()


@pytest.mark.parametrize("mode,values,best", [
    ("max", [0.1, 0.9, 0.2, float("nan"), 0.4, 0.5], 2),
    ("min", [0.5, 0.05, 0.4, 0.3, float("inf"), 0.2], 2),
])
def test_keeps_last_n_plus_best(tmp_path, mode, values, best):
  mgr = ckpt.CheckpointManager(str(tmp_path), max_to_keep=2, keep_best=True,
                               best_metric="val/miou", best_mode=mode)
  for step, v in enumerate(values, start=1):
    mgr.save(step, _state(step), metrics={"val/miou": v, "loss": 1.0})
  mgr.save(7, _state(7))  # no metrics: kept as one of the last N, never "best"
  mgr.wait()
  assert mgr.all_steps() == [best, 6, 7]
  assert mgr.best_step() == best
  assert mgr.read_metadata(best)["metrics"]["val/miou"] == values[best - 1]
  _assert_trees_equal(mgr.restore(best, _state()).state, _state(best))
  with pytest.raises(KeyError, match="best_metric"):
    mgr.save(8, _state(8), metrics={"loss": 1.0})
  mgr.close()
  reopened = ckpt.CheckpointManager(str(tmp_path), max_to_keep=2, keep_best=True,
                                    best_mode=mode)
  assert reopened.best_step() == best
  reopened.close()


class _CustomIterator:
  """Not a Grain iterator: state is a JSON dict."""

  def __init__(self):
    self.pos = 0

  def __next__(self):
    self.pos += 1
    return self.pos

  def get_state(self):
    return {"pos": self.pos}

  def set_state(self, state):
    self.pos = state["pos"]


def test_custom_iterator_state(tmp_path):
  it = _CustomIterator()
  for _ in range(5):
    next(it)
  with ckpt.CheckpointManager(str(tmp_path)) as mgr:
    mgr.save(1, _state(), it)
    mgr.wait()
    fresh = _CustomIterator()
    mgr.restore(1, _state(), fresh)
  assert fresh.pos == 5
  data = json.loads((tmp_path / "checkpoints" / "1" / "data_iter" /
                     "process_0-of-1.json").read_text())
  assert data == {"pos": 5}
  with pytest.raises(TypeError, match="get_state"):
    ckpt._iterator_item(object())  # pylint: disable=protected-access


def test_check_finite():
  assert ckpt.check_finite(jnp.float32(1.5), 3) == 1.5
  with pytest.raises(ckpt.NonFiniteLossError, match="step 12"):
    ckpt.check_finite(jnp.float32(jnp.nan), 12)
  with pytest.raises(ckpt.NonFiniteLossError, match=r"grad_norm \(inf\)"):
    ckpt.check_finite(np.inf, 1, name="grad_norm")


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep"):
    ckpt.CheckpointManager(str(tmp_path), max_to_keep=0)
  with pytest.raises(ValueError, match="best_mode"):
    ckpt.CheckpointManager(str(tmp_path), best_mode="up")
  with ckpt.CheckpointManager(str(tmp_path)) as mgr:
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
      mgr.restore()
    with pytest.raises(TypeError, match="not a scalar"):
      mgr.save(1, _state(), metrics={"x": [1, 2]})
