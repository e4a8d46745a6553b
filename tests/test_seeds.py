"""place_seeds against a numpy/OpenCV/scipy transcription of the reference's seed placement."""
import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from fss_jax.models import sgc


def _oracle_seeds(mask, max_sp=5, avg_sp_area=100, stride=8):
  """The reference procedure (util/seed_init.py) on one mask, on the host."""
  h = (mask.shape[0] - 1) // stride + 1
  w = (mask.shape[1] - 1) // stride + 1
  down = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST)
  seeds = np.zeros((max_sp, 2), np.int64)
  nz = np.nonzero(down)
  if len(nz[0]) == 0:
    return seeds, 0
  top, left = nz[0].min(), nz[1].min()
  crop = down[top:nz[0].max() + 1, left:nz[1].max() + 1].copy()
  area = (crop == 1).sum()
  num_sp = int(min(np.round(area / avg_sp_area), max_sp))
  if num_sp not in (0, 1):
    for i in range(num_sp):
      dist = ndimage.distance_transform_edt(crop)
      dist = ndimage.gaussian_filter(dist, sigma=0.1)
      rows, cols = np.nonzero(dist == np.max(dist))
      seeds[i] = rows[0] + top, cols[0] + left
      crop[rows[0], cols[0]] = 0
  return seeds, num_sp


def _oracle_count(seeds):
  return max(np.count_nonzero(seeds[:, 0]), np.count_nonzero(seeds[:, 1]))


