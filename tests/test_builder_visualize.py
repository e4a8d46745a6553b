"""Config → model (registry), backbone weights (weights.load_backbone), episode pictures."""
import jax
import numpy as np
import pytest

from fss_jax import configs_lib
from fss_jax import weights
from fss_jax.convert import io
from fss_jax.data import transforms
from fss_jax.data import visualize
from fss_jax.models import registry


def _tiny():
  config = configs_lib.load_config("configs/tiny_asgnet.py")
  model = registry.build_model(config)
  return config, model


def test_build_model_follows_the_config():
  config, model = _tiny()
  assert model.backbone.width == configs_lib.SMALL_WIDTH
  assert tuple(model.backbone.blocks) == configs_lib.SMALL_BLOCKS
  assert model.train_backbone  # tiny config freezes nothing
  assert model.bn_batch_stats and model.reduce_dim == config.model.reduce_dim
  assert model.train_iters == config.model.train_iters == 2
  config.train.frozen_keys = ("backbone",)
  config.train.aux_weight = 0.4
  model = registry.build_model(config)
  assert not model.train_backbone and model.aux_weight == 0.4
  config.model.name = "nope"
  with pytest.raises(ValueError, match=r"model.name = 'nope': must be one of \['asgnet'"):
    registry.build_model(config)


@pytest.mark.parametrize("backbone", ["resnet101", "vgg16_bn"])
def test_registry_builds_every_model_with_its_backbone(backbone):
  config = configs_lib.load_config(f"configs/pascal_pfenet.py:backbone={backbone}")
  model = registry.build_model(config)
  assert type(model).__name__ == "PFENet" and model.bins == (60, 30, 15, 8)
  assert type(model.backbone).__name__ == ("VGG16BN" if backbone == "vgg16_bn" else "ResNet")
  assert set(registry.MODELS) >= {"asgnet", "pfenet"}
  for name, module in registry.MODELS.items():  # every model keeps the contract
    m = module.from_config(configs_lib.base_config(name))
    assert callable(m.loss) and m.torch_order
    assert set(registry.dummy_inputs(m, 33, 1)) == set(m.inputs)  # every input can be built
    if registry.task(m) == "episodes":
      assert m.inputs[:3] == ("query", "supp_images", "supp_labels")
      assert m.targets[0] == "query_label"  # the label of 'logits' (the train step's accuracy)
    else:
      assert registry.task(m) == "semantic" and (m.inputs, m.targets) == (("image",), ("label",))


def test_template_matches_initial_variables():
  config, model = _tiny()
  variables = registry.init_variables(model, 33, 1, jax.random.key(0))
  template = registry.variables_template(model)
  assert (jax.tree.map(lambda x: (x.shape, x.dtype), template)
          == jax.tree.map(lambda x: (x.shape, x.dtype), variables))


def test_load_backbone_replaces_only_the_backbone(tmp_path):
  config, model = _tiny()
  a = registry.init_variables(model, 33, 1, jax.random.key(0))
  b = jax.tree.map(lambda x: np.asarray(x) + 1, a)  # other values, same structure
  path = str(tmp_path / "backbone.msgpack")
  io.save_variables(path, {"params": a["params"]["backbone"],
                           "batch_stats": a["batch_stats"]["backbone"]})
  out = weights.load_backbone(b, config, path)
  for coll in ("params", "batch_stats"):
    for x, y in zip(jax.tree.leaves(out[coll]["backbone"]), jax.tree.leaves(a[coll]["backbone"])):
      np.testing.assert_array_equal(x, y)
  for x, y in zip(jax.tree.leaves(out["params"]["down_conv_0"]),
                  jax.tree.leaves(b["params"]["down_conv_0"])):
    np.testing.assert_array_equal(x, y)  # the head is untouched
  config.model.backbone_width = 32
  wider = jax.tree.map(lambda t: np.zeros(t.shape, t.dtype),
                       registry.variables_template(registry.build_model(config)))
  with pytest.raises(ValueError, match="do not match"):
    weights.load_backbone(wider, config, path)


def test_episode_row_layout_and_colours(tmp_path):
  rng = np.random.default_rng(0)
  s, k = 33, 2
  raw = rng.integers(0, 256, size=(s, s, 3)).astype(np.float32)
  query = transforms.normalize(raw)
  np.testing.assert_array_equal(visualize.denormalize(query), raw.astype(np.uint8))
  label = np.zeros((s, s), np.uint8)
  label[5:20, 5:20] = 1
  label[30:] = 255
  pred = np.zeros((s, s), np.int32)
  pred[10:25, 10:25] = 1
  row = visualize.episode_row(query, label, np.stack([query] * k), np.stack([label] * k), pred,
                              cell=40)
  assert row.shape == (40, (k + 2) * 40 + (k + 1) * 4, 3) and row.dtype == np.uint8
  over = visualize.overlay(np.zeros((s, s, 3), np.uint8), pred, visualize.PRED_COLOUR)
  inside = over[15, 15].astype(int)
  assert inside[0] > inside[1] and inside[0] > inside[2]  # tinted red inside the prediction
  assert np.all(over[2, 2] == 0)  # untouched outside
  path = str(tmp_path / "grid.png")
  visualize.write_grid(path, [row, row[:, :50]])
  import cv2  # pylint: disable=g-import-not-at-top
  assert cv2.imread(path).shape == (2 * (40 + 4), row.shape[1], 3)
  with pytest.raises(ValueError, match="no rows"):
    visualize.write_grid(path, [])
