"""PANet's "blog" variant (``model.variant='blog'``, reference_panet.md §15) against its PyTorch
oracle (tests/torch_panet_blog_ref.py), and the guards around it.

On the same weights (the oracle's init, moved into Flax by the checkpoint importer), a SMALL
deep-stem ResNet (width 8, one block per stage; the same code path as ResNet-50) and 41x41
images (6x6 feature maps), B = 2 episodes, 1-shot and 5-shot, BN frozen (eval mode), training
mode: logits, feature-resolution scores, encoder outputs, per-shot masked averages, prototypes,
PAR's query prototypes and per-shot CEs, PAR, the query CE, the total loss, and the gradients
of every layer2/layer3 parameter (layer0/layer1: exactly zero here, no gradient in the oracle).
Float64 exact (``numerics.assert_exact``) and float32 within the float32 oracle's noise
(``numerics.assert_parity``). Support labels hold 1, 0, 255 and 254 (both neither here), query
labels 0, 1 and 255.

Mutation notes (each breaks a test here): align_corners=False in the mask resize or the logits;
bg = (label == 0) | (label == 255); the final ReLU kept in layer3; scaler 20; no stop_gradient
after layer1 (nonzero layer0/1 gradients); PAR from the prediction or with the query prototypes
swapped; the optimiser decaying layer0/layer1.
"""
import copy

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from fss_jax import configs_lib
from fss_jax import weights
from fss_jax.convert import torch_import
from fss_jax.models import backbones
from fss_jax.models import panet
from fss_jax.models import registry
from fss_jax.models import resnet
from fss_jax.train import optim
import numerics
from tests import torch_panet_blog_ref as ref
from tests import torch_resnet_ref

torch.set_num_threads(2)
SIZE = 41  # 41 → 21 → 11 → 11 → 6 → 6
WIDTH, BLOCKS = 8, (1, 1, 1, 1)
B = 2
TRAINED = ("layer2", "layer3")


def _config(shot: int):
  config = configs_lib.base_config("panet")
  configs_lib.set_backbone(config, "resnet_small")
  config.model.backbone_width, config.model.backbone_blocks = WIDTH, BLOCKS
  config.model.variant, config.model.frozen_layers = "blog", ("layer0", "layer1")
  config.model.scaler = 10.0
  config.data.shot, config.data.way = shot, 1
  config.train.frozen_keys = ()
  return config


def _ellipse(rng, size):
  yy, xx = np.mgrid[:size, :size]
  cy, cx = rng.uniform(0.35, 0.65, 2) * size
  ry, rx = rng.uniform(0.2, 0.35, 2) * size
  return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2


