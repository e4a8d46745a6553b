"""Segmentation losses (NHWC logits, integer label maps)."""
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

IGNORE_INDEX = 255


def cross_entropy_ignore(logits: jax.Array, labels: jax.Array,
                         ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """Pixel-wise softmax cross-entropy averaged over non-ignored pixels.

  Matches ``nn.CrossEntropyLoss(ignore_index=ignore_index)`` (reduction 'mean') except that a
  batch with every pixel ignored gives 0.0 with a zero gradient instead of PyTorch's NaN.

  Only `ignore_index` is skipped. Every other label must lie in [0, C); PyTorch raises on an
  out-of-range label, but a jitted function cannot, so such labels are clipped into [0, C) (no
  out-of-bounds gather, no NaN) and their loss is meaningless.

  Args:
    logits: (B, H, W, C) floating; computed in at least float32.
    labels: (B, H, W) integer.
    ignore_index: label value excluded from the loss and the pixel count.

  Returns:
    Scalar float32 loss.
  """
  if logits.ndim != 4 or labels.shape != logits.shape[:3]:
    raise ValueError(
        f"cross_entropy_ignore: expected logits (B, H, W, C) and labels (B, H, W), got "
        f"{logits.shape} and {labels.shape}.")
  num_classes = logits.shape[-1]
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  valid = labels != ignore_index
  safe_labels = jnp.clip(jnp.where(valid, labels, 0), 0, num_classes - 1).astype(jnp.int32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  valid = valid.astype(log_probs.dtype)
  # max(count, 1): the numerator is already 0 when nothing is valid, so the loss is 0, not 0/0.
  return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def main_aux_loss(logits: jax.Array, aux_logits: Sequence[jax.Array], labels: jax.Array,
                  aux_weight: float = 1.0, ignore_index: int = IGNORE_INDEX):
  """PFENet's training loss (also ASGNet's): main CE + aux_weight · mean of the auxiliary CEs.

  Args:
    logits: (B, H, W, C) main logits at label resolution.
    aux_logits: list of (B, H, W, C) auxiliary (FEM) logits at label resolution (may be empty).
    labels: (B, H, W) integer labels with `ignore_index` for ignored pixels.
    aux_weight: weight of the mean auxiliary loss (1.0 in the references).
    ignore_index: label value excluded from every loss.

  Returns:
    (total, main, aux) scalars; aux is the unweighted mean (0.0 when aux_logits is empty).
  """
  main = cross_entropy_ignore(logits, labels, ignore_index)
  if aux_logits:
    aux = jnp.mean(jnp.stack(
        [cross_entropy_ignore(a, labels, ignore_index) for a in aux_logits]))
  else:
    aux = jnp.zeros((), main.dtype)
  return main + aux_weight * aux, main, aux


def fem_model_loss(out: Mapping[str, Any], batch: Mapping[str, jax.Array],
                   aux_weight: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """``main_aux_loss`` of a model output (``logits``, ``aux_logits``) against
  ``batch['query_label']``, as models' ``loss`` methods return it: (total, named terms)."""
  total, main, aux = main_aux_loss(out["logits"], out["aux_logits"], batch["query_label"],
                                   aux_weight)
  return total, {"main_loss": main, "aux_loss": aux}
