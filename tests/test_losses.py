"""fss_jax.models.losses against torch.nn.CrossEntropyLoss(ignore_index=255): float64 on both
sides to numerics.EXACT, and our float32 against PyTorch float64 within numerics' multiple of
PyTorch float32's own error."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fss_jax.models import losses
import numerics

# bfloat16 logits: the loss is computed in float32 from the rounded logits, so it equals the
# float32 loss of those logits up to float32 rounding of a mean of ~100 terms (a few ulps).
BF16_RTOL = 1e-6


def _case(shape=(2, 7, 9, 2), ignore_frac=0.3, seed=0):
  rng = np.random.default_rng(seed)
  logits = (3 * rng.standard_normal(shape)).astype(np.float32)
  labels = rng.integers(0, shape[-1], size=shape[:3]).astype(np.int32)
  labels[rng.uniform(size=shape[:3]) < ignore_frac] = 255
  return logits, labels


def _torch_ce(logits, labels, dtype=torch.float64):
  """Loss and d loss / d logits (NHWC) from PyTorch, in float64 (or ``dtype``)."""
  lt = torch.from_numpy(logits.transpose(0, 3, 1, 2).copy()).to(dtype).requires_grad_(True)
  loss = torch.nn.CrossEntropyLoss(ignore_index=255)(lt, torch.from_numpy(labels).long())
  loss.backward()
  return loss.item(), lt.grad.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("dtype", [np.int32, np.uint8])  # the pipeline's labels are uint8
def test_cross_entropy_matches_torch_value_and_grad(dtype):
  for shape in [(2, 7, 9, 2), (1, 5, 4, 5)]:
    logits, labels = _case(shape)
    assert (labels == 255).any() and (labels != 255).any()
    ours = lambda x: jax.value_and_grad(losses.cross_entropy_ignore)(
        x, jnp.asarray(labels.astype(dtype)))
    want64, want32 = _torch_ce(logits, labels), _torch_ce(logits, labels, torch.float32)
    with jax.enable_x64(True):
      for name, got, want in zip(("loss", "grad"), ours(jnp.asarray(logits, jnp.float64)),
                                 want64):
        numerics.assert_exact(got, want, name)
    for name, got, w64, w32 in zip(("loss", "grad"), ours(jnp.asarray(logits)), want64,
                                   want32):
      numerics.assert_parity(got, w64, w32, name)


def test_cross_entropy_hand_case():
  # Two valid pixels with logits (0, 0) -> log 2 each; one ignored pixel with a huge logit.
  logits = jnp.asarray([[[[0.0, 0.0], [0.0, 0.0], [100.0, -100.0]]]])
  labels = jnp.asarray([[[0, 1, 255]]])
  # log 2 rounded to float32 (relative 3e-8) plus the mean's rounding: 1e-6 is ~8 ulps.
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
  np.testing.assert_allclose(float(loss), loss_t, rtol=BF16_RTOL)


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
  ours = lambda dtype: jax.jit(losses.main_aux_loss, static_argnames="aux_weight")(
      jnp.asarray(logits, dtype), [jnp.asarray(a, dtype) for a in aux], jnp.asarray(labels),
      aux_weight=0.4)

  def want(dtype):
    main_t = _torch_ce(logits, labels, dtype)[0]
    aux_t = np.mean([_torch_ce(a, labels, dtype)[0] for a in aux])
    return main_t + 0.4 * aux_t, main_t, aux_t
  want64, want32 = want(torch.float64), want(torch.float32)
  names = ("total", "main", "aux")
  with jax.enable_x64(True):
    for name, got, w64 in zip(names, ours(jnp.float64), want64):
      numerics.assert_exact(got, w64, name)
  for name, got, w64, w32 in zip(names, ours(jnp.float32), want64, want32):
    numerics.assert_parity(got, w64, w32, name)


def test_main_aux_loss_without_aux():
  logits, labels = _case()
  total, main, aux = losses.main_aux_loss(jnp.asarray(logits), [], jnp.asarray(labels))
  assert float(aux) == 0.0 and float(total) == float(main)