def _labels(rng, shape, size, query):
  """An ellipse of 1s with a 255 rim; supports also a rectangle of 254; queries 0/1/255."""
  out = np.zeros(shape + (size, size), np.int64).reshape((-1, size, size))
  for lab in out:
    r = _ellipse(rng, size)
    lab[r <= 1] = 1
    lab[(r > 1) & (r <= 1.3)] = 255
    if not query:
      r0, c0 = rng.integers(2, size // 2, 2)
      lab[r0:r0 + size // 3, c0:c0 + size // 4] = 254
  return out.reshape(shape + (size, size))


class Case(numerics.ModelCase):

  def __init__(self, shot, seed=0):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    self.shot = shot
    self.torch32 = torch_resnet_ref.randomize_(ref.BlogPANet(WIDTH, BLOCKS[:3]), seed=seed)
    self.torch32.eval()
    self.x = rng.standard_normal((B, 3, SIZE, SIZE)).astype(np.float32)
    self.s_x = rng.standard_normal((B, shot, 3, SIZE, SIZE)).astype(np.float32)
    self.s_y = _labels(rng, (B, shot), SIZE, query=False)
    self.y = _labels(rng, (B,), SIZE, query=True)
    self.build(_config(shot), SIZE, shot)
    self.naming = weights.model_naming(self.config)
    self._oracle = {}

  def oracle(self, double: bool) -> dict:
    """(outputs, layer2/layer3 gradients) of the oracle in float64 or float32 (computed once)."""
    if double not in self._oracle:
      self._oracle[double] = self._run_oracle(double)
    return self._oracle[double]

  def _run_oracle(self, double: bool) -> dict:
    model = copy.deepcopy(self.torch32)
    if double:
      model = model.double()
    model.eval()
    cast = (lambda a: torch.from_numpy(a).double()) if double else torch.from_numpy
    out = model(cast(self.s_x), torch.from_numpy(self.s_y), cast(self.x),
                torch.from_numpy(self.y))
    total, query_loss = ref.total_loss(out, torch.from_numpy(self.y))
    total.backward()
    got = {"logits": out["logits"].permute(0, 2, 3, 1), "scores": out["scores"].permute(0, 2, 3, 1),
           "query_feat": out["query_feat"].permute(0, 2, 3, 1),
           "supp_feat": out["supp_feat"].permute(0, 1, 3, 4, 2),
           "supp_fg": out["supp_fg"], "supp_bg": out["supp_bg"],
           "fg_prototype": out["fg_prototype"], "bg_prototype": out["bg_prototype"],
           "qry_prototypes": out["qry_prototypes"], "par_ce": out["par_ce"],
           "align_loss": out["align_loss"], "query_loss": query_loss, "total": total}
    got = {k: v.detach().numpy() for k, v in got.items()}
    grads = {}
    for name, p in model.named_parameters():
      layer = name.split(".")[2]
      if layer in TRAINED:
        grads[name] = p.grad.numpy()
      else:
        assert p.grad is None, name  # layer0 / layer1 ran under no_grad
    return got, grads

  def ours(self, exact: bool):
    net, variables, batch = super().ours(exact)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def loss_fn(params):
      out = net.apply({**variables, "params": params}, batch["query"], batch["supp_images"],
                      batch["supp_labels"], train=True)
      total, terms = net.loss(out, batch)
      par = panet.blog_par(out["query_feat"], out["supp_feat"][:, 0], batch["query_label"],
                           batch["supp_labels"], net.scaler)
      got = {"logits": out["logits"], "scores": out["scores"], "query_feat": out["query_feat"],
             "supp_feat": out["supp_feat"][:, 0], "supp_fg": out["supp_fg"][:, 0],
             "supp_bg": out["supp_bg"][:, 0], "fg_prototype": out["fg_prototypes"][:, 0],
             "bg_prototype": out["bg_prototype"], "qry_prototypes": par["qry_prototypes"],
             "par_ce": par["par_ce"], "align_loss": terms["align_loss"],
             "query_loss": terms["query_loss"], "total": total}
      return total, got

    (_, got), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    got = {k: np.asarray(v) for k, v in got.items()}
    flat = {}
    for path, g in flax.traverse_util.flatten_dict(grads).items():
      g = np.asarray(g)
      flat[self.naming.key("params", path)] = g.transpose(3, 2, 0, 1) if g.ndim == 4 else g
    return got, flat


@pytest.fixture(scope="module", params=[1, 5], ids=lambda s: f"{s}shot")
def case(request):
  return Case(request.param, seed=request.param)


def _split(grads):
  trained = {k: v for k, v in grads.items() if k.split(".")[2] in TRAINED}
  frozen = {k: v for k, v in grads.items() if k.split(".")[2] not in TRAINED}
  return trained, frozen


def test_exact_float64(case):
  want, want_g = case.oracle(double=True)
  with jax.enable_x64(True):
    got, got_g = case.ours(exact=True)
  assert set(got) == set(want)
  for name in want:
    assert got[name].shape == want[name].shape, name
    numerics.assert_exact(got[name], want[name], name)
  trained, frozen = _split(got_g)
  assert set(trained) == set(want_g) and len(trained) > 10
  for name in want_g:
    numerics.assert_exact(trained[name], want_g[name], name)
  assert frozen and all(not np.any(v) for v in frozen.values())


def test_float32_within_the_oracles_noise(case):
  want, want_g = case.oracle(double=True)
  want32, want32_g = case.oracle(double=False)
  got, got_g = case.ours(exact=False)
  for name in want:
    numerics.assert_parity(got[name], want[name], want32[name], name)
  trained, frozen = _split(got_g)
  for name in want_g:
    numerics.assert_parity(trained[name], want_g[name], want32_g[name], name)
  assert all(not np.any(v) for v in frozen.values())


def test_par_is_computed_in_the_loss_and_off_without_align():
  """PAR's loss needs the query label, so it is in ``loss``: the model's inputs stay those of the
  official variant; ``align=False`` leaves only the query CE."""
  case = Case(1, seed=3)
  assert case.net.inputs == ("query", "supp_images", "supp_labels")
  net = case.net.clone(align=False)
  total, terms = jax.jit(lambda v, b: net.loss(net.apply(
      v, b["query"], b["supp_images"], b["supp_labels"], train=True), b))(case.variables,
                                                                          case.batch)
  assert float(terms["align_loss"]) == 0.0 and float(total) == float(terms["query_loss"])


def test_optimizer_leaves_frozen_layers_unchanged():
  """Weight decay and momentum would move layer0/layer1 despite their zero gradients; the
  optimiser masks them (PyTorch's SGD skips parameters without a gradient)."""
  c = Case(1, seed=3)
  config = c.config
  config.train.weight_decay, config.train.total_steps = 5e-4, 10
  tx = optim.make_optimizer(config)
  params = c.variables["params"]
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for path, u in flax.traverse_util.flatten_dict(updates).items():
    frozen = path[1].split("_")[0] in ("layer0", "layer1")
    assert np.all(np.asarray(u) == 1.0) if frozen else not np.any(np.asarray(u) == 1.0), path
  config.model.frozen_layers = ()
  tx = optim.make_optimizer(config)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert all(np.all(np.asarray(u) != 1.0) for u in jax.tree.leaves(updates))


def test_official_variant_unchanged_and_validation():
  m = panet.model_config()
  assert (m.variant, tuple(m.frozen_layers), m.scaler) == ("official", (), 20.0)
  official = configs_lib.base_config("panet")
  configs_lib.set_backbone(official, "vgg16_panet")
  net = registry.build_model(official)
  assert net.variant == "official" and net.frozen_layers == () and net.scaler == 20.0
  blog = registry.build_model(_config(1))
  assert blog.variant == "blog" and blog.backbone.layer3_last_relu is False
  # Inconsistent combinations.
  bad = _config(1)
  bad.data.way = 2
  with pytest.raises(ValueError, match="'blog' is 1-way"):
    registry.build_model(bad)
  bad = _config(1)
  configs_lib.set_backbone(bad, "vgg16_panet")
  with pytest.raises(ValueError, match="model.backbone must be 'resnet'"):
    registry.build_model(bad)
  bad = _config(1)
  bad.model.frozen_layers = ("layer1",)
  with pytest.raises(ValueError, match="must be a prefix"):
    registry.build_model(bad)
  official.model.frozen_layers = ("layer0",)
  with pytest.raises(ValueError, match="'official' trains its whole encoder"):
    registry.build_model(official)
  official.model.frozen_layers, official.model.variant = (), "paper"
  with pytest.raises(ValueError, match="must be one of"):
    registry.build_model(official)
  # The blog module refuses a backbone with layer3's last ReLU (built by hand).
  net = panet.PANet(backbone=resnet.ResNet(width=8, blocks=BLOCKS), variant="blog",
                    frozen_layers=("layer0", "layer1"))
  x = jnp.zeros((1, 17, 17, 3))
  with pytest.raises(ValueError, match="layer3_last_relu=False"):
    net.init(jax.random.key(0), x, x[:, None], jnp.ones((1, 1, 17, 17), jnp.int32), train=False)


def test_resnet_default_keeps_layer3s_last_relu():
  """ASGNet/PFENet's ResNet is the default (layer3_last_relu=True) and computes what it did:
  layer3 = ReLU(the no-ReLU variant's layer3), bit for bit, and layer4 is unchanged."""
  config = configs_lib.base_config("asgnet")
  configs_lib.set_backbone(config, "resnet_small")
  assert backbones.build(config.model).layer3_last_relu is True
  net = resnet.ResNet(width=8, blocks=(1, 1, 2, 1))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 17, 17, 3)), jnp.float32)

  @jax.jit
  def both(x):
    variables = net.init(jax.random.key(1), x, upto="layer4")
    return (net.apply(variables, x, upto="layer3"),
            net.clone(layer3_last_relu=False).apply(variables, x, upto="layer3"))

  default, off = both(x)
  assert np.any(np.asarray(off["layer3"]) < 0)
  np.testing.assert_array_equal(np.asarray(default["layer3"]),
                                np.maximum(np.asarray(off["layer3"]), 0))
  for name in ("layer0", "layer1", "layer2"):
    np.testing.assert_array_equal(np.asarray(default[name]), np.asarray(off[name]))
