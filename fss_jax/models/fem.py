"""PFENet's Feature Enrichment Module (FEM), as used by PFENet and ASGNet.

The layers are created in the *calling* module's scope (these are plain functions called from a
compact ``__call__``), so parameter names are flat and mirror the PyTorch module paths with '.'
replaced by '_': ``corr_conv_0_0`` (PFENet: ``init_merge_0_0``), ``alpha_conv_0_0``, ``beta_conv_0_0``, ``beta_conv_0_2``,
``inner_cls_0_0``, ``inner_cls_0_3``, ``res1_0``, ``res2_0``, ``res2_2``, ``cls_0``, ``cls_3``.
That keeps the PyTorch key map a one-line rule (``fss_jax.convert.keymap.dotted``).
"""
from typing import Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from fss_jax.models import ops

Bin = Union[int, float]


def conv(features: int, kernel: int, name: str, bias: bool = False) -> nn.Conv:
  """A PyTorch-style conv: 'same' size via explicit padding (k // 2), no bias by default."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), use_bias=bias,
                 name=name)


def down_conv(x: jax.Array, name: str, features: int, deterministic: bool) -> jax.Array:
  """PFENet's (and BAM/MSANet's) ``down_query`` / ``down_supp``: (N,h,w,C) → (N,h,w,features),
  ``{name}`` 1x1 conv (no bias) → ReLU → Dropout2d(0.5), in the caller's scope."""
  x = nn.relu(conv(features, 1, name)(x))
  return ops.Dropout2d(0.5)(x, deterministic=deterministic)


def bin_size(b: Bin, feat_size: int) -> int:
  """Absolute bin size: ints > 1 are absolute (PASCAL 60/30/15/8), floats <= 1 relative (COCO,
  truncated as the references do: int(feat_size · b))."""
  if isinstance(b, float) and b <= 1.0:
    size = int(feat_size * b)
    if size < 1:
      raise ValueError(f"bin {b!r} of a {feat_size}x{feat_size} feature map is empty "
                       f"(int({feat_size} * {b}) = 0): use larger inputs or other bins")
    return size
  if b < 1:
    raise ValueError(f"bin {b!r}: use an int > 1 (absolute) or a float <= 1 (relative)")
  return int(b)


def classifier(x: jax.Array, prefix: str, num_classes: int, deterministic: bool) -> jax.Array:
  """``{prefix}_0`` 3x3 conv → ReLU → Dropout2d(0.1) → ``{prefix}_3`` 1x1 conv with bias.

  x: (B,h,w,C) → (B,h,w,num_classes).
  """
  c = x.shape[-1]
  x = nn.relu(conv(c, 3, f"{prefix}_0")(x))
  x = ops.Dropout2d(0.1)(x, deterministic=deterministic)
  return conv(num_classes, 1, f"{prefix}_3", bias=True)(x)


def fem(feat: jax.Array, maps: jax.Array, bins: Sequence[Bin], *, reduce_dim: int,
        num_classes: int, deterministic: bool, vector: Optional[jax.Array] = None,
        merge: str = "corr_conv"):
  """Multi-scale feature enrichment and the final classifier.

  For each bin the merge conv ``{merge}_{i}_0`` (1x1, no bias, ReLU) sees
  concat[adaptive-avg-pooled ``feat``, ``vector`` tiled, bilinearly resized ``maps``]:
  ASGNet: feat = guide feature (query ‖ allocated prototype), maps = prob map, 'corr_conv';
  PFENet: feat = query feature, vector = prototype, maps = prior, 'init_merge'.

  Args:
    feat: (B,h,w,C) pooled to each bin (AdaptiveAvgPool2d).
    maps: (B,h,w,M) probability / prior maps, resized to each bin (bilinear, align_corners).
    bins: pyramid bin sizes, in order (e.g. (60, 30, 15, 8) or (1.0, 0.5, 0.25, 0.125)).
    vector: optional (B,D), tiled to each bin (a prototype: never pooled).
    merge: name of the per-bin merge convs.
  Returns:
    (logits (B,h,w,num_classes), aux_logits: list of (B,b,b,num_classes), one per bin).
  """
  h, w = feat.shape[1:3]
  pyramid, aux = [], []
  for i, b in enumerate(bins):
    b = bin_size(b, h)
    parts = [ops.adaptive_avg_pool(feat, (b, b))]
    if vector is not None:
      parts.append(jnp.broadcast_to(vector[:, None, None, :], (vector.shape[0], b, b,
                                                               vector.shape[-1])))
    parts.append(ops.resize_bilinear_ac(maps, (b, b)))
    x = nn.relu(conv(reduce_dim, 1, f"{merge}_{i}_0")(jnp.concatenate(parts, axis=-1)))
    if i >= 1:
      prev = ops.resize_bilinear_ac(pyramid[i - 1], (b, b))
      x = nn.relu(conv(reduce_dim, 1, f"alpha_conv_{i - 1}_0")(
          jnp.concatenate([x, prev], axis=-1))) + x
    y = nn.relu(conv(reduce_dim, 3, f"beta_conv_{i}_0")(x))
    x = nn.relu(conv(reduce_dim, 3, f"beta_conv_{i}_2")(y)) + x
    aux.append(classifier(x, f"inner_cls_{i}", num_classes, deterministic))
    pyramid.append(ops.resize_bilinear_ac(x, (h, w)))

  x = nn.relu(conv(reduce_dim, 1, "res1_0")(jnp.concatenate(pyramid, axis=-1)))
  y = nn.relu(conv(reduce_dim, 3, "res2_0")(x))
  x = nn.relu(conv(reduce_dim, 3, "res2_2")(y)) + x
  return classifier(x, "cls", num_classes, deterministic), aux
