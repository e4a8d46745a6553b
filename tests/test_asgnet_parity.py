"""ASGNet against the PyTorch transcription of the reference (tests/torch_asgnet_ref.py).

Weights go torch → ours through the checkpoint importer (the path users take with the authors'
checkpoints); seeds come from the oracle's host-side scipy procedure on the torch side and from our
on-device placement on ours (they must be equal). Two comparisons per case (``numerics``):
  * exact mode: our model in float64 (jax.enable_x64) against the oracle in float64, to
    ``numerics.EXACT`` — the computation itself, free of float32 rounding, of GPA argmax flips at
    float32 ties and of the ReLU-kink flips that float32 rounding causes in gradients. 65x65 inputs
    (float64 convolutions are slow on XLA's CPU) with ``avg_sp_area`` lowered so that 9x9 masks
    still get 2-5 superpixels;
  * float32: our float32 forward against the float64 oracle, within a multiple of the float32
    oracle's own error (the noise of this CPU), at 233 with the reference's seeding (and 473 in
    the slow tests).
Compared: seeds, prototypes (SGC), GPA's allocation and prob map, final and auxiliary logits; the
loss terms and every head gradient through the public ``train_step`` (dropout off, frozen BN).
The same for the ASGNet + prior and ASGNet + AMM options (the prior map too; AMM's BatchNorm in
training mode on both sides, its updated running statistics compared).
"""
import copy

import flax
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fss_jax import configs_lib
from fss_jax import weights
from fss_jax.models import registry
from fss_jax.train import step as step_lib
import datagen
import numerics
from tests import torch_asgnet_ref as ref
from tests import torch_resnet_ref

torch.set_num_threads(2)
# GPA gives a pixel the prototype of largest cosine; where the top two are closer than this in
# the float64 oracle, a float32 computation may pick either (measured float32 cosine noise:
# ~1e-7). One flipped pixel moves the logits by ~1e-3 through FEM's pooling.
TIE = 1e-6
DOWN_CONV_SCALE = 3e-4


class Case(numerics.ModelCase):
  """One oracle model (float32 and float64 copies), our model and variables, inputs and seeds."""

  def __init__(self, size, shot, batch, tiny=(), bins=(60, 30, 15, 8), avg_sp_area=100,
               tiny_radius=0.02, seed=0, prior=False, amm=False, mask_support_l4=True):
    torch.manual_seed(seed)
    # He-scaled random weights and random BN statistics. (PyTorch's default conv init shrinks the
    # activations layer by layer: logits of ~0.03, too ill-conditioned to compare usefully.)
    self.torch32 = torch_resnet_ref.randomize_(
        ref.RefASGNet(depth=50, shot=shot, bins=bins, prior=prior, amm=amm,
                      mask_support_l4=mask_support_l4), seed)
    # Those weights give reduced features of norm ~4e4 and SGC distances D of ~1e4, for which
    # exp(-D) is a one-hot on the seed pixel (or 0/0 when a seed lies outside the ROI, which the
    # port guards): down_conv is scaled so that D is O(1) and the clustering is a real soft
    # assignment, as with trained weights.
    with torch.no_grad():
      self.torch32.down_conv[0].weight.mul_(DOWN_CONV_SCALE)
    self.torch64 = copy.deepcopy(self.torch32).double()
    rng = np.random.default_rng(seed)
    self.x = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
    self.s_x = rng.normal(size=(batch, shot, 3, size, size)).astype(np.float32)
    self.s_y = datagen.episode_masks(rng, batch, shot, size, tiny=tiny, tiny_radius=tiny_radius)
    self.y = datagen.episode_masks(rng, batch, 1, size)[:, 0]
    self.seeds = np.stack([[ref.place_seed_points((self.s_y[i, j] == 1).astype(np.float32),
                                                  avg_sp_area=avg_sp_area)
                            for j in range(shot)] for i in range(batch)])
    config = configs_lib.base_config("asgnet")
    config.model.bins = bins
    config.model.avg_sp_area = avg_sp_area
    config.model.prior = prior
    config.model.prior_mask_support = mask_support_l4
    config.model.amm = amm
    self.build(config, size, shot)

  def run_torch(self, prepare, fn):
    """fn(model, out) for the float64 and float32 oracles, after prepare(model)."""
    results = []
    for model in (self.torch64, self.torch32):
      prepare(model)
      dtype = next(model.parameters()).dtype
      out = model(x=torch.from_numpy(self.x).to(dtype), s_x=torch.from_numpy(self.s_x).to(dtype),
                  s_y=torch.from_numpy(self.s_y).to(dtype), s_seed=torch.from_numpy(self.seeds))
      results.append(fn(model, out))
    return results


nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)


