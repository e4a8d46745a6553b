"""Weak supports (fss_jax/data/weak.py): PANet's box and scribble rules on hand-built maps, the
DilateScribble filter, and the scribble generator's invariants."""
import cv2
import numpy as np
import pytest

from fss_jax.data import schema
from fss_jax.data import synthetic
from fss_jax.data import transforms
from fss_jax.data import weak

N = weak.NEITHER


def test_neither_is_the_contracts_value():
  assert weak.NEITHER == 254
  if hasattr(transforms, "NEITHER"):
    assert transforms.NEITHER == weak.NEITHER


# ----------------------------------------------------------------------------- box rule


def _official_bbox_masks(own, instance):
  """(fg, bg) as util/utils.py get_bbox computes them, written as plain loops."""
  h, w = own.shape
  inst = [[int(instance[y, x]) if own[y, x] else 0 for x in range(w)] for y in range(h)]
  area = {}
  for y in range(h):
    for x in range(w):
      if inst[y][x]:
        area[inst[y][x]] = area.get(inst[y][x], 0) + 1
  best = max(sorted(area), key=lambda i: area[i])  # first maximum in id order

  def box(i):
    pts = [(y, x) for y in range(h) for x in range(w) if inst[y][x] == i]
    return (min(p[0] for p in pts), max(p[0] for p in pts),
            min(p[1] for p in pts), max(p[1] for p in pts))

  fg = np.zeros((h, w), bool)
  bg = np.ones((h, w), bool)
  y0, y1, x0, x1 = box(best)
  for y in range(y0, y1 + 1):
    for x in range(x0, x1 + 1):
      fg[y, x] = True
  for i in area:
    y0, y1, x0, x1 = box(i)
    for y in range(y0, y1 + 1):
      for x in range(x0, x1 + 1):
        bg[y, x] = False
  return fg, bg


