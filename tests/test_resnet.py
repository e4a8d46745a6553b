"""Deep-stem dilated ResNet vs a PyTorch transcription of the reference (tests/torch_resnet_ref).

The forward oracle runs in float64, and in float32 to measure the float32 noise that bounds our
error (``numerics``): with batch statistics, 53 BatchNorms amplify float32 rounding to ~1e-4 at
layer4 (PyTorch float32 against float64: 8e-5 here), more than a fixed 1e-4 bound allows on
every CPU.
"""
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
from fss_jax.models import resnet
import numerics
import torch_resnet_ref as ref

_rel_err = numerics.rel_err


def _config(depth=50):
  return configs_lib.set_backbone(configs_lib.base_config(), "resnet", depth)


def _import(state_dict, depth=50):
  """A DeepStemResNet state_dict (the checkpoints' ``layer0.N`` stem naming) → variables."""
  return weights.backbone_from_state_dict(state_dict, _config(depth), scheme="model")


def _numpy_state_dict(model):
  """Numpy copy; float64 tensors are cast to float32 by the importer (the template's dtype)."""
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def torch_r50():
  torch.manual_seed(0)
  return ref.randomize_(ref.DeepStemResNet(50), seed=0)


@pytest.fixture(scope="module")
def variables_r50(torch_r50):
  return _import(_numpy_state_dict(torch_r50))


def _input(batch, size=65, seed=0):
  return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def test_forward_frozen_bn_matches_torch(torch_r50, variables_r50):
  x = _input(1)
  model = copy.deepcopy(torch_r50).double().eval()
  with torch.no_grad():
    want = {k: v.numpy() for k, v in model(torch.from_numpy(x).double()).items()}
    want32 = {k: v.numpy() for k, v in torch_r50.eval()(torch.from_numpy(x)).items()}
  got = jax.jit(lambda v, x: resnet.ResNet(50).apply(v, x, use_running_average=True))(
      variables_r50, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert list(got) == list(resnet.LAYERS)
  for name in resnet.LAYERS:
    g = np.asarray(got[name]).transpose(0, 3, 1, 2)
    assert g.shape == want[name].shape, name
    numerics.assert_parity(g, want[name], want32[name], name)


def test_forward_batch_stats_and_running_updates_match_torch_train_mode(torch_r50,
                                                                        variables_r50):
  x = _input(2, seed=1)
  model = copy.deepcopy(torch_r50).double().train()
  model32 = copy.deepcopy(torch_r50).train()
  with torch.no_grad():
    want = {k: v.numpy() for k, v in model(torch.from_numpy(x).double()).items()}
    want32 = {k: v.numpy() for k, v in model32(torch.from_numpy(x)).items()}
  want_vars = _import(_numpy_state_dict(model))
  want_vars32 = _import(_numpy_state_dict(model32))

  def step(v, x):
    return resnet.ResNet(50).apply(v, x, use_running_average=False, mutable=["batch_stats"])
  got, updates = jax.jit(step)(variables_r50, jnp.asarray(x.transpose(0, 2, 3, 1)))
  for name in resnet.LAYERS:
    numerics.assert_parity(np.asarray(got[name]).transpose(0, 3, 1, 2), want[name],
                           want32[name], name)

  got_stats = flax.traverse_util.flatten_dict(updates["batch_stats"])
  want_stats = flax.traverse_util.flatten_dict(want_vars["batch_stats"])
  want_stats32 = flax.traverse_util.flatten_dict(want_vars32["batch_stats"])
  old_stats = flax.traverse_util.flatten_dict(variables_r50["batch_stats"])
  assert set(got_stats) == set(want_stats)
  for path, want_value in want_stats.items():
    if path[-1] == "num_batches_tracked":
      assert int(got_stats[path]) == int(want_value) == int(old_stats[path]) + 1, path
    else:
      assert not np.allclose(want_value, old_stats[path]), path  # the update did happen
      numerics.assert_parity(got_stats[path], want_value, want_stats32[path], str(path))


def _bn_pair(c, seed):
  g = torch.Generator().manual_seed(seed)
  bn = torch.nn.BatchNorm2d(c)
  with torch.no_grad():
    bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
    bn.bias.copy_(torch.randn(c, generator=g))
    bn.running_mean.copy_(torch.randn(c, generator=g))
    bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
  variables = {
      "params": {"scale": bn.weight.detach().numpy().copy(),
                 "bias": bn.bias.detach().numpy().copy()},
      "batch_stats": {"mean": bn.running_mean.numpy().copy(),
                      "var": bn.running_var.numpy().copy(),
                      "num_batches_tracked": np.zeros((), np.int32)}}
  return bn, variables


def test_torch_batchnorm_train_steps_match_torch():
  """Three train-mode steps (batch statistics, running-statistics updates with the unbiased
  variance): ours in float32 against PyTorch float64, within PyTorch float32's own noise."""
  bn, variables = _bn_pair(5, seed=3)
  bn64 = copy.deepcopy(bn).double()
  bn.train()
  bn64.train()
  module = resnet.TorchBatchNorm()
  rng = np.random.default_rng(0)
  for _ in range(3):
    x = (rng.standard_normal((3, 4, 6, 5)) * 2 + 1).astype(np.float32)  # NHWC
    with torch.no_grad():
      xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
      want32 = bn(xt).numpy().transpose(0, 2, 3, 1)
      want64 = bn64(xt.double()).numpy().transpose(0, 2, 3, 1)
    got, upd = module.apply(variables, jnp.asarray(x), use_running_average=False,
                            mutable=["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": upd["batch_stats"]}
    numerics.assert_parity(got, want64, want32, "output")
    numerics.assert_parity(upd["batch_stats"]["mean"], bn64.running_mean.numpy(),
                           bn.running_mean.numpy(), "running_mean")
    numerics.assert_parity(upd["batch_stats"]["var"], bn64.running_var.numpy(),
                           bn.running_var.numpy(), "running_var")
  assert int(variables["batch_stats"]["num_batches_tracked"]) == 3
  assert int(bn.num_batches_tracked) == 3
  assert variables["batch_stats"]["num_batches_tracked"].dtype == jnp.int32


def test_torch_batchnorm_eval_and_non_mutable_modes():
  bn, variables = _bn_pair(4, seed=4)
  x = np.random.default_rng(1).standard_normal((2, 3, 3, 4)).astype(np.float32)
  module = resnet.TorchBatchNorm()
  bn.eval()
  with torch.no_grad():
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2))
    want32 = bn(xt).numpy().transpose(0, 2, 3, 1)
    want64 = copy.deepcopy(bn).double()(xt.double()).numpy().transpose(0, 2, 3, 1)
  numerics.assert_parity(module.apply(variables, x, use_running_average=True), want64, want32,
                         "eval")
  # Batch statistics without a mutable collection: normalises, updates nothing.
  y = module.apply(variables, x, use_running_average=False)
  x64 = x.astype(np.float64)
  mean = x64.mean((0, 1, 2))
  var = x64.var((0, 1, 2))
  direct = ((x64 - mean) / np.sqrt(var + 1e-5) * variables["params"]["scale"]
            + variables["params"]["bias"])
  # The same formula in float64: float32 rounding of an 18-value mean and variance and one
  # normalisation, ~1e-7 relative (measured 5.5e-8); 1e-6 is 8 ulps of float32.
  assert numerics.rel_err(y, direct) <= 1e-6
  with pytest.raises(ValueError, match="more than 1 value"):
    module.apply(variables, x[:1, :1, :1], use_running_average=False)


