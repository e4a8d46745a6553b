"""PyTorch ⇄ Flax weight interop: key maps, import/export round trips, file formats, errors.

Oracles: ``torch_resnet_ref`` modules (their ``state_dict()`` gives the reference's keys, shapes
and order) and a Flax head template written from the head spec (reference_asgnet.md §2).
"""
import collections
import os
import pickle
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
from fss_jax.convert import torch_export
from fss_jax.convert import torch_import
import torch_resnet_ref as ref

_SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
HEAD_PARAMS = 10_423_818  # reference_asgnet.md §2


def _numpy(sd):
  return collections.OrderedDict((k, v.detach().numpy()) for k, v in sd.items())


def _assert_same_state_dict(got, want):
  """Same keys in the same order, same dtypes, bit-identical values."""
  assert list(got) == list(want)
  for k in want:
    g, w = np.asarray(got[k]), np.asarray(want[k])
    assert g.dtype == w.dtype, (k, g.dtype, w.dtype)
    assert g.shape == w.shape, (k, g.shape, w.shape)
    np.testing.assert_array_equal(g, w, err_msg=k)


def _head_template(num_bins=4):
  """Flax head variables from the spec: 1x1/3x3 convs (HWIO), biases only on the 2-way convs."""
  f32 = jnp.float32
  conv = lambda k, cin, cout, bias=False: dict(
      kernel=jax.ShapeDtypeStruct((k, k, cin, cout), f32),
      **({"bias": jax.ShapeDtypeStruct((cout,), f32)} if bias else {}))
  head = {"down_conv_0": conv(1, 1536, 256), "res1_0": conv(1, 1024, 256),
          "res2_0": conv(3, 256, 256), "res2_2": conv(3, 256, 256),
          "cls_0": conv(3, 256, 256), "cls_3": conv(1, 256, 2, True)}
  for i in range(num_bins):
    head[f"corr_conv_{i}_0"] = conv(1, 513, 256)
    head[f"beta_conv_{i}_0"] = conv(3, 256, 256)
    head[f"beta_conv_{i}_2"] = conv(3, 256, 256)
    head[f"inner_cls_{i}_0"] = conv(3, 256, 256)
    head[f"inner_cls_{i}_3"] = conv(1, 256, 2, True)
    if i:
      head[f"alpha_conv_{i - 1}_0"] = conv(1, 512, 256)
  return head


def _r50_config(name="asgnet", depth=50):
  return configs_lib.set_backbone(configs_lib.base_config(name), "resnet", depth)


ASGNET_NAMING = weights.model_naming(_r50_config())
IMAGENET_NAMING = weights.backbone_naming("resnet", "imagenet")


def _import_backbone(sd, depth=50, source="state_dict"):
  return weights.backbone_from_state_dict(sd, _r50_config(depth=depth), source=source)


def _import_asgnet(sd, template, source="state_dict"):
  return torch_import.variables_from_torch(sd, template, ASGNET_NAMING, source=source)


@pytest.fixture(scope="module")
def asgnet_template():
  backbone = weights.backbone_template(_r50_config())
  return {"params": {"backbone": backbone["params"], **_head_template()},
          "batch_stats": {"backbone": backbone["batch_stats"]}}


@pytest.fixture(scope="module")
def asgnet_sd():
  """Random state_dict with the reference ASGNet checkpoint's keys, shapes and order."""
  with torch.no_grad():
    return _numpy(ref.randomize_(ref.AsgnetNaming(50), seed=1).state_dict())


@pytest.fixture(scope="module")
def imagenet_sd():
  with torch.no_grad():
    return ref.imagenet_state_dict(ref.randomize_(ref.DeepStemResNet(50), seed=2))


@pytest.fixture(scope="module")
def imagenet_pth(tmp_path_factory, imagenet_sd):
  path = str(tmp_path_factory.mktemp("imagenet") / "resnet50_v2.pth")
  torch.save(imagenet_sd, path)
  return path


def _without_fc(sd):
  return collections.OrderedDict((k, v) for k, v in sd.items() if not k.startswith("fc."))


