"""fss_jax/infer/explain.py (figures of a prediction's internal maps) and sgc.sgc_assignment.

The SGC assignment is checked against an independent float64 numpy clustering; the figures are
built from the outputs of tiny randomly initialised models (one jitted forward per model), with
the maps whose drawing is checked replaced by known patterns and the images by flat grey (the
explanation reads the model's maps from ``outputs``; the images are only drawn).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fss_jax import configs_lib
from fss_jax.data import transforms
from fss_jax.infer import explain
from fss_jax.infer.predictor import Prediction, Support
from fss_jax.models import ops
from fss_jax.models import registry
from fss_jax.models import sgc

GREY = 128  # flat images: the dimmed base under categorical maps is DIM * GREY everywhere

_trace = jax.jit(sgc.sgc_trace, static_argnames=("n_iter", "distance"))
_prototypes = jax.jit(sgc.sgc_prototypes, static_argnames=("n_iter", "distance", "loop"))
_assignment = jax.jit(sgc.sgc_assignment, static_argnames=("n_iter", "distance"))


# ------------------------------------------------------------------ SGC assignment -----------
def _np_clustering(feat, soft, seeds, n_iter):
  """The reference's clustering of one shot in float64 numpy, written from its description:
  feat (h, w, C), soft (h, w), seeds (max_sp, 2). Returns (assignment (h, w), centres (n, C))
  with the assignment argmin_i D_pi of the last iteration (-1 outside the ROI / no SGC)."""
  h, w, _ = feat.shape
  n = max(np.count_nonzero(seeds[:, 0]), np.count_nonzero(seeds[:, 1]))
  out = np.full((h, w), -1, np.int64)
  if n < 2:
    return out, None, None
  roi = soft == 1.0
  rows, cols = np.nonzero(roi)
  f = feat[roi].astype(np.float64)
  xy = np.stack([rows, cols], 1).astype(np.float64)
  c_f = feat[seeds[:n, 0], seeds[:n, 1]].astype(np.float64)
  c_xy = seeds[:n].astype(np.float64)
  for _ in range(n_iter):
    d = np.sqrt(((f[:, None, :] - c_f[None]) ** 2).sum(-1) +
                ((xy[:, None, :] - c_xy[None]) ** 2).sum(-1) / 100.0)
    a = np.exp(-d)
    a = a / a.sum(0, keepdims=True)
    c_f, c_xy = a.T @ f, a.T @ xy
  out[roi] = np.argmin(d, axis=1)
  return out, c_f, d


def _sgc_inputs(seed, size=97, c=8):
  """Support features, soft masks and seeds of 4 shots; shot 2 has a disc too small for 2
  seeds (its prototype is the masked average)."""
  rng = np.random.default_rng(seed)
  h = (size - 1) // 8 + 1
  yy, xx = np.mgrid[:size, :size]
  masks = np.zeros((4, size, size), np.float32)
  for i in range(4):
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    ry, rx = (0.04, 0.04) if i == 2 else rng.uniform(0.2, 0.4, 2)
    masks[i][((yy - cy) / (ry * size)) ** 2 + ((xx - cx) / (rx * size)) ** 2 <= 1] = 1
  seeds, _ = sgc.place_seeds(jnp.asarray(masks), avg_sp_area=12)
  soft = ops.resize_bilinear_ac(jnp.asarray(masks)[..., None], (h, h))[..., 0]
  feat = rng.normal(size=(4, h, h, c))
  return feat, np.asarray(soft, np.float64), np.asarray(seeds)


@pytest.mark.parametrize("n_iter", [1, 3])
def test_sgc_assignment_matches_float64_numpy(n_iter):
  feat, soft, seeds = _sgc_inputs(n_iter)
  n = np.asarray(sgc.effective_num_seeds(jnp.asarray(seeds)))
  assert n[2] < 2 and np.all(np.delete(n, 2) >= 2), n
  with jax.enable_x64(True):
    got64 = np.asarray(_assignment(jnp.asarray(feat), jnp.asarray(soft), jnp.asarray(seeds),
                                   n_iter=n_iter))
  got32 = np.asarray(_assignment(jnp.asarray(feat, jnp.float32), jnp.asarray(soft, jnp.float32),
                                 jnp.asarray(seeds), n_iter=n_iter))
  assert got64.dtype == got32.dtype == np.int32 and got64.shape == soft.shape
  for i in range(4):
    want = _np_clustering(feat[i], soft[i], seeds[i], n_iter)
    if n[i] < 2:
      np.testing.assert_array_equal(got64[i], -1)
      np.testing.assert_array_equal(got32[i], -1)
      continue
    want_assign, _, d = want
    roi = soft[i] == 1.0
    assert roi.sum() > 10 and len(np.unique(want_assign[roi])) >= 2  # a real clustering
    np.testing.assert_array_equal(got64[i], want_assign)
    # float32 may differ only where the float64 distances to the two nearest centres nearly tie.
    diff = got32[i][roi] != want_assign[roi]
    ds = np.sort(d, axis=1)
    assert np.all((ds[:, 1] - ds[:, 0])[diff] < 1e-4 * ds[diff, 0]), np.nonzero(diff)
    assert diff.mean() < 0.05


def test_sgc_trace_is_the_models_clustering():
  """Every step of the trace is what sgc_prototypes gives for that many iterations, and the
  numpy clustering's centres."""
  feat, soft, seeds = _sgc_inputs(7)
  with jax.enable_x64(True):
    assign, protos = (np.asarray(x) for x in _trace(jnp.asarray(feat), jnp.asarray(soft),
                                                    jnp.asarray(seeds), n_iter=3))
    assert assign.shape == (3,) + soft.shape and protos.shape == (3, 4, 5, feat.shape[-1])
    for t in (0, 2):  # (the per-shot loop form equals the batched one: test_sgc_gpa.py)
      want, _ = _prototypes(jnp.asarray(feat), jnp.asarray(soft), jnp.asarray(seeds),
                            n_iter=t + 1, loop=False)
      np.testing.assert_allclose(protos[t], np.asarray(want), rtol=1e-12, atol=1e-12)
    for t in range(3):
      for i in (0, 1, 3):
        a, centres, _ = _np_clustering(feat[i], soft[i], seeds[i], t + 1)
        np.testing.assert_allclose(protos[t, i, :len(centres)], centres, rtol=1e-10,
                                   atol=1e-12)
        np.testing.assert_array_equal(assign[t, i], a)
  # The iterations move the clustering: the assignment is not that of the seeds alone.
  assert any(np.any(assign[0, i] != assign[2, i]) for i in (0, 1, 3))


