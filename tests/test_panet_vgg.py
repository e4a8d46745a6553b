"""PANet's VGG-16 (backbone ``vgg16_panet``, ``vgg.VGG16PANet``) vs the PyTorch transcription of
the official ``Encoder`` (tests/torch_panet_ref), its weights and its initialisation.

Parity: every layer's output and the gradients of all 26 weight tensors, our float64 to
``numerics.EXACT`` and our float32 within the float32 oracle's own noise (``numerics``). The
ImageNet file is torchvision's ``vgg16`` naming (``features.N.*``, 32 keys with the classifier),
loaded into the transcription by PANet's own positional rule; the checkpoint naming is PANet's
``features.{block}.{index}``.
"""
import collections
import copy
import functools
import os
import runpy

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fss_jax import configs_lib
from fss_jax import weights
from fss_jax.convert import io
from fss_jax.convert import keymap
from fss_jax.convert import torch_import
from fss_jax.models import backbones
from fss_jax.models import vgg
import numerics
from tests import torch_panet_ref as ref

torch.set_num_threads(2)
SIZE = 33  # every forward here: (2, 33, 33, 3) → 17 → 9 → 5 → 5 → 5 (one compile per dtype)
_SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def _config():
  return configs_lib.set_backbone(configs_lib.base_config(), "vgg16_panet")


def _nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def _to_flax_layout(g):
  """OIHW conv weight (gradient) → HWIO; a bias as it is."""
  return g.transpose(2, 3, 1, 0) if g.ndim == 4 else g


@pytest.fixture(scope="module")
def imagenet_sd():
  """A synthetic torchvision vgg16 file's state_dict (32 keys, classifier included)."""
  return ref.imagenet_state_dict(seed=3)


@pytest.fixture(scope="module")
def torch_encoder(imagenet_sd):
  """The transcription's Encoder with the ImageNet weights, loaded by PANet's positional rule."""
  torch.manual_seed(0)
  return ref.load_imagenet_positional_(ref.Encoder(), imagenet_sd)


@pytest.fixture(scope="module")
def variables(torch_encoder):
  sd = {k: v.detach().numpy() for k, v in torch_encoder.state_dict().items()}
  return weights.backbone_from_state_dict(sd, _config(), scheme="model")


@functools.lru_cache(maxsize=None)
def _forward(dtype, grads=False):
  """jit: (variables, x NHWC) → layers; with ``grads`` (variables, x, r per layer) → (layers,
  d Σ_layers <layer, r> / d params)."""
  net = vgg.VGG16PANet(dtype=dtype)
  if not grads:
    return jax.jit(net.apply)

  def f(v, x, r):
    def scalar(params):
      out = net.apply({"params": params}, x)
      return sum(jnp.sum(out[k] * r[k]) for k in vgg.LAYERS), out
    grads, out = jax.grad(scalar, has_aux=True)(v["params"])
    return out, grads
  return jax.jit(f)


@pytest.fixture(scope="module")
def parity_case(torch_encoder, variables):
  """Oracle float64 / float32 layers, oracle float64 gradients; ours float64 (exact mode) layers
  and gradients, float32 layers.

  Gradients are compared in float64 only: in float32, a ReLU input or a max-pool runner-up
  within rounding of the winner routes the backward signal differently from float64, a discrete
  change. Measured on this input at 65² (weights as here): PyTorch's own float32 gradients of
  the first ten tensors 4e-3..2.5e-2 away from its float64 ones, ours 3e-3..1.3e-2 for the first
  eight, each from a handful of such flips; at 33² none fell (1e-6 / 8e-7). A float32 bound would test where the
  flips fall, not the computation; the float32 forward covers our float32 arithmetic.
  """
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 3, SIZE, SIZE))
  want = {}
  for name, dt in (("64", torch.float64), ("32", torch.float32)):
    m = copy.deepcopy(torch_encoder).to(dt)
    xt = torch.tensor(x, dtype=dt)
    out = m.layers(xt)
    np.testing.assert_array_equal(out["layer4"].detach().numpy(), m(xt).detach().numpy())
    want[name] = ({k: v.detach().numpy() for k, v in out.items()}, None)
    if name == "64":
      r = {k: rng.standard_normal(v.shape) for k, v in out.items()}
      scalar = sum((out[k] * torch.tensor(r[k], dtype=dt)).sum() for k in out)
      grads = torch.autograd.grad(scalar, list(m.parameters()))
      want[name] = (want[name][0], {k: g.numpy() for (k, _), g in zip(m.named_parameters(), grads)})
  x_nhwc = x.transpose(0, 2, 3, 1)
  got = {}
  with jax.enable_x64(True):
    v64 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
    out, grads = _forward(jnp.float64, grads=True)(
        v64, x_nhwc, {k: v.transpose(0, 2, 3, 1) for k, v in r.items()})
    got["64"] = (jax.tree.map(np.asarray, out), jax.tree.map(np.asarray, grads))
  got["32"] = (jax.tree.map(np.asarray, _forward(jnp.float32)(variables,
                                                               x_nhwc.astype(np.float32))), None)
  return want, got


