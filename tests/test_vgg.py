"""VGG16-bn (PFENet's cut) vs a PyTorch transcription (tests/torch_vgg_ref), and its weights.

Forward parity is bounded by the float32 noise of the oracle (``numerics``); the ImageNet file is
torchvision's ``vgg16_bn`` naming (``features.N.*``, ``classifier.*`` ignored), the checkpoint
naming PFENet's (``layerK.j.*``).
"""
import collections
import copy

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fss_jax import configs_lib
from fss_jax import weights
from fss_jax.convert import keymap
from fss_jax.convert import torch_export
from fss_jax.convert import torch_import
from fss_jax.models import vgg
import numerics
from tests import torch_resnet_ref
from tests import torch_vgg_ref as ref

torch.set_num_threads(2)


def _config():
  return configs_lib.set_backbone(configs_lib.base_config("pfenet"), "vgg16_bn")


@pytest.fixture(scope="module")
def torch_vgg():
  torch.manual_seed(0)
  return torch_resnet_ref.randomize_(ref.VGG16BN(), seed=0)


@pytest.fixture(scope="module")
def variables(torch_vgg):
  sd = {k: v.detach().numpy() for k, v in torch_vgg.state_dict().items()}
  return weights.backbone_from_state_dict(sd, _config(), scheme="model")


def _nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("size", [64, 65])
def test_max_pool_ceil_mode_matches_torch(size):
  x = np.random.default_rng(size).standard_normal((2, 3, size, size + 3)).astype(np.float32)
  want = torch.nn.MaxPool2d(2, 2, ceil_mode=True)(torch.from_numpy(x)).numpy()
  got = _nchw(vgg.max_pool_ceil(jnp.asarray(x.transpose(0, 2, 3, 1))))
  assert got.shape == want.shape == (2, 3, (size + 1) // 2, (size + 4) // 2)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("train", [False, True])
def test_forward_matches_torch(torch_vgg, variables, train):
  """Frozen BN (eval) and the batch-statistics mode with its running-statistics updates."""
  x = np.random.default_rng(1).standard_normal((2, 3, 97, 97)).astype(np.float32)
  models = [copy.deepcopy(torch_vgg).double(), copy.deepcopy(torch_vgg)]
  want = []
  for m in models:
    m.train(train)
    with torch.no_grad():
      out = m(torch.from_numpy(x).to(next(m.parameters()).dtype))
    want.append({k: v.numpy() for k, v in out.items()})
  got, updates = jax.jit(lambda v, x: vgg.VGG16BN().apply(
      v, x, use_running_average=not train, mutable=["batch_stats"]))(
          variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert {k: v.shape[1:3] for k, v in got.items()} == {
      "layer0": (49, 49), "layer1": (25, 25), "layer2": (13, 13), "layer3": (7, 7),
      "layer4": (7, 7)}
  for name in vgg.LAYERS:
    numerics.assert_parity(_nchw(got[name]), want[0][name], want[1][name], name)
  if train:
    naming = weights.backbone_naming("vgg16_bn", "model")
    stats = {naming.key("batch_stats", p): np.asarray(v)
             for p, v in flax.traverse_util.flatten_dict(updates["batch_stats"]).items()}
    for key in ("layer0.1.running_mean", "layer3.7.running_var", "layer4.7.running_mean"):
      numerics.assert_parity(stats[key], models[0].state_dict()[key].numpy(),
                             models[1].state_dict()[key].numpy(), key)


def test_start_at_layer4_continues_from_layer3(variables):
  x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 65, 65, 3)), jnp.float32)
  full = vgg.VGG16BN().apply(variables, x)
  rest = vgg.VGG16BN().apply(variables, full["layer3"], start="layer4")
  assert list(rest) == ["layer4"]
  np.testing.assert_array_equal(rest["layer4"], full["layer4"])
  x473 = jax.ShapeDtypeStruct((1, 473, 473, 3), jnp.float32)
  shapes = jax.eval_shape(vgg.VGG16BN().apply, variables, x473)
  assert [v.shape[1] for v in shapes.values()] == [237, 119, 60, 30, 30]


def test_imagenet_file_import_export(tmp_path, torch_vgg, variables):
  """torchvision's file naming in, ours out; the classifier ignored; old files without
  num_batches_tracked (torchvision's vgg16_bn-6c64b313.pth predates them) load with 0."""
  sd = collections.OrderedDict((k, v.numpy()) for k, v in
                               ref.imagenet_state_dict(torch_vgg, seed=3).items())
  assert "features.41.running_var" in sd and "classifier.6.weight" in sd
  got = weights.backbone_from_state_dict(sd, _config())
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(got["params"]["layer2_7"]["scale"], sd["features.21.weight"])
  np.testing.assert_array_equal(got["params"]["layer4_6"]["bias"], sd["features.40.bias"])
  old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
  got = weights.backbone_from_state_dict(old, _config())
  assert int(got["batch_stats"]["layer1_1"]["num_batches_tracked"]) == 0

  out = weights.backbone_state_dict(variables, "vgg16_bn")
  want = [k for k in sd if not k.startswith("classifier.")]
  assert list(out) == want  # torchvision's order (features.0.weight, features.0.bias, ...)
  for k in want:
    np.testing.assert_array_equal(out[k], sd[k])
  path = str(tmp_path / "vgg16_bn.pth")
  torch.save(ref.imagenet_state_dict(torch_vgg, seed=3), path)
  config = _config()
  config.model.backbone_weights = path
  loaded = weights.read_backbone(path, config)
  np.testing.assert_array_equal(loaded["params"]["layer0_0"]["kernel"],
                                variables["params"]["layer0_0"]["kernel"])


def test_variables_match_the_pfenet_checkpoint_layout(torch_vgg):
  template = weights.backbone_template(_config())
  mapping = keymap.torch_key_map(template, weights.backbone_naming("vgg16_bn", "model"))
  want = [(k, tuple(v.shape)) for k, v in torch_vgg.state_dict().items()]
  assert [(k, keymap.torch_shape(p[-1], tuple(l.shape)))
          for k, (_, p, l) in mapping.items()] == want
  assert sum(x.size for x in jax.tree.leaves(template["params"])) == 14_723_136
  wrong = {k: v.numpy() for k, v in torch_vgg.state_dict().items()}
  wrong["layer3.1.weight"] = np.zeros(7, np.float32)
  with pytest.raises(torch_import.CheckpointMismatchError, match=r"layer3.1.weight \(7,\) vs"):
    weights.backbone_from_state_dict(wrong, _config(), scheme="model", source="x.pth")
  # The naming never guesses BatchNorm from the key: features.1 is a BN only because the
  # Flax variable there is one.
  naming = weights.backbone_naming("vgg16_bn")
  assert naming.key("params", ("layer0_1", "scale")) == "features.1.weight"
  assert naming.key("params", ("layer0_0", "kernel")) == "features.0.weight"
  sd = torch_export.state_dict_from_variables(template and jax.tree.map(
      lambda t: np.zeros(t.shape, t.dtype), template), naming)
  assert list(sd)[:7] == ["features.0.weight", "features.0.bias", "features.1.weight",
                          "features.1.bias", "features.1.running_mean",
                          "features.1.running_var", "features.1.num_batches_tracked"]
