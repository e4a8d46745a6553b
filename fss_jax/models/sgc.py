"""Seed placement (maskSLIC) and superpixel-guided clustering (SGC), jittable.

The reference ASGNet places seeds on the host with OpenCV and scipy, then clusters each support
shot's features in a Python loop over a gathered region of interest. Here both run on device with
fixed shapes:

* ``place_seeds`` reproduces the host procedure exactly (same seeds, same tie-breaking): nearest
  downsampling in OpenCV's convention, the bounding-box crop, ``num_sp`` from the crop area, and
  ``num_sp`` rounds of "exact Euclidean distance transform of the crop, first row-major maximum,
  zero it". The distance transform is computed as an exact *squared* integer transform with two
  separable 1-D min passes inside the bounding box, so ties compare integers, not square roots.
* ``sgc_prototypes`` runs the clustering over all h x w pixels with the region of interest as a
  weight mask, batched over (batch x shots).

Reference quirk reproduced on purpose (see ``effective_num_seeds``): the model counts seeds with
``max(count_nonzero(rows), count_nonzero(cols))`` over all padded slots, so a seed placed exactly
at (0, 0) is not counted.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from fss_jax.models import ops

# Larger than any squared distance on a feature grid (grids are at most a few hundred pixels
# wide), small enough that adding a squared column offset cannot overflow int32.
_FAR = 1 << 28


@functools.lru_cache(maxsize=64)
def _nearest_src_index(in_size: int, out_size: int) -> np.ndarray:
  """Source index of each output pixel for OpenCV ``INTER_NEAREST`` resizing.

  OpenCV computes ``floor(i * (1 / (out / in)))`` in double precision; reproducing that
  arithmetic (not the integer ``i * in // out``) matters for sizes where the two disagree.
  """
  scale = 1.0 / (out_size / in_size)
  idx = np.floor(np.arange(out_size, dtype=np.float64) * scale).astype(np.int64)
  idx = np.minimum(idx, in_size - 1).astype(np.int32)
  idx.setflags(write=False)
  return idx


def downsample_mask_nearest(masks: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """Nearest-neighbour downsampling with OpenCV's convention (source index floor(i * H / h)).

  Args:
    masks: (B, H, W) array of any dtype.
    out_hw: static (h, w).

  Returns:
    (B, h, w) array of masks' dtype.
  """
  if masks.ndim != 3:
    raise ValueError(f"downsample_mask_nearest: expected masks (B, H, W), got {masks.shape}.")
  out_h, out_w = (int(s) for s in out_hw)
  rows = _nearest_src_index(masks.shape[1], out_h)
  cols = _nearest_src_index(masks.shape[2], out_w)
  return masks[:, rows, :][:, :, cols]


def _first_last(flags):
  """Index of the first and last True of a 1-D bool array (0, -1 when none)."""
  n = flags.shape[0]
  first = jnp.argmax(flags)
  last = n - 1 - jnp.argmax(flags[::-1])
  any_ = jnp.any(flags)
  return jnp.where(any_, first, 0), jnp.where(any_, last, -1)


def _round_half_even_div(area, denom: int):
  """round(area / denom) with numpy's half-to-even rule, in exact integer arithmetic."""
  q, r = area // denom, area % denom
  up = (2 * r > denom) | ((2 * r == denom) & (q % 2 == 1))
  return q + up.astype(q.dtype)


def _squared_edt(zero, top, left):
  """Exact squared Euclidean distance to the nearest True of ``zero``, scipy's no-zero rule.

  Args:
    zero: (h, w) bool, the background pixels; all lie inside the bounding box.
    top, left: the box's top-left corner (int32 scalars).

  Returns:
    (h, w) int32. Where ``zero`` has no True at all, scipy's ``distance_transform_edt`` measures
    the distance to the point one row above the crop's top-left pixel; that is reproduced. Values
    outside the box are meaningless (callers mask them).
  """
  h, w = zero.shape
  r = jnp.arange(h, dtype=jnp.int32)
  c = jnp.arange(w, dtype=jnp.int32)
  dr2 = jnp.square(r[:, None] - r[None, :])  # (h, h') [row, background row]
  dc2 = jnp.square(c[:, None] - c[None, :])  # (w, w') [col, background col]
  # Pass 1: per column, squared distance to the nearest background pixel in that column.
  col_d2 = jnp.min(jnp.where(zero[None, :, :], dr2[:, :, None], _FAR), axis=1)  # (h, w')
  # Pass 2: combine columns; the squared Euclidean distance is separable this way exactly.
  d2 = jnp.min(col_d2[:, None, :] + dc2[None, :, :], axis=2)  # (h, w)
  no_zero = jnp.square(r[:, None] - (top - 1)) + jnp.square(c[None, :] - left)
  return jnp.where(jnp.any(zero), d2, no_zero)


def _seeds_single(fg, max_sp: int, avg_sp_area: int):
  """Seeds of one (h, w) bool mask; see ``place_seeds``."""
  h, w = fg.shape
  top, bottom = _first_last(jnp.any(fg, axis=1))
  left, right = _first_last(jnp.any(fg, axis=0))
  r = jnp.arange(h, dtype=jnp.int32)
  c = jnp.arange(w, dtype=jnp.int32)
  in_box = (((r >= top) & (r <= bottom))[:, None]) & (((c >= left) & (c <= right))[None, :])
  area = jnp.sum(fg, dtype=jnp.int32)
  num_sp = jnp.minimum(_round_half_even_div(area, avg_sp_area), max_sp)
  num_sp = jnp.where(area > 0, num_sp, 0).astype(jnp.int32)
  place = num_sp >= 2

  zero = in_box & ~fg
  seeds = []
  for i in range(max_sp):
    d2 = jnp.where(in_box, _squared_edt(zero, top, left), -1)
    flat = jnp.argmax(d2.reshape(-1))  # First maximum in row-major order, as np.nonzero.
    seed_r, seed_c = (flat // w).astype(jnp.int32), (flat % w).astype(jnp.int32)
    take = place & (i < num_sp)
    seeds.append(jnp.where(take, jnp.stack([seed_r, seed_c]), 0))
    zero = zero | ((r[:, None] == seed_r) & (c[None, :] == seed_c) & take)
  return jnp.stack(seeds).astype(jnp.int32), num_sp


def place_seeds(masks: jax.Array, max_sp: int = 5, avg_sp_area: int = 100,
                stride: int = 8) -> tuple[jax.Array, jax.Array]:
  """maskSLIC seed placement of the reference (``util/seed_init.py``), on device.

  Procedure per mask: nearest-downsample (OpenCV convention) to h = (H - 1) // stride + 1 (and
  likewise w); crop to the bounding box of the nonzero pixels; num_sp = min(round_half_even(area
  / avg_sp_area), max_sp) with area the number of ones (0 for an empty mask); if num_sp >= 2,
  num_sp times: exact Euclidean distance transform of the crop with scipy's semantics (distance
  to the nearest zero inside the crop, the crop border is not background, and with no zero at
  all the distance to the point one row above the crop's top-left pixel), take the first maximum
  in row-major order as the next seed and zero that pixel. (The reference also smooths with a
  sigma-0.1 Gaussian, an exact identity in scipy.)

  Non-square inputs use (h, w) in the natural order; the reference swaps OpenCV's dsize, which
  differs only for non-square masks.

  Args:
    masks: (B, H, W) bool / int / float at input resolution; nonzero means foreground (callers
      pass ``label == 1``).
    max_sp: number of seed slots (static).
    avg_sp_area: area per superpixel in feature-grid pixels (static).
    stride: the backbone's output stride (static).

  Returns:
    seeds: (B, max_sp, 2) int32 (row, col) on the h x w grid; unused slots are (0, 0).
    num_sp: (B,) int32, the reference's num_sp (0 or 1 means no seeds were placed).
  """
  if masks.ndim != 3:
    raise ValueError(f"place_seeds: expected masks (B, H, W), got shape {masks.shape}.")
  in_h, in_w = masks.shape[1:]
  out_hw = ((in_h - 1) // stride + 1, (in_w - 1) // stride + 1)
  fg = downsample_mask_nearest(masks, out_hw) != 0
  return jax.vmap(functools.partial(
      _seeds_single, max_sp=int(max_sp), avg_sp_area=int(avg_sp_area)))(fg)


def effective_num_seeds(seeds: jax.Array) -> jax.Array:
  """The reference model's seed count: max(count_nonzero(rows), count_nonzero(cols)).

  Counted over all padded slots, as the reference does: a seed in row 0 escapes the row count
  and one in column 0 the column count, so a seed at (0, 0) never counts, and seeds (0, 0),
  (0, 4), (4, 0) count as 1 (that shot then falls back to masked average pooling). The model
  uses the first n slots. Reproduced on purpose; it only happens for masks touching the
  top-left corner of the feature grid.

  Args:
    seeds: (B, max_sp, 2) int.

  Returns:
    (B,) int32.
  """
  nz = seeds != 0
  return jnp.maximum(jnp.sum(nz[..., 0], -1), jnp.sum(nz[..., 1], -1)).astype(jnp.int32)


def _pixel_coords(h: int, w: int) -> np.ndarray:
  """(h * w, 2) float32 (row, col) of each pixel in row-major order."""
  rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  return np.stack([rr.reshape(-1), cc.reshape(-1)], -1).astype(np.float32)


def _matmul_sq_dist(feat, shift, roi, num_near: int = 8):
  """Squared distances ||g_p - c_k||^2 in matmul form, exact where it matters.

  The expansion ||g||^2 - 2 g.c + ||c||^2 runs at GEMM speed but carries an absolute error of
  ~eps |g|^2. That is harmless except where the distance itself is tiny: a pixel (nearly)
  coinciding with a centre, as every seed pixel does in the first iteration, where
  D = sqrt(d2) turns it into an error of ~sqrt(eps) |g| in D and so in that pixel's dominant
  weight (~1e-4 relative error in the prototypes on smooth features). Recomputing the
  ``num_near`` smallest distances of each centre by differences (a gather of K * num_near rows)
  removes it; with features centred on their ROI mean the prototypes then agree with a float64
  evaluation as closely as PyTorch's float32 direct form does (~5e-7 relative).

  The centred features g = feat - shift enter only through ||g||^2 and g.c = feat.c - shift.c,
  so g itself is never materialised (one pass over the features less per call).

  Args:
    feat: (B, N, C) features.
    shift: (B, 1, C) their ROI mean.
    roi: (B, N) bool region of interest.
    num_near: how many nearest ROI pixels per centre to recompute.

  Returns:
    A function of centres c (B, K, C), centred alike, -> (B, N, K) squared distances.
  """
  hi = jax.lax.Precision.HIGHEST
  f = feat
  b, n, _ = f.shape
  num_near = min(num_near, n)
  g_sq = jnp.sum(jnp.square(f - shift), axis=-1)

  def sq_dist(c):
    k = c.shape[1]
    # g.c = f.c - shift.c: the centred features g = f - shift are never materialised.
    gc = (jnp.einsum("bnc,bkc->bnk", f, c, precision=hi)
          - jnp.einsum("bc,bkc->bk", shift[:, 0], c, precision=hi)[:, None, :])
    d2 = g_sq[:, :, None] - 2.0 * gc + jnp.sum(jnp.square(c), axis=-1)[:, None, :]
    score = jnp.where(roi[:, :, None], d2, jnp.inf)
    _, near = jax.lax.top_k(-jnp.swapaxes(score, 1, 2), num_near)  # (B, K, M)
    near_g = jnp.take_along_axis(f, near.reshape(b, k * num_near)[..., None], axis=1) - shift
    near_d2 = jnp.sum(jnp.square(near_g.reshape(b, k, num_near, -1) - c[:, :, None, :]), -1)
    return d2.at[jnp.arange(b)[:, None, None], near, jnp.arange(k)[None, :, None]].set(near_d2)

  return sq_dist


def _direct_sq_dist(g):
  """Exact squared distances by differences: c (B, K, C) -> (B, N, K)."""
  def sq_dist(c):
    return jnp.sum(jnp.square(g[:, :, None, :] - c[:, None, :, :]), axis=-1)
  return sq_dist


def _cluster(feat, roi, init_feat, init_xy, xy, n_iter: int, distance: str, roi_sum=None,
             trace: bool = False):
  """SGC iterations over all pixels with the ROI as a weight mask.

  Args:
    feat: (B, N, C) features.
    roi: (B, N) bool region of interest.
    init_feat: (B, K, C) initial centres (feature part).
    init_xy: (B, K, 2) initial centres (coordinate part).
    xy: (N, 2) pixel coordinates.
    n_iter: number of iterations (static, >= 1).
    distance: "matmul" or "direct" (see ``sgc_prototypes``).
    roi_sum: (B, C) sum of the ROI features, if the caller has it (saves a pass).
    trace: also return every iteration's state (``sgc_trace``); without it the computation is
      unchanged.

  Returns:
    (B, K, C) final centres without coordinates; zeros where the ROI is empty. With ``trace``,
    a list over iterations of (D (B, N, K): that iteration's distances to the centres it starts
    from, (B, K, C): the centres it ends with, zeros where the ROI is empty).
  """
  hi = jax.lax.Precision.HIGHEST
  roi_f = roi.astype(feat.dtype)
  count = jnp.sum(roi_f, axis=1)
  # Distances are translation invariant; centring on the ROI mean keeps the matmul form's
  # rounding relative to the features' spread rather than their magnitude.
  if roi_sum is None:
    roi_sum = jnp.einsum("bn,bnc->bc", roi_f, feat, precision=hi)
  shift = (roi_sum / jnp.maximum(count, 1.0)[:, None])[:, None, :]
  centre = init_feat - shift
  if distance == "matmul":
    sq_dist = _matmul_sq_dist(feat, shift, roi)
  else:
    sq_dist = _direct_sq_dist(feat - shift)
  centre_xy = init_xy
  steps = []
  for _ in range(n_iter):
    xy_d2 = (jnp.square(xy[None, :, None, 0] - centre_xy[:, None, :, 0]) +
             jnp.square(xy[None, :, None, 1] - centre_xy[:, None, :, 1]))
    dist = jnp.sqrt(jnp.maximum(sq_dist(centre) + xy_d2 / 100.0, 0.0))  # (B, N, K)
    # exp(-D) normalised over the ROI, shifted by the ROI minimum: identical in exact arithmetic,
    # but never 0/0 when exp(-D) underflows for every ROI pixel.
    dist_min = jnp.min(jnp.where(roi[:, :, None], dist, jnp.inf), axis=1, keepdims=True)
    dist_min = jnp.where(jnp.isfinite(dist_min), dist_min, 0.0)
    assoc = jnp.where(roi[:, :, None], jnp.exp(-(dist - dist_min)), 0.0)
    total = jnp.sum(assoc, axis=1, keepdims=True)
    assoc = assoc / jnp.where(total > 0, total, 1.0)
    # Weighted sums of the raw features, as the reference: no centred copy to keep around.
    raw = jnp.einsum("bnk,bnc->bkc", assoc, feat, precision=hi)
    centre = raw - shift
    centre_xy = jnp.einsum("bnk,nd->bkd", assoc, xy, precision=hi)
    if trace:
      steps.append((dist, raw))
  # The reference sums over an empty ROI: all-zero centres.
  nonempty = (count > 0)[:, None, None]
  if trace:
    return [(d, jnp.where(nonempty, r, 0.0)) for d, r in steps]
  return jnp.where(nonempty, raw, 0.0)


# Prefix sizes (fractions of h*w) the per-shot SGC iterations may run over (see
# cluster_roi_first in sgc_prototypes).
ROI_CAPACITIES = (1 / 8, 1 / 4, 1 / 2, 1.0)


def _roi_capacities(n: int, min_size: int) -> tuple[int, ...]:
  """Increasing distinct prefix sizes, the last one n."""
  caps = {max(min(n, int(np.ceil(n * c))), min(n, max(min_size, 8))) for c in ROI_CAPACITIES}
  return tuple(sorted(caps | {n}))


def _resolve_loop(loop) -> bool:
  return jax.default_backend() == "cpu" if loop is None else bool(loop)


def _resolve_distance(distance: str) -> str:
  if distance == "auto":
    return "matmul" if jax.default_backend() == "cpu" else "direct"
  if distance not in ("matmul", "direct"):
    raise ValueError(f"sgc_prototypes: distance must be 'auto', 'matmul' or 'direct', got "
                     f"{distance!r}.")
  return distance


def _check_args(fn: str, feat, soft_mask, seeds, n_iter) -> int:
  """Raises ValueError naming ``fn`` on shapes other than feat (B, h, w, C), soft_mask
  (B, h, w), seeds (B, max_sp, 2), or n_iter < 1; returns int(n_iter)."""
  if feat.ndim != 4 or soft_mask.shape != feat.shape[:3]:
    raise ValueError(f"{fn}: expected feat (B, h, w, C) and soft_mask (B, h, w), got "
                     f"{feat.shape} and {soft_mask.shape}.")
  if seeds.ndim != 3 or seeds.shape[0] != feat.shape[0] or seeds.shape[2] != 2:
    raise ValueError(f"{fn}: expected seeds (B, max_sp, 2), got {seeds.shape}.")
  n_iter = int(n_iter)
  if n_iter < 1:
    raise ValueError(f"{fn}: n_iter must be >= 1, got {n_iter}.")
  return n_iter


def _cluster_inputs(feat, soft_mask, seeds):
  """What the clustering starts from: int32 seeds, flat features (B, h·w, C), the ROI
  (B, h·w) = soft_mask == 1, the effective seed count n (B,), the seeds' features (B, max_sp, C)
  and the pixel coordinates (h·w, 2)."""
  b, h, w, c = feat.shape
  seeds = seeds.astype(jnp.int32)
  flat_feat = feat.reshape(b, h * w, c)
  roi = (soft_mask == 1.0).reshape(b, h * w)
  init_feat = jnp.take_along_axis(
      flat_feat, (seeds[..., 0] * w + seeds[..., 1])[..., None], axis=1)
  xy = jnp.asarray(_pixel_coords(h, w), feat.dtype)
  return seeds, flat_feat, roi, effective_num_seeds(seeds), init_feat, xy


def sgc_prototypes(feat: jax.Array, soft_mask: jax.Array, seeds: jax.Array, n_iter: int,
                   distance: str = "auto",
                   loop: bool | None = None) -> tuple[jax.Array, jax.Array]:
  """Superpixel-guided clustering prototypes of support shots (``Model.sp_center_iter``).

  Per shot: n = ``effective_num_seeds``; with n >= 2 the first n seeds start centres
  [feature at seed, seed row, seed col] and n_iter rounds of
    D_pi = sqrt(||f_p - c_i||^2 + ||xy_p - xy_i||^2 / 100),
    A_pi = exp(-D_pi) / sum_{p in ROI} exp(-D_pi),
    c_i = sum_{p in ROI} A_pi [f_p, xy_p]
  run over the ROI = pixels where ``soft_mask == 1.0`` exactly. With n <= 1 the single
  prototype is the soft-masked average sum(f m) / (sum(m) + 0.0005).

  Differences from the reference, numerically invisible where the reference is finite:
  A is computed as exp(-(D - min_ROI D)) normalised over the ROI, which is the same in exact
  arithmetic but stays finite when exp(-D) underflows for every ROI pixel (the reference gives
  0/0 = NaN there; with huge feature scales this keeps the nearest pixels' weights). An empty ROI
  gives all-zero centres, as the reference's sums over no pixels do.

  ``distance`` picks how ||f_p - c_i||^2 is evaluated: "direct" (differences, as the reference;
  best on accelerators), "matmul" (||f||^2 - 2 f.c + ||c||^2 on ROI-centred features with each
  centre's nearest pixels recomputed by differences, see ``_matmul_sq_dist``; several times
  faster on XLA-CPU, where the direct form's channel reduction is slow), or "auto" (matmul on
  CPU, direct elsewhere). Both keep prototypes within ~1e-6 relative of a float64 evaluation
  (PyTorch float32: ~3e-7); the textbook matmul form alone is off by ~1e-4 on smooth features.

  Everything here is a constant for differentiation (the reference computes it without grad).

  Args:
    feat: (B, h, w, C) support features (B = batch x shots, flattened by the caller).
    soft_mask: (B, h, w) support mask bilinearly (align_corners) resized to (h, w).
    seeds: (B, max_sp, 2) int seeds from ``place_seeds``.
    n_iter: clustering iterations (static, >= 1; the reference would return zeros for 0).
    distance: "auto", "matmul" or "direct" (static).
    loop: cluster one shot after the other (``lax.map``), each over the smallest prefix of
      ``ROI_CAPACITIES`` * h*w pixels that holds its ROI (ROI pixels gathered first), instead
      of all shots at once over all pixels; None: loop on CPU (cache-friendly, and the work
      follows the ROI's size; each prefix size is compiled, which lengthens a model's
      compilation by a few seconds), batched on accelerators. Both give the same prototypes
      up to float rounding.

  Returns:
    protos: (B, max_sp, C) prototypes; invalid slots are zeros.
    valid: (B, max_sp) bool; slots >= n are invalid, and with n <= 1 only slot 0 is valid.
  """
  n_iter = _check_args("sgc_prototypes", feat, soft_mask, seeds, n_iter)
  distance = _resolve_distance(distance)
  feat = jax.lax.stop_gradient(feat)
  soft_mask = jax.lax.stop_gradient(soft_mask)
  b, h, w, c = feat.shape
  max_sp = seeds.shape[1]
  seeds, flat_feat, roi, n, init_feat, xy = _cluster_inputs(feat, soft_mask, seeds)
  use_sgc = n >= 2
  slot = jnp.arange(max_sp)

  def cluster(args, roi_first: bool):
    f, r, i_f, i_xy, m = args
    # One pass over the features for both the ROI sum (SGC's centring) and the soft-masked sum
    # (the fallback prototype, ``ops.masked_average_pool``).
    weights = jnp.stack([r.astype(f.dtype), m.reshape(m.shape[0], -1)], axis=-1)
    sums = jnp.einsum("bnw,bnc->bwc", weights, f, precision=jax.lax.Precision.HIGHEST)
    fallback = sums[:, 1] / (jnp.sum(weights[..., 1], axis=1)[:, None] + ops.MASKED_POOL_EPS)
    if not roi_first:
      return _cluster(f, r, i_f, i_xy, xy, n_iter, distance, roi_sum=sums[:, 0]), fallback
    # One shot (leading axis 1). Its ROI pixels are gathered to the front (raster order kept)
    # and the iterations run over the smallest prefix of ROI_CAPACITIES * h*w pixels that
    # holds them: the work follows the ROI's size, as the reference's loop over ROI pixels.
    caps = _roi_capacities(h * w, max_sp)
    order = jnp.argsort(~r[0], stable=True)

    def branch(cap):
      keep = order[:cap] if cap < h * w else slice(None)
      return lambda _: _cluster(f[:, keep], r[:, keep], i_f, i_xy, xy[keep], n_iter, distance,
                                roi_sum=sums[:, 0])

    which = jnp.searchsorted(jnp.asarray(caps), jnp.sum(r), side="left")
    return jax.lax.switch(which, [branch(cap) for cap in caps], None), fallback

  args = (flat_feat, roi, init_feat, seeds.astype(feat.dtype), soft_mask)
  if _resolve_loop(loop):
    # One shot at a time: its features (h*w*C floats, 3.7 MB at 60x60x256) stay in cache over
    # the iterations instead of streaming the whole batch from memory at every pass, and
    # the iterations cover only a prefix that holds the ROI.
    centres, fallback = jax.lax.map(
        lambda a: jax.tree.map(lambda x: x[0],
                               cluster(jax.tree.map(lambda x: x[None], a), roi_first=True)),
        args)
  else:
    centres, fallback = cluster(args, roi_first=False)  # (B, K, C), (B, C)

  valid = jnp.where(use_sgc[:, None], slot[None, :] < n[:, None], slot[None, :] == 0)
  protos = jnp.where(use_sgc[:, None, None], centres,
                     jnp.where(slot[None, :, None] == 0, fallback[:, None, :], 0.0))
  protos = jnp.where(valid[..., None], protos, 0.0)
  return jax.lax.stop_gradient(protos), valid


# ------------------------------------------------------------------- explanation (not the model)


def sgc_trace(feat: jax.Array, soft_mask: jax.Array, seeds: jax.Array, n_iter: int,
              distance: str = "auto") -> tuple[jax.Array, jax.Array]:
  """The clustering of ``sgc_prototypes`` after each of its iterations, with the assignment.

  Runs the same iterations as ``sgc_prototypes`` (the batched form over all h x w pixels with
  the ROI as a weight mask, same ``distance`` choice; equal to the model's prototypes up to
  float rounding) and keeps, for every t = 1..n_iter, what ``sgc_prototypes(..., n_iter=t)``
  and ``sgc_assignment(..., n_iter=t)`` return. For display and inspection (``fss_jax/infer/
  explain.py``), not used by the model.

  Args: as ``sgc_prototypes`` (feat (B, h, w, C), soft_mask (B, h, w), seeds (B, max_sp, 2),
    n_iter >= 1 static, distance static).

  Returns:
    assignment: (n_iter, B, h, w) int32, entry t the assignment after t + 1 iterations (see
      ``sgc_assignment``).
    protos: (n_iter, B, max_sp, C), entry t the prototypes after t + 1 iterations (as
      ``sgc_prototypes``: the masked-average fallback in slot 0 for shots with fewer than 2
      seeds, zeros in invalid slots).
  """
  n_iter = _check_args("sgc_trace", feat, soft_mask, seeds, n_iter)
  distance = _resolve_distance(distance)
  feat = jax.lax.stop_gradient(jnp.asarray(feat))
  soft_mask = jax.lax.stop_gradient(jnp.asarray(soft_mask, feat.dtype))
  b, h, w, c = feat.shape
  max_sp = seeds.shape[1]
  seeds, flat_feat, roi, n, init_feat, xy = _cluster_inputs(feat, soft_mask, jnp.asarray(seeds))
  use_sgc = n >= 2
  slot = jnp.arange(max_sp)
  steps = _cluster(flat_feat, roi, init_feat, seeds.astype(feat.dtype), xy, n_iter, distance,
                   trace=True)
  fallback = ops.masked_average_pool(feat, soft_mask)  # shots with fewer than 2 seeds
  valid = jnp.where(use_sgc[:, None], slot[None, :] < n[:, None], slot[None, :] == 0)
  in_sgc = roi & use_sgc[:, None]
  assignments, protos = [], []
  for dist, centres in steps:
    # Nearest valid centre: argmin over slots < n of D (first slot on ties).
    d = jnp.where((slot[None, :] < n[:, None])[:, None, :], dist, jnp.inf)
    a = jnp.where(in_sgc, jnp.argmin(d, axis=-1), -1).astype(jnp.int32)
    assignments.append(a.reshape(b, h, w))
    p = jnp.where(use_sgc[:, None, None], centres,
                  jnp.where(slot[None, :, None] == 0, fallback[:, None, :], 0.0))
    protos.append(jnp.where(valid[..., None], p, 0.0))
  return jnp.stack(assignments), jnp.stack(protos)


def sgc_assignment(feat: jax.Array, soft_mask: jax.Array, seeds: jax.Array, n_iter: int,
                   distance: str = "auto") -> jax.Array:
  """Which SGC prototype slot each support pixel belongs to, as the clustering sees it.

  The clustering never makes a hard assignment: its last iteration computes, for every ROI
  pixel p and valid centre i, D_pi = sqrt(||f_p - c_i||^2 + ||xy_p - xy_i||^2 / 100) to the
  centres c_i that iteration starts from (after n_iter - 1 updates; the seeds' features for
  n_iter = 1), and the returned prototypes are the averages sum_p A_pi f_p with A_pi =
  exp(-D_pi) normalised over the ROI pixels. The assignment of p is the slot i of the nearest
  valid centre in that last iteration, argmin_i D_pi (first slot on ties) = argmax_i exp(-D_pi),
  the association *before* its normalisation over pixels (the normalised A_pi is per centre, so
  its argmax over i can differ). Equivalently: the prototype whose last averaging gives p the
  largest weight relative to the other centres.

  Computed exactly as the clustering (same distances, same ``distance`` form; ``sgc_trace``),
  over all pixels at once: equal to the model's clustering up to float rounding, so a pixel
  almost equidistant from two centres can go either way in float32.

  Args: as ``sgc_prototypes``.

  Returns:
    (B, h, w) int32 slot index in [0, max_sp) (the shot's slot; ASGNet's global prototype index
    is shot * max_sp + slot); -1 outside the ROI (``soft_mask != 1.0``) and everywhere for a shot
    with fewer than 2 effective seeds (``effective_num_seeds``), whose single prototype is the
    soft-masked average and not a clustering.
  """
  return sgc_trace(feat, soft_mask, seeds, n_iter, distance)[0][-1]