def test_forward_matches_the_official_encoder(parity_case):
  want, got = parity_case
  for dt in ("64", "32"):
    assert {k: v.shape[1:3] for k, v in got[dt][0].items()} == {
        k: v.shape[2:] for k, v in want["64"][0].items()}
  assert got["64"][0]["layer4"].dtype == np.float64
  for name in vgg.LAYERS:
    numerics.assert_exact(_nchw(got["64"][0][name]), want["64"][0][name], name)
    numerics.assert_parity(_nchw(got["32"][0][name]), want["64"][0][name], want["32"][0][name],
                           name)
  # conv5_3 has no ReLU: PANet's features take both signs.
  assert want["64"][0]["layer4"].min() < 0 < want["64"][0]["layer4"].max()


def test_gradients_match_the_official_encoder(parity_case):
  """The whole encoder trains in PANet: every tensor's gradient, float64 (see ``parity_case``)."""
  want, got = parity_case
  naming = weights.backbone_naming("vgg16_panet", "model")
  flat = {naming.key("params", p): np.asarray(g)
          for p, g in flax.traverse_util.flatten_dict(got["64"][1]).items()}
  assert list(flat) and sorted(flat) == sorted(want["64"][1])
  for key, w64 in want["64"][1].items():
    numerics.assert_exact(flat[key], _to_flax_layout(w64), key)
    assert np.abs(w64).max() > 0, key


@pytest.mark.parametrize("size", [(417, 417), (33, 33), (64, 64), (100, 57), (9, 10)])
def test_output_sizes_match_the_official_encoder(size):
  """Layer sizes against the transcription run on PyTorch's meta device (shapes only): 8k+1
  sides give (H−1)/8+1 (417 → 53), others ⌈⌈⌈H/2⌉/2⌉/2⌉."""
  h, w = size
  with torch.device("meta"):
    want = {k: tuple(v.shape[1:]) for k, v in
            ref.Encoder().layers(torch.empty(1, 3, h, w)).items()}
  x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  net = backbones.build(_config().model)
  shapes = jax.eval_shape(lambda x: net.init_with_output(jax.random.key(0), x)[0], x)
  assert {k: (v.shape[3],) + v.shape[1:3] for k, v in shapes.items()} == want
  for _ in range(3):
    h, w = -(-h // 2), -(-w // 2)
  assert want["layer4"][1:] == (h, w)
  if size == (417, 417):
    stride = (size[0] - 1) // (want["layer4"][1] - 1)
    assert backbones.get("vgg16_panet").stride == stride


def test_imagenet_file_import_by_the_positional_rule(tmp_path, imagenet_sd, torch_encoder,
                                                    variables, parity_case):
  """torchvision's vgg16 file (32 keys) → our variables through the importer users run (.pth,
  torch.load(weights_only=True); scripts/convert_backbone.py) = what PANet's positional load puts
  in its Encoder, and the same outputs; our export writes the file's 26 feature tensors back."""
  assert len(imagenet_sd) == 32 and list(imagenet_sd)[26:] == [
      f"classifier.{i}.{t}" for i in (0, 3, 6) for t in ("weight", "bias")]
  path = str(tmp_path / "vgg16-397923af.pth")
  torch.save(imagenet_sd, path)
  config = _config()
  got = weights.read_backbone(path, config)
  assert set(got) == {"params"}  # no batch statistics
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(variables), strict=True):
    np.testing.assert_array_equal(a, b)
  # Same tensors as the transcription's positional load, by PANet's table (reference §1).
  np.testing.assert_array_equal(got["params"]["features_6_2"]["kernel"],
                                imagenet_sd["features.19.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(got["params"]["features_8_4"]["bias"],
                                imagenet_sd["features.28.bias"].numpy())
  # The same outputs as the positionally loaded Encoder (the parity case's oracle): the imported
  # variables run through the same compiled forward.
  want, _ = parity_case
  x = np.random.default_rng(1).standard_normal((2, 3, SIZE, SIZE))
  out = _forward(jnp.float32)(got, x.transpose(0, 2, 3, 1).astype(np.float32))
  numerics.assert_parity(_nchw(out["layer4"]), want["64"][0]["layer4"], want["32"][0]["layer4"],
                         "layer4 (imported)")
  # The script writes the same variables.
  msgpack = str(tmp_path / "vgg16_panet.msgpack")
  runpy.run_path(os.path.join(_SCRIPTS, "convert_backbone.py"), run_name="script")["main"](
      ["--backbone", "vgg16_panet", "--input", path, "--output", msgpack])
  for a, b in zip(jax.tree.leaves(io.load_variables(msgpack)), jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(a, b)
  # By name, so a file in another key order (a sorted .safetensors) imports the same.
  shuffled = collections.OrderedDict(sorted((k, v.numpy()) for k, v in imagenet_sd.items()))
  assert list(shuffled)[:3] == ["classifier.0.bias", "classifier.0.weight", "classifier.3.bias"]
  for a, b in zip(jax.tree.leaves(weights.backbone_from_state_dict(shuffled, config)),
                  jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(a, b)
  # Export: torchvision's naming and order, without the classifier.
  out = weights.backbone_state_dict(got, "vgg16_panet")
  assert list(out) == list(imagenet_sd)[:26]
  for k, v in out.items():
    np.testing.assert_array_equal(v, imagenet_sd[k].numpy())
  # vgg16_bn's file (BatchNorm at features.1) is refused, naming the keys.
  bn = dict(shuffled, **{"features.1.weight": np.ones(64, np.float32)})
  with pytest.raises(torch_import.CheckpointMismatchError, match=r"features\.1\.weight"):
    weights.backbone_from_state_dict(bn, config, source="vgg16_bn.pth")


def test_variables_match_the_panet_encoder_layout():
  """Our variables in the 'model' naming are the official Encoder's state_dict: keys, order,
  shapes (26 tensors, no buffers), and the paper's 14.7M parameters."""
  template = weights.backbone_template(_config())
  assert set(template) == {"params"}
  mapping = keymap.torch_key_map(template, weights.backbone_naming("vgg16_panet", "model"))
  with torch.device("meta"):
    encoder = ref.Encoder()
  want = [(k, tuple(v.shape)) for k, v in encoder.state_dict().items()]
  assert [(k, keymap.torch_shape(p[-1], tuple(l.shape))) for k, (_, p, l) in mapping.items()] \
      == want
  count = sum(x.size for x in jax.tree.leaves(template["params"]))
  assert count == sum(p.numel() for p in encoder.parameters()) == 14_714_688
  for bad in ("features_1_0", "features_0_4", "features_8_1", "layer0_0", "features_6_2_1"):
    with pytest.raises(ValueError, match="unexpected"):
      vgg.panet_torch_module_path((bad,), "model")


def test_start_at_layer4_continues_from_layer3(variables):
  x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 33, 33, 3)), jnp.float32)
  net = vgg.VGG16PANet()
  full = net.apply(variables, x)
  rest = net.apply(variables, full["layer3"], start="layer4")
  assert list(rest) == ["layer4"]
  np.testing.assert_array_equal(rest["layer4"], full["layer4"])
  # As models run it (backbones.run: the groups in one call; use_running_average ignored).
  other = x[:, ::-1]
  ran = backbones.run(net.bind(variables), [x, other], batch_stats=False, upto="layer4")
  for got, want in zip(ran, (full, net.apply(variables, other))):
    assert list(got) == list(vgg.LAYERS)
    # Two float32 XLA programs (batch 2 vs 1) may sum in other orders: measured 7e-7.
    assert numerics.rel_err(got["layer4"], want["layer4"]) < 1e-5


