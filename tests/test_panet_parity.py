"""PANet (fss_jax/models/panet.py) against the PyTorch oracle of the official FewShotSeg
(tests/torch_panet_ref.py: the official forward, alignLoss and training loss, bit-identical to
kaixin96/PANet on CPU), and PANet's checkpoints both ways.

Compared in every case, in training mode (PAR on): the logits, the feature-resolution scores,
the encoder outputs, the per-shot masked averages, the prototypes, PAR's query prototypes, skips
and per-(way, shot) cross-entropies, PAR, the query CE, the total loss, and the gradients of the
total loss. Cases: 1-way 1-shot, 1-way 5-shot, 2-way 1-shot, 2-way 5-shot, all with B = 2
episodes, and a 2-way batch in which one episode's way 1 has no predicted query pixel (PAR skips
it in both). Support labels hold fg (1), background (0), void (255: background for PANet, as the
official getMask) and another episode class (254: neither), query labels 0..N and 255.

Three comparisons (``numerics``):
  * float32, PANet's VGG-16 (the oracle's init, moved into Flax by the checkpoint importer):
    forward quantities, each conv's output included, within the float32 oracle's own noise of
    the float64 oracle; every quantity within 1e-4 of the float32 oracle, and so is the
    gradient of the total loss w.r.t. the encoder output (the head's whole backward pass). The
    26 encoder gradients within 1e-4, after every ReLU / max-pool routing decision that differs
    from the float64 oracle's is proved a float32 tie: those of the convs no such flip reaches
    against the float32 oracle, all 26 against the float64 oracle run with our routing
    (``_check_routing``, ``_check_float32``).
  * float64 exact mode, every case, with a 3-conv encoder substituted in both (the oracle's
    ``encoder`` attribute; the same convs in Flax): the whole head, PAR and every encoder
    gradient to ``numerics.EXACT``;
  * float64 exact mode with PANet's VGG-16 on one small 2-way batch: everything, all 26 encoder
    gradients included.
Images are small (25x25: 4x4 feature maps; 17x17 for the float64 VGG) and every program is
compiled ahead of time in a worker thread while the oracles run (``_aot``, ``cases``).
"""
import collections
import concurrent.futures
import copy
import functools
import os
import runpy
import sys
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fss_jax import configs_lib
from fss_jax import weights
from fss_jax.convert import torch_export
from fss_jax.convert import torch_import
from fss_jax.models import ops
from fss_jax.models import panet
from fss_jax.models import registry
from fss_jax.models import vgg
from fss_jax.train import step as step_lib
import numerics
from tests import torch_panet_ref as ref

torch.set_num_threads(2)
SIZE = 25  # VGG: 25 → 13 → 7 → 4 (4x4 feature maps)
SMALL = 17  # the float64 VGG case: 17 → 9 → 5 → 3 (float64 convolutions are slow on CPUs)
# float32 against the float32 oracle (or the float64 oracle with our routing); measured:
# outputs ≤ 1.7e-6, encoder gradients ≤ 7.4e-6.
MAX_REL_F32 = 1e-4
_SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
FORWARD = ("logits", "scores", "query_feat", "supp_feat", "supp_fg", "supp_bg", "fg_prototypes",
           "bg_prototype", "qry_prototypes", "par_ce", "align_loss", "query_loss", "total")
# PANet's VGG in forward order: its 13 convs (the oracle's names in ``encoder.backbone``, ours
# features_{block}_{index}), the 12 followed by a ReLU (not conv5_3) and the 4 followed by a 3x3
# max-pool (pad 1; the pool's stride).
CONVS = tuple(f"features.{block}.{2 * i}" for block, widths, *_ in vgg.PANET_BLOCKS
              for i in range(len(widths)))
RELU = CONVS[:-1]
POOLS = {f"features.{block}.{2 * len(widths) - 2}": stride
         for block, widths, _, _, stride in vgg.PANET_BLOCKS if stride}
# A routing decision (a ReLU's sign, a max-pool's window argmax) of a float32 run that differs
# from the float64 oracle's is a proved tie when its float64 margin is within float32 rounding:
# for a ReLU |pre-activation| ≤ TIE x the layer's float32 noise, for a max-pool the float64
# winner minus the float64 value of the element the float32 run picked ≤ 2 x TIE x the noise.
# The noise of a conv: max |float32 oracle − float64 oracle| over its outputs, measured in each
# case (on the CPU that runs the test). A sign flip needs a float32 error ≥ the margin at that
# unit, a window flip errors summing to ≥ the margin at two units; TIE = numerics.FACTOR, the
# ratio allowed between our float32 errors and the oracle's (measured per conv, max abs error:
# ours ≤ 1.8 x the oracle's; the flips' margins: ≤ 0.11 x the noise, ``_check_routing``).
TIE = numerics.FACTOR


def _config(way: int, shot: int):
  config = configs_lib.base_config("panet")
  configs_lib.set_backbone(config, "vgg16_panet")
  config.data.way, config.data.shot = way, shot
  config.train.frozen_keys = ()
  return config


# ----------------------------------------------------------------------------- inputs


def _ellipse(rng, size):
  yy, xx = np.mgrid[:size, :size]
  cy, cx = rng.uniform(0.35, 0.65, 2) * size
  ry, rx = rng.uniform(0.2, 0.35, 2) * size
  return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2