# ------------------------------------------------------------------ tiny predictions ---------
def _ellipse(hw, ry, rx):
  h, w = hw
  yy, xx = np.mgrid[:h, :w]
  return ((((yy - h / 2) / (ry * h)) ** 2 + ((xx - w / 2) / (rx * w)) ** 2) <= 1).astype(
      np.uint8)


def _random_variables(model, size, shot, rng):
  """Random variables of the model's structure, drawn in numpy (registry.init_variables would
  compile the init program, which costs more than the forward): kernels N(0, 1/fan_in),
  BatchNorm identities, zero biases."""
  def leaf(path, spec):
    name = path[-1].key
    if name in ("scale", "var"):
      return np.ones(spec.shape, spec.dtype)
    if name == "kernel":
      fan_in = int(np.prod(spec.shape[:-1]))
      return (rng.normal(size=spec.shape) / np.sqrt(fan_in)).astype(spec.dtype)
    return np.zeros(spec.shape, spec.dtype)  # bias, mean, counters
  return jax.tree_util.tree_map_with_path(leaf, registry.variables_template(model, size, shot))


def _predict(spec, query_hw, support_hws, tiny_shots=(), eval_iters=None, seed=0):
  """A Prediction from one forward of a tiny random model (the evaluator's resize; the
  original-size score is a plain bilinear resize here, the predictor's job)."""
  config = configs_lib.load_config(spec)
  if config.model.name == "asgnet":
    config.model.avg_sp_area = 4  # several seeds on the 9x9 grid of a 65 input
    if eval_iters:
      config.model.eval_iters = eval_iters
  size = config.data.image_size
  model = registry.build_model(config)
  rng = np.random.default_rng(seed)
  variables = _random_variables(model, size, len(support_hws), rng)
  query = rng.integers(0, 256, tuple(query_hw) + (3,), dtype=np.uint8)
  q_in, _ = transforms.eval_resize(query, np.zeros(query_hw, np.uint8), size)
  supports, images, labels = [], [], []
  for k, hw in enumerate(support_hws):
    image = rng.integers(0, 256, tuple(hw) + (3,), dtype=np.uint8)
    mask = _ellipse(hw, 0.06, 0.06) if k in tiny_shots else _ellipse(hw, 0.38, 0.33)
    supports.append(Support(image, mask, f"support{k}.png"))
    im, lab = transforms.eval_resize(image, mask, size)
    images.append(im)
    labels.append(lab)
  out = jax.jit(functools.partial(model.apply, train=False))(
      variables, q_in[None], np.stack(images)[None], np.stack(labels).astype(np.int32)[None])
  outputs = {k: np.asarray(v[0]) for k, v in out.items() if k not in ("aux_logits",
                                                                       "guide_feat")}
  side = max(query_hw)
  logits = np.asarray(ops.resize_bilinear_ac(jnp.asarray(outputs["logits"])[None],
                                             (side, side)))[0, :query_hw[0], :query_hw[1]]
  score = (logits[..., 1] - logits[..., 0]).astype(np.float32)
  pred = Prediction(mask=(score > 0).astype(np.uint8), fg_score=score, query=query,
                    canvas_hw=transforms.eval_hw(*query_hw, size), image_size=size,
                    outputs=outputs, supports=supports,
                    support_canvas_hw=[transforms.eval_hw(*hw, size) for hw in support_hws],
                    name="query.jpg")
  return config, pred


