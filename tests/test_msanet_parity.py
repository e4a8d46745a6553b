"""MSANet against the PyTorch transcription of its official forward (tests/torch_msanet_ref.py,
itself equal to AIVResearch/MSANet's model/MSANet.py on CPU, bit for bit).

As tests/test_bam_parity.py (whose case and checks it reuses): our float64 model against the
float64 oracle to ``numerics.EXACT``, float32 within a multiple of the oracle's float32 noise.
Compared: final, meta and base logits; the multi-similarity maps before ``hyper_final`` (the
chained masks and the ≥-mean support selection decide them), ``hyper_final``, the attention
output, the prior (unmasked support layer4), the prototypes, ψ and the k-shot weights (MSANet's
identity gather); the three loss terms and every trainable gradient. Supports are ellipses whose
resized masks have fractional borders, one of them empty. ResNet-50 at 33² (layer1 9×9, the
mask chain 18 → 9 → 5), VGG16-bn at 65² (conv4 9×9, conv5 5×5; 2 shots: the layer2 group of the
last shot only).
"""
import copy

import jax
import numpy as np
import pytest
import torch

from fss_jax import weights
from fss_jax.models import registry
from fss_jax.train import step as step_lib
import datagen
import numerics
import test_bam_parity as bam_tests
from tests import torch_msanet_ref as ref
from tests import torch_resnet_ref

torch.set_num_threads(2)
nhwc = bam_tests.nhwc


class MSACase(bam_tests.BAMCase):
  def __init__(self, backbone, shot, batch=1, empty=(), seed=0):  # pylint: disable=super-init-not-called
    size = 33 if backbone == "resnet" else 65
    torch.manual_seed(seed)
    self.torch32 = torch_resnet_ref.randomize_(
        ref.RefMSANet(bam_tests.LAYERS[backbone], bam_tests.CLASSES, shot), seed)
    self.torch64 = copy.deepcopy(self.torch32).double()
    rng = np.random.default_rng(seed)
    self.x = rng.normal(size=(batch, 3, size, size)).astype(np.float32)
    self.s_x = rng.normal(size=(batch, shot, 3, size, size)).astype(np.float32)
    self.s_y = datagen.episode_masks(rng, batch, shot, size, empty)
    self.y = datagen.episode_masks(rng, batch, 1, size)[:, 0]
    self.y_b = rng.integers(0, bam_tests.CLASSES, size=(batch, size, size))
    self.cat_idx = rng.integers(0, bam_tests.CLASSES - 1, size=(batch,))
    self.config = bam_tests._config("msanet", backbone, shot)  # pylint: disable=protected-access
    self.net = registry.build_model(self.config)
    self.variables = bam_tests._variables(self.torch32, self.net, self.config, size, shot)  # pylint: disable=protected-access
    self.batch = {"query": self.x.transpose(0, 2, 3, 1),
                  "supp_images": self.s_x.transpose(0, 1, 3, 4, 2),
                  "supp_labels": self.s_y.astype(np.int32),
                  "query_label": self.y.astype(np.int32),
                  "query_base_label": self.y_b.astype(np.int32),
                  "base_class": (self.cat_idx + 1).astype(np.int32)}


def _eval(case):
  def collect(out):
    vec = lambda t: t.detach().numpy().reshape(t.shape[0], -1)
    return {"logits": nhwc(out["final"]), "meta_logits": nhwc(out["meta"]),
            "base_logits": nhwc(out["base"]), "hyper": nhwc(out["hyper"]),
            "hyper_final": nhwc(out["hyper_final"]), "gam": nhwc(out["gam"]),
            "prior": nhwc(out["prior"]), "prototype": vec(out["prototype"]),
            "shot_psi": vec(out["psi"]), "psi": vec(out["psi_combined"])[:, 0]}
  with torch.no_grad():
    want = [collect(m.eval()(**case.torch_inputs(m))) for m in (case.torch64, case.torch32)]

  def forward(exact):
    net, variables, batch = case.ours(exact)
    out = jax.jit(lambda v, b: net.apply(v, **step_lib.model_inputs(net, b), train=False))(
        variables, batch)
    return {k: np.asarray(out[k]) for k in want[0]}
  with jax.enable_x64(True):
    bam_tests._check(forward(True), want[0], exact=True)  # pylint: disable=protected-access
  out = forward(False)
  bam_tests._check(out, want[0], want[1])  # pylint: disable=protected-access
  return out, want[0]