def test_init_creates_fresh_stats_without_updating():
  v = resnet.TorchBatchNorm().init(jax.random.PRNGKey(0), jnp.ones((2, 3, 3, 4)),
                                   use_running_average=False)
  np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(4))
  np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(4))
  assert int(v["batch_stats"]["num_batches_tracked"]) == 0
  assert v["params"]["scale"].dtype == jnp.float32


def test_473_gives_60_and_upto(variables_r50):
  assert resnet.resnet_output_stride_size(473) == 60
  assert resnet.resnet_output_stride_size(641) == 81
  x = jax.ShapeDtypeStruct((2, 473, 473, 3), jnp.float32)
  out = jax.eval_shape(lambda v, x: resnet.ResNet(50).apply(v, x), variables_r50, x)
  assert {k: v.shape for k, v in out.items()} == {
      "layer0": (2, 119, 119, 128), "layer1": (2, 119, 119, 256), "layer2": (2, 60, 60, 512),
      "layer3": (2, 60, 60, 1024), "layer4": (2, 60, 60, 2048)}
  out = jax.eval_shape(lambda v, x: resnet.ResNet(50).apply(v, x, upto="layer2"),
                       variables_r50, x)
  assert list(out) == ["layer0", "layer1", "layer2"]


@pytest.mark.parametrize("size", [472, 474, 64, 1])
def test_input_size_must_be_8k_plus_1(size, variables_r50):
  with pytest.raises(ValueError, match="8k\\+1"):
    resnet.resnet_output_stride_size(size)
  x = jax.ShapeDtypeStruct((1, size, 65, 3), jnp.float32)
  with pytest.raises(ValueError, match="8k\\+1"):
    jax.eval_shape(lambda v, x: resnet.ResNet(50).apply(v, x), variables_r50, x)


def test_bad_arguments(variables_r50):
  x = jax.ShapeDtypeStruct((1, 65, 65, 3), jnp.float32)
  with pytest.raises(ValueError, match="upto"):
    jax.eval_shape(lambda v, x: resnet.ResNet(50).apply(v, x, upto="layer5"), variables_r50, x)
  with pytest.raises(ValueError, match="depth"):
    jax.eval_shape(resnet.ResNet(34).init, jax.random.PRNGKey(0), x)


def test_bfloat16_compute_keeps_float32_params(variables_r50):
  model = resnet.ResNet(50, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((1, 65, 65, 3), jnp.float32)
  v = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(v["params"]))
  out = jax.eval_shape(model.apply, v, x)
  assert all(o.dtype == jnp.bfloat16 for o in out.values())


@pytest.mark.parametrize("depth", [50, 101])
def test_variables_match_torch_keys_shapes_and_order(depth):
  """Key-level check (no forward): every torch tensor has exactly one Flax variable."""
  template = weights.backbone_template(_config(depth))
  mapping = keymap.torch_key_map(template, weights.backbone_naming("resnet", "model"))
  with torch.device("meta"):
    model = ref.DeepStemResNet(depth)
  want = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
  got = [(k, keymap.torch_shape(path[-1], tuple(leaf.shape)))
         for k, (_, path, leaf) in mapping.items()]
  assert got == want
  n_params = sum(int(np.prod(l.shape)) for l in jax.tree_util.tree_leaves(template["params"]))
  assert n_params == sum(p.numel() for p in model.parameters())
  if depth == 101:
    assert "layer3_22" in template["params"] and "layer3_23" not in template["params"]
    x = jax.ShapeDtypeStruct((1, 473, 473, 3), jnp.float32)
    out = jax.eval_shape(resnet.ResNet(101).apply, template, x)
    assert out["layer3"].shape == (1, 60, 60, 1024)
