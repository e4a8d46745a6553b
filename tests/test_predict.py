"""Prediction on one's own image files (scripts/predict.py, fss_jax/infer/predictor.py).

The model: the tiny ASGNet at its random initialisation (seed 0), with the classifier's
foreground bias shifted so that the median fg − bg logit over the chosen episodes' query pixels
is 0. That is the cheapest model whose masks are neither empty nor full (about half of each
query is foreground, with boundaries everywhere, so every pixel of the resize undo counts; a
4-step training run costs ~2 minutes here and still predicts almost nothing), and the test checks
that it does give IoUs strictly between 0 and 1. It is written both as a run directory (an Orbax
checkpoint with the trainer's state layout + the trainer's config.json) and as a .msgpack file.
"""
import os
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest

import datagen
from fss_jax.convert import io
from fss_jax.data import dataset_dir
from fss_jax.data import episodes as episodes_lib
from fss_jax.data import pipeline
from fss_jax.data import schema
from fss_jax.data import transforms
from fss_jax.infer import predictor as predictor_lib
from fss_jax.models import registry
from fss_jax.train import checkpoint as ckpt_lib
from fss_jax.train import evaluator
from fss_jax.train import logging as logging_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLD, SHOT, SEED, EPISODES = 0, 1, 321, 3
WHICH = "base"  # the tiny split's base-class episodes have several classes and queries


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  env.setdefault("JAX_PLATFORMS", "cpu")
  # The evaluator below runs in this process, where conftest sets "highest".
  env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
  return env


def _predict_cmd(*args):
  return [sys.executable, "scripts/predict.py", "--progress=false", *args]


def _run(*args, timeout=300):
  return subprocess.run(_predict_cmd(*args), cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=timeout, check=False)


