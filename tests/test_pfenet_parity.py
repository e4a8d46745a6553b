"""PFENet against the PyTorch transcription of the official forward (tests/torch_pfenet_ref.py,
itself equal to the official model/PFENet.py bit for bit on CPU).

Weights go torch → ours through the checkpoint importer (the path users take with the authors'
checkpoints). Two comparisons per case (``numerics``):
  * exact mode: our model in float64 (jax.enable_x64) against the oracle in float64, to
    ``numerics.EXACT`` — the computation itself, free of float32 rounding and of the ReLU-kink
    flips that float32 rounding causes in gradients;
  * float32: our float32 forward against the float64 oracle, within a multiple of the float32
    oracle's own error (the noise of this CPU).
Compared: the prior mask, the per-shot and mean prototypes, final and auxiliary logits; the loss
terms and every head gradient through the public ``train_step`` (dropout off, frozen BN); and
the batch-statistics BN quirk (logits and layer4's running statistics). ResNet-50 and VGG16-bn,
1-shot and 5-shot, an empty support mask (prior ≡ 0 for that shot), small sizes in every run and
473 in the slow tests.
"""
import copy

import flax
import jax
import numpy as np
import pytest
import torch

from fss_jax import configs_lib
from fss_jax import weights
from fss_jax.models import prior as prior_lib
from fss_jax.models import registry
from fss_jax.train import step as step_lib
import datagen
import numerics
from tests import torch_pfenet_ref as ref
from tests import torch_resnet_ref

torch.set_num_threads(2)
BACKBONES = {"resnet": 50, "vgg16_bn": "vgg"}  # our config name → the oracle's `layers`


def _config(backbone, bins=(60, 30, 15, 8), bn_mode="frozen"):
  config = configs_lib.base_config("pfenet")
  configs_lib.set_backbone(config, backbone)
  config.model.bins = bins
  config.model.bn_mode = bn_mode
  return config


class Case(numerics.ModelCase):
  """One oracle model (float32 and float64 copies), our model and variables, and inputs."""

  def __init__(self, backbone, size, shot, batch, empty=(), bins=(60, 30, 15, 8),
               bn_mode="frozen", seed=0):
    torch.manual_seed(seed)
    self.torch32 = torch_resnet_ref.randomize_(
        ref.RefPFENet(layers=BACKBONES[backbone], shot=shot, bins=bins), seed)
    self.torch64 = copy.deepcopy(self.torch32).double()
    rng = np.random.default_rng(seed)
    self.x = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
    self.s_x = rng.normal(size=(batch, shot, 3, size, size)).astype(np.float32)
    self.s_y = datagen.episode_masks(rng, batch, shot, size, empty)
    self.y = datagen.episode_masks(rng, batch, 1, size)[:, 0]
    self.build(_config(backbone, bins, bn_mode), size, shot)

  def torch_inputs(self, model):
    dtype = next(model.parameters()).dtype
    return dict(x=torch.from_numpy(self.x).to(dtype), s_x=torch.from_numpy(self.s_x).to(dtype),
                s_y=torch.from_numpy(self.s_y).to(dtype))

  def run_torch(self, prepare, fn):
    """fn(model, out) for the float64 and float32 oracles, after prepare(model)."""
    results = []
    for model in (self.torch64, self.torch32):
      prepare(model)
      results.append(fn(model, model(**self.torch_inputs(model))))
    return results


nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)


def _check(got, want64, want32=None, exact=False):
  """Every entry of ``want64`` against ``got``: to numerics.EXACT, or within the float32 noise
  measured by ``want32``. Returns the errors."""
  if exact:
    return {k: numerics.assert_exact(got[k], want64[k], k) for k in want64}
  return {k: numerics.assert_parity(got[k], want64[k], want32[k], k) for k in want64}


