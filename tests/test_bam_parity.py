"""PSPNet (BAM's stage-1 base learner) and BAM against the PyTorch transcription of the official
forwards (tests/torch_bam_ref.py, itself checked against chunbolang/BAM's model/PSPNet.py and
model/BAM.py on CPU).

Weights go torch → ours through the checkpoint importer (PSPNet's official file holds every
backbone tensor twice, ``layerN.*`` and ``encoder.N.*``). Two comparisons per case
(``numerics``): our model in float64 against the float64 oracle to ``numerics.EXACT``, and our
float32 forward within a multiple of the float32 oracle's own error.
PSPNet: logits, PPM output; the training step with BN in batch-statistics mode (every parameter's
gradient, backbone included, and the updated running statistics). BAM: final, meta and base
logits, priors, prototypes, ψ, the k-shot weights (1- and 5-shot, BAM's and MSANet's un-sorting),
ResNet-50 and VGG16-bn, a shot with an empty mask; the training step's three loss terms and every
trainable gradient with the training-only ensemble rule (the episode's own base class left out).
33×33 ResNet inputs (5×5 maps: the PPM bins 2 and 3 take PyTorch's overlapping windows, bin 6
up-samples by replication) and 65×65 VGG inputs (5×5 maps); float64 convolutions are slow on
XLA's CPU.
"""
import copy

import jax
import numpy as np
import pytest
import torch

from fss_jax import configs_lib
from fss_jax import weights
from fss_jax.convert import torch_import
from fss_jax.models import registry
from fss_jax.train import step as step_lib
import datagen
import numerics
from tests import torch_bam_ref as ref
from tests import torch_resnet_ref

torch.set_num_threads(2)
LAYERS = {"resnet": 50, "vgg16_bn": "vgg"}  # our backbone name → the oracle's `layers`
CLASSES = 16
nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)


def _config(name, backbone, shot=1, **model):
  config = configs_lib.base_config(name)
  configs_lib.set_backbone(config, backbone)
  config.data.shot = shot
  config.model.classes = CLASSES
  for k, v in model.items():
    config.model[k] = v
  return config


def _variables(torch_model, net, config, size, shot):
  sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  template = registry.variables_template(net, size, shot)
  return torch_import.variables_from_torch(weights.resolve_aliases(sd, net), template,
                                           weights.model_naming(config))


def _check(got, want64, want32=None, exact=False):
  if exact:
    return {k: numerics.assert_exact(got[k], want64[k], k) for k in want64}
  return {k: numerics.assert_parity(got[k], want64[k], want32[k], k) for k in want64}


# ----------------------------------------------------------------------------- PSPNet


class PSPCase:
  def __init__(self, backbone, size=33, batch=2, seed=0, bn_mode="batch_stats"):
    torch.manual_seed(seed)
    self.torch32 = torch_resnet_ref.randomize_(ref.RefPSPNet(LAYERS[backbone], CLASSES), seed)
    self.torch64 = copy.deepcopy(self.torch32).double()
    rng = np.random.default_rng(seed)
    self.x = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
    self.y = rng.integers(0, CLASSES, size=(batch, size, size))
    self.y[:, :2] = 255
    self.config = _config("pspnet", backbone, bn_mode=bn_mode)
    self.config.train.frozen_keys = ()  # stage 1 trains the whole network
    self.net = registry.build_model(self.config)
    self.variables = _variables(self.torch32, self.net, self.config, size, 1)
    self.batch = {"image": self.x.transpose(0, 2, 3, 1), "label": self.y.astype(np.int32)}

  def ours(self, exact):
    if not exact:
      return self.net, self.variables, self.batch
    return numerics.float64_copies(self.net, self.variables, self.batch)


@pytest.mark.parametrize("backbone,total", [("resnet", 46_713_808), ("vgg16_bn", 19_714_128)])
def test_pspnet_param_counts(backbone, total):
  """reference_msanet.md §13: PASCAL PSPNet (C = 16), all of it learnable in stage 1."""
  params = registry.variables_template(registry.build_model(_config("pspnet", backbone)))
  assert sum(x.size for x in jax.tree.leaves(params["params"])) == total


@pytest.mark.parametrize("backbone", ["resnet", "vgg16_bn"])
def test_pspnet_eval_forward(backbone):
  case = PSPCase(backbone)
  collect = lambda out: {"logits": nhwc(out["logits"]), "ppm": nhwc(out["ppm"])}
  with torch.no_grad():
    want = [collect(m.eval()(torch.from_numpy(case.x).to(next(m.parameters()).dtype)))
            for m in (case.torch64, case.torch32)]

  def forward(exact):
    net, variables, batch = case.ours(exact)
    out = jax.jit(lambda v, b: net.apply(v, **step_lib.model_inputs(net, b), train=False))(
        variables, batch)
    return {"logits": np.asarray(out["logits"]), "ppm": np.asarray(out["ppm"])}
  with jax.enable_x64(True):
    _check(forward(True), want[0], exact=True)
  _check(forward(False), want[0], want[1])