@pytest.fixture(scope="module")
def asgnet_1shot():
  # Wide query, tall support: both canvases non-square; 3 SGC iterations (not the default).
  return _predict("configs/tiny_asgnet.py", (40, 64), [(64, 44)], eval_iters=3)


@pytest.fixture(scope="module")
def asgnet_prior_2shot():
  # Shot 2's mask is too small for 2 seeds (masked-average prototype).
  return _predict("configs/tiny_asgnet.py:shot=2,prior=true", (64, 52), [(48, 64), (56, 56)],
                  tiny_shots=(1,))


@pytest.fixture(scope="module")
def pfenet_1shot():
  return _predict("configs/tiny_pfenet.py", (50, 64), [(64, 64)])


def _flat(pred):
  """The prediction with flat grey images (same sizes), so drawn colours can be unblended."""
  grey = lambda im: np.full_like(im, GREY)
  return dataclasses.replace(pred, query=grey(pred.query), supports=[
      dataclasses.replace(s, image=grey(s.image)) for s in pred.supports])


def _with_outputs(pred, **outputs):
  return dataclasses.replace(pred, outputs={**pred.outputs, **outputs})


def _panel(panels, prefix):
  hits = [img for title, img in panels if title.startswith(prefix)]
  assert len(hits) == 1, (prefix, [t for t, _ in panels])
  return hits[0]


def _cell_centres(image_hw, canvas_hw, size, feat_hw):
  """Display pixel (row, col) of every feature cell whose centre lies in the image's canvas
  extent, computed from the mapping's definition: feature pixel i at canvas 8i; display pixel
  centre u at canvas (u + 0.5) extent / n - 0.5."""
  disp = explain.display_hw(image_hw)
  stride = (size - 1) // (feat_hw[0] - 1)
  out = {}
  for i in range(feat_hw[0]):
    for j in range(feat_hw[1]):
      y, x = stride * i, stride * j
      if y <= canvas_hw[0] - 1 and x <= canvas_hw[1] - 1:
        out[i, j] = (int(round((y + 0.5) * disp[0] / canvas_hw[0] - 0.5)),
                     int(round((x + 0.5) * disp[1] / canvas_hw[1] - 0.5)))
  return disp, out