def _check_eval(case, exact=True):
  """Eval forward: float32 against the float64 oracle within its noise and, when ``exact``,
  float64 to numerics.EXACT (float64 convolutions are slow on XLA's CPU: small sizes only)."""
  def collect(model, out):
    return {"logits": nhwc(out["logits"]), "prior": nhwc(out["prior"]),
            "prototype": out["prototype"].detach().numpy()[:, :, 0, 0],
            "shot_prototypes": np.stack([p.detach().numpy()[:, :, 0, 0]
                                         for p in out["shot_prototypes"]], 1),
            **{f"aux_{i}": nhwc(a) for i, a in enumerate(out["aux_logits"])}}
  with torch.no_grad():
    want64, want32 = case.run_torch(lambda m: m.eval(), collect)

  def forward(exact):
    net, variables, batch = case.ours(exact)
    out = jax.jit(lambda v, b: net.apply(v, **step_lib.model_inputs(net, b), train=False))(
        variables, batch)
    return {k: np.asarray(v) for k, v in out.items() if k != "aux_logits"} | {
        f"aux_{i}": np.asarray(a) for i, a in enumerate(out["aux_logits"])}
  if exact:
    with jax.enable_x64(True):
      _check(forward(True), want64, exact=True)
  out = forward(False)
  _check(out, want64, want32)
  return out, want64


def _check_train_step(case):
  """Loss terms and head gradients through the public train step, in exact mode: plain SGD
  with lr = 1, so the gradient is old − new (float64: exact to 1e-16 of the weights). Dropout
  off (deterministic) and frozen BN on both sides."""
  def prepare(model):
    model.train()
    for m in model.modules():
      if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.Dropout2d)):
        m.eval()
    model.zero_grad()

  def grads(model, out):
    main, aux = ref.loss_terms(out, torch.from_numpy(case.y))
    (main + aux).backward()
    return {"main_loss": main.item(), "aux_loss": aux.item(),
            **{n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()
               if p.grad is not None}}
  want64, _ = case.run_torch(prepare, grads)

  with jax.enable_x64(True):
    got, state = numerics.train_step_gradients(*case.ours(exact=True),
                                               weights.model_naming(case.config))
  head = {k for k in want64 if not k.startswith("layer")}
  # Every head tensor of reference_pfenet.md §6 (35 with 4 bins: 8 + 7 per bin − 1) + 2 losses.
  assert set(got) == head and len(head) == 2 + 7 * len(case.net.bins) + 7
  assert "backbone" not in state.trainable
  return _check(got, {k: want64[k] for k in head}, exact=True)


# ---- parameters ----

@pytest.mark.parametrize("backbone,head", [("resnet", 10_817_034), ("vgg16_bn", 10_423_818)])
def test_head_param_counts(backbone, head):
  """reference_pfenet.md §6; the VGG backbone has 14,723,136 learnable parameters (§1)."""
  params = registry.variables_template(registry.build_model(_config(backbone)))["params"]
  assert registry.head_param_count(params) == head
  if backbone == "vgg16_bn":
    assert sum(x.size for x in jax.tree.leaves(params["backbone"])) == 14_723_136


# ---- the prior alone ----

@pytest.mark.parametrize("scale", [1.0, 1e-4])
def test_prior_mask_matches_reference(scale):
  """prior.prior_mask against the transcription's, in float64, including features so small
  that the eps on the product of norms (1e-7, not a per-vector clamp) decides the value, and a
  shot with an empty mask (its map is exactly 0)."""
  rng = np.random.default_rng(4)
  b, k, h, size = 2, 3, 7, 49
  q4 = np.maximum(rng.normal(size=(b, 16, h, h)), 0) * scale
  s4 = np.maximum(rng.normal(size=(b, k, 16, h, h)), 0) * scale
  fg = (datagen.episode_masks(rng, b, k, size, empty=((1, 2),)) == 1).astype(np.float64)
  maps = [ref.prior_mask(torch.from_numpy(q4), torch.from_numpy(s4[:, i]),
                         torch.from_numpy(fg[:, i:i + 1]), (h, h)) for i in range(k)]
  want = torch.cat(maps, 1).mean(1).numpy()
  with jax.enable_x64(True):
    got = prior_lib.prior_mask(q4.transpose(0, 2, 3, 1), s4.transpose(0, 1, 3, 4, 2), fg,
                               (h, h))
    numerics.assert_exact(np.asarray(got)[..., 0], want, "prior")
  assert np.abs(maps[2][1].numpy()).max() == 0.0  # the empty shot