# ---- key maps ----

def test_keymap_documented_examples():
  key = ASGNET_NAMING.key
  assert key("batch_stats", ("backbone", "layer1_0", "downsample_1", "mean")) == (
      "layer1.0.downsample.1.running_mean")
  assert key("params", ("backbone", "layer0", "bn2", "scale")) == "layer0.4.weight"
  assert IMAGENET_NAMING.key("params", ("layer0", "bn2", "scale")) == "bn2.weight"
  assert key("params", ("beta_conv_3_2", "kernel")) == "beta_conv.3.2.weight"
  assert keymap.Naming().key("params", ("inner_cls_0_3", "bias")) == "inner_cls.0.3.bias"
  assert key("batch_stats", ("backbone", "layer4_2", "bn3", "num_batches_tracked")) == (
      "layer4.2.bn3.num_batches_tracked")
  with pytest.raises(ValueError, match="no torch counterpart"):
    key("params", ("cls_3", "embedding"))
  with pytest.raises(ValueError, match="stem"):
    key("params", ("backbone", "layer0", "conv9", "kernel"))


def test_template_keys_shapes_and_order_match_reference(asgnet_template, asgnet_sd):
  mapping = keymap.torch_key_map(asgnet_template, ASGNET_NAMING)
  got = [(k, keymap.torch_shape(p[-1], tuple(l.shape))) for k, (_, p, l) in mapping.items()]
  assert got == [(k, v.shape) for k, v in asgnet_sd.items()]
  head = sum(int(np.prod(l.shape)) for name, sub in asgnet_template["params"].items()
             if name != "backbone" for l in jax.tree_util.tree_leaves(sub))
  assert head == HEAD_PARAMS


def test_layout_transposes():
  x = np.arange(2 * 3 * 5 * 7).reshape(2, 3, 5, 7)  # OIHW
  hwio = keymap.to_flax_layout("kernel", x)
  assert hwio.shape == (5, 7, 3, 2) and hwio[4, 6, 2, 1] == x[1, 2, 4, 6]
  np.testing.assert_array_equal(keymap.to_torch_layout("kernel", hwio), x)
  assert keymap.torch_shape("kernel", (5, 7, 3, 2)) == (2, 3, 5, 7)
  np.testing.assert_array_equal(keymap.to_flax_layout("kernel", x[0, 0]), x[0, 0].T)
  np.testing.assert_array_equal(keymap.to_flax_layout("scale", x[0, 0, 0]), x[0, 0, 0])


# ---- ImageNet backbone files ----

def test_imagenet_import_export_round_trip(tmp_path, imagenet_sd, imagenet_pth):
  sd = torch_import.load_state_dict(imagenet_pth)
  _assert_same_state_dict(sd, _numpy(imagenet_sd))
  variables = _import_backbone(sd)
  np.testing.assert_array_equal(variables["params"]["layer0"]["bn2"]["scale"], sd["bn2.weight"])
  w = sd["layer2.0.conv2.weight"]  # OIHW (128,128,3,3)
  k = variables["params"]["layer2_0"]["conv2"]["kernel"]
  assert k.shape == (3, 3, 128, 128) and k[2, 0, 5, 7] == w[7, 5, 2, 0]
  assert variables["batch_stats"]["layer3_0"]["downsample_1"]["num_batches_tracked"] == int(
      sd["layer3.0.downsample.1.num_batches_tracked"])

  want = _without_fc(_numpy(imagenet_sd))
  out = weights.backbone_state_dict(variables, "resnet")
  assert isinstance(out, collections.OrderedDict)
  _assert_same_state_dict(out, want)
  assert out["bn1.num_batches_tracked"].dtype == np.int64 and out["bn1.num_batches_tracked"].ndim == 0

  for name in ("back.pth", "back.safetensors"):
    path = str(tmp_path / name)
    torch_export.save_state_dict(out, path)
    _assert_same_state_dict(torch_import.load_state_dict(path), want)
  # Independent readers see the same tensors.
  _assert_same_state_dict(_numpy(torch.load(str(tmp_path / "back.pth"), weights_only=True)), want)
  from safetensors.numpy import load_file
  st = load_file(str(tmp_path / "back.safetensors"))
  _assert_same_state_dict(collections.OrderedDict((k, st[k]) for k in want), want)