def _slots_of(pixels, n_slots):
  """Per pixel (..., 3), the slot whose colour blended over the flat dimmed grey it shows
  (within rounding), else -1."""
  a = explain.CATEGORICAL_ALPHA
  blends = np.stack([(1 - a) * explain.DIM * GREY + a * explain.slot_colour(p).astype(float)
                     for p in range(n_slots)])
  dist = np.abs(np.asarray(pixels, float)[..., None, :] - blends).max(-1)
  best = np.argmin(dist, axis=-1)
  return np.where(np.min(dist, axis=-1) <= 1.0, best, -1)


def _slot_of(pixel, n_slots):
  slot = int(_slots_of(pixel, n_slots))
  return None if slot < 0 else slot


def _lut_index(pixel, lut):
  return int(np.argmin(np.abs(lut.astype(int) - pixel.astype(int)).sum(-1)))


# ------------------------------------------------------------------ ASGNet --------------------
def test_asgnet_figure_and_panels(asgnet_1shot):
  config, pred = asgnet_1shot
  fig = explain.figure("asgnet", pred)
  assert fig.dtype == np.uint8 and fig.ndim == 3 and fig.shape[2] == 3
  panels = explain.panels("asgnet", pred)
  titles = [t for t, _ in panels]
  assert titles[0].startswith("shot 1: support, mask,")
  assert titles[1].startswith("shot 1: SGC assignment after 3 iterations")  # inferred
  assert [t.split(" (")[0] for t in titles[2:]] == [
      "query: GPA allocation", "query: GPA probability map", "query: prediction",
      "query: fg − bg logit"]
  for _, img in panels:
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
  # The figure holds every panel (stacked with titles): at least as large as the widest.
  assert fig.shape[1] >= max(img.shape[1] for _, img in panels)
  assert fig.shape[0] >= panels[1][1].shape[0] + panels[2][1].shape[0]  # shot row + query row
  # The iteration count is inferred from the prototypes: given it, the same; wrong, noted.
  assign, iters, err = explain.asgnet_sgc(pred.outputs)
  assert iters == config.model.eval_iters == 3 and err < 1e-4
  assert explain.asgnet_sgc(pred.outputs, sgc_iters=1)[2] > 1e-3
  assert "differ" in explain.panels("asgnet", pred, sgc_iters=1)[1][0]
  np.testing.assert_array_equal(assign, np.asarray(_assignment(
      pred.outputs["supp_feat"], pred.outputs["supp_mask"], pred.outputs["seeds"], n_iter=3)))


def test_allocation_panel_draws_guide_index_cropped(asgnet_1shot):
  _, pred = asgnet_1shot
  out = pred.outputs
  valid = np.nonzero(out["proto_valid"])[0]
  assert len(valid) >= 3, "the tiny model should cluster the support"
  h, w = out["guide_index"].shape
  ch, cw = pred.canvas_hw
  assert ch < cw  # the query fills only the top rows of the canvas
  # A pattern over the valid slots in the image's cells; the last valid slot only in the
  # padding rows below the image (never visible).
  shown = valid[:-1]
  rr, cc = np.mgrid[:h, :w]
  guide = shown[(rr * 3 + cc) % len(shown)].astype(np.int32)
  hidden = 8 * rr > ch - 1 + 4  # rows whose cells are entirely below the image
  guide[hidden] = valid[-1]
  pred = _flat(_with_outputs(pred, guide_index=guide))
  img = _panel(explain.panels("asgnet", pred), "query: GPA allocation")
  disp, centres = _cell_centres(pred.query.shape, pred.canvas_hw, pred.image_size, (h, w))
  assert disp[1] / disp[0] == pytest.approx(pred.query.shape[1] / pred.query.shape[0], 0.02)
  assert img.shape[1] == max(disp[1], explain.MIN_PANEL_WIDTH) and img.shape[0] > disp[0]
  body = img[:disp[0], :disp[1]]
  n_slots = len(out["proto_valid"])
  for (i, j), (y, x) in centres.items():
    assert _slot_of(body[y, x], n_slots) == guide[i, j], (i, j)
  drawn = set(np.unique(_slots_of(body, n_slots)).tolist())
  assert drawn == set(shown.tolist())  # every shown slot, nothing from the padding