def _scene_a():
  """Own class 3 (instances 1, 2, 3), class 5 (instance 4), void 255, an own pixel without an
  instance at (3, 4)."""
  instance = np.array([
      [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
      [0, 1, 1, 0, 0, 0, 0, 0, 4, 4],
      [0, 1, 1, 2, 0, 0, 0, 0, 4, 4],
      [0, 0, 1, 2, 0, 0, 0, 0, 0, 0],
      [0, 2, 0, 2, 2, 2, 0, 0, 0, 0],
      [0, 0, 0, 0, 2, 2, 0, 0, 255, 0],
      [3, 0, 0, 0, 0, 0, 0, 0, 0, 0],
      [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], np.uint8)
  label = np.zeros_like(instance)
  label[np.isin(instance, [1, 2, 3])] = 3
  label[instance == 4] = 5
  label[instance == 255] = 255
  label[0, 0] = 255
  label[3, 4] = 3
  return label, instance


def test_box_rule_hand_built():
  label, instance = _scene_a()
  # Instance 2 (8 pixels) beats 1 (5) and 3 (1): its box rows 2-5, cols 1-5 is fg; instance 1's
  # box (rows 1-3, cols 1-2) outside it and instance 3's (6, 0) are neither; the rest,
  # class 5, void and the own pixel without an instance included, is background.
  want = np.array([
      [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
      [0, N, N, 0, 0, 0, 0, 0, 0, 0],
      [0, 1, 1, 1, 1, 1, 0, 0, 0, 0],
      [0, 1, 1, 1, 1, 1, 0, 0, 0, 0],
      [0, 1, 1, 1, 1, 1, 0, 0, 0, 0],
      [0, 1, 1, 1, 1, 1, 0, 0, 0, 0],
      [N, 0, 0, 0, 0, 0, 0, 0, 0, 0],
      [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], np.uint8)
  out = weak.box_support_label(instance, label == 3)
  assert out.dtype == np.uint8 and out.shape == label.shape
  np.testing.assert_array_equal(out, want)
  # Class 5: one instance, its box; nothing is neither.
  want5 = np.zeros_like(want)
  want5[1:3, 8:10] = 1
  np.testing.assert_array_equal(weak.box_support_label(instance, label == 5), want5)
  # The input is not modified (the official zeroes instance ids in place).
  np.testing.assert_array_equal(instance, _scene_a()[1])


def test_box_rule_ties_255_and_partial_instances():
  # Two own instances of 2 pixels: the smaller id wins (first maximum).
  instance = np.array([[0, 2, 2, 0],
                       [0, 0, 0, 0],
                       [1, 0, 0, 1]], np.uint8)
  np.testing.assert_array_equal(
      weak.box_support_label(instance, instance > 0),
      np.array([[0, N, N, 0],
                [0, 0, 0, 0],
                [1, 1, 1, 1]], np.uint8))
  # An instance id 255 inside the own mask is an instance like any other (official bincount),
  # here the largest; instance 1 only counts inside the own mask (its pixel (0, 3) does not).
  instance = np.array([[255, 255, 0, 1],
                       [255, 0, 0, 1],
                       [0, 0, 0, 1]], np.uint8)
  own = np.array([[1, 1, 0, 0],
                  [1, 0, 0, 1],
                  [0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(
      weak.box_support_label(instance, own),
      np.array([[1, 1, 0, 0],
                [1, 1, 0, N],
                [0, 0, 0, N]], np.uint8))


def test_box_rule_fallbacks():
  own = np.zeros((4, 5), bool)
  own[1, 1] = own[2, 3] = True
  box_of_own = np.zeros((4, 5), np.uint8)
  box_of_own[1:3, 1:4] = 1
  # No instance inside the own mask (the official would fail): the own mask's tight box.
  instance = np.zeros((4, 5), np.uint8)
  instance[0, 0] = 7
  np.testing.assert_array_equal(weak.box_support_label(instance, own), box_of_own)
  np.testing.assert_array_equal(weak.box_support_label(None, own), box_of_own)
  # Empty own mask: all background.
  np.testing.assert_array_equal(weak.box_support_label(instance, np.zeros((4, 5), bool)),
                                np.zeros((4, 5), np.uint8))
  with pytest.raises(ValueError, match="differ in shape"):
    weak.box_support_label(instance, own[:3])


def test_box_rule_against_loop_oracle():
  rng = np.random.default_rng(3)
  for trial in range(40):
    h, w = rng.integers(3, 12, size=2)
    instance = rng.choice(np.array([0, 0, 0, 1, 2, 3, 4, 255], np.uint8), size=(h, w))
    own = rng.random((h, w)) < 0.6
    if not (own & (instance > 0)).any():
      continue
    out = weak.box_support_label(instance, own)
    fg, bg = _official_bbox_masks(own, instance)
    # PANet's masks from a support label: fg = (l == 1), bg = (l == 0) | (l == 255).
    np.testing.assert_array_equal(out == 1, fg, err_msg=str(trial))
    np.testing.assert_array_equal((out == 0) | (out == 255), bg, err_msg=str(trial))
    assert set(np.unique(out)) <= {0, 1, N}


# ----------------------------------------------------------------------------- scribble rule


def _scribbles_b():
  """Own mask rows 1-3, cols 1-4. Ids 1 and 2 inside it (2 also outside), 3 outside only,
  background strokes (0) inside and outside the own mask."""
  own = np.zeros((5, 7), bool)
  own[1:4, 1:5] = True
  scribble = np.array([
      [255, 255, 255, 255, 255, 3, 3],
      [255, 1, 1, 255, 255, 255, 255],
      [0, 255, 255, 255, 2, 2, 255],
      [0, 255, 0, 255, 255, 255, 255],
      [0, 0, 255, 255, 255, 255, 3]], np.uint8)
  return scribble, own


def test_scribble_rule_hand_built():
  scribble, own = _scribbles_b()
  base = np.array([
      [N, N, N, N, N, N, N],
      [N, N, N, N, N, N, N],
      [0, N, N, N, N, N, N],
      [0, N, 0, N, N, N, N],
      [0, 0, N, N, N, N, N]], np.uint8)
  want1, want2 = base.copy(), base.copy()
  want1[1, 1] = want1[1, 2] = 1
  want2[2, 4] = 1  # id 2's pixel (2, 5) lies outside the own mask: not foreground
  seen = set()
  for seed in range(40):
    out = weak.scribble_support_label(scribble, own, np.random.default_rng(seed))
    assert out.dtype == np.uint8
    if np.array_equal(out, want1):
      seen.add(1)
    else:
      np.testing.assert_array_equal(out, want2, err_msg=str(seed))
      seen.add(2)
  assert seen == {1, 2}  # one id at random among those inside the own mask; never id 3
  np.testing.assert_array_equal(weak.scribble_support_label(scribble, own, None), want1)


def test_scribble_rule_without_object_scribble():
  scribble, own = _scribbles_b()
  scribble[scribble == 1] = 255
  scribble[scribble == 2] = 255
  rng = np.random.default_rng(5)
  out = weak.scribble_support_label(scribble, own, rng)
  assert not (out == 1).any()
  np.testing.assert_array_equal(out == 0, scribble == 0)
  # The rng was not drawn from (random.choice is only called with a non-empty list).
  assert rng.integers(1 << 30) == np.random.default_rng(5).integers(1 << 30)
  with pytest.raises(ValueError, match="differ in shape"):
    weak.scribble_support_label(scribble, own[:4], rng)


def test_dilate_scribble_hand_and_scipy():
  s = np.full((5, 6), 255, np.uint8)
  s[2, 2] = 7
  s[0, 5] = 0
  want = np.full((5, 6), 255, np.uint8)
  want[1:4, 1:4] = 7
  want[0:2, 4:6] = 0
  np.testing.assert_array_equal(weak.dilate_scribble(s, 3), want)
  np.testing.assert_array_equal(weak.dilate_scribble(s, 1), s)
  np.testing.assert_array_equal(weak.dilate_scribble(s, 0), s)
  ndimage = pytest.importorskip("scipy.ndimage")
  rng = np.random.default_rng(0)
  for size in (2, 3, 4, 5, 8):
    m = np.where(rng.random((13, 17)) < 0.9, 255,
                 rng.integers(0, 5, (13, 17))).astype(np.uint8)
    np.testing.assert_array_equal(weak.dilate_scribble(m, size),
                                  ndimage.minimum_filter(m, size=size), err_msg=str(size))


# ----------------------------------------------------------------------------- generator


def _toy_label():
  """80x100: class 2 ellipse, class 7 bar with a second component (a square), void ring around
  the ellipse, background elsewhere."""
  label = np.zeros((80, 100), np.uint8)
  cv2.ellipse(label, (30, 35), (20, 14), 20, 0, 360, 2, -1)
  cv2.ellipse(label, (30, 35), (20, 14), 20, 0, 360, 255, 1)
  label[60:70, 10:90] = 7
  label[10:30, 70:90] = 7
  return label


def test_generator_deterministic_inside_and_background_only_on_background():
  label = _toy_label()
  a = weak.generate_scribbles(label, np.random.default_rng(1))
  b = weak.generate_scribbles(label, np.random.default_rng(1))
  c = weak.generate_scribbles(label, np.random.default_rng(2))
  assert a.dtype == np.uint8 and a.shape == label.shape
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  for s in (a, c):
    assert set(np.unique(s)) == {0, 1, 2, 3, 255}
    assert (label[s == 0] == 0).all()  # background scribbles only on background
    assert (s == 0).sum() >= 20
    # Ids in order of class, then first pixel: 1 = the ellipse (class 2), 2 = the square
    # (class 7, starts at row 10), 3 = the bar (class 7, row 60).
    ellipse = label == 2
    square = np.zeros_like(ellipse)
    square[10:30, 70:90] = True
    bar = np.zeros_like(ellipse)
    bar[60:70, 10:90] = True
    for v, obj in ((1, ellipse), (2, square), (3, bar)):
      assert obj[s == v].all(), v  # every object scribble pixel inside its object
      assert (s == v).sum() >= 8, v
  # The bar's stroke is long: its skeleton runs along the bar.
  assert np.ptp(np.nonzero(a == 3)[1]) >= 40


def test_generator_with_instances_uses_their_ids():
  label = np.zeros((40, 60), np.uint8)
  instance = np.zeros_like(label)
  label[5:20, 5:25] = 4
  instance[5:20, 5:25] = 9
  label[5:20, 25:50] = 4  # same class, touching: one component, two instances
  instance[5:20, 25:50] = 3
  label[30:36, 10:50] = 255
  instance[30:36, 10:50] = 255
  s = weak.generate_scribbles(label, np.random.default_rng(0), instance=instance)
  assert set(np.unique(s)) == {0, 3, 9, 255}
  assert (instance[s == 9] == 9).all() and (instance[s == 3] == 3).all()
  assert (label[s == 0] == 0).all()
  s = weak.generate_scribbles(label, np.random.default_rng(0), instance=instance,
                              background=False)
  assert set(np.unique(s)) == {3, 9, 255}
  big = instance.astype(np.uint16)
  big[big == 9] = 300
  with pytest.raises(ValueError, match="300"):
    weak.generate_scribbles(label, np.random.default_rng(0), instance=big)


def test_generator_thin_and_tiny_objects():
  label = np.zeros((50, 60), np.uint8)
  label[5, 5:45] = 1  # 1-pixel line
  for k in range(30):  # 2-pixel diagonal
    label[10 + k, 20 + k] = label[10 + k, 21 + k] = 2
  label[45, 2] = 3  # single pixel
  label[45:47, 10:12] = 4  # 2x2 block (thins to one pixel)
  label[44, 30:33] = 5  # 3 pixels (fewer than min_nodes=4)
  s = weak.generate_scribbles(label, np.random.default_rng(0), min_fraction=1.0)
  objects = {1: label == 1, 2: label == 2, 3: label == 3, 4: label == 4, 5: label == 5}
  assert set(np.unique(s)) == {0, 1, 2, 3, 4, 5, 255}
  for v, obj in objects.items():
    assert obj[s == v].all(), v
  assert (s == 1).sum() == 40  # the whole line is its own skeleton and longest path
  assert (s == 2).sum() >= 29
  for v in (3, 4, 5):  # fallback: one most interior pixel
    assert (s == v).sum() == 1, v
  s = weak.generate_scribbles(label, np.random.default_rng(0), fallback_point=False)
  assert not np.isin(s, [3, 4, 5]).any()  # as the robot: no stroke for these
  assert (s == 1).sum() >= 32 and (s == 2).sum() >= 23  # min_fraction 0.8


def test_generator_longest_path_of_a_tree_and_a_ring():
  # A one-pixel T: arms of 10 pixels each side of the junction, a 12-pixel stem. Its longest
  # path runs from one arm's end down the stem (23 pixels).
  label = np.zeros((20, 30), np.uint8)
  label[2, 4:25] = 1
  label[3:15, 14] = 1
  stem = {(y, 14) for y in range(3, 15)}
  left = stem | {(2, x) for x in range(4, 14)}
  right = stem | {(2, x) for x in range(15, 25)}
  # Thinning keeps the T; the medial-axis rule drops the junction (2, 14) (its neighbours stay
  # 8-connected without it), so the path steps diagonally from the arm to the stem.
  for skeleton, extra in (("thinning", {(2, 14)}), ("medial_axis", set())):
    s = weak.generate_scribbles(label, np.random.default_rng(0), background=False,
                                min_fraction=1.0, skeleton=skeleton)
    got = {(int(y), int(x)) for y, x in zip(*np.nonzero(s == 1))}
    assert got in (left | extra, right | extra), skeleton
  # A ring: ScribblesRobot cuts the cycle once, so the stroke goes most of the way round.
  label = np.zeros((70, 70), np.uint8)
  cv2.circle(label, (35, 35), 25, 1, 7)
  s = weak.generate_scribbles(label, np.random.default_rng(0), background=False,
                              min_fraction=1.0)
  assert (label[s == 1] == 1).all()
  assert (s == 1).sum() >= 0.8 * 2 * np.pi * 25 * 0.7  # 8-connected steps are up to sqrt 2


def test_generator_dilation_and_arguments():
  label = _toy_label()
  plain = weak.generate_scribbles(label, np.random.default_rng(4))
  dilated = weak.generate_scribbles(label, np.random.default_rng(4), dilation=3)
  np.testing.assert_array_equal(dilated, weak.dilate_scribble(plain, 3))
  with pytest.raises(ValueError, match="min_fraction"):
    weak.generate_scribbles(label, np.random.default_rng(0), min_fraction=0)
  with pytest.raises(ValueError, match="integer"):
    weak.generate_scribbles(label.astype(np.float32), np.random.default_rng(0))


def test_generated_scribbles_feed_the_scribble_rule():
  label = _toy_label()
  s = weak.generate_scribbles(label, np.random.default_rng(0))
  out = weak.scribble_support_label(s, label == 7, np.random.default_rng(0))
  fg = out == 1
  assert fg.any() and (label[fg] == 7).all()
  assert np.isin(np.unique(s[fg]), [2, 3]).all() and len(np.unique(s[fg])) == 1
  np.testing.assert_array_equal(out == 0, s == 0)


@pytest.mark.parametrize("skeleton", [weak.thin, weak.medial_axis])
def test_skeletons_are_thin_connected_subsets(skeleton):
  mask = np.zeros((40, 50), bool)
  mask[5:35, 5:15] = True
  mask[20:30, 5:45] = True  # an L
  cv2.circle(mask.view(np.uint8), (30, 10), 3, 0, -1)  # with a hole: the skeleton has a loop
  skel = skeleton(mask)
  assert skel.any() and mask[skel].all()
  count, _ = cv2.connectedComponents(skel.astype(np.uint8), connectivity=8)
  assert count == 2  # background + one component
  blocks = skel[:-1, :-1] & skel[1:, :-1] & skel[:-1, 1:] & skel[1:, 1:]
  assert not blocks.any()  # no 2x2 block
  line = np.zeros((3, 9), bool)
  line[1, 1:8] = True
  np.testing.assert_array_equal(skeleton(line), line)
  assert not skeleton(np.zeros((4, 4), bool)).any()


def test_medial_axis_of_a_square_is_its_diagonals():
  # skimage's rule on a 12x12 square: the two diagonals (the X of the square's medial axis),
  # corner to corner, its centre 2x2 included (each corner pixel is visited last among the
  # border pixels, its cornerness being highest, and is then an end: kept).
  mask = np.zeros((14, 14), bool)
  mask[1:13, 1:13] = True
  want = np.zeros_like(mask)
  for k in range(1, 13):
    want[k, k] = want[k, 13 - k] = True
  np.testing.assert_array_equal(weak.medial_axis(mask), want)
  # Guo-Hall thinning shrinks the square to a point.
  assert weak.thin(mask).sum() == 1


def test_medial_axis_is_the_same_run_after_run(tmp_path):
  """OpenCV's exact distance transform carries run-to-run float noise (parallel passes); the
  skeleton sorts on the rounded squared distance, so ties never reorder. (The background of
  this procedural scene: its skeleton differed in a few pixels between runs before.)"""
  synthetic.write_synthetic_dataset(str(tmp_path), num_train=1, num_val=7, image_size=97,
                                    seed=3, num_shards=1)
  _, _, label = schema.read_record(schema.load_manifest(str(tmp_path)).source("val").reader, 6)
  runs = [weak.medial_axis(label == 0) for _ in range(40)]
  assert runs[0].any()
  for r in runs[1:]:
    np.testing.assert_array_equal(r, runs[0])