def _check_eval(case, exact=True):
  """Eval forward: float32 against the float64 oracle within its noise and, when ``exact``,
  float64 to numerics.EXACT. Returns our float32 outputs and the float64 oracle's."""
  def collect(model, out):
    return {"logits": nhwc(out["logits"]), "prob_map": nhwc(out["prob_map"]),
            "prototypes": np.concatenate([p.numpy().T for p in out["prototypes"]]),
            "guide_index": out["guide_index"].numpy(), "top2_gap": out["top2_gap"].numpy(),
            **({"prior": nhwc(out["prior"])} if out.get("prior") is not None else {}),
            **{f"aux_{i}": nhwc(a) for i, a in enumerate(out["aux_logits"])}}
  with torch.no_grad():
    want64, want32 = case.run_torch(lambda m: m.eval(), collect)
  gap = want64.pop("top2_gap")
  index64, _ = want64.pop("guide_index"), want32.pop("guide_index")

  def forward(exact):
    net, variables, batch = case.ours(exact)
    out = jax.jit(lambda v, b: net.apply(v, **step_lib.model_inputs(net, b), train=False))(
        variables, batch)
    valid = np.asarray(out["proto_valid"])
    np.testing.assert_array_equal(np.asarray(out["seeds"]), case.seeds)
    # Our prototypes sit in fixed slots (shot·max_sp + rank); the oracle's are concatenated.
    slot_to_rank = np.cumsum(valid, axis=-1) - 1
    got = {"logits": np.asarray(out["logits"]), "prob_map": np.asarray(out["prob_map"]),
           "prototypes": np.asarray(out["prototypes"])[valid],
           "guide_index": np.stack([slot_to_rank[i][np.asarray(out["guide_index"][i])]
                                    for i in range(len(valid))]),
           **({"prior": np.asarray(out["prior"])} if "prior" in out else {}),
           **{f"aux_{i}": np.asarray(a) for i, a in enumerate(out["aux_logits"])}}
    return got, valid
  assert ("prior" in want64) == case.net.prior
  if exact:
    with jax.enable_x64(True):
      got, _ = forward(True)
      np.testing.assert_array_equal(got.pop("guide_index"), index64)
      for k in want64:
        numerics.assert_exact(got[k], want64[k], k)
  got, valid = forward(False)
  flips = got.pop("guide_index") != index64
  assert (gap[flips] < TIE).all(), "GPA allocation differs away from a float32 tie"
  if flips.any():  # a tie decided the other way: the logits move by ~1e-3 (measured)
    skip = {"logits"} | {k for k in want64 if k.startswith("aux_")}
    assert numerics.rel_err(got["logits"], want64["logits"]) <= 5e-2
  else:
    skip = set()
  for k in want64:
    if k not in skip:
      numerics.assert_parity(got[k], want64[k], want32[k], k)
  n_valid = valid.reshape(case.seeds.shape[:2] + (-1,)).sum(-1)
  return got, n_valid


def _check_train_step(case):
  """Loss terms and head gradients through the public train step, in exact mode: plain SGD
  with lr = 1, so the gradient is old − new (float64: exact to 1e-16 of the weights). Dropout
  off (deterministic) and frozen backbone BN on both sides; SGC runs its 10 training
  iterations. With AMM, its BatchNorm runs in training mode on both sides (batch statistics, one
  running-statistics update per call: query and each shot), and the updated statistics are
  compared too."""
  def prepare(model):
    model.train()
    for name, m in model.named_modules():
      if isinstance(m, torch.nn.Dropout2d) or (isinstance(m, torch.nn.BatchNorm2d)
                                               and name.startswith("layer")):
        m.eval()
    model.zero_grad()

  def grads(model, out):
    y = torch.from_numpy(case.y).long()
    main = F.cross_entropy(out["logits"], y, ignore_index=255)
    aux = sum(F.cross_entropy(a, y, ignore_index=255) for a in out["aux_logits"]) / len(
        out["aux_logits"])
    total = ref.reference_loss(out, y)
    assert abs(total.item() - (main + aux).item()) <= 1e-12 * abs(total.item())
    total.backward()
    return {"main_loss": main.item(), "aux_loss": aux.item(),
            **{n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()
               if p.grad is not None},
            **{f"stats:{n}": b.detach().numpy().copy() for n, b in model.named_buffers()
               if n.startswith("amm.")}}
  want64, _ = case.run_torch(prepare, grads)
  want_stats = {k[6:]: want64.pop(k) for k in list(want64) if k.startswith("stats:")}

  with jax.enable_x64(True):
    got, state = numerics.train_step_gradients(*case.ours(exact=True),
                                               weights.model_naming(case.config))
  head = {k for k in want64 if not k.startswith("layer")}
  # Every head tensor: cls (2 convs, bias on the last) 3, down_conv 1, and per bin corr_conv 1,
  # beta_conv 2, inner_cls 3, alpha_conv 1 (not the first bin), res1 1, res2 2; + 2 losses;
  # AMM: two Linear layers 4, the 7x7 conv 1, its BatchNorm 2.
  amm_tensors = 7 if case.net.amm else 0
  assert set(got) == head and len(head) == 2 + 3 + 1 + 7 * len(case.net.bins) - 1 + 3 + amm_tensors
  assert "backbone" not in state.trainable
  if case.net.amm:
    naming = weights.model_naming(case.config)
    flat = flax.traverse_util.flatten_dict(state.batch_stats["amm"])
    got_stats = {naming.key("batch_stats", ("amm",) + path): np.asarray(v)
                 for path, v in flat.items()}
    assert set(got_stats) == set(want_stats)
    for k in want_stats:
      numerics.assert_exact(got_stats[k].astype(np.float64), want_stats[k], k)
  return {k: numerics.assert_exact(got[k], want64[k], k) for k in head}