def _write_rgb(path, rgb):
  datagen.write_png(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def setup(tiny_data_dir):
  """(config, data dir, model, variables, evaluation batches of the chosen episodes)."""
  config = datagen.tiny_config(tiny_data_dir)
  data = dataset_dir.prepare(config)
  model = registry.build_model(config)
  s, b = config.data.image_size, config.data.eval_batch_size
  variables = registry.init_variables(model, s, SHOT, jax.random.key(0))
  batches = list(pipeline.eval_dataset(
      data, FOLD, SHOT, s, SEED, b, EPISODES, split="val", original_label=True,
      min_pixels=config.data.min_class_pixels, classes=WHICH))
  diffs = []
  for batch in batches:
    out = predictor_lib._forward(model, variables, {k: batch[k] for k in model.inputs})
    diff = np.asarray(out["logits"][..., 1] - out["logits"][..., 0])
    inside = (batch["query_label"] != 255) & batch["valid"][:, None, None]
    diffs.append(diff[inside])
  params = dict(variables["params"])
  params["cls_3"] = dict(params["cls_3"])
  bias = np.array(params["cls_3"]["bias"])
  bias[1] -= np.median(np.concatenate(diffs))
  params["cls_3"]["bias"] = bias
  variables = {**variables, "params": params}
  return config, data, model, variables, batches


def _write_run(workdir, config, variables):
  """A run directory as the trainer leaves it: checkpoints/ (its state layout) + config.json."""
  params = variables["params"]
  state = {"step": np.int32(1), "frozen": {"backbone": params["backbone"]},
           "trainable": {k: v for k, v in params.items() if k != "backbone"},
           "batch_stats": variables["batch_stats"]}
  mgr = ckpt_lib.CheckpointManager(workdir, keep_best=True, best_metric=ckpt_lib.BEST_METRIC,
                                   async_save=False)
  mgr.save(1, state, metrics={ckpt_lib.BEST_METRIC: 0.5})
  mgr.close()
  logging_lib.save_config(config, workdir, enabled=True)


def test_script_masks_score_as_the_evaluator(setup, tmp_path):
  """Acceptance: evaluation episodes written out as PNG files, predicted by scripts/predict.py
  (one process per episode, run concurrently), scored from the written masks against the
  original-size labels: per episode, intersection and union equal the evaluator's own numbers
  (episode_scores with original labels) as integers."""
  config, data, model, variables, batches = setup
  manifest = schema.load_manifest(data)
  eps = episodes_lib.eval_episode_list(manifest, "val", FOLD, SHOT, EPISODES, SEED,
                                       config.data.min_class_pixels, which=WHICH)
  reader = manifest.source("val").reader

  # The evaluator's per-episode (inter, union), [bg, fg], in episode order.
  keys = list(model.inputs) + ["orig_label", "orig_size"]
  want, order = [], []
  for batch in batches:
    scores = evaluator.episode_scores(model, variables, {k: batch[k] for k in keys}, True)
    inter, union = scores[:2]  # (then the prediction at input size)
    for j in np.flatnonzero(batch["valid"]):
      want.append((np.asarray(inter[j]).tolist(), np.asarray(union[j]).tolist()))
      order.append((int(batch["query_record"][j]), batch["supp_records"][j].tolist()))
  assert order == [(e.query, list(e.supports)) for e in eps]  # the same episodes
  ious = [i[1] / u[1] for i, u in want]
  assert any(0 < x < 1 for x in ious), ious  # the model predicts non-trivially

  run = str(tmp_path / "run")
  _write_run(run, config, variables)
  msgpack = str(tmp_path / "model.msgpack")
  io.save_variables(msgpack, variables)

  labels, procs = [], []
  for i, ep in enumerate(eps):
    folder = tmp_path / f"episode{i}"
    args = []
    for k, rec in enumerate(ep.supports):
      image, label = pipeline.load_record(reader, rec)
      _write_rgb(folder / f"support{k}.png", image)
      datagen.write_png(str(folder / f"support{k}_ids.png"), label)  # class ids, 255 ignore
      args.append(f"--support={folder}/support{k}.png:{folder}/support{k}_ids.png")
    image, label = pipeline.load_record(reader, ep.query)
    _write_rgb(folder / "queries" / "query.png", image)
    labels.append(transforms.binarize_label(label, ep.class_id))
    # Batches of the evaluator's size (its forward's shapes; the metric does not depend on it).
    args += [f"--class_id={ep.class_id}", f"--query={folder}/queries",
             f"--output={folder}/out", "--npz", f"--batch_size={config.data.eval_batch_size}"]
    # The run directory (its own config; 'best', then 'latest'), and the model file + config.
    model_args = ([f"--workdir={run}"], [f"--workdir={run}", "--step=latest"],
                  [f"--checkpoint={msgpack}", "--config=configs/tiny_asgnet.py"])[i % 3]
    procs.append(subprocess.Popen(_predict_cmd(*args, *model_args), cwd=REPO, env=_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, (out, err[-3000:])
    assert "wrote 1 prediction(s)" in out, out

  got = []
  for i, label in enumerate(labels):
    out_dir = tmp_path / f"episode{i}" / "out"
    mask = cv2.imread(str(out_dir / "query_mask.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == label.shape and mask.dtype == np.uint8  # single channel, own size
    assert set(np.unique(mask).tolist()) <= {0, 255}
    assert cv2.imread(str(out_dir / "query_overlay.png")).shape == label.shape + (3,)
    npz = np.load(out_dir / "query.npz")
    np.testing.assert_array_equal(npz["mask"], (npz["fg_score"] > 0).astype(np.uint8))
    np.testing.assert_array_equal(npz["mask"] * 255, mask)
    assert npz["logits"].shape == (config.data.image_size,) * 2 + (2,)
    pred, valid = mask > 0, label != 255
    inter, union = [], []
    for cls_pred, cls_true in ((~pred, label == 0), (pred, label == 1)):
      inter.append(int(np.sum(cls_pred & cls_true & valid)))
      union.append(int(np.sum((cls_pred | cls_true) & valid)))
    got.append((inter, union))
  assert got == want


def _resized(image, h, w):
  return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)


def _undo_reference(logits, h, w):
  """float64 align-corners bilinear of the canvas's fg − bg logit to L×L, cropped to h×w."""
  d = logits[..., 1].astype(np.float64) - logits[..., 0]
  s, side = d.shape[0], max(h, w)
  src = np.arange(side) * ((s - 1) / (side - 1) if side > 1 else 0.0)
  i0 = np.minimum(np.floor(src).astype(int), s - 1)
  i1 = np.minimum(i0 + 1, s - 1)
  f = src - i0
  rows = d[i0] * (1 - f)[:, None] + d[i1] * f[:, None]
  full = rows[:, i0] * (1 - f)[None] + rows[:, i1] * f[None]
  return full[:h, :w]


def test_queries_of_any_size_come_back_at_their_size(setup):
  """Library API, 2 shots, 5 queries of odd and non-square sizes in batches of 2 (the last one
  padded): every prediction is at its query's size, its score is the evaluation canvas's
  logit difference upsampled to L×L and cropped (checked against a float64 transcription),
  and a query predicts the same alone as in a batch."""
  config, data, model, variables, _ = setup
  manifest = schema.load_manifest(data)
  reader = manifest.source("val").reader
  records = [pipeline.load_record(reader, i) for i in range(3)]
  cls = int(np.max(records[0][1][records[0][1] != 255]))
  supports = [predictor_lib.Support(records[0][0], transforms.binarize_label(records[0][1], cls),
                                    name="first"),
              predictor_lib.Support(_resized(records[1][0], 50, 71), np.pad(
                  np.ones((30, 40), np.uint8), ((10, 10), (20, 11))), name="second")]
  sizes = [(37, 91), (130, 47), (53, 53), (91, 37), (211, 64)]
  queries = [_resized(records[2][0], h, w) for h, w in sizes]
  pred = predictor_lib.Predictor(model, variables, config, batch_size=2)
  assert pred.model_name == "asgnet" and pred.image_size == config.data.image_size
  out = pred.predict(supports, queries, names=[f"q{i}" for i in range(len(sizes))])
  s = config.data.image_size
  assert len(out) == len(sizes)
  for p, (h, w), q in zip(out, sizes, queries):
    assert p.mask.shape == (h, w) and p.fg_score.shape == (h, w) and p.mask.dtype == np.uint8
    assert p.fg_score.dtype == np.float32
    np.testing.assert_array_equal(p.mask, (p.fg_score > 0).astype(np.uint8))
    assert p.query is q and p.image_size == s
    assert p.canvas_hw == transforms.eval_hw(h, w, s)
    assert p.support_canvas_hw == [transforms.eval_hw(*records[0][1].shape, s),
                                   transforms.eval_hw(50, 71, s)]
    assert p.outputs["logits"].shape == (s, s, 2)
    assert p.outputs["supp_feat"].shape[0] == 2 and p.outputs["query_feat"].ndim == 3
    assert "aux_logits" not in p.outputs and "guide_feat" not in p.outputs
    np.testing.assert_allclose(p.fg_score, _undo_reference(p.outputs["logits"], h, w),
                               rtol=0, atol=1e-4)
    assert predictor_lib.overlay(p).shape == (h, w, 3)
  assert [p.name for p in out] == [f"q{i}" for i in range(len(sizes))]
  assert not np.array_equal(out[0].outputs["logits"], out[1].outputs["logits"])
  alone = pred.predict(supports, queries[3:4])[0]
  np.testing.assert_array_equal(alone.mask, out[3].mask)
  np.testing.assert_allclose(alone.fg_score, out[3].fg_score, rtol=0, atol=1e-5)


def test_file_errors_name_the_file(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  _write_rgb(tmp_path / "image.png", image)
  np.testing.assert_array_equal(predictor_lib.read_image(tmp_path / "image.png"), image)
  missing = tmp_path / "missing.jpg"
  with pytest.raises(FileNotFoundError, match=f"{missing}: no such image file"):
    predictor_lib.read_image(missing)
  (tmp_path / "empty.jpg").write_bytes(b"")
  with pytest.raises(ValueError, match=r"empty.jpg: empty image file \(0 bytes\)"):
    predictor_lib.read_image(tmp_path / "empty.jpg")
  (tmp_path / "empty.png").write_bytes(b"")
  with pytest.raises(ValueError, match=r"empty.png: empty mask file \(0 bytes\)"):
    predictor_lib.read_mask(tmp_path / "empty.png")
  (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  with pytest.raises(ValueError, match="junk.jpg: cannot decode image"):
    predictor_lib.read_image(tmp_path / "junk.jpg")

  # Masks: binary (nonzero = 1), class ids (255 kept), palette, colour with equal channels.
  ids = np.zeros((20, 30), np.uint8)
  ids[2:8, 3:9], ids[10:15, 10:20], ids[0, :] = 3, 7, 255
  datagen.write_png(str(tmp_path / "ids.png"), ids)
  np.testing.assert_array_equal(predictor_lib.read_mask(tmp_path / "ids.png"), ids != 0)
  np.testing.assert_array_equal(predictor_lib.read_mask(tmp_path / "ids.png", class_id=7),
                                transforms.binarize_label(ids, 7))
  (tmp_path / "palette.png").write_bytes(datagen.palette_png_bytes(ids))
  np.testing.assert_array_equal(predictor_lib.read_mask(tmp_path / "palette.png", 3),
                                transforms.binarize_label(ids, 3))
  datagen.write_png(str(tmp_path / "grey3.png"), np.repeat(ids[..., None], 3, axis=2))
  np.testing.assert_array_equal(predictor_lib.read_mask(tmp_path / "grey3.png"), ids != 0)
  colour = np.zeros((20, 30, 3), np.uint8)
  colour[5:9, 5:9, 2] = 200  # a red object on black
  datagen.write_png(str(tmp_path / "colour.png"), colour)
  with pytest.raises(ValueError, match="colour.png: a colour mask whose channels differ"):
    predictor_lib.read_mask(tmp_path / "colour.png")

  # A mask of another size than its image: both files and both sizes named.
  datagen.write_png(str(tmp_path / "small.png"), ids[:19])
  with pytest.raises(ValueError, match=r"image.png: .*small.png is 19x30 \(HxW\) but the image "
                                       r"is 20x30"):
    predictor_lib.load_support(tmp_path / "image.png", tmp_path / "small.png")
  support = predictor_lib.load_support(tmp_path / "image.png", tmp_path / "ids.png", 7)
  assert support.mask.shape == (20, 30) and support.name.endswith("image.png")


def test_empty_support_warns_and_still_predicts(setup):
  config, _, model, variables, batches = setup
  s = config.data.image_size
  image = np.asarray(np.clip(batches[0]["query"][0] * 50 + 128, 0, 255), np.uint8)
  pred = predictor_lib.Predictor(model, variables, config, batch_size=2)
  empty = predictor_lib.Support(image, np.zeros(image.shape[:2], np.uint8), name="blank.png")
  with pytest.warns(predictor_lib.EmptySupportWarning,
                    match=r"blank.png: its mask has no foreground .*ASGNet then gives that shot "
                          r"a single all-zero prototype") as record:
    out = pred.predict([empty], [image, image[:40]])
  assert len(record) == 1
  assert [p.mask.shape for p in out] == [image.shape[:2], (40, s)]
  assert out[0].warnings == [str(record[0].message)]
  # One object pixel of a 200x200 mask is lost by the nearest-neighbour resize to the input.
  big = cv2.resize(image, (200, 200))
  dot = np.zeros((200, 200), np.uint8)
  dot[1, 1] = 1
  with pytest.warns(predictor_lib.EmptySupportWarning,
                    match=r"dot: its mask's foreground \(1 pixels\) vanishes when the image is "
                          rf"resized to the model's {s}x{s} input"):
    pred.predict([predictor_lib.Support(big, dot, name="dot")], [image])
  full = predictor_lib.Support(image, np.ones(image.shape[:2], np.uint8))
  with pytest.raises(ValueError, match=r"q: 4x300 is too elongated for the model's"):
    pred.predict([full], [np.zeros((4, 300, 3), np.uint8)], names=["q"])


def test_script_refuses_clearly(tmp_path):
  """Same-stem queries (exit 2, before anything loads), a missing support and --explain without
  fss_jax/infer/explain.py (exit 1, before the model loads)."""
  for d in ("a", "b"):
    _write_rgb(tmp_path / d / "x.png", np.zeros((8, 8, 3), np.uint8))
  base = [f"--output={tmp_path}/out", f"--workdir={tmp_path}/no_run"]
  out = _run(f"--support={tmp_path}/a/x.png:{tmp_path}/a/x.png", f"--query={tmp_path}/a",
             f"--query={tmp_path}/b/x.png", *base)
  assert out.returncode == 2, out.stderr
  assert (f"predict.py: error: queries {tmp_path}/a/x.png and {tmp_path}/b/x.png have the same "
          "name 'x'") in out.stderr
  assert not os.path.exists(tmp_path / "out")
  out = _run(f"--support={tmp_path}/nope.jpg:{tmp_path}/a/x.png", f"--query={tmp_path}/a",
             *base)
  assert out.returncode == 1, out.stderr
  assert f"predict.py: error: {tmp_path}/nope.jpg: no such image file" in out.stderr
  assert "Traceback" not in out.stderr
  # --explain when fss_jax.infer.explain cannot be imported (None in sys.modules blocks it).
  argv = ["predict.py", f"--support={tmp_path}/a/x.png:{tmp_path}/a/x.png",
          f"--query={tmp_path}/a", "--explain", *base]
  code = ("import runpy, sys; sys.modules['fss_jax.infer.explain'] = None; "
          f"sys.argv = {argv!r}; runpy.run_path('scripts/predict.py', run_name='__main__')")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=300, check=False)
  assert out.returncode == 1, out.stderr
  assert "predict.py: error: --explain needs fss_jax/infer/explain.py" in out.stderr
  assert "Traceback" not in out.stderr


def test_panet_predicts_with_the_support_canvas_padding_as_neither(tiny_data_dir):
  """PANet through the predictor (its outputs include a scalar, align_loss, which has no
  per-query row): the support's canvas padding is neither foreground nor background, so its
  background prototype is the model's on labels with the padding at 254, not at 255 (which
  PANet reads as void = background)."""
  from fss_jax import configs_lib  # pylint: disable=g-import-not-at-top
  config = configs_lib.load_config("configs/tiny_panet.py")
  config.data.data_dir = tiny_data_dir
  model = registry.build_model(config)
  s = config.data.image_size
  variables = registry.init_variables(model, s, 1, jax.random.key(1))
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (30, 60, 3), dtype=np.uint8)  # wide: padding below
  mask = np.zeros((30, 60), np.uint8)
  mask[8:22, 15:40] = 1
  query = rng.integers(0, 256, (41, 33, 3), dtype=np.uint8)
  (p,) = predictor_lib.Predictor(model, variables, config, batch_size=1).predict(
      [predictor_lib.Support(image, mask)], [query])
  assert p.mask.shape == (41, 33) and "align_loss" not in p.outputs
  supp, label = transforms.eval_resize(image, mask, s)
  q, _ = transforms.eval_resize(query, np.zeros((41, 33), np.uint8), s)
  h, w = transforms.eval_hw(30, 60, s)
  assert h < s and (label[h:] == 255).all()
  bg = {}
  for pad in (transforms.NEITHER, 255):
    lab = label.copy()
    lab[h:], lab[:, w:] = pad, pad
    out = model.apply(variables, q[None], supp[None, None], lab[None, None], train=False)
    bg[pad] = np.asarray(out["bg_prototype"][0])
  np.testing.assert_allclose(p.outputs["bg_prototype"], bg[transforms.NEITHER], rtol=1e-5,
                             atol=1e-6)
  assert not np.allclose(bg[transforms.NEITHER], bg[255], rtol=1e-3)