def _random_mask(rng, size):
  """Blobs, filled rectangles, lines, single pixels, empty, corner shapes and noise."""
  m = np.zeros((size, size), np.uint8)
  kind = rng.integers(0, 8)
  if kind == 0:  # Unions of ellipses, often cut by the borders.
    for _ in range(rng.integers(1, 4)):
      centre = tuple(int(x) for x in rng.integers(0, size, 2))
      axes = tuple(int(x) for x in rng.integers(1, size // 2, 2))
      cv2.ellipse(m, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
  elif kind == 1:  # A rectangle fills its bounding box: the crop has no zero.
    r0, c0 = rng.integers(0, size, 2)
    m[r0:rng.integers(r0, size) + 1, c0:rng.integers(c0, size) + 1] = 1
  elif kind == 2:  # Lines of any thickness.
    p0 = tuple(int(x) for x in rng.integers(0, size, 2))
    p1 = tuple(int(x) for x in rng.integers(0, size, 2))
    cv2.line(m, p0, p1, 1, int(rng.integers(1, 12)))
  elif kind == 3:  # A single pixel.
    m[rng.integers(0, size), rng.integers(0, size)] = 1
  elif kind == 4:  # Empty.
    pass
  elif kind == 5:  # Touching the top-left corner (bbox at (0, 0)), sometimes with a hole.
    r1, c1 = rng.integers(size // 4, size + 1, 2)
    m[:r1, :c1] = 1
    if rng.random() < 0.5:
      m[rng.integers(0, r1), rng.integers(0, c1)] = 0
  elif kind == 6:  # Rings: zeros inside the crop, ties between symmetric maxima.
    centre = (size // 2, size // 2)
    cv2.circle(m, centre, int(rng.integers(size // 6, size // 2)), 1, -1)
    cv2.circle(m, centre, int(rng.integers(1, size // 6)), 0, -1)
  else:  # Salt noise of any density.
    m = (rng.random((size, size)) < rng.uniform(0.05, 0.95)).astype(np.uint8)
  return m


def _check_batch(masks, avg_sp_area):
  place = jax.jit(lambda m: sgc.place_seeds(m, avg_sp_area=avg_sp_area))
  seeds, num_sp = place(jnp.asarray(masks))
  count = np.asarray(jax.jit(sgc.effective_num_seeds)(seeds))
  seeds, num_sp = np.asarray(seeds), np.asarray(num_sp)
  assert seeds.dtype == np.int32 and seeds.shape == (len(masks), 5, 2)
  for i, mask in enumerate(masks):
    want, want_n = _oracle_seeds(mask, avg_sp_area=avg_sp_area)
    np.testing.assert_array_equal(seeds[i], want, err_msg=f"mask {i}")
    assert num_sp[i] == want_n, i
    assert count[i] == _oracle_count(want), i
  return num_sp


# Small avg_sp_area on small grids places up to 5 seeds in most masks (area 100 on a 9x9 grid
# never places more than one).
@pytest.mark.parametrize("size,avg_sp_area,seed", [
    (65, 5, 0), (97, 7, 1), (97, 100, 2), (65, 3, 3)])
def test_random_masks_match_reference(size, avg_sp_area, seed):
  rng = np.random.default_rng(seed)
  masks = np.stack([_random_mask(rng, size) for _ in range(512)])
  num_sp = _check_batch(masks, avg_sp_area)
  if avg_sp_area < 10:  # The batch must exercise the seeding loop, not only the fallbacks.
    assert np.sum(num_sp >= 2) > 150 and np.sum(num_sp == 5) > 50


def test_full_resolution_batch():
  rng = np.random.default_rng(7)
  masks = np.stack([_random_mask(rng, 473) for _ in range(12)])
  masks[0] = 0
  masks[0, 40:400, 100:450] = 1  # Filled rectangle: area 45 * 44 on the 60 x 60 grid.
  masks[1] = 0
  masks[1, 200:473, 0:473] = 1  # Touches three borders.
  num_sp = _check_batch(masks, 100)
  assert num_sp[0] == 5 and num_sp[1] == 5


def _embed(down, size, stride=8):
  """An input mask whose OpenCV nearest downsampling is exactly `down`."""
  h = (size - 1) // stride + 1
  assert down.shape == (h, h)
  src = np.asarray(sgc._nearest_src_index(size, h))
  mask = np.zeros((size, size), np.uint8)
  mask[np.ix_(src, src)] = down
  return mask


def test_no_zero_crop_follows_scipy():
  # With no zero in the crop scipy measures distances to the point one row above the crop's
  # top-left pixel, so the first seed is the bottom-right pixel.
  dist = ndimage.distance_transform_edt(np.ones((3, 4)))
  np.testing.assert_allclose(dist[-1, -1], np.hypot(3, 3))
  down = np.zeros((9, 9), np.uint8)
  down[2:6, 3:8] = 1  # 20 pixels.
  seeds, num_sp = sgc.place_seeds(jnp.asarray(_embed(down, 65))[None], avg_sp_area=5)
  want, want_n = _oracle_seeds(_embed(down, 65), avg_sp_area=5)
  assert want_n == 4 and tuple(want[0]) == (5, 7)
  np.testing.assert_array_equal(np.asarray(seeds[0]), want)


def test_seed_at_origin_is_not_counted():
  # A crop anchored at (0, 0) whose only zero is its bottom-right pixel: the seeds are (0, 0),
  # (0, 4) and (4, 0), and the reference's count_nonzero rule counts one nonzero row and one
  # nonzero column, so the model uses the masked-average fallback for this shot.
  down = np.zeros((9, 9), np.uint8)
  down[:5, :5] = 1
  down[4, 4] = 0
  mask = _embed(down, 65)
  seeds, num_sp = sgc.place_seeds(jnp.asarray(mask)[None], avg_sp_area=8)
  want, want_n = _oracle_seeds(mask, avg_sp_area=8)
  assert want_n == 3 and tuple(want[0]) == (0, 0)
  np.testing.assert_array_equal(np.asarray(seeds[0]), want)
  assert int(num_sp[0]) == 3
  assert int(sgc.effective_num_seeds(seeds)[0]) == _oracle_count(want) == 1


def test_effective_num_seeds_rule():
  seeds = jnp.asarray([
      [[3, 4], [5, 6], [0, 0], [0, 0], [0, 0]],
      [[0, 4], [5, 0], [7, 7], [0, 0], [0, 0]],  # 2 nonzero rows, 2 nonzero cols.
      [[0, 0], [0, 0], [0, 0], [0, 0], [0, 0]],
      [[0, 3], [0, 5], [1, 0], [0, 0], [0, 0]],
  ])
  np.testing.assert_array_equal(np.asarray(sgc.effective_num_seeds(seeds)), [2, 2, 0, 2])


@pytest.mark.parametrize("size,out", [(473, 60), (172, 22), (65, 9), (100, 13), (9, 20)])
def test_downsample_matches_opencv(size, out):
  rng = np.random.default_rng(size)
  x = rng.random((2, size, size + 3)).astype(np.float32)
  got = np.asarray(sgc.downsample_mask_nearest(jnp.asarray(x), (out, out + 1)))
  for i in range(2):
    want = cv2.resize(x[i], (out + 1, out), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(got[i], want)


def test_non_square_uses_natural_order():
  mask = np.zeros((97, 65), np.uint8)
  cv2.ellipse(mask, (30, 50), (25, 40), 0.0, 0, 360, 1, -1)
  seeds, num_sp = sgc.place_seeds(jnp.asarray(mask)[None], avg_sp_area=5)
  want, want_n = _oracle_seeds(mask, avg_sp_area=5)
  assert want_n == 5
  np.testing.assert_array_equal(np.asarray(seeds[0]), want)


def test_bad_shape_is_reported():
  with pytest.raises(ValueError, match="place_seeds"):
    sgc.place_seeds(jnp.zeros((65, 65)))