def test_pspnet_train_step_batch_statistics():
  """The stage-1 step: BN in train mode everywhere (the reference's SyncBN over the batch),
  dropout off; the CE loss, the gradient of every parameter (backbone included: the whole
  network is fine-tuned) and the running statistics after the step, in float64."""
  case = PSPCase("resnet", batch=2)
  model = case.torch64
  model.train()
  for m in model.modules():
    if isinstance(m, torch.nn.Dropout2d):
      m.eval()
  model.zero_grad()
  out = model(torch.from_numpy(case.x).double())
  loss = ref.pspnet_loss(out, torch.from_numpy(case.y))
  loss.backward()
  want = {"main_loss": loss.item()}
  want.update({k: p.grad.numpy().copy() for k, p in model.named_parameters()
               if not k.startswith("encoder.")})
  stats = {k: v.numpy().copy() for k, v in model.state_dict().items()
           if "running_" in k and not k.startswith("encoder.")}
  naming = weights.model_naming(case.config)
  with jax.enable_x64(True):
    got, state = numerics.train_step_gradients(*case.ours(exact=True), naming,
                                               terms=("main_loss",), frozen_keys=())
    import flax  # pylint: disable=g-import-not-at-top
    for path, v in flax.traverse_util.flatten_dict(state.batch_stats).items():
      key = naming.key("batch_stats", path)
      if "running_" in key:
        got[key] = np.asarray(v)
  assert set(got) == set(want) | set(stats)
  assert any(k.startswith("layer0.") for k in want)  # the backbone is trained
  _check(got, {**want, **stats}, exact=True)


def test_pspnet_official_checkpoint_round_trip(tmp_path):
  """BAM's best.pth ({'epoch', 'state_dict', 'optimizer'}, 'module.' keys, both copies of the
  backbone) → ours → export: the official model loads it strictly with equal tensors; a file
  whose two copies disagree is refused, naming both keys."""
  case = PSPCase("vgg16_bn", batch=1)
  path = str(tmp_path / "best.pth")
  torch.save(ref.official_checkpoint(case.torch32), path)
  variables = weights.read_model(path, case.net, case.config)
  sd = weights.model_state_dict(variables, case.config)
  theirs = case.torch32.state_dict()
  assert list(sd) == list(theirs)  # keys and order, encoder.* copies included
  fresh = ref.RefPSPNet("vgg", CLASSES)
  fresh.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()},
                        strict=True)
  for k, v in fresh.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), theirs[k].numpy(), err_msg=k)
  bad = ref.official_checkpoint(case.torch32)
  key = "module.encoder.4.0.weight"
  bad["state_dict"][key] = bad["state_dict"][key] + 1
  torch.save(bad, path)
  with pytest.raises(ValueError, match=r"encoder\.4\.0\.weight.*layer4\.0\.weight"):
    weights.read_model(path, case.net, case.config)


# ----------------------------------------------------------------------------- BAM


class BAMCase(numerics.ModelCase):
  def __init__(self, backbone, shot, batch=2, size=None, empty=(), seed=0, unsort="bam",
               vgg_gram_resized=True):
    size = size or (33 if backbone == "resnet" else 65)
    torch.manual_seed(seed)
    psp = torch_resnet_ref.randomize_(ref.RefPSPNet(LAYERS[backbone], CLASSES), seed)
    self.torch32 = torch_resnet_ref.randomize_(
        ref.RefBAM(LAYERS[backbone], CLASSES, shot, unsort=unsort,
                   vgg_gram_resized=vgg_gram_resized, pspnet=psp), seed + 1)
    # randomize_ also draws the merge convs (gram_merge, cls_merge) away from their (1, 0)
    # init, so ψ and the base learner's foreground both reach the final output.
    self.torch64 = copy.deepcopy(self.torch32).double()
    rng = np.random.default_rng(seed)
    self.x = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
    self.s_x = rng.normal(size=(batch, shot, 3, size, size)).astype(np.float32)
    self.s_y = datagen.episode_masks(rng, batch, shot, size, empty)
    self.y = datagen.episode_masks(rng, batch, 1, size)[:, 0]
    self.y_b = rng.integers(0, CLASSES, size=(batch, size, size))
    self.cat_idx = rng.integers(0, CLASSES - 1, size=(batch,))
    self.config = _config("bam", backbone, shot, kshot_unsort=unsort,
                          vgg_gram_resized=vgg_gram_resized)
    self.net = registry.build_model(self.config)
    self.variables = _variables(self.torch32, self.net, self.config, size, shot)
    self.batch = {"query": self.x.transpose(0, 2, 3, 1),
                  "supp_images": self.s_x.transpose(0, 1, 3, 4, 2),
                  "supp_labels": self.s_y.astype(np.int32),
                  "query_label": self.y.astype(np.int32),
                  "query_base_label": self.y_b.astype(np.int32),
                  "base_class": (self.cat_idx + 1).astype(np.int32)}

  def torch_inputs(self, model):
    dtype = next(model.parameters()).dtype
    return dict(x=torch.from_numpy(self.x).to(dtype), s_x=torch.from_numpy(self.s_x).to(dtype),
                s_y=torch.from_numpy(self.s_y).to(dtype))