def support_labels(rng, b, nk, size, no_fg=()):
  """(B,N·K,S,S): an ellipse of 1s with a void (255) rim, two void rows on top, a rectangle of
  254 (another class of the episode) across part of it; (episode, support) pairs in ``no_fg``
  get no foreground (their rim and the rest stay)."""
  out = np.zeros((b, nk, size, size), np.int32)
  for i in range(b):
    for j in range(nk):
      r = _ellipse(rng, size)
      if (i, j) not in no_fg:
        out[i, j][r <= 1] = 1
      out[i, j][(r > 1) & (r <= 1.3)] = 255
      out[i, j, :2] = 255
      r0, c0 = rng.integers(2, size // 2, 2)
      out[i, j, r0:r0 + size // 3, c0:c0 + size // 4] = 254
  return out


def query_labels(rng, b, way, size):
  """(B,S,S): an ellipse per way (label w+1, later ways over earlier ones), void rims, 0 else."""
  out = np.zeros((b, size, size), np.int32)
  for i in range(b):
    for w in range(way):
      r = _ellipse(rng, size)
      out[i][(r > 1) & (r <= 1.25)] = 255
      out[i][r <= 1] = w + 1
  return out


# ----------------------------------------------------------------------------- a small encoder


class TinyEncoder(nn.Module):
  """Three 3x3 stride-2 convs (ReLU, ReLU, none): output stride 8 like PANet's VGG, (H−1)/8+1
  for 8k+1 sides; float64 exact runs with it take milliseconds where the VGG takes minutes."""
  dtype: Any = jnp.float32
  widths = (8, 16, 12)

  @nn.compact
  def __call__(self, x, use_running_average=True, upto="layer4", start="layer0"):
    del use_running_average, upto, start
    x = x.astype(self.dtype)
    for i, c in enumerate(self.widths):
      x = nn.Conv(c, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype,
                  param_dtype=jnp.float32, name=f"conv{i}")(x)
      if i < len(self.widths) - 1:
        x = nn.relu(x)
    return {"layer4": x}


def _tiny_torch():
  """The oracle's replacement ``encoder``: the same convs (keys encoder.{0,2,4}.*)."""
  mods, cin = [], 3
  for i, c in enumerate(TinyEncoder.widths):
    mods.append(torch.nn.Conv2d(cin, c, 3, stride=2, padding=1))
    if i < len(TinyEncoder.widths) - 1:
      mods.append(torch.nn.ReLU(inplace=True))
    cin = c
  return torch.nn.Sequential(*mods)


def _tiny_key(path):
  """Our tiny encoder's variable path → the oracle's parameter name."""
  assert path[0] == "backbone" and path[1].startswith("conv"), path
  return f"encoder.{2 * int(path[1][4:])}.{'weight' if path[2] == 'kernel' else 'bias'}"


class _Masked(torch.nn.Module):
  """A ReLU with a given routing: x · mask (mask 0/1, the shape of x)."""

  def __init__(self, mask):
    super().__init__()
    self.mask = mask

  def forward(self, x):
    return x * self.mask


class _Routed(torch.nn.Module):
  """``nn.MaxPool2d(3, stride, padding=1)`` with a given routing: each output is the window
  element at ``index`` (N,C,h,w) of 0..8 (row-major in the window); its gradient goes there
  (summed where windows overlap, as max-pool's backward)."""

  def __init__(self, index, stride):
    super().__init__()
    self.index, self.stride = index.long(), stride

  def forward(self, x):
    n, c, h, w = self.index.shape
    cols = F.unfold(x, 3, padding=1, stride=self.stride).view(n, c, 9, h * w)
    return torch.gather(cols, 2, self.index.view(n, c, 1, h * w)).view(n, c, h, w)


def windows(pre, stride):
  """The 3x3 windows (pad 1) of ``nn.MaxPool2d(3, stride, padding=1)`` after a ReLU: ``pre``
  (N,H,W,C) pre-activations → (N,h,w,C,9) of max(pre, 0), -inf padding, row-major in a window.
  Both frameworks pass a window's gradient to its first maximum (``np.argmax``'s choice)."""
  x = np.pad(np.maximum(pre, 0), ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  h, w = (pre.shape[1] - 1) // stride + 1, (pre.shape[2] - 1) // stride + 1
  return np.stack([x[:, dy:dy + stride * (h - 1) + 1:stride, dx:dx + stride * (w - 1) + 1:stride]
                   for dy in range(3) for dx in range(3)], axis=-1)


def window_argmax(pre, stride):
  """The max-pool's routing: (N,h,w,C) window indices of ``windows``' first maximum."""
  return np.argmax(windows(pre, stride), axis=-1)


class Probe(nn.Module):
  """A backbone wrapper adding a zero parameter ``delta`` to its layer4 output: the gradient of
  the loss w.r.t. ``delta`` is its gradient w.r.t. the encoder output (the whole batch of one
  encoder call: the supports in (episode, way, shot) order, then the queries)."""
  inner: nn.Module

  @nn.compact
  def __call__(self, x, use_running_average=True, upto="layer4", start="layer0"):
    out = dict(self.inner(x, use_running_average, upto=upto, start=start))
    delta = self.param("delta", nn.initializers.zeros, out["layer4"].shape, jnp.float32)
    out["layer4"] = out["layer4"] + delta
    return out


# ----------------------------------------------------------------------------- cases


class Case(numerics.ModelCase):
  """One batch of episodes, the oracle (float32, float64 copy) and our model and variables.

  ``encoder``: 'vgg' (PANet's, through the checkpoint importer) or 'tiny'. ``skip``: episode 1's
  way 1 has no support foreground (a zero prototype: its score is 0 everywhere) and the encoder's
  last bias is shifted by three times the largest feature norm, so every other score is positive:
  the way is never the argmax and PAR skips it."""

  def __init__(self, way, shot, *, encoder="vgg", size=SIZE, batch=2, seed=0, skip=False):
    self.way, self.shot, self.size, self.encoder = way, shot, size, encoder
    torch.manual_seed(seed)
    model = ref.FewShotSeg(cfg={"align": True})
    if encoder == "tiny":
      model.encoder = _tiny_torch()
    rng = np.random.default_rng(seed)
    nk = way * shot
    self.x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    self.s_x = rng.standard_normal((batch, nk, 3, size, size)).astype(np.float32)
    no_fg = [(1, shot + k) for k in range(shot)] if skip else []
    self.s_y = support_labels(rng, batch, nk, size, no_fg)
    self.y = query_labels(rng, batch, way, size)
    self.torch32 = model
    if skip:
      last = model.encoder[-1] if encoder == "tiny" else model.encoder.backbone.features[8][4]
      with torch.no_grad():
        feats = model.encoder(torch.cat([torch.from_numpy(self.s_x).flatten(0, 1),
                                         torch.from_numpy(self.x)]))
        radius = feats.norm(dim=1).max()
        last.bias += 3 * radius / feats.shape[1] ** 0.5
    self.torch64 = copy.deepcopy(model).double()
    if encoder == "vgg":
      self.build(_config(way, shot), size, shot)  # weights through the checkpoint importer
      self.naming = weights.model_naming(self.config)
      self.key = lambda path: self.naming.key("params", path)
    else:
      self.net = panet.PANet(backbone=TinyEncoder(), way=way)
      params = {}
      for name, p in model.state_dict().items():
        i, leaf = int(name.split(".")[1]) // 2, name.split(".")[2]
        v = p.numpy()
        params.setdefault(f"conv{i}", {})["kernel" if leaf == "weight" else "bias"] = (
            v.transpose(2, 3, 1, 0) if v.ndim == 4 else v)
      self.variables = {"params": {"backbone": params}}
      self.batch = {"query": self.x.transpose(0, 2, 3, 1),
                    "supp_images": self.s_x.transpose(0, 1, 3, 4, 2),
                    "supp_labels": self.s_y, "query_label": self.y}
      self.key = _tiny_key

  # ---- the oracle ----

  def oracle(self, model, grads: bool, train: bool = True, capture: bool = False) -> dict:
    """The oracle's outputs in our layout (and its gradients of the total loss by name); with
    ``capture``, ``convs``: each encoder conv's output (the ReLU's input), by ``CONVS`` name, in
    our layout (``ours_layout``), read by forward hooks (a copy before the in-place ReLU)."""
    convs, hooks = {}, []
    if capture:
      for name, mod in model.encoder.backbone.features.named_modules(prefix="features"):
        if isinstance(mod, torch.nn.Conv2d):
          hooks.append(mod.register_forward_hook(
              lambda m, i, o, name=name: convs.__setitem__(name, o.detach().clone())))
    try:
      got = self._oracle(model, grads, train)
    finally:
      for hook in hooks:
        hook.remove()
    if capture:
      assert list(convs) == list(CONVS), list(convs)
      got["convs"] = {k: self.ours_layout(v.numpy()) for k, v in convs.items()}
    return got

  def _oracle(self, model, grads: bool, train: bool) -> dict:
    dt = next(model.parameters()).dtype
    b, way, shot, s = self.x.shape[0], self.way, self.shot, self.size
    model.train(train)
    model.zero_grad()
    supp = torch.from_numpy(self.s_x).to(dt).view(b, way, shot, 3, s, s).permute(1, 2, 0, 3, 4, 5)
    lab = torch.from_numpy(self.s_y).long().view(b, way, shot, s, s).permute(1, 2, 0, 3, 4)
    fore = (lab == 1).to(dt)  # the official getMask (VOC): void is background, 254 neither
    back = ((lab == 0) | (lab == 255)).to(dt)
    qry = torch.from_numpy(self.x).to(dt)[None]
    with torch.set_grad_enabled(grads):
      out = model(*ref.nested(supp, fore, back, qry))
      labels = torch.from_numpy(self.y).long()
      total = ref.total_loss(out, labels)
      query_loss = F.cross_entropy(out["logits"], labels, ignore_index=255)
    got = {"logits": out["logits"], "scores": out["pred"][:, 0].permute(0, 2, 3, 1),
           "query_feat": out["qry_fts"][0].permute(0, 2, 3, 1),
           "supp_feat": out["supp_fts"].permute(2, 0, 1, 4, 5, 3),
           "supp_fg": out["supp_fg_fts"], "supp_bg": out["supp_bg_fts"],
           "fg_prototypes": out["fg_prototypes"], "bg_prototype": out["bg_prototype"],
           "query_loss": query_loss, "total": total, "align_loss": out["align_loss"]}
    got["logits"] = got["logits"].permute(0, 2, 3, 1)
    if train:
      got.update(qry_prototypes=out["qry_prototypes"], par_ce=out["par_ce"],
                 par_skipped=out["par_skipped"])
    got = {k: np.asarray(v.detach().numpy() if torch.is_tensor(v) else v) for k, v in got.items()}
    if grads:
      out["supp_fts"].retain_grad()
      out["qry_fts"].retain_grad()
      total.backward()
      got["grads"] = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
      # d total / d encoder output, in our layout: supports (B·N·K, h, w, C), then the queries.
      supp = out["supp_fts"].grad.permute(2, 0, 1, 4, 5, 3).flatten(0, 2)
      got["feature_grad"] = torch.cat([supp, out["qry_fts"].grad[0].permute(0, 2, 3, 1)]).numpy()
    return got

  @functools.cached_property
  def want32(self):
    return self.oracle(self.torch32, grads=True, capture=self.encoder == "vgg")

  @functools.cached_property
  def want64_forward(self):
    with torch.no_grad():
      return self.oracle(self.torch64, grads=False, capture=self.encoder == "vgg")

  def ours_layout(self, a):
    """An encoder-batch array of the oracle ((N·K·B + B, C, h, w): supports (way, shot,
    episode), then the queries) → ours ((B·N·K + B, h, w, C): (episode, way, shot), queries)."""
    nk, b, rest = self.way * self.shot, self.x.shape[0], a.shape[1:]
    supp = a[:nk * b].reshape((nk, b) + rest).swapaxes(0, 1).reshape((nk * b,) + rest)
    return np.concatenate([supp, a[nk * b:]]).transpose(0, 2, 3, 1)

  def torch_layout(self, a):
    """The inverse of ``ours_layout``."""
    a = a.transpose(0, 3, 1, 2)
    nk, b, rest = self.way * self.shot, self.x.shape[0], a.shape[1:]
    supp = a[:nk * b].reshape((b, nk) + rest).swapaxes(0, 1).reshape((nk * b,) + rest)
    return np.concatenate([supp, a[nk * b:]])

  def routed64(self, relu: dict, pool: dict) -> dict:
    """The float64 oracle's gradients with our float32 routing imposed: each ReLU of the
    encoder replaced by its input times our mask (``relu``: conv name → our pre-activation > 0,
    our layout), each max-pool by a gather of the window element we picked (``pool``: name of
    the conv before it → window index 0..8, row-major, our layout). The same forward but for
    float32 near-ties (values moved by at most their margin), and a backward that passes
    exactly where ours does."""
    features = self.torch64.encoder.backbone.features
    places, routed = [], []  # (parent Sequential, child index), its replacement
    for name in CONVS:
      block, index = map(int, name.split(".")[1:])
      if name in RELU:
        places.append((features[block], index + 1))
        routed.append(_Masked(torch.from_numpy(self.torch_layout(relu[name])).double()))
      if name in POOLS:
        places.append((features, block + 1))
        routed.append(_Routed(torch.from_numpy(self.torch_layout(pool[name])), POOLS[name]))
    originals = [parent[j] for parent, j in places]
    try:
      for (parent, j), mod in zip(places, routed):
        parent[j] = mod
      return self.oracle(self.torch64, grads=True)["grads"]
    finally:
      for (parent, j), mod in zip(places, originals):
        parent[j] = mod

  # ---- ours ----

  def submit(self, float32: bool = False, float64: bool = False, eval_mode: bool = False):
    """Starts compiling the programs this case will run (``_aot``): float32 with the encoder
    wrapped in ``Probe``, float64 exact mode, the float32 evaluation forward."""
    if float32:
      net = self.net.clone(backbone=Probe(inner=self.net.backbone))
      h = (self.size - 1) // 8 + 1
      c = 512 if self.encoder == "vgg" else TinyEncoder.widths[-1]
      delta = np.zeros((self.x.shape[0] * (1 + self.way * self.shot), h, h, c), np.float32)
      variables = {"params": {"backbone": {"inner": self.variables["params"]["backbone"],
                                           "delta": delta}}}
      self._f32 = (_aot(net, _train_fn(net, capture=True), (variables, self.batch), x64=False),
                   (variables, self.batch))
    if float64:
      net, variables, batch = numerics.ModelCase.ours(self, exact=True)
      self._f64 = (_aot(net, _train_fn(net), (variables, batch), x64=True), (variables, batch))
    if eval_mode:
      net = self.net
      fn = lambda v, b: net.apply(v, **step_lib.model_inputs(net, b), train=False)
      self._eval = (_aot(("eval", net), fn, (self.variables, self.batch), x64=False),
                    (self.variables, self.batch))
    return self

  @functools.cached_property
  def got32(self):
    """Our float32 outputs and gradients (also the gradient w.r.t. the encoder output,
    ``feature_grad``, through ``Probe``)."""
    future, args = self._f32
    got = _ours(future.result()(*args),
                lambda path: self.key(path[:1] + path[2:]) if path[1] != "delta" else "delta")
    got["feature_grad"] = got["grads"].pop("delta").transpose(2, 3, 1, 0)  # undo _torch_layout
    return got

  def ours(self, exact: bool) -> dict:
    """Our float64 outputs and gradients (exact mode)."""
    assert exact
    future, args = self._f64
    with jax.enable_x64(True):
      return _ours(future.result()(*args), self.key)

  def ours_eval(self) -> dict:
    future, args = self._eval
    return future.result()(*args)


def _ours(results, key) -> dict:
  """Our training-mode outputs, loss terms and parameter gradients (torch names and layout)."""
  total, terms, out, grads, convs = results
  got = {k: np.asarray(v) for k, v in out.items()}
  got["convs"] = {".".join(p[-2].split("_")): np.asarray(v[0])
                  for p, v in flax.traverse_util.flatten_dict(convs).items()}
  got.update(total=np.asarray(total), query_loss=np.asarray(terms["query_loss"]))
  assert float(terms["align_loss"]) == float(out["align_loss"])
  flat = flax.traverse_util.flatten_dict(grads)
  got["grads"] = {key(p): _torch_layout(np.asarray(g)) for p, g in flat.items()}
  return got


def _torch_layout(g):
  return g.transpose(3, 2, 0, 1) if g.ndim == 4 else g


def _train_fn(net, capture: bool = False):
  """(variables, batch) → (total loss, its terms, the training-mode outputs, d total /
  d params, the conv outputs), through the model's own ``loss`` (as the train step runs it).
  With ``capture`` the conv outputs are every ``nn.Conv``'s output (Flax's
  ``capture_intermediates``: extra outputs of the same program, the computation unchanged),
  else {}."""
  def f(variables, batch):
    def loss_fn(params):
      out = net.apply({"params": params}, **step_lib.model_inputs(net, batch), train=True,
                      capture_intermediates=lambda mdl, _: capture and isinstance(mdl, nn.Conv),
                      mutable=["intermediates"])
      out, state = out
      total, terms = net.loss(out, batch)
      return total, (terms, out, state.get("intermediates", {}))
    (total, (terms, out, convs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables["params"])
    return total, terms, out, grads, convs
  return f


# Ahead-of-time compilation in one worker thread: XLA compiles on one core while the oracles
# run on the other (compiling is about half of this file's time). Programs are shared by key.
_WORKER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="panet-xla")
_PROGRAMS = {}


def _aot(key, fn, args, x64: bool) -> concurrent.futures.Future:
  """A future of ``jax.jit(fn)`` compiled for ``args`` (float64 when ``x64``)."""
  leaves, treedef = jax.tree.flatten(args)
  key = (key, x64, treedef, tuple((np.shape(a), np.asarray(a).dtype.str) for a in leaves))
  if key not in _PROGRAMS:
    def work():
      with jax.enable_x64(x64):
        return jax.jit(fn).lower(*args).compile()
    _PROGRAMS[key] = _WORKER.submit(work)
  return _PROGRAMS[key]


def _check_routing(case):
  """The encoder's routing decisions of both float32 runs (ours, the float32 oracle) against the
  float64 oracle's, each differing one proved a tie. Every conv's output (its pre-activation;
  ours captured in the float32 program, the oracles' by forward hooks) is first checked within
  the float32 oracle's noise (``numerics.assert_parity``); then per conv, in forward order: the
  ReLU's sign of every unit, and for the 4 convs before a max-pool the window argmax
  (``window_argmax``) of every pool output. A decision that differs from the float64 oracle's
  must have a float64 margin within TIE x the layer's float32 noise (see TIE; for the float32
  oracle's own flips this holds by construction: they matter for which gradients it can be
  compared on).

  Returns (reach, our ReLU masks, our pool indices, the ties): ``reach`` is the index in CONVS
  of the deepest conv whose ReLU or following max-pool holds a differing decision of either
  float32 run (-1: none). Such a flip after conv k moves the gradients of convs 0..k only: the
  forward after it moves by about the margin (float32 noise), the backward above it is the
  same.
  Measured on an AVX-512 EPYC: the 1-shot batches and the skipped-way batch have no differing
  decision; the 1-way and the 2-way 5-shot batches (whose first episode's supports are the
  same images) the same one, ours only: a conv3_2 (features.4.2) pre-activation of −7.0e-7,
  0.11 x that layer's noise 6.7e-6, positive in our float32; no max-pool flips. With AVX2
  kernels (tests/README.md) the same unit flips in both float32 runs: margin 0.025 x the noise
  2.8e-5. Our max abs error per conv: 1.0–1.8 x the float32 oracle's (AVX2: ≤ 1.13).
  """
  got, want32, want64 = (case.got32["convs"], case.want32["convs"],
                         case.want64_forward["convs"])
  assert list(got) == list(want64) == list(CONVS), list(got)
  relu, pool, ties, reach = {}, {}, [], -1
  log = numerics._log  # pylint: disable=protected-access
  for k, name in enumerate(CONVS):
    pre64 = want64[name]
    numerics.assert_parity(got[name], pre64, want32[name], f"{name} output")
    noise = float(np.abs(want32[name] - pre64).max())
    log(f"{name} output: max |ours - float64| / max |float32 oracle - float64|",
        float(np.abs(got[name] - pre64).max()) / noise, noise)
    if name in RELU:
      relu[name] = (got[name] > 0).astype(np.float64)
    if name in POOLS:
      pool[name] = window_argmax(got[name], POOLS[name])
      index64 = window_argmax(pre64, POOLS[name])
    for who, pre in (("ours", got[name]), ("float32 oracle", want32[name])):
      if name in RELU:
        flips = (pre > 0) != (pre64 > 0)
        if flips.any():
          ties.append((who, name, "ReLU", int(flips.sum()), float(np.abs(pre64[flips]).max()),
                       noise))
      if name in POOLS:
        index = pool[name] if who == "ours" else window_argmax(pre, POOLS[name])
        flips = index != index64
        if flips.any():
          win64 = windows(pre64, POOLS[name])
          gap = (np.take_along_axis(win64, index64[..., None], -1)
                 - np.take_along_axis(win64, index[..., None], -1))[..., 0]
          ties.append((who, name, "max-pool", int(flips.sum()), float(gap[flips].max()),
                       2 * noise))
    if ties and ties[-1][1] == name:
      reach = k
  for who, name, kind, count, margin, noise in ties:  # noise: 2 x the layer's for a max-pool
    log(f"tie: {who} {name} {kind} ({count} decisions), float64 margin / noise", margin / noise,
        noise, TIE)
    assert margin <= TIE * noise, (
        f"{who}: {count} {kind} decisions after {name} differ from the float64 oracle's with a "
        f"float64 margin up to {margin:.3g} > {TIE:g} x {noise:.3g} (the layer's float32 noise"
        f"{', x 2' if kind == 'max-pool' else ''}): not a float32 tie")
  return reach, relu, pool, ties


def _check_float32(case) -> dict:
  """Float32: forward quantities within the float32 oracle's noise of the float64 oracle, and
  everything, the gradient of the total loss w.r.t. the encoder output included, within
  MAX_REL_F32 of the float32 oracle; and the 26 encoder gradients, with a proof of every
  routing near-tie. Returns the errors against the float32 oracle.

  The encoder's backward passes where its ReLUs and max-pools route it: a ReLU input within
  float32 rounding of 0 or a max-pool runner-up within rounding of the winner may route it
  differently in a float32 run than in float64 (a discrete change in the gradients of that conv
  and those before it). Measured: the 5-shot batches (12 and 22 images) had such flips, e.g. a
  conv3_2 pre-activation at 2e-7 of that layer's standard deviation has the other sign in our
  float32 (PyTorch's float32 kept it), so features.4.2.weight's gradient is 8.3e-3 from both
  oracles while features.4.4's is 7e-7; which units flip depends on the CPU (summation order).
  So ``_check_routing`` finds every decision of either float32 run that differs from the
  float64 oracle's and proves it a tie; then, bounded to MAX_REL_F32:
    * against the float32 oracle: the gradients of the convs after the deepest one such a
      decision reaches (all 26 when none differs);
    * when some decision differs, all 26 against the float64 oracle with our routing imposed
      (``Case.routed64``: the official computation passing the backward exactly where ours
      does; given the float64 oracle's own decisions it reproduces its gradients to 2e-15).
      The gradients reached by a flip are logged, not bounded, against the float32 oracle.
  Measured (AVX-512 and AVX2): bounded ones ≤ 8.2e-6 against the float32 oracle, ≤ 2.4e-6
  against the float64 oracle with our routing; those the conv3_2 flip reaches (convs 0..5) up
  to 8.3e-3 against the float32 oracle on AVX-512, where only ours flips it. The head's backward
  has no such routing (PAR's argmax masks are constants, with a margin:
  ``_assert_stable_argmax``) and is bounded through ``feature_grad``.
  """
  got, want32, want64 = case.got32, case.want32, case.want64_forward
  errors = {}
  for name in FORWARD:
    numerics.assert_parity(got[name], want64[name], want32[name], name)
    errors[name] = numerics.rel_err(got[name], want32[name])
  np.testing.assert_array_equal(got["par_skipped"], want64["par_skipped"])
  np.testing.assert_array_equal(got["par_skipped"], want32["par_skipped"])
  assert np.abs(want32["feature_grad"]).max() > 0
  errors["feature_grad"] = numerics.rel_err(got["feature_grad"], want32["feature_grad"])
  assert sorted(got["grads"]) == sorted(want32["grads"]) and len(want32["grads"]) == 26
  reach, relu, pool, _ = _check_routing(case)
  log = numerics._log  # pylint: disable=protected-access
  for k, conv in enumerate(CONVS):
    for leaf in ("weight", "bias"):
      name = f"encoder.backbone.{conv}.{leaf}"
      err = numerics.rel_err(got["grads"][name], want32["grads"][name])
      if k > reach:
        errors[name] = err
      else:
        log(f"{name} (against the float32 oracle; reached by a routing tie, not bounded)", err)
  for name, err in errors.items():
    log(f"{name} (against the float32 oracle)", err, None, MAX_REL_F32)
    assert err <= MAX_REL_F32, f"{name}: relative error {err:.3g} against the float32 oracle"
  if reach >= 0:
    routed = case.routed64(relu, pool)
    for name, g in routed.items():
      err = numerics.rel_err(got["grads"][name], g)
      log(f"{name} (against the float64 oracle with our routing)", err, None, MAX_REL_F32)
      assert err <= MAX_REL_F32, (
          f"{name}: relative error {err:.3g} against the float64 oracle with our routing")
  return errors


def _check_exact(case) -> dict:
  """Float64 exact mode: every output and every encoder gradient to numerics.EXACT."""
  want = case.oracle(case.torch64, grads=True)
  with jax.enable_x64(True):
    got = case.ours(exact=True)
  errors = {name: numerics.assert_exact(got[name], want[name], name) for name in FORWARD}
  np.testing.assert_array_equal(got["par_skipped"], want["par_skipped"])
  assert sorted(got["grads"]) == sorted(want["grads"])
  for name, g in want["grads"].items():
    assert np.abs(g).max() > 0, name
    errors[name] = numerics.assert_exact(got["grads"][name], g, name)
  return errors, got, want


def _assert_stable_argmax(case):
  """The float64 oracle's top two scores differ by ≥ 1e-3 at every query pixel, so PAR's argmax
  masks cannot flip under float32 rounding (measured errors ≤ 1e-5 of the scores): a data
  check of the case, not of the model."""
  top2 = np.sort(case.want64_forward["scores"], axis=-1)[..., -2:]
  assert np.min(top2[..., 1] - top2[..., 0]) > 1e-3


WAYS_SHOTS = ((1, 1), (1, 5), (2, 1), (2, 5))
TINY_CASES = tuple((way, shot, False) for way, shot in WAYS_SHOTS) + ((2, 1, True),)


@pytest.fixture(scope="module")
def cases(request):
  """Every case the selected tests of this file use, built at once so that all their programs
  compile in the worker thread while the tests run the oracles (in test order)."""
  selected = {item.originalname for item in request.session.items
              if getattr(item, "module", None) is sys.modules[__name__]}
  out = {}
  if "test_float32_matches_the_oracle" in selected:
    for way, shot in WAYS_SHOTS:
      out["vgg", way, shot] = Case(way, shot).submit(float32=True)
  if selected & {"test_float32_skipped_way", "test_eval_mode_has_no_par"}:
    out["vgg_skip"] = Case(2, 1, skip=True).submit(
        float32="test_float32_skipped_way" in selected,
        eval_mode="test_eval_mode_has_no_par" in selected)
  if "test_exact_head_and_par_with_a_small_encoder" in selected:
    for way, shot, skip in TINY_CASES:
      out["tiny", way, shot, skip] = Case(way, shot, encoder="tiny", skip=skip).submit(
          float64=True)
  if "test_exact_with_panets_vgg" in selected:
    out["vgg64"] = Case(2, 1, size=SMALL).submit(float64=True)
  yield out
  for future in _PROGRAMS.values():
    future.cancel()  # those not started (a failed test leaves its programs unused)


@pytest.fixture(scope="module", params=WAYS_SHOTS, ids=lambda p: f"{p[0]}way{p[1]}shot")
def vgg_case(request, cases):
  return cases["vgg", *request.param]


@pytest.fixture(scope="module")
def skip_case(cases):
  return cases["vgg_skip"]


# ----------------------------------------------------------------------------- float32, VGG


def test_float32_matches_the_oracle(vgg_case):
  _assert_stable_argmax(vgg_case)
  _check_float32(vgg_case)
  want = vgg_case.want64_forward
  # The case exercises what it should: every way predicted somewhere (nothing skipped), 254
  # pixels present, PAR terms non-zero, the features of both signs (no ReLU after conv5_3).
  assert not want["par_skipped"].any() and want["par_ce"].min() > 0
  assert (vgg_case.s_y == 254).any() and (vgg_case.s_y == 255).any()
  assert want["query_feat"].min() < 0 < want["query_feat"].max()
  assert want["logits"].shape == (2, SIZE, SIZE, 1 + vgg_case.way)


def test_float32_skipped_way(skip_case):
  """Episode 1's way 1 is never predicted: skipped in both (its PAR terms 0, still in 1/N);
  episode 0's ways and episode 1's way 0 are not."""
  _assert_stable_argmax(skip_case)
  want = skip_case.want64_forward
  np.testing.assert_array_equal(want["par_skipped"], [[False, False], [False, True]])
  assert np.abs(want["scores"][1, ..., 2]).max() == 0.0  # the zero prototype scores 0
  assert want["scores"][1, ..., :2].min() > 0
  _check_float32(skip_case)
  got = skip_case.got32
  assert got["par_ce"][1, 1].max() == 0.0 and got["par_ce"][1, 0].min() > 0
  assert np.abs(got["qry_prototypes"][1, 2]).max() == 0.0
  # PAR = mean over episodes of Σ_ways Σ_shots CE / K / N, the skipped way counting in N.
  want_par = np.mean(np.sum(want["par_ce"], axis=(1, 2)) / 2)
  assert abs(got["align_loss"] - want_par) <= 1e-6 * want_par


def test_eval_mode_has_no_par(skip_case):
  """Evaluation: the same logits, no PAR (align_loss 0, no PAR outputs)."""
  net, batch = skip_case.net, skip_case.batch
  out = skip_case.ours_eval()
  with torch.no_grad():
    want64 = skip_case.oracle(skip_case.torch64, grads=False, train=False)
    want32 = skip_case.oracle(skip_case.torch32, grads=False, train=False)
  assert float(want64["align_loss"]) == 0.0 and float(out["align_loss"]) == 0.0
  assert not {"qry_prototypes", "par_ce", "par_skipped"} & set(out)
  for name in ("logits", "scores", "fg_prototypes", "bg_prototype"):
    numerics.assert_parity(out[name], want64[name], want32[name], name)
  total, terms = net.loss(out, batch)
  assert float(total) == float(terms["query_loss"]) and float(terms["align_loss"]) == 0.0


# ----------------------------------------------------------------------------- float64 exact


@pytest.mark.parametrize("way,shot,skip", TINY_CASES)
def test_exact_head_and_par_with_a_small_encoder(cases, way, shot, skip):
  errors, got, want = _check_exact(cases["tiny", way, shot, skip])
  assert len(got["grads"]) == 6
  if skip:
    np.testing.assert_array_equal(want["par_skipped"], [[False, False], [False, True]])
  else:
    assert not want["par_skipped"].any()


def test_exact_with_panets_vgg(cases):
  """Float64, PANet's VGG-16, a 2-way 1-shot batch of 2 at SMALL x SMALL: every output and all
  26 encoder gradients of the total loss."""
  errors, got, want = _check_exact(cases["vgg64"])
  assert len(got["grads"]) == 26


# ----------------------------------------------------------------------------- pieces


@pytest.mark.parametrize("in_hw,out_hw", [((5, 5), (33, 33)), ((6, 4), (41, 17)),
                                          ((9, 7), (4, 11)), ((1, 3), (5, 1))])
def test_resize_bilinear_is_torchs_align_corners_false(in_hw, out_hw):
  x = np.random.default_rng(0).standard_normal((2, 3) + in_hw)
  want = F.interpolate(torch.from_numpy(x), size=out_hw, mode="bilinear",
                       align_corners=False).numpy()
  with jax.enable_x64(True):
    got = np.asarray(ops.resize_bilinear(x.transpose(0, 2, 3, 1), out_hw))
  numerics.assert_exact(got.transpose(0, 3, 1, 2), want, "resize")
  m = ops.bilinear_matrix(in_hw[0], out_hw[0])
  np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=0, atol=1e-15)


def test_upsampled_masked_average_equals_upsample_then_pool():
  """The transposed-interpolation MAP against the official getFeatures (upsample, then pool)."""
  rng = np.random.default_rng(1)
  feat = rng.standard_normal((3, 16, 5, 6))
  mask = (rng.uniform(size=(3, 33, 41)) < 0.3).astype(np.float64)
  mask[2] = 0.0  # empty: a zero vector
  want = np.stack([ref.get_features(torch.from_numpy(feat[i:i + 1]),
                                    torch.from_numpy(mask[i:i + 1]))[0].numpy()
                   for i in range(3)])
  with jax.enable_x64(True):
    got = panet.upsampled_masked_average(feat.transpose(0, 2, 3, 1), mask)
  numerics.assert_exact(got, want, "MAP")
  assert np.abs(got[2]).max() == 0.0


def test_inputs_are_checked():
  net = panet.PANet(way=2)
  q = jax.ShapeDtypeStruct((1, 33, 33, 3), jnp.float32)
  s = jax.ShapeDtypeStruct((1, 3, 33, 33, 3), jnp.float32)
  y = jax.ShapeDtypeStruct((1, 3, 33, 33), jnp.int32)
  with pytest.raises(ValueError, match=r"way = 2: supp_images holds 3 supports"):
    jax.eval_shape(lambda q, s, y: net.init(jax.random.key(0), q, s, y, train=False), q, s, y)


def test_registry_config_and_parameters():
  """config → PANet (way from data.way, PANet's fields, the encoder trains unless frozen), init
  with way·shot supports, 14,714,688 parameters, all in the encoder; the head stays float32
  with a bfloat16 encoder."""
  config = _config(2, 3)
  config.model.scaler, config.model.align, config.model.align_weight = 10.0, False, 0.5
  net = registry.build_model(config)
  assert isinstance(net, panet.PANet)
  assert (net.way, net.scaler, net.align, net.align_weight, net.train_backbone) == (
      2, 10.0, False, 0.5, True)
  assert type(net.backbone).__name__ == "VGG16PANet"
  assert set(panet.model_config()) == {"scaler", "align", "align_weight", "variant",
                                       "frozen_layers"}
  assert (net.variant, net.frozen_layers) == ("official", ())  # the blog variant: test_panet_blog
  assert configs_lib.base_config("panet").model.align is True
  config.train.frozen_keys = ("backbone",)
  assert not registry.build_model(config).train_backbone
  params = registry.variables_template(net, 33, 3)["params"]  # 6 supports: 2 ways x 3 shots
  assert set(params) == {"backbone"} and registry.head_param_count(params) == 0
  assert sum(x.size for x in jax.tree.leaves(params)) == 14_714_688
  config.model.backbone_dtype = "bfloat16"
  net = registry.build_model(config)
  shapes = jax.eval_shape(
      lambda v: net.apply(v, jnp.zeros((1, 33, 33, 3)), jnp.zeros((1, 6, 33, 33, 3)),
                          jnp.ones((1, 6, 33, 33), jnp.int32), train=True),
      {"params": params})
  assert shapes["query_feat"].dtype == jnp.float32 and shapes["logits"].dtype == jnp.float32
  assert shapes["logits"].shape == (1, 33, 33, 3) and shapes["supp_fg"].shape == (1, 2, 3, 512)


# ----------------------------------------------------------------------------- checkpoints


def _oracle_state_dict(seed=5):
  torch.manual_seed(seed)
  return ref.FewShotSeg(cfg={"align": True}).state_dict()


def _write_config(tmp_path, way=1, shot=1):
  path = tmp_path / "panet_config.py"
  path.write_text(
      "from fss_jax import configs_lib\n\n"
      "def get_config():\n"
      "  config = configs_lib.base_config('panet')\n"
      "  configs_lib.set_backbone(config, 'vgg16_panet')\n"
      f"  config.data.way, config.data.shot = {way}, {shot}\n"
      "  config.train.frozen_keys = ()\n"
      "  return config\n")
  return str(path)


def test_official_snapshot_import_and_export(tmp_path):
  """An official snapshot (DataParallel's state_dict: ``module.encoder.backbone.features.*``, 26
  tensors) → our variables (weights.read_model and scripts/import_checkpoint.py); our export
  loads strictly into the oracle's FewShotSeg (bare keys) and into the DataParallel model the
  official test.py builds (--reference_wrapping, --module_prefix), values equal."""
  sd = _oracle_state_dict()
  assert len(sd) == 26 and all(k.startswith("encoder.backbone.features.") for k in sd)
  snapshot = str(tmp_path / "30000.pth")
  torch.save(collections.OrderedDict(("module." + k, v) for k, v in sd.items()), snapshot)
  config = _config(2, 1)
  net = registry.build_model(config)
  variables = weights.read_model(snapshot, net, config)
  assert set(variables) == {"params"} and set(variables["params"]) == {"backbone"}
  np.testing.assert_array_equal(variables["params"]["backbone"]["features_6_2"]["kernel"],
                                sd["encoder.backbone.features.6.2.weight"].numpy()
                                .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["params"]["backbone"]["features_8_4"]["bias"],
                                sd["encoder.backbone.features.8.4.bias"].numpy())
  # A bare state_dict (FewShotSeg's own, no 'module.') reads the same.
  bare = str(tmp_path / "bare.pth")
  torch.save(sd, bare)
  for a, b in zip(jax.tree.leaves(weights.read_model(bare, net, config)),
                  jax.tree.leaves(variables), strict=True):
    np.testing.assert_array_equal(a, b)
  # The script writes the same variables.
  msgpack = str(tmp_path / "panet.msgpack")
  cfg_path = _write_config(tmp_path, way=2)
  runpy.run_path(os.path.join(_SCRIPTS, "import_checkpoint.py"), run_name="script")["main"](
      ["--config", cfg_path, "--input", snapshot, "--output", msgpack])
  for a, b in zip(jax.tree.leaves(weights.read_model(msgpack, net, config)),
                  jax.tree.leaves(variables), strict=True):
    np.testing.assert_array_equal(a, b)

  # Export: the official keys in the official order, loaded strictly, values equal.
  out = weights.model_state_dict(variables, config)
  assert list(out) == list(sd)
  model = ref.FewShotSeg(cfg={"align": True})
  model.load_state_dict({k: torch.from_numpy(v) for k, v in out.items()}, strict=True)
  for k, v in model.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), sd[k].numpy())
  export = runpy.run_path(os.path.join(_SCRIPTS, "export_torch.py"), run_name="script")["main"]
  for flag in ("--reference_wrapping", "--module_prefix", None):
    path = str(tmp_path / f"export{flag}.pth")
    export(["--input", msgpack, "--config", cfg_path, "--output", path] + ([flag] if flag else []))
    loaded = torch.load(path, weights_only=True)
    # The official test.py: DataParallel(FewShotSeg).load_state_dict(torch.load(snapshot)).
    target = torch.nn.DataParallel(ref.FewShotSeg(cfg={"align": True})) if flag else \
        ref.FewShotSeg(cfg={"align": True})
    assert list(loaded) == [("module." if flag else "") + k for k in sd]
    target.load_state_dict(loaded, strict=True)
    for k, v in target.state_dict().items():
      np.testing.assert_array_equal(v.numpy(), sd[k[len("module."):] if flag else k].numpy())
  # ASGNet/PFENet keep their {'state_dict': {'module.' + key}} wrapping.
  assert weights.reference_wrapping(configs_lib.base_config("pfenet")) == "state_dict"
  assert weights.reference_wrapping(config) == "module"


def test_wrong_checkpoints_are_refused(tmp_path):
  """A checkpoint of another layout names the offending keys: torchvision's vgg16 file given
  as a whole PANet, and a PANet snapshot missing a tensor."""
  config = _config(1, 1)
  net = registry.build_model(config)
  imagenet = str(tmp_path / "vgg16.pth")
  torch.save(ref.imagenet_state_dict(seed=1), imagenet)
  with pytest.raises(torch_import.CheckpointMismatchError,
                     match=r"encoder\.backbone\.features\.0\.0\.weight"):
    weights.read_model(imagenet, net, config)
  sd = _oracle_state_dict()
  del sd["encoder.backbone.features.8.4.bias"]
  partial = str(tmp_path / "partial.pth")
  torch_export.save_state_dict({k: v.numpy() for k, v in sd.items()}, partial,
                               reference_wrapping="module")
  with pytest.raises(torch_import.CheckpointMismatchError, match=r"1 missing, 0 unexpected"):
    weights.read_model(partial, net, config)