def test_head_param_count():
  params = registry.variables_template(registry.build_model(
      configs_lib.base_config("asgnet")))["params"]
  assert registry.head_param_count(params) == 10_423_818


# ---- exact mode (float64), 65x65: 9x9 features, absolute bins larger and smaller than 9 ----

# A small support (radius 6.5 px: ~2 cells of the 9x9 grid) gets no seeds: its prototype is the
# masked average (Weighted_GAP) of a non-empty soft mask.
SMALL = dict(avg_sp_area=5, tiny_radius=0.1)


def test_eval_exact_1shot_batch2_with_a_small_support():
  """Episode 0's only shot is too small to cluster (masked-average fallback: one prototype);
  episode 1's is clustered into several."""
  got, n_valid = _check_eval(Case(65, shot=1, batch=2, tiny=((0, 0),), bins=(12, 6, 4, 2),
                                  **SMALL))
  assert n_valid[0, 0] == 1 and n_valid[1, 0] > 1
  assert np.abs(got["prototypes"][0]).max() > 0  # the fallback saw foreground


def test_eval_exact_5shot():
  got, n_valid = _check_eval(Case(65, shot=5, batch=1, tiny=((0, 2),), bins=(1.0, 0.5, 0.25),
                                  **SMALL))
  assert n_valid[0, 2] == 1 and n_valid.max() > 1


def test_train_step_gradients_exact_1shot_batch2():
  _check_train_step(Case(65, shot=1, batch=2, tiny=((0, 0),), bins=(12, 6, 4, 2), **SMALL))


def test_train_step_gradients_exact_5shot():
  _check_train_step(Case(65, shot=5, batch=1, bins=(12, 6, 3, 2), avg_sp_area=5))


# ---- float32 at the reference's seeding: 233 (30x30 features), 473 in the slow tests ----

@pytest.mark.parametrize("shot", [1, 5])
def test_eval_float32_233(shot):
  batch = 2 if shot == 1 else 1
  _, n_valid = _check_eval(Case(233, shot, batch, tiny=((0, 0),)), exact=False)
  assert n_valid[0, 0] == 1 and n_valid.max() > 1


@pytest.mark.slow
@pytest.mark.parametrize("shot", [1, 5])
def test_eval_float32_473(shot):
  _check_eval(Case(473, shot, batch=1), exact=False)


# ---- ASGNet + prior and ASGNet + AMM (options of the same module), exact mode at 65x65 ----

def test_variant_head_param_counts():
  counts = {}
  for prior, amm in ((True, False), (False, True)):
    config = configs_lib.base_config("asgnet")
    config.model.prior, config.model.amm = prior, amm
    counts[prior, amm] = registry.head_param_count(
        registry.variables_template(registry.build_model(config))["params"])
  assert counts[True, False] == 10_424_842  # 4 corr_conv levels x 256 prior columns
  # AMM at 256 wide: Linear 256->16 and 16->256 with biases, 7x7x2 conv, BN affine.
  assert counts[False, True] == 10_423_818 + (256 * 16 + 16) + (16 * 256 + 256) + 98 + 2


# Both options in one model (each case costs a ResNet-50 oracle in two precisions): a wrong prior
# or a wrong AMM moves every output compared here. Each option alone is the same code path.
BOTH = dict(prior=True, amm=True)


def test_prior_amm_eval_exact_1shot_batch2():
  _check_eval(Case(65, shot=1, batch=2, tiny=((0, 0),), bins=(12, 6, 4, 2), **SMALL, **BOTH))


def test_prior_amm_eval_exact_5shot():
  _check_eval(Case(65, shot=5, batch=1, tiny=((0, 2),), bins=(1.0, 0.5, 0.25), **SMALL, **BOTH))


def test_prior_unmasked_support_eval_exact():
  """``prior_mask_support=False``: layer4 of the support on its unmasked layer3 (the prior
  then still masks the layer4 features, as PFENet's prior code does)."""
  _check_eval(Case(65, shot=2, batch=1, bins=(12, 6), avg_sp_area=5, prior=True,
                   mask_support_l4=False))


def test_prior_amm_train_step_gradients_exact_1shot_batch2():
  _check_train_step(Case(65, shot=1, batch=2, tiny=((0, 0),), bins=(12, 6, 4, 2), **SMALL,
                         **BOTH))


def test_prior_amm_train_step_gradients_exact_5shot():
  _check_train_step(Case(65, shot=5, batch=1, bins=(12, 6, 3, 2), avg_sp_area=5, **BOTH))


def test_prior_and_amm_eval_float32_233():
  """Both options together, float32 at the reference's seeding against the float64 oracle."""
  _check_eval(Case(233, shot=1, batch=2, tiny=((0, 0),), prior=True, amm=True), exact=False)