def _bam_eval(case, exact=True):
  def collect(out):
    return {"logits": nhwc(out["final"]), "meta_logits": nhwc(out["meta"]),
            "base_logits": nhwc(out["base"]), "prior": nhwc(out["prior"]),
            "shot_priors": np.concatenate([nhwc(p) for p in out["shot_priors"]], -1
                                          ).transpose(0, 3, 1, 2),
            "prototype": out["prototype"].detach().numpy()[:, :, 0, 0],
            "shot_prototypes": np.stack([p.detach().numpy()[:, :, 0, 0]
                                         for p in out["shot_prototypes"]], 1),
            "shot_psi": out["shot_psi"].detach().numpy()[:, :, 0, 0],
            "psi": out["psi"].detach().numpy()[:, 0, 0, 0],
            "shot_weights": out["weights"].detach().numpy()[:, :, 0, 0]}
  with torch.no_grad():
    want = [collect(m.eval()(**case.torch_inputs(m))) for m in (case.torch64, case.torch32)]

  def forward(exact):
    net, variables, batch = case.ours(exact)
    out = jax.jit(lambda v, b: net.apply(v, **step_lib.model_inputs(net, b), train=False))(
        variables, batch)
    return {k: np.asarray(out[k]) for k in want[0]}
  if exact:
    with jax.enable_x64(True):
      _check(forward(True), want[0], exact=True)
  out = forward(False)
  _check(out, want[0], want[1])
  return out, want[0]


def test_bam_learnable_param_counts():
  """reference_msanet.md §13: BAM R50 / VGG 1-shot 4,917,254 / 4,524,038, +27 for 5-shot."""
  for backbone, shot, want in (("resnet", 1, 4_917_254), ("vgg16_bn", 1, 4_524_038),
                               ("resnet", 5, 4_917_281)):
    params = registry.variables_template(
        registry.build_model(_config("bam", backbone, shot)), shot=shot)["params"]
    got = sum(x.size for k, v in params.items() if k not in ("backbone", "learner_base")
              for x in jax.tree.leaves(v))
    assert got == want, (backbone, shot)


def test_bam_eval_resnet_1shot_with_an_empty_support():
  out, want = _bam_eval(BAMCase("resnet", 1, empty=((1, 0),)))
  assert np.abs(out["prior"][1]).max() == 0.0 == np.abs(want["prior"][1]).max()
  assert np.all(out["shot_weights"] == 1.0)


@pytest.mark.parametrize("unsort", ["bam", "msanet"])
def test_bam_eval_resnet_5shot_kshot_weights(unsort):
  """5 shots: ψ sorted, the K→2→K MLP, un-sorted by rank (BAM) or not at all (MSANet's
  identity gather); the two modes give different weights on these shots."""
  out, _ = _bam_eval(BAMCase("resnet", 5, batch=1, unsort=unsort, empty=((0, 3),), seed=1))
  assert not np.all(np.argsort(out["shot_psi"][0]) == np.arange(5))  # not already sorted


@pytest.mark.parametrize("vgg_gram_resized", [True, False])
def test_bam_eval_vgg(vgg_gram_resized):
  _bam_eval(BAMCase("vgg16_bn", 2, batch=1, vgg_gram_resized=vgg_gram_resized))