def test_initialisation_is_panets():
  """Kaiming-normal conv weights with PANet's fan (fan_in, ReLU gain: std √(2/(9·C_in))), not
  truncated; PyTorch's default uniform biases U(±1/√(9·C_in)). Tolerances are a few standard
  errors of each layer's sample; the transcription's init (torch.nn.init) passes the same test."""
  params = vgg.VGG16PANet().init(jax.random.key(0), jnp.zeros((1, 33, 33, 3)))["params"]
  torch.manual_seed(0)
  torch_params = {k: v.detach().numpy() for k, v in ref.Encoder().state_dict().items()}
  naming = weights.backbone_naming("vgg16_panet", "model")
  biases = {"ours": [], "torch": []}
  for name, p in params.items():
    kernel, bias = np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64)
    fan_in = kernel.shape[0] * kernel.shape[1] * kernel.shape[2]
    std, bound = (2.0 / fan_in) ** 0.5, fan_in ** -0.5
    key = naming.key("params", (name, "kernel"))
    for who, w, b in (("ours", kernel, bias),
                      ("torch", torch_params[key], torch_params[key[:-len("weight")] + "bias"])):
      n = w.size
      # std of a normal sample: relative standard error 1/√(2n); 5 of them.
      assert abs(w.std() / std - 1) < 5 / (2 * n) ** 0.5, (who, name, w.std(), std)
      assert abs(w.mean()) < 5 * std / n ** 0.5, (who, name)
      if n > 10 ** 6:  # a normal, not a truncated normal: 4.55% of the mass beyond 2σ
        assert abs(np.mean(np.abs(w) > 2 * std) - 0.0455) < 0.002, (who, name)
      assert np.abs(b).max() <= bound, (who, name)
      biases[who].append(np.asarray(b) / bound)
  for who, b in biases.items():
    b = np.concatenate(b)
    # U(−1, 1): std 1/√3 (relative standard error ≈ 0.7% with 4,224 biases), range covered.
    assert abs(b.std() * 3 ** 0.5 - 1) < 0.04, who
    assert np.abs(b).max() > 0.99 and abs(b.mean()) < 0.05, who