def test_msanet_learnable_param_counts():
  """reference_msanet.md §13: R50 5,131,782, VGG 4,738,182 (1-shot), +27 for 5-shot; the merge
  conv sees 833 channels."""
  for backbone, shot, want in (("resnet", 1, 5_131_782), ("vgg16_bn", 1, 4_738_182),
                               ("resnet", 5, 5_131_809)):
    params = registry.variables_template(registry.build_model(
        bam_tests._config("msanet", backbone, shot)), shot=shot)["params"]  # pylint: disable=protected-access
    got = sum(x.size for k, v in params.items() if k not in ("backbone", "learner_base")
              for x in jax.tree.leaves(v))
    assert got == want, (backbone, shot)
    assert params["init_merge_0"]["kernel"].shape == (1, 1, 833, 256)


def test_msanet_eval_resnet_1shot_with_an_empty_support():
  out, want = _eval(MSACase("resnet", 1, batch=2, empty=((1, 0),)))
  assert out["hyper"].shape[-1] == 13
  assert np.abs(out["hyper"][1]).max() == 0.0 == np.abs(want["hyper"][1]).max()  # no support
  assert np.abs(out["hyper"][0]).max() > 0.1


def test_msanet_eval_resnet_5shot():
  _eval(MSACase("resnet", 5, empty=((0, 2),), seed=1))


def test_msanet_eval_vgg_2shot_last_shot_layer2_group():
  out, _ = _eval(MSACase("vgg16_bn", 2, seed=2))
  assert out["hyper"].shape[-1] == 7


@pytest.mark.parametrize("backbone,shot", [("resnet", 5), ("vgg16_bn", 1)])
def test_msanet_train_step_gradients(backbone, shot):
  """Dropout off, the training ensemble (own base class left out): the three loss terms and
  the gradient of every trainable tensor, hyper_final's conv and BN affine and the attention
  gate included."""
  got = bam_tests.check_stage2_train_step(MSACase(backbone, shot), ref.msanet_loss,
                                          low_key="base_low")
  assert {"gam.gate.0.weight", "hyper_final.0.bias", "hyper_final.1.weight"} <= set(got)


def test_msanet_export_loads_strictly():
  case = MSACase("resnet", 5)
  sd = weights.model_state_dict(case.variables, case.config)
  theirs = case.torch32.state_dict()
  assert list(sd) == list(theirs) and len(sd) == 398  # §13: 394 + 4 for 5-shot
  fresh = ref.RefMSANet(50, bam_tests.CLASSES, 5)
  fresh.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()},
                        strict=True)


def test_mask_chain_and_similarity_at_473():
  """The multi-similarity alone at the reference's sizes (no network): a disc support mask at
  473 through MSANet's chain (238 → 119 → 60, not a direct resize: they differ by up to ~0.5),
  the ≥-mean selection on the 60×60 mask and the clamped-cosine mean, against the transcription
  in float64; an empty mask gives a zero map. (The network tests at 33² and 65² have too few
  fractional mask pixels for the chain to change a result: skipping its first step passes them
  and fails this test.)"""
  from fss_jax.models import bam  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  yy, xx = np.mgrid[:473, :473]
  fg = np.zeros((2, 473, 473))
  fg[0][((yy - 230) / 101.3) ** 2 + ((xx - 250) / 77.9) ** 2 <= 1] = 1.0  # episode 1: empty
  sizes = [(119, 119), (60, 60), (60, 60)]
  want = ref.chain_masks(torch.from_numpy(fg[:, None]), sizes)
  q = rng.normal(size=(2, 60, 60, 32))
  s = np.maximum(rng.normal(size=(2, 60, 60, 32)), 0)
  sel, counts = ref.select_support(torch.from_numpy(s.transpose(0, 3, 1, 2)), want[1])
  want_map = ref.correlation(torch.from_numpy(q.transpose(0, 3, 1, 2)), sel).numpy()[:, 0]
  with jax.enable_x64(True):
    got = bam.chained_masks(jax.numpy.asarray(fg), sizes)
    for g, w in zip(got, want):
      numerics.assert_exact(np.asarray(g), w.numpy()[:, 0], "chained mask")
    got_map = np.asarray(bam.similarity_map(q, s, got[1]))
  numerics.assert_exact(got_map, want_map, "similarity map")
  direct = torch.nn.functional.interpolate(torch.from_numpy(fg[:, None]), (60, 60),
                                           mode="bilinear", align_corners=True)
  assert float((direct - want[1]).abs().max()) > 0.3  # the chain matters
  m = want[1][0, 0].numpy()
  assert np.sum(m == 1) <= counts[0] < np.sum(m > 0)  # not every pixel with m > 0
  assert np.abs(got_map[1]).max() == 0.0 and counts[1] == 0