def check_stage2_train_step(case, loss_terms, low_key="base_lo"):
  """The training forward with dropout off, for BAM and MSANet: the ensemble leaves the
  episode's own base class (cat_idx + 1 = our base_class) out of the base foreground; the three
  loss terms (the oracle's ``loss_terms(out, y_m, y_b)``) and the gradient of every trainable
  tensor (the frozen backbone and base learner get none), in float64. The exclusion is asserted
  to change the output. Returns our gradients."""
  model = case.torch64
  model.eval()
  # The episode class: each query's most probable base class, so that leaving it out of the
  # base foreground changes the output (with random weights most classes have ~0 mass).
  with torch.no_grad():
    p_b = model(**case.torch_inputs(model))[low_key].softmax(1).mean((2, 3))[:, 1:]
  case.cat_idx = p_b.argmax(1).numpy()
  case.batch["base_class"] = (case.cat_idx + 1).astype(np.int32)
  model.zero_grad()
  out = model(**case.torch_inputs(model), cat_idx=torch.from_numpy(case.cat_idx), train=True)
  main, meta, base = loss_terms(out, torch.from_numpy(case.y), torch.from_numpy(case.y_b))
  (main + meta + base).backward()
  want = {"main_loss": main.item(), "meta_loss": meta.item(), "base_loss": base.item()}
  want.update({k: p.grad.numpy().copy() for k, p in model.named_parameters()
               if p.grad is not None})
  with jax.enable_x64(True):
    got, _ = numerics.train_step_gradients(
        *case.ours(exact=True), weights.model_naming(case.config),
        terms=("main_loss", "meta_loss", "base_loss"), frozen_keys=("backbone", "learner_base"))
  assert set(got) == set(want)
  _check(got, want, exact=True)
  with jax.enable_x64(True):
    net, variables, batch = case.ours(exact=True)
    run = lambda b: np.asarray(net.apply(variables, **step_lib.model_inputs(net, b),
                                         train=True, deterministic=True)["logits"])
    assert np.abs(run(batch) - run({**batch, "base_class": batch["base_class"] * 0})).max() > 1e-6
  return got


@pytest.mark.parametrize("backbone,shot", [("resnet", 5), ("vgg16_bn", 1)])
def test_bam_train_step_gradients(backbone, shot):
  case = BAMCase(backbone, shot, batch=1 if backbone == "vgg16_bn" else 2)
  got = check_stage2_train_step(case, ref.bam_loss)
  assert ("kshot_rw.0.weight" in got) == (shot > 1)


def test_bam_checkpoint_import_and_strict_export(tmp_path):
  """A released stage-2 file ({'epoch', 'state_dict', 'optimizer'}, 'module.' keys) imports to
  the oracle's tensors; our export has the official keys in order and loads strictly."""
  case = BAMCase("vgg16_bn", 5, batch=1)
  path = str(tmp_path / "train5_epoch_1.pth")
  torch.save(ref.official_checkpoint(case.torch32), path)
  imported = weights.read_model(path, case.net, case.config)
  same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                      imported, case.variables)
  assert all(jax.tree.leaves(same))
  sd = weights.model_state_dict(case.variables, case.config)
  theirs = case.torch32.state_dict()
  assert list(sd) == list(theirs)
  fresh = ref.RefBAM("vgg", CLASSES, 5)
  fresh.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()},
                        strict=True)
  for k, v in fresh.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), theirs[k].numpy(), err_msg=k)


def test_stage1_file_seeds_stage2(tmp_path):
  """A stage-1 best.pth as BAM's base_weights: the backbone and learner_base of the stage-2
  variables are the PSPNet's tensors; a PSPNet of another class count is refused with the
  stage-1 command in the message; an empty base_weights too."""
  psp = torch_resnet_ref.randomize_(ref.RefPSPNet("vgg", CLASSES), 3)
  path = str(tmp_path / "best.pth")
  torch.save(ref.official_checkpoint(psp), path)
  config = _config("bam", "vgg16_bn")
  config.model.base_weights = path
  net = registry.build_model(config)
  variables = weights.load_base_learner(registry.init_variables(net, 65, 1, jax.random.key(0)),
                                        config)
  sd = weights.model_state_dict(variables, config)
  theirs = psp.state_dict()
  for k, v in sd.items():
    src = k.replace("learner_base.0.", "ppm.").replace("learner_base.1.", "cls.")
    if src in theirs:
      np.testing.assert_array_equal(np.asarray(v), theirs[src].numpy(), err_msg=k)
  assert sum(k.startswith("learner_base.") for k in sd) == sum(
      k.startswith(("ppm.", "cls.")) for k in theirs)
  other = _config("bam", "vgg16_bn")
  other.model.classes = 61
  other.model.base_weights = path
  with pytest.raises(weights.BaseLearnerError, match="pascal_bam_base.py:fold=0"):
    weights.load_base_learner(registry.init_variables(registry.build_model(other), 65, 1,
                                                      jax.random.key(0)), other)
  other.model.base_weights = ""
  with pytest.raises(weights.BaseLearnerError, match="base_weights is empty"):
    weights.read_base_learner("", other)