# ---- eval forward: prior, prototypes, logits ----
# 65x65 inputs: 9x9 ResNet maps, 5x5 VGG maps (float64 convolutions are slow on XLA's CPU).

def test_eval_resnet_1shot_with_an_empty_support():
  """Absolute bins, 12 larger than the 9x9 map (AdaptiveAvgPool2d up-samples by replication,
  as the PASCAL bin 60 does on VGG's 30x30 map), 6/4/2 smaller; episode 1's only support is
  empty: its prior and prototype are exactly 0."""
  out, want = _check_eval(Case("resnet", 65, shot=1, batch=2, empty=((1, 0),),
                               bins=(12, 6, 4, 2)))
  assert np.abs(out["prior"][1]).max() == 0.0 == np.abs(want["prior"][1]).max()
  assert np.abs(out["prototype"][1]).max() == 0.0
  assert float(out["prior"][0].max()) > 0.5  # the other episode's prior is not trivial


def test_eval_vgg_5shot_relative_bins():
  _check_eval(Case("vgg16_bn", 65, shot=5, batch=1, empty=((0, 2),), bins=(1.0, 0.5, 0.25)))


# ---- train step: loss terms and head gradients ----

def test_train_step_gradients_resnet_5shot():
  _check_train_step(Case("resnet", 65, shot=5, batch=1, bins=(12, 6, 3, 2)))


def test_train_step_gradients_vgg_1shot():
  _check_train_step(Case("vgg16_bn", 65, shot=1, batch=2, bins=(1.0, 0.5, 0.25)))


def test_batch_statistics_quirk_matches_train_mode_bn():
  """bn_mode='batch_stats': BN in train mode in every backbone call (the query, each shot,
  layer4 on each shot's masked layer3), running statistics updated: logits and layer4 stats."""
  case = Case("resnet", 65, shot=2, batch=2, bins=(1.0, 0.5, 0.25, 0.125),
              bn_mode="batch_stats")

  def prepare(model):
    model.train()
    for m in model.modules():
      if isinstance(m, torch.nn.Dropout2d):
        m.eval()

  def collect(model, out):
    stats = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()
             if k.startswith("layer4.") and "running_" in k}
    return {"logits": nhwc(out["logits"]), **stats}
  with torch.no_grad():
    want64, _ = case.run_torch(prepare, collect)
  with jax.enable_x64(True):
    net, variables, batch = case.ours(exact=True)
    out, updates = jax.jit(lambda v, b: net.apply(
        v, **step_lib.model_inputs(net, b), train=True, deterministic=True,
        mutable=["batch_stats"]))(variables, batch)
  naming = weights.model_naming(case.config)
  flat = flax.traverse_util.flatten_dict(updates["batch_stats"])
  got = {"logits": np.asarray(out["logits"]),
         **{naming.key("batch_stats", p): np.asarray(v) for p, v in flat.items()}}
  layer4 = [k for k in want64 if k.startswith("layer4.")]
  assert len(layer4) == 2 * 10  # 3 BNs in each of 3 bottlenecks + the downsample BN: mean, var
  _check(got, want64, exact=True)
  # layer4 ran 1 + shot times (the query, each masked shot).
  path = ("backbone", "layer4_0", "bn1", "num_batches_tracked")
  before = flax.traverse_util.flatten_dict(case.variables["batch_stats"])[path]
  assert int(flat[path]) == int(before) + 3


# ---- 473 (slow; float32 only) ----

@pytest.mark.slow
def test_eval_473_resnet_1shot():
  _check_eval(Case("resnet", 473, shot=1, batch=1), exact=False)


@pytest.mark.slow
def test_eval_473_vgg_5shot():
  _check_eval(Case("vgg16_bn", 473, shot=5, batch=1), exact=False)
