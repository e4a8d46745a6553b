"""fss_jax.models.losses against torch.nn.CrossEntropyLoss(ignore_index=255)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fss_jax.models import losses

RTOL = 1e-5
ATOL = 1e-6


def _case(shape=(2, 7, 9, 2), ignore_frac=0.3, seed=0):
  rng = np.random.default_rng(seed)
  logits = (3 * rng.standard_normal(shape)).astype(np.float32)
  labels = rng.integers(0, shape[-1], size=shape[:3]).astype(np.int32)
  labels[rng.uniform(size=shape[:3]) < ignore_frac] = 255
  return logits, labels


def _torch_ce(logits, labels):
  """Loss and d loss / d logits (NHWC) from PyTorch, in float64."""
  lt = torch.from_numpy(logits.transpose(0, 3, 1, 2).copy()).double().requires_grad_(True)
  loss = torch.nn.CrossEntropyLoss(ignore_index=255)(lt, torch.from_numpy(labels).long())
  loss.backward()
  return loss.item(), lt.grad.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("dtype", [np.int32, np.uint8])  # the pipeline's labels are uint8
def test_cross_entropy_matches_torch_value_and_grad(dtype):
  for shape in [(2, 7, 9, 2), (1, 5, 4, 5)]:
    logits, labels = _case(shape)
    assert (labels == 255).any() and (labels != 255).any()
    loss, grad = jax.value_and_grad(losses.cross_entropy_ignore)(
        jnp.asarray(logits), jnp.asarray(labels.astype(dtype)))
    loss_t, grad_t = _torch_ce(logits, labels)
    np.testing.assert_allclose(float(loss), loss_t, rtol=RTOL)
    np.testing.assert_allclose(np.asarray(grad), grad_t, rtol=RTOL, atol=ATOL)


def test_cross_entropy_hand_case():
  # Two valid pixels with logits (0, 0) -> log 2 each; one ignored pixel with a huge logit.
  logits = jnp.asarray([[[[0.0, 0.0], [0.0, 0.0], [100.0, -100.0]]]])
  labels = jnp.asarray([[[0, 1, 255]]])
  np.testing.assert_allclose(float(losses.cross_entropy_ignore(logits, labels)), np.log(2.0),
                             rtol=1e-6)


def test_cross_entropy_all_ignored_is_zero_with_zero_grad():
  logits, labels = _case()
  labels[:] = 255
  loss, grad = jax.jit(jax.value_and_grad(losses.cross_entropy_ignore))(
      jnp.asarray(logits), jnp.asarray(labels))
  assert float(loss) == 0.0
  assert np.all(np.asarray(grad) == 0.0)


def test_cross_entropy_out_of_range_labels_stay_finite():
  logits, labels = _case(shape=(1, 4, 4, 2))
  labels[0, 0, :2] = [7, -3]  # Invalid, not ignore_index: clipped, never NaN.
  loss, grad = jax.value_and_grad(losses.cross_entropy_ignore)(
      jnp.asarray(logits), jnp.asarray(labels))
  assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))


def test_cross_entropy_bf16_logits_computed_in_float32():
  logits, labels = _case()
  lb = jnp.asarray(logits).astype(jnp.bfloat16)
  loss = losses.cross_entropy_ignore(lb, jnp.asarray(labels))
  assert loss.dtype == jnp.float32
  loss_t, _ = _torch_ce(np.asarray(lb.astype(jnp.float32)), labels)
  np.testing.assert_allclose(float(loss), loss_t, rtol=RTOL)


def test_cross_entropy_rejects_shape_mismatch():
  try:
    losses.cross_entropy_ignore(jnp.zeros((1, 4, 4, 2)), jnp.zeros((1, 4, 5), jnp.int32))
  except ValueError as e:
    assert "cross_entropy_ignore" in str(e)
  else:
    raise AssertionError("shape mismatch accepted")


def test_main_aux_loss_matches_torch_composition():
  logits, labels = _case(seed=1)
  aux = [_case(seed=s)[0] for s in (2, 3, 4, 5)]
  total, main, aux_loss = jax.jit(losses.main_aux_loss, static_argnames="aux_weight")(
      jnp.asarray(logits), [jnp.asarray(a) for a in aux], jnp.asarray(labels), aux_weight=0.4)

  main_t, _ = _torch_ce(logits, labels)
  aux_t = np.mean([_torch_ce(a, labels)[0] for a in aux])
  np.testing.assert_allclose(float(main), main_t, rtol=RTOL)
  np.testing.assert_allclose(float(aux_loss), aux_t, rtol=RTOL)
  np.testing.assert_allclose(float(total), main_t + 0.4 * aux_t, rtol=RTOL)


def test_main_aux_loss_without_aux():
  logits, labels = _case()
  total, main, aux = losses.main_aux_loss(jnp.asarray(logits), [], jnp.asarray(labels))
  assert float(aux) == 0.0 and float(total) == float(main)
