"""Evaluator: batched, padded, sharded scoring equals a per-episode loop; original-label resize."""
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fss_jax import configs_lib
from fss_jax.data import episodes
from fss_jax.data import pipeline
from fss_jax.data import schema
from fss_jax.data import synthetic
from fss_jax.data import transforms
from fss_jax.models import registry
from fss_jax.train import evaluator as E
from fss_jax.train import metrics
from fss_jax.train import sharding
import numerics

SIZE = 41
MIN_PIXELS = 64


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic_eval")
  synthetic.write_synthetic_dataset(str(out), num_train=8, num_val=30, image_size=72, seed=5)
  return str(out)


@pytest.fixture(scope="module")
def model_and_variables():
  config = configs_lib.load_config("configs/tiny_asgnet.py")
  model = registry.build_model(config)
  variables = registry.init_variables(model, SIZE, 1, jax.random.key(3))
  return model, variables


@pytest.mark.parametrize("sides", [(41, 30, 7), (1, 2, 41)])
def test_resize_to_original_matches_torch_interpolate(sides):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(len(sides), 17, 17)).astype(np.float32)
  canvas = 45
  got = np.asarray(E.resize_to_original(x, np.asarray(sides), canvas))
  assert got.shape == (len(sides), canvas, canvas)
  for b, side in enumerate(sides):
    want64, want32 = (F.interpolate(torch.from_numpy(x[b])[None, None].to(dtype),
                                    size=(side, side), mode="bilinear",
                                    align_corners=True)[0, 0].numpy()
                      for dtype in (torch.float64, torch.float32))
    numerics.assert_parity(got[b, :side, :side], want64, want32, f"side {side}")
    assert not np.any(got[b, side:]) and not np.any(got[b, :, side:])


def _loop_meter(model, variables, dataset_dir, num_episodes, seed, which, original=False,
                shot=1):
  """Oracle: one episode at a time, no padding, no sharding, numpy scoring."""
  manifest = schema.load_manifest(dataset_dir)
  eps = episodes.eval_episode_list(manifest, "val", 0, shot, num_episodes, seed, MIN_PIXELS,
                                   which=which)
  reader = manifest.source("val").reader
  meter = metrics.FewShotMeter(episodes.fold_classes(manifest, 0, which))

  def load(index, class_id):
    image, label = pipeline.decode_record(reader[index])
    label = transforms.binarize_label(label, class_id)
    img, lab = transforms.eval_resize(image, label, SIZE)
    return img, lab, label

  forward = jax.jit(lambda v, q, s, sl: model.apply(v, q, s, sl, train=False)["logits"])
  for ep in eps:
    q, ql, orig = load(ep.query, ep.class_id)
    supports = [load(i, ep.class_id)[:2] for i in ep.supports]
    s = np.stack([x for x, _ in supports])[None]
    sl = np.stack([y for _, y in supports])[None]
    logits = np.array(forward(variables, q[None], s, sl)[0])
    if original:
      side = max(orig.shape)
      up = F.interpolate(torch.from_numpy(logits).permute(2, 0, 1)[None], size=(side, side),
                         mode="bilinear", align_corners=True)[0].numpy()
      pred = (up[1] > up[0]).astype(np.int64)
      target = np.full((side, side), 255, np.int64)
      target[:orig.shape[0], :orig.shape[1]] = orig
      inter, union = metrics.episode_stats(pred, target)
    else:
      inter, union = metrics.episode_stats(logits.argmax(-1), ql)
    meter.update(ep.class_id, inter, union)
  return meter


@pytest.mark.parametrize("which,original", [("novel", False), ("base", False),
                                            ("novel", True)])
def test_evaluator_equals_a_per_episode_loop(model_and_variables, dataset_dir, which,
                                             original):
  model, variables = model_and_variables
  n = 7  # not a multiple of the batch: the last batch is padded
  ev = E.Evaluator(model, sharding.make_mesh(), dataset_dir, fold=0, shot=1, image_size=SIZE,
                   batch_size=3, num_episodes=n, classes=which, original_label=original,
                   min_pixels=MIN_PIXELS)
  result = ev.run(variables, seed=11)
  want = _loop_meter(model, variables, dataset_dir, n, 11, which, original)
  assert result.meter.num_episodes == n
  assert result.meter.state_dict()["counts"] == want.state_dict()["counts"]
  assert result.miou == pytest.approx(want.miou())
  assert result.fbiou == pytest.approx(want.fbiou())
  manifest = schema.load_manifest(dataset_dir)
  assert result.classes == episodes.fold_classes(manifest, 0, which)
  assert (set(result.classes) & set(manifest.novel_folds[0])) == (
      set(manifest.novel_folds[0]) if which == "novel" else set())


def test_pfenet_evaluated_with_other_shots_than_trained(dataset_dir):
  """PFENet's protocol: a model initialised (and trained) 1-shot, evaluated 2-shot through
  ``data.eval_shot``; the evaluator equals the per-episode loop for any registered model."""
  config = configs_lib.load_config("configs/tiny_pfenet.py")
  config.data.eval_shot, config.data.image_size = 2, SIZE
  config.data.eval_episodes, config.data.eval_batch_size = 5, 2
  config.data.min_class_pixels = MIN_PIXELS
  model = registry.build_model(config)
  variables = registry.init_variables(model, SIZE, config.data.shot, jax.random.key(4))
  ev = E.from_config(config, model, sharding.make_mesh(), dataset_dir)
  assert (ev.shot, config.data.shot) == (2, 1)
  result = ev.run(variables, seed=3)
  want = _loop_meter(model, variables, dataset_dir, 5, 3, "novel", shot=2)
  assert result.meter.state_dict()["counts"] == want.state_dict()["counts"]


def test_multi_seed_protocol_reports_mean_and_std(model_and_variables, dataset_dir):
  model, variables = model_and_variables
  ev = E.Evaluator(model, sharding.make_mesh(), dataset_dir, fold=0, shot=1, image_size=SIZE,
                   batch_size=4, num_episodes=5, min_pixels=MIN_PIXELS)
  out = ev.run_seeds(variables, [1, 2, 3])
  per_seed = [ev.run(variables, s).miou for s in (1, 2, 3)]
  assert out["miou"]["n"] == 3
  assert out["miou"]["mean"] == pytest.approx(np.mean(per_seed))
  assert out["miou"]["std"] == pytest.approx(np.std(per_seed))
  assert "±" in E.format_seeds(out) or out["miou"]["std"] == 0