def test_assignment_panel_draws_sgc_assignment(asgnet_1shot):
  _, pred = asgnet_1shot
  pred = _flat(pred)
  out = pred.outputs
  assign = np.asarray(_assignment(out["supp_feat"], out["supp_mask"], out["seeds"],
                                  n_iter=3))[0]
  assert len(np.unique(assign[assign >= 0])) >= 2
  panels = explain.panels("asgnet", pred)
  img = _panel(panels, "shot 1: SGC assignment after 3 iterations")
  s = pred.supports[0]
  disp, centres = _cell_centres(s.image.shape, pred.support_canvas_hw[0], pred.image_size,
                                assign.shape)
  assert disp[0] > disp[1]  # a tall support keeps its aspect
  seeds = {tuple(x) for x in out["seeds"][0]}
  n_slots = out["seeds"].shape[1]  # shot 1: slots 0..max_sp-1
  checked = 0
  for (i, j), (y, x) in centres.items():
    near_seed = any(abs(i - a) + abs(j - b) <= 1 for a, b in seeds)  # numbered dots on top
    if near_seed:
      continue
    got = _slot_of(img[y, x], n_slots)
    assert got == (assign[i, j] if assign[i, j] >= 0 else None), (i, j)
    checked += 1
  assert checked >= 20
  # Outside the ROI: the dimmed grey only.
  i, j = next(ij for ij in centres if assign[ij] < 0)
  np.testing.assert_allclose(img[centres[i, j]], explain.DIM * GREY, atol=1)
  # The support panel carries the seeds as dots in their slot colours.
  sup = _panel(panels, "shot 1: support, mask,")
  n = explain.effective_num_seeds(out["seeds"])[0]
  assert n >= 2
  for slot, (a, b) in enumerate(out["seeds"][0][:n]):
    y, x = (int(round((8 * v + 0.5) * d / c - 0.5)) for v, d, c in
            zip((a, b), disp, pred.support_canvas_hw[0]))
    y, x = np.clip(y, 7, disp[0] - 8), np.clip(x, 7, disp[1] - 8)  # dots stay whole
    dot = sup[y - 5:y + 6, x - 5:x + 6].reshape(-1, 3)
    colours, counts = np.unique(dot, axis=0, return_counts=True)
    np.testing.assert_array_equal(colours[np.argmax(counts)], explain.slot_colour(slot))