def test_backbone_import_ignores_only_fc(imagenet_sd):
  sd = dict(_numpy(imagenet_sd))
  sd["foo.bar"] = np.zeros(3, np.float32)
  del sd["layer4.2.bn3.running_var"]
  with pytest.raises(torch_import.CheckpointMismatchError) as e:
    _import_backbone(sd, source="r50.pth")
  msg = str(e.value)
  assert "r50.pth" in msg and "foo.bar (3,)" in msg and "layer4.2.bn3.running_var (2048,)" in msg
  assert "fc." not in msg
  with pytest.raises(torch_import.CheckpointMismatchError, match="missing"):
    _import_backbone(_numpy(imagenet_sd), depth=101)


# ---- whole-model (ASGNet naming) checkpoints ----

def test_asgnet_checkpoint_round_trip_with_reference_wrapping(tmp_path, asgnet_sd,
                                                              asgnet_template):
  path = str(tmp_path / "train_epoch_200.pth")
  wrapped = collections.OrderedDict(("module." + k, torch.from_numpy(v))
                                    for k, v in asgnet_sd.items())
  torch.save({"epoch": 200, "state_dict": wrapped,
              "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]}},
             path)
  sd = torch_import.load_state_dict(path)
  _assert_same_state_dict(sd, asgnet_sd)

  variables = _import_asgnet(sd, asgnet_template)
  assert (jax.tree_util.tree_structure(variables)
          == jax.tree_util.tree_structure(flax.core.unfreeze(asgnet_template)))
  for got, want in zip(jax.tree_util.tree_leaves(variables),
                       jax.tree_util.tree_leaves(asgnet_template)):
    assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_array_equal(
      variables["batch_stats"]["backbone"]["layer1_0"]["downsample_1"]["mean"],
      sd["layer1.0.downsample.1.running_mean"])
  np.testing.assert_array_equal(variables["params"]["backbone"]["layer0"]["bn2"]["scale"],
                                sd["layer0.4.weight"])
  np.testing.assert_array_equal(variables["params"]["inner_cls_2_3"]["bias"],
                                sd["inner_cls.2.3.bias"])
  np.testing.assert_array_equal(variables["params"]["corr_conv_3_0"]["kernel"][0, 0],
                                sd["corr_conv.3.0.weight"][:, :, 0, 0].T)

  out = weights.model_state_dict(variables, _r50_config())
  _assert_same_state_dict(out, asgnet_sd)
  for name in ("m.pth", "m.safetensors"):
    p = str(tmp_path / name)
    torch_export.save_state_dict(out, p)
    _assert_same_state_dict(torch_import.load_state_dict(p), asgnet_sd)
  p = str(tmp_path / "ref.pth")
  torch_export.save_state_dict(out, p, reference_wrapping=True)
  raw = torch.load(p, weights_only=True)
  assert list(raw) == ["state_dict"] and all(k.startswith("module.") for k in raw["state_dict"])
  _assert_same_state_dict(torch_import.load_state_dict(p), asgnet_sd)


def test_mismatch_error_lists_every_offending_key(asgnet_sd, asgnet_template):
  sd = dict(asgnet_sd)
  del sd["layer3.2.bn1.running_var"], sd["cls.3.bias"]
  sd["extra.weight"] = np.zeros((3, 3), np.float32)
  sd["fc.weight"] = np.zeros((1000, 2048), np.float32)
  sd["corr_conv.1.0.weight"] = np.zeros((256, 512, 1, 1), np.float32)
  with pytest.raises(torch_import.CheckpointMismatchError) as e:
    _import_asgnet(sd, asgnet_template, source="bad.pth")
  err = e.value
  assert isinstance(err, ValueError)
  assert err.missing == {"layer3.2.bn1.running_var": (256,), "cls.3.bias": (2,)}
  assert err.unexpected == {"extra.weight": (3, 3), "fc.weight": (1000, 2048)}
  assert err.mismatched == {"corr_conv.1.0.weight": ((256, 512, 1, 1), (256, 513, 1, 1))}
  msg = str(err)
  for line in ("bad.pth", "2 missing, 2 unexpected, 1 mismatched",
               "layer3.2.bn1.running_var (256,)", "cls.3.bias (2,)", "extra.weight (3, 3)",
               "fc.weight (1000, 2048)", "corr_conv.1.0.weight (256, 512, 1, 1) vs (256, 513, 1, 1)"):
    assert line in msg, line


def test_mismatch_on_three_fem_bins(asgnet_sd):
  """The bin count comes from the variables: a 3-bin template rejects the 4-bin checkpoint."""
  backbone = weights.backbone_template(_r50_config())
  template = {"params": {"backbone": backbone["params"], **_head_template(3)},
              "batch_stats": {"backbone": backbone["batch_stats"]}}
  with pytest.raises(torch_import.CheckpointMismatchError) as e:
    _import_asgnet(asgnet_sd, template)
  assert not e.value.missing and not e.value.mismatched
  assert set(e.value.unexpected) == {"corr_conv.3.0.weight", "beta_conv.3.0.weight",
                                     "beta_conv.3.2.weight", "inner_cls.3.0.weight",
                                     "inner_cls.3.3.weight", "inner_cls.3.3.bias",
                                     "alpha_conv.2.0.weight"}


# ---- file handling ----

def _touch(path):
  with open(path, "w") as f:
    f.write("pwned")


class _Payload:
  """Unpickling this runs ``_touch(marker)``: the weights-only loader must refuse it."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (_touch, (self.marker,))


def test_pickle_payload_is_refused(tmp_path):
  marker = str(tmp_path / "marker")
  pickle.loads(pickle.dumps(_Payload(marker)))  # the payload does run under plain pickle
  assert os.path.exists(marker)
  os.remove(marker)
  path = str(tmp_path / "evil.pth")
  torch.save({"state_dict": {"conv1.weight": torch.zeros(1), "x": _Payload(marker)}}, path)
  with pytest.raises(ValueError, match="weights_only") as e:
    torch_import.load_state_dict(path)
  assert "evil.pth" in str(e.value)
  assert not os.path.exists(marker)


def test_load_state_dict_errors_and_conversions(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    torch_import.load_state_dict(str(tmp_path / "nope.pth"))
  bad = tmp_path / "w.npz"
  bad.write_bytes(b"x")
  with pytest.raises(ValueError, match="suffix"):
    torch_import.load_state_dict(str(bad))
  p = str(tmp_path / "meta.pth")
  torch.save({"epoch": 3, "conv1.weight": torch.zeros(2)}, p)
  with pytest.raises(ValueError, match="'epoch' is a int"):
    torch_import.load_state_dict(p)
  p = str(tmp_path / "half.pth")
  torch.save({"module.a.weight": torch.ones(2, dtype=torch.bfloat16),
              "b.num_batches_tracked": torch.tensor(7)}, p)
  sd = torch_import.load_state_dict(p)
  assert list(sd) == ["a.weight", "b.num_batches_tracked"]
  assert sd["a.weight"].dtype == np.float32 and sd["b.num_batches_tracked"].dtype == np.int64
  with pytest.raises(ValueError, match="suffix"):
    torch_export.save_state_dict(sd, str(tmp_path / "x.npz"))


def test_foreign_safetensors_without_order_metadata(tmp_path):
  from safetensors.torch import save_file
  tensors = {"b.weight": torch.randn(2, 3), "a.bias": torch.randn(4),
             "c.num_batches_tracked": torch.tensor(5)}
  path = str(tmp_path / "foreign.safetensors")
  save_file(tensors, path)
  sd = torch_import.load_state_dict(path)
  assert set(sd) == set(tensors)
  for k, v in tensors.items():
    np.testing.assert_array_equal(sd[k], v.numpy())


def test_msgpack_variables_round_trip(tmp_path):
  variables = {"params": {"a": {"kernel": np.random.rand(3, 3, 2, 4).astype(np.float32)},
                          "b": {"bias": jnp.arange(3, dtype=jnp.float32)}},
               "batch_stats": {"a": {"num_batches_tracked": np.array(5, np.int32)}}}
  path = str(tmp_path / "sub" / "v.msgpack")
  io.save_variables(path, variables)
  back = io.load_variables(path)
  assert (jax.tree_util.tree_structure(back)
          == jax.tree_util.tree_structure(jax.device_get(variables)))
  for g, w in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(variables)):
    assert g.dtype == w.dtype
    np.testing.assert_array_equal(g, w)
  with pytest.raises(ValueError, match="msgpack"):
    io.save_variables(str(tmp_path / "v.pkl"), variables)
  corrupt = tmp_path / "c.msgpack"
  corrupt.write_bytes(b"\xc1\xc1")
  with pytest.raises(ValueError, match="c.msgpack"):
    io.load_variables(str(corrupt))


# ---- scripts ----

def _script(name):
  return runpy.run_path(os.path.join(_SCRIPTS, name), run_name="script")["main"]


def test_convert_backbone_and_export_scripts(tmp_path, imagenet_sd, imagenet_pth):
  out = str(tmp_path / "backbone.msgpack")
  _script("convert_backbone.py")(["--input", imagenet_pth, "--backbone", "resnet50",
                                  "--output", out])
  st = str(tmp_path / "backbone.safetensors")
  _script("export_torch.py")(["--input", out, "--backbone", "resnet50", "--output", st])
  _assert_same_state_dict(torch_import.load_state_dict(st), _without_fc(_numpy(imagenet_sd)))
  with pytest.raises(SystemExit):  # a bare backbone without --backbone: a usage error
    _script("export_torch.py")(["--input", out, "--output", st])


def test_export_script_whole_model(tmp_path, asgnet_sd, asgnet_template):
  msg = str(tmp_path / "model.msgpack")
  io.save_variables(msg, _import_asgnet(asgnet_sd, asgnet_template))
  pth = str(tmp_path / "model.pth")
  _script("export_torch.py")(["--input", msg, "--config", "configs/pascal_asgnet.py",
                              "--output", pth])
  _assert_same_state_dict(_numpy(torch.load(pth, weights_only=True)), asgnet_sd)
  with pytest.raises(SystemExit):  # a whole model without --config: a usage error
    _script("export_torch.py")(["--input", msg, "--output", pth])


def test_import_script_with_the_real_asgnet(tmp_path, asgnet_sd):
  """The ASGNet module's variables have the reference checkpoint's keys, shapes and order."""
  src = str(tmp_path / "asgnet.safetensors")
  torch_export.save_state_dict(asgnet_sd, src)
  out = str(tmp_path / "model.msgpack")
  _script("import_checkpoint.py")(["--config", "configs/pascal_asgnet.py", "--input", src,
                                   "--output", out])
  _assert_same_state_dict(weights.model_state_dict(io.load_variables(out), _r50_config()),
                          asgnet_sd)


# ---- PFENet checkpoints (ResNet and VGG layouts) ----

@pytest.mark.parametrize("backbone,layers", [("resnet", 50), ("vgg16_bn", "vgg")])
def test_pfenet_checkpoint_import_export_strict(tmp_path, backbone, layers):
  """The authors' training checkpoint ({'epoch', 'state_dict': {'module.' + key}, 'optimizer'})
  in, the same state_dict out (keys, order, values), and the export loads strictly into the
  transcription of the official PFENet (same keys as the official, checked against it)."""
  from fss_jax.models import registry  # pylint: disable=g-import-not-at-top
  from tests import torch_pfenet_ref  # pylint: disable=g-import-not-at-top
  with torch.device("meta"):
    shapes = torch_pfenet_ref.RefPFENet(layers=layers).state_dict()
  g = torch.Generator().manual_seed(5)
  sd = collections.OrderedDict(
      (k, torch.randint(0, 9, v.shape, generator=g) if k.endswith("num_batches_tracked")
       else torch.randn(v.shape, generator=g)) for k, v in shapes.items())
  path = str(tmp_path / "train_epoch_200.pth")
  torch.save({"epoch": 200, "state_dict": collections.OrderedDict(
      ("module." + k, v) for k, v in sd.items()), "optimizer": {}}, path)
  config = configs_lib.set_backbone(configs_lib.base_config("pfenet"), backbone)
  model = registry.build_model(config)
  variables = weights.read_model(path, model, config)
  assert variables["params"]["down_supp_0"]["kernel"].shape[2] == (768 if layers == "vgg"
                                                                    else 1536)
  out = weights.model_state_dict(variables, config)
  _assert_same_state_dict(out, _numpy(sd))
  ref_model = torch_pfenet_ref.RefPFENet(layers=layers)
  ref_model.load_state_dict({k: torch.from_numpy(v) for k, v in out.items()}, strict=True)
  # A ResNet config rejects the VGG file (and the reverse) with every offending key.
  other = configs_lib.set_backbone(configs_lib.base_config("pfenet"),
                                   "resnet" if layers == "vgg" else "vgg16_bn")
  with pytest.raises(torch_import.CheckpointMismatchError) as e:
    weights.read_model(path, registry.build_model(other), other)
  assert "train_epoch_200.pth" in str(e.value) and e.value.missing and e.value.unexpected
  assert "down_query.0.weight" in e.value.mismatched


def test_pfenet_import_and_export_scripts(tmp_path):
  from tests import torch_pfenet_ref  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  sd = _numpy(ref.randomize_(torch_pfenet_ref.RefPFENet(layers="vgg"), seed=2).state_dict())
  src = str(tmp_path / "pfenet_vgg.safetensors")
  torch_export.save_state_dict(sd, src)
  msg = str(tmp_path / "pfenet.msgpack")
  config = "configs/pascal_pfenet.py:backbone=vgg16_bn"
  _script("import_checkpoint.py")(["--config", config, "--input", src, "--output", msg])
  pth = str(tmp_path / "pfenet.pth")
  _script("export_torch.py")(["--input", msg, "--config", config, "--output", pth,
                              "--reference_wrapping"])
  raw = torch.load(pth, weights_only=True)["state_dict"]
  _assert_same_state_dict(collections.OrderedDict(
      (k[len("module."):], v.numpy()) for k, v in raw.items()), sd)
  with pytest.raises(ValueError, match="do not match the configured model"):
    from fss_jax.models import registry  # pylint: disable=g-import-not-at-top
    asg = configs_lib.load_config("configs/pascal_asgnet.py")
    weights.read_model(msg, registry.build_model(asg), asg)


# ---- ASGNet + prior / + AMM checkpoints, and seeding ASGNet + prior from an ASGNet ----

@pytest.mark.parametrize("prior,amm", [(True, False), (False, True), (True, True)])
def test_asgnet_variant_checkpoint_import_export_strict(tmp_path, prior, amm):
  """A checkpoint of the transcription's variant in (reference wrapping), the same state_dict
  out (keys, order, values: ``corr_conv.*`` with 514 columns, ``amm.*`` last), and the export
  loads strictly into the transcription."""
  from fss_jax.models import registry  # pylint: disable=g-import-not-at-top
  from tests import torch_asgnet_ref  # pylint: disable=g-import-not-at-top
  with torch.device("meta"):
    shapes = torch_asgnet_ref.RefASGNet(prior=prior, amm=amm).state_dict()
  g = torch.Generator().manual_seed(7)
  sd = collections.OrderedDict(
      (k, torch.randint(0, 9, v.shape, generator=g) if k.endswith("num_batches_tracked")
       else torch.randn(v.shape, generator=g)) for k, v in shapes.items())
  assert (sd["corr_conv.0.0.weight"].shape[1] == 514) == prior
  path = str(tmp_path / "asgnet_variant.pth")
  torch.save({"epoch": 1, "state_dict": collections.OrderedDict(
      ("module." + k, v) for k, v in sd.items())}, path)
  config = configs_lib.load_config(f"configs/pascal_asgnet.py:prior={prior},amm={amm}")
  variables = weights.read_model(path, registry.build_model(config), config)
  out = weights.model_state_dict(variables, config)
  _assert_same_state_dict(out, _numpy(sd))
  torch_asgnet_ref.RefASGNet(prior=prior, amm=amm).load_state_dict(
      {k: torch.from_numpy(v) for k, v in out.items()}, strict=True)
  if prior:  # a plain ASGNet config names the 514-column kernels as mismatched
    plain = configs_lib.load_config(f"configs/pascal_asgnet.py:amm={amm}")
    with pytest.raises(torch_import.CheckpointMismatchError) as e:
      weights.read_model(path, registry.build_model(plain), plain)
    assert "corr_conv.0.0.weight" in e.value.mismatched


def test_seed_asgnet_prior_from_an_asgnet_checkpoint(tmp_path):
  """``import_checkpoint.py --from_asgnet``: an ASGNet checkpoint becomes an ASGNet + prior whose
  prior columns are zero, so it computes exactly what the ASGNet computes (float64, every
  output of the FEM); a prior checkpoint or a non-prior config is refused."""
  from fss_jax.models import registry  # pylint: disable=g-import-not-at-top
  import numerics  # pylint: disable=g-import-not-at-top
  plain = configs_lib.load_config("configs/tiny_asgnet.py")
  plain_net = registry.build_model(plain)
  plain_vars = registry.init_variables(plain_net, 65, 1, jax.random.key(3))
  src = str(tmp_path / "asgnet.pth")
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in
              weights.model_state_dict(plain_vars, plain).items()}, src)
  msg = str(tmp_path / "seeded.msgpack")
  arg = "configs/tiny_asgnet.py:prior=true"
  _script("import_checkpoint.py")(["--config", arg, "--input", src, "--from_asgnet",
                                   "--output", msg])
  prior_cfg = configs_lib.load_config(arg)
  prior_net = registry.build_model(prior_cfg)
  seeded = weights.read_model(msg, prior_net, prior_cfg)  # shapes checked against the model
  kernel = np.asarray(seeded["params"]["corr_conv_0_0"]["kernel"])
  assert kernel.shape[2] == 2 * prior_cfg.model.reduce_dim + 2 and not kernel[:, :, -1].any()
  rng = np.random.default_rng(0)
  batch = {"query": rng.normal(size=(2, 65, 65, 3)).astype(np.float32),
           "supp_images": rng.normal(size=(2, 1, 65, 65, 3)).astype(np.float32),
           "supp_labels": np.pad(np.ones((2, 1, 30, 30), np.int32),
                                 ((0, 0), (0, 0), (10, 25), (20, 15)))}
  with jax.enable_x64(True):
    outs = []
    for net, v in ((plain_net, plain_vars), (prior_net, seeded)):
      net, v, b = numerics.float64_copies(net, v, batch)
      outs.append(net.apply(v, **b, train=False))
    assert float(np.abs(np.asarray(outs[1]["prior"])).max()) > 0  # a real prior, ignored
    for k in ("logits", "prob_map"):
      numerics.assert_exact(np.asarray(outs[1][k]), np.asarray(outs[0][k]), k, limit=1e-12)
  # An ASGNet + prior checkpoint is not a plain ASGNet's: refused with the offending keys.
  with pytest.raises(torch_import.CheckpointMismatchError) as e:
    weights.read_asgnet_as_prior(_prior_pth(tmp_path, seeded, prior_cfg), prior_cfg)
  assert "corr_conv.0.0.weight" in e.value.mismatched
  with pytest.raises(ValueError, match="must describe an ASGNet \\+ prior"):
    weights.read_asgnet_as_prior(src, plain)


def _prior_pth(tmp_path, variables, config):
  path = str(tmp_path / "prior.pth")
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in
              weights.model_state_dict(variables, config).items()}, path)
  return path