def test_probability_map_panel_has_range_and_colour_bar(asgnet_1shot):
  _, pred = asgnet_1shot
  h, w = pred.outputs["prob_map"].shape[:2]
  ramp = np.broadcast_to(np.arange(w, dtype=np.float32)[None, :, None] * 0.5 - 1.0, (h, w, 1))
  img = _panel(explain.panels("asgnet", _with_outputs(pred, prob_map=ramp)),
               "query: GPA probability map")
  disp = explain.display_hw(pred.query.shape)
  assert img.shape[1] > disp[1] + 20  # the colour bar
  lut = explain.viridis_lut()
  row = img[disp[0] // 2, :disp[1]]
  idx = [_lut_index(px, lut) for px in row]
  assert idx[0] == 0 and idx[-1] == 255 and np.all(np.diff(idx) >= 0)
  # The bar: its top is the highest colour, its bottom the lowest.
  bar = img[:, disp[1] + 4:]
  column = bar[:disp[0], 4]
  inner = [_lut_index(px, lut) for px in column[8:-8]]
  assert inner[0] > 240 and inner[-1] < 15 and np.all(np.diff(inner) <= 0)


def test_score_and_prediction_panels(asgnet_1shot):
  _, pred = asgnet_1shot
  score = np.where(np.arange(pred.query.shape[1])[None, :] < pred.query.shape[1] // 2, 2.0,
                   -1.0) * np.ones(pred.query.shape[:2], np.float32)
  pred = _flat(dataclasses.replace(pred, fg_score=score.astype(np.float32),
                                   mask=(score > 0).astype(np.uint8)))
  panels = explain.panels("asgnet", pred)
  img = _panel(panels, "query: fg − bg logit")
  disp = explain.display_hw(pred.query.shape)
  lut = explain.diverging_lut()
  y = disp[0] // 2
  assert _lut_index(img[y, 2], lut) == 255                     # +2 = the top of ±2
  assert abs(_lut_index(img[y, disp[1] - 3], lut) - 64) <= 1   # -1 = a quarter up
  overlay = _panel(panels, "query: prediction (50.0% foreground)")
  assert overlay[y, 5, 0] > overlay[y, 5, 1] + 50              # red on the left half
  np.testing.assert_array_equal(overlay[y, disp[1] - 5], GREY)  # untouched on the right


def test_asgnet_prior_two_shots(asgnet_prior_2shot):
  _, pred = asgnet_prior_2shot
  assert "prior" in pred.outputs
  n = explain.effective_num_seeds(pred.outputs["seeds"])
  assert n[0] >= 2 and n[1] < 2
  panels = explain.panels("asgnet", _flat(_with_outputs(
      pred, prior=np.full(pred.outputs["prior"].shape, 0.25, np.float32))))
  titles = [t for t, _ in panels]
  assert [t.split(":")[0] for t in titles[:4]] == ["shot 1"] * 2 + ["shot 2"] * 2
  assert titles[2].startswith("shot 2: support, mask (fewer than 2 seeds")
  assert titles[3] == "shot 2: no SGC, 1 prototype = masked average"
  assert [t.split(" (")[0] for t in titles[4:]] == [
      "query: GPA allocation", "query: GPA probability map", "query: prior mask",
      "query: prediction", "query: fg − bg logit"]
  prior = _panel(panels, "query: prior mask")
  disp = explain.display_hw(pred.query.shape)
  np.testing.assert_array_equal(prior[disp[0] // 2, disp[1] // 2],
                                explain.viridis_lut()[round(0.25 * 255)])
  # Shot 2's single prototype is slot 5 (shot 2 · proto 1): its colour where the mask is.
  fallback = _panel(panels, "shot 2: no SGC")
  s2 = pred.supports[1]
  d2 = explain.display_hw(s2.image.shape)
  centre = fallback[d2[0] // 2, d2[1] // 2].astype(float)
  colour = explain.slot_colour(pred.outputs["seeds"].shape[1]).astype(float)
  assert np.abs(centre - colour).sum() < np.abs(centre - explain.DIM * GREY).sum()
  fig = explain.figure("asgnet", pred)
  assert fig.dtype == np.uint8 and fig.shape[2] == 3


# ------------------------------------------------------------------ PFENet, unknown models ----
def test_pfenet_panels(pfenet_1shot):
  _, pred = pfenet_1shot
  panels = explain.panels("pfenet", _flat(_with_outputs(
      pred, prior=np.full(pred.outputs["prior"].shape, 1.0, np.float32))))
  assert [t.split(" (")[0] for t, _ in panels] == [
      "shot 1: support and mask", "query: prior mask", "query: prediction",
      "query: fg − bg logit"]
  prior = _panel(panels, "query: prior mask")
  disp = explain.display_hw(pred.query.shape)
  np.testing.assert_array_equal(prior[disp[0] // 2, disp[1] // 2], explain.viridis_lut()[255])
  fig = explain.figure("pfenet", pred)
  assert fig.dtype == np.uint8 and fig.ndim == 3 and min(fig.shape[:2]) > 200


def test_unknown_model_gets_generic_panels(pfenet_1shot, asgnet_1shot):
  for _, pred in (pfenet_1shot, asgnet_1shot):
    panels = explain.panels("sg_one", pred)
    assert [t.split(" (")[0] for t, _ in panels] == [
        "shot 1: support and mask", "query: prediction", "query: fg − bg logit"]
    fig = explain.figure("sg_one", pred)
    assert fig.dtype == np.uint8 and fig.shape[2] == 3
  assert set(explain.EXPLAINERS) >= {"asgnet", "pfenet"}
