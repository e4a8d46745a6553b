"""Model speed and memory on CPU: every registered model in fss_jax against its PyTorch baseline,
timed in the same run.

Each (case, implementation) pair runs in a fresh subprocess so that its peak resident memory
(ru_maxrss) is its own. Latency = median of --repeats timed calls after --warmup untimed ones (the
first call includes JIT compilation). Both sides use random weights and the same random inputs
(normal images, an ellipse per support mask).

  python benchmarks/model_speed.py                        # every case, table to stdout
  python benchmarks/model_speed.py --models pfenet        # one model family
  python benchmarks/model_speed.py --cases pfenet_vgg_eval_1shot_233 --warmup 0 --repeats 1
  python benchmarks/model_speed.py --models asgnet --no-torch

Cases, named <model>_<backbone>_<kind>_[<N>way_]<K>shot_<size>[_b<batch>] (backbone r50 | r101 |
vgg; the VGG is each model's own: VGG16-bn for PFENet/ASGNet, ``vgg16_panet`` for PANet; N ways,
default 1, only for N-way models: the supports are N·K images, way-major):
  *_eval_{1,5}shot_473    eval forward, batch 1 (fss_jax: jitted ``model.apply(train=False)``)
  *_eval_1shot_233        the same at a small size (quick checks)
  *_train_1shot_473_b4    train step, batch 4: forward + backward + SGD-momentum update of the
                          head, backbone frozen (fss_jax: the jitted public
                          ``fss_jax.train.step.train_step`` with ``optim.make_optimizer``, state
                          donated, as the trainer runs it; baseline: ``torch.optim.SGD`` momentum
                          0.9, weight decay 1e-4 over the head parameters only, as the official
                          training scripts build it)
  asgnet_sgc_5shot_473    seeds + SGC + GPA alone for one 5-shot episode (60x60x256 features);
                          fss_jax only
  panet_vgg_eval_{1,5}shot_417, panet_vgg_eval_2way_1shot_417, panet_vgg_eval_1shot_233
                          PANet eval forward at its official size (417), batch 1 episode
  panet_vgg_train_1shot_417_b1
                          PANet train step as the official train.py runs it: batch 1 episode,
                          query CE (ignore 255) + PAR (align on), SGD lr 1e-3 momentum 0.9 weight
                          decay 5e-4 over ALL parameters (the whole encoder trains; fss_jax: the
                          same public train_step on ``configs_lib.panet_settings``, whose
                          ``train.frozen_keys = ()``)
The fss_jax side is built from the registry (``configs_lib.base_config(model)`` +
``set_backbone`` → ``registry.build_model`` / ``registry.init_variables``; PANet's training fields
from ``configs_lib.panet_settings``), so a newly registered model needs only its case names here
(and a baseline entry in ``_torch_model`` for the torch column).

Inputs: normal images; each support label an ellipse of 1s (the support's own way's class: the
N-way contract's labels are relative to their way) on 0s; the query label is the first support's
(class 1, way 0).

Baselines (PyTorch, ``torch.set_num_threads(os.cpu_count())``, eval under ``no_grad``, train in
``model.train()`` as the official scripts do: the backbone's BN then uses batch statistics and
updates its running statistics; the fss_jax train cases run ``model.bn_mode='batch_stats'`` to do
the same work, although fss_jax configs default to frozen BN, which is cheaper):
  pfenet  tests/torch_pfenet_ref.py, verified equal to the official dvlab-research/PFENet code bit
          for bit on CPU (same ops in the same order): its time is the official algorithm's cost.
  asgnet  tests/torch_asgnet_ref.py (``top2_gap=False``), a transcription of the official
          Reagan1311/ASGNet forward that does its work op for op: same no_grad regions, ReLUs
          and residual adds in place, SGC/GPA on the same ``repeat``-ed tensors, the same
          allocations per train step (8.5 GB); the loss also takes the official forward's
          argmax. Against the official code (run on CPU, same weights, inputs and seeds): float64
          logits identical; interleaved on a 2-core AMD EPYC, train b4 in 0.91-0.97x and eval
          1-shot 473 in 0.98x the official time (its earlier version allocated 3.4 GB more per
          train step, non-in-place ReLUs and adds; 8.08 s against the official 5.78 s was
          reported from another machine). Its superpixel
          seeds are computed on the host (``place_seed_points``), as the official data loader
          does, once, outside the timing.
  panet   tests/torch_panet_ref.py (``FewShotSeg``, cfg align=True; ``total_loss``), verified
          bit-identical to the official kaixin96/PANet code on CPU: its time is the official
          algorithm's cost, including its Python loops over episodes, ways and shots and its
          skipping of PAR for a way with no predicted query pixel (fss_jax computes every way
          and masks; a note under the table lists the ways the baseline skipped). Its inputs
          are the official nesting (way x shot x [B,3,H,W]) with fg / bg masks (``getMask``:
          fg = 1, bg = 0 or 255) built once outside the timing, as the official data loader
          does. Train:
          ``torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)``,
          zero_grad, forward, loss, backward, step, as official train.py (MultiStepLR's step
          is left out, as the poly update is for the others).
"""
import argparse
import functools
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import NamedTuple, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = (
    "asgnet_r50_eval_1shot_473", "asgnet_r50_eval_5shot_473", "asgnet_r50_eval_1shot_233",
    "asgnet_r50_train_1shot_473_b4", "asgnet_sgc_5shot_473",
    "pfenet_r50_eval_1shot_473", "pfenet_r50_eval_5shot_473", "pfenet_r50_eval_1shot_233",
    "pfenet_r50_train_1shot_473_b4",
    "pfenet_vgg_eval_1shot_473", "pfenet_vgg_eval_5shot_473", "pfenet_vgg_eval_1shot_233",
    "pfenet_vgg_train_1shot_473_b4",
    "panet_vgg_eval_1shot_417", "panet_vgg_eval_5shot_417", "panet_vgg_eval_2way_1shot_417",
    "panet_vgg_eval_1shot_233", "panet_vgg_train_1shot_417_b1",
    "bam_r50_eval_1shot_473", "bam_r50_eval_5shot_473", "bam_r50_eval_1shot_233",
    "bam_r50_train_1shot_473_b4",
    "msanet_r50_eval_1shot_473", "msanet_r50_eval_5shot_473", "msanet_r50_eval_1shot_233",
    "msanet_r50_train_1shot_473_b4",
)
# case-name backbone tag -> (config.model.backbone family, ResNet depth; unused for VGG)
BACKBONES = {"r50": ("resnet", 50), "r101": ("resnet", 101), "vgg": ("vgg16_bn", 50)}
# Per-model exceptions to BACKBONES: the tag names that model's own network of the family.
MODEL_BACKBONES = {"panet": {"vgg": ("vgg16_panet", 50)}}
# What the baseline column is, per model (printed above the table).
BASELINES = {
    "pfenet": "the official PFENet forward (bit-identical transcription, "
              "tests/torch_pfenet_ref.py)",
    "asgnet": "the official ASGNet forward's work (op-for-op transcription, "
              "tests/torch_asgnet_ref.py *)",
    "panet": "the official PANet FewShotSeg + PAR (bit-identical transcription, "
             "tests/torch_panet_ref.py)",
    "bam": "the official BAM OneModel (bit-identical transcription, tests/torch_bam_ref.py)",
    "msanet": "the official MSANet OneModel (bit-identical transcription, "
              "tests/torch_msanet_ref.py)",
}
STAGE2 = ("bam", "msanet")  # stage-2 models: frozen backbone and base learner, BN frozen
FOOTNOTE = ("* float64 logits equal to the official Reagan1311/ASGNet code's; interleaved against it "
            "on a 2-core CPU,\n  train b4 0.91-0.97x and eval 1-shot 473 0.98x the official "
            "time (same ops, same allocations).")
_CASE_RE = re.compile(r"(?P<model>[a-z0-9]+)_(?P<backbone>[a-z0-9]+)_(?P<kind>eval|train)_"
                      r"(?:(?P<way>\d+)way_)?(?P<shot>\d+)shot_(?P<size>\d+)"
                      r"(?:_b(?P<batch>\d+))?$")
_SGC_RE = re.compile(r"(?P<model>asgnet)_(?P<kind>sgc)_(?P<shot>\d+)shot_(?P<size>\d+)$")
TRAIN_STEPS = 10_000  # poly schedule length for the train cases (the rate does not change speed)
_NOTES = {}  # what a child adds to its JSON line (PANet's baseline: the ways PAR skipped)


class Case(NamedTuple):
  model: str              # registry name
  backbone: Optional[str]  # key of BACKBONES; None for the SGC micro-case
  kind: str               # 'eval' | 'train' | 'sgc'
  shot: int
  size: int               # square input side, 8k+1
  batch: int
  way: int = 1            # N of N-way episodes (N-way models only)


def parse_case(name: str) -> Case:
  """'pfenet_vgg_eval_5shot_473' → Case('pfenet', 'vgg', 'eval', 5, 473, 1);
  'asgnet_r50_train_1shot_473_b4' → batch 4; 'panet_vgg_eval_2way_1shot_417' → way 2;
  'asgnet_sgc_5shot_473' → kind 'sgc'."""
  m = _CASE_RE.match(name) or _SGC_RE.match(name)
  if not m:
    raise ValueError(f"case {name!r} is not <model>_<backbone>_<eval|train>_[<N>way_]<K>shot_"
                     "<size>[_b<batch>] nor asgnet_sgc_<K>shot_<size>")
  g = m.groupdict()
  backbone = g.get("backbone")
  if backbone is not None and backbone not in BACKBONES:
    raise ValueError(f"case {name!r}: backbone tag {backbone!r} not in {sorted(BACKBONES)}")
  way = int(g.get("way") or 1)
  if way < 1:
    raise ValueError(f"case {name!r}: way must be >= 1")
  return Case(g["model"], backbone, g["kind"], int(g["shot"]), int(g["size"]),
              int(g.get("batch") or 1), way)


def backbone_of(case: Case):
  """(config.model.backbone family, depth) of the case's backbone tag for its model."""
  return MODEL_BACKBONES.get(case.model, {}).get(case.backbone, BACKBONES[case.backbone])


def _inputs(shot, size, batch, way=1):
  """Random episode batch (NHWC): query (B,S,S,3), supports (B,N·K,S,S,3) way-major, support
  labels (B,N·K,S,S) with an ellipse of 1s per support (1 = the support's own way's class, the
  N-way contract's labels being relative to their way), query label (B,S,S) (= the first
  support's: class 1, way 0). For way = 1 the draws are those of the 1-way cases."""
  import numpy as np
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:size, :size]
  nk = way * shot
  labels = np.zeros((batch, nk, size, size), np.int32)
  for i in range(batch):
    for j in range(nk):
      cy, cx = rng.uniform(0.35, 0.65, 2) * size
      ry, rx = rng.uniform(0.2, 0.3, 2) * size
      labels[i, j][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
  q = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  s = rng.normal(size=(batch, nk, size, size, 3)).astype(np.float32)
  y = labels[:, 0].copy()
  return q, s, labels, y


def _time(fn, warmup, repeats):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _run_sgc(case, warmup, repeats):
  """ASGNet's prototype stage alone: seeds + SGC + GPA on random 256-d features."""
  import jax
  import jax.numpy as jnp
  from fss_jax.models import gpa, ops, sgc

  _, _, lab, _ = _inputs(case.shot, case.size, 1)
  lab = jnp.asarray(lab)
  h = (case.size - 1) // 8 + 1
  feat = jax.random.normal(jax.random.key(0), (case.shot, h, h, 256)) * 0.05
  qf = jax.random.normal(jax.random.key(1), (1, h, h, 256))

  @jax.jit
  def part(feat, qf, lab):
    fg = (lab[0] == 1).astype(jnp.float32)  # (K,S,S)
    soft = ops.resize_bilinear_ac(fg[..., None], (h, h))[..., 0]
    seeds, _ = sgc.place_seeds(fg)
    protos, valid = sgc.sgc_prototypes(feat, soft, seeds, n_iter=5)
    return gpa.allocate(qf, protos.reshape(1, -1, 256), valid.reshape(1, -1))

  return _time(lambda: jax.block_until_ready(part(feat, qf, lab)), warmup, repeats)


def run_jax(case, warmup, repeats, train_bn="batch_stats"):
  import fss_jax  # noqa: F401  (sets XLA's CPU flags before JAX starts its backend)
  import jax
  from fss_jax import configs_lib
  from fss_jax.models import registry
  from fss_jax.train import optim
  from fss_jax.train import step as step_lib

  if case.kind == "sgc":
    return _run_sgc(case, warmup, repeats)

  config = configs_lib.base_config(case.model)
  if case.model == "panet":
    # The official recipe: vgg16_panet trained whole (train.frozen_keys = ()), SGD lr 1e-3
    # momentum 0.9 weight decay 5e-4, PAR on; the case's way / shot.
    configs_lib.panet_settings(config, {"fold": 0, "shot": case.shot, "way": case.way,
                                        "align": True})
  configs_lib.set_backbone(config, *backbone_of(case))
  config.data.way = case.way
  config.data.shot = case.shot
  config.data.image_size = case.size
  config.data.train_batch_size = case.batch
  if case.kind == "train" and case.model not in STAGE2:
    config.model.bn_mode = train_bn  # batch_stats: the official scripts' train mode
  if case.model in STAGE2:  # BAM's train.py: fix_bn, frozen PSPNet, all groups at 10x
    config.train.frozen_keys = ("backbone", "learner_base")
  model = registry.build_model(config)
  variables = jax.device_put(
      registry.init_variables(model, case.size, case.shot, jax.random.key(0)))
  q, s, lab, y = _inputs(case.shot, case.size, case.batch, case.way)
  batch = {"query": q, "supp_images": s, "supp_labels": lab, "query_label": y}
  if case.model in STAGE2:
    batch.update(_stage2_targets(case))
  batch = jax.device_put(batch)

  if case.kind == "eval":
    f = jax.jit(lambda v, b: model.apply(v, **step_lib.model_inputs(model, b),
                                         train=False)["logits"])
    return _time(lambda: jax.block_until_ready(f(variables, batch)), warmup, repeats)

  # Train: what the trainer runs (fss_jax/train/trainer.py), minus its sharding annotations.
  tx = optim.make_optimizer(config, TRAIN_STEPS)
  state = [jax.device_put(
      step_lib.create_train_state(variables, tx, tuple(config.train.frozen_keys)))]
  del variables  # the state holds its own copy; keep the peak RSS to what training holds
  f = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx), donate_argnums=(0,))
  rng = jax.random.key(1)

  def fn():
    state[0], metrics = f(state[0], batch, rng)
    jax.block_until_ready((state[0], metrics))
  return _time(fn, warmup, repeats)


def _stage2_targets(case):
  """BAM/MSANet's extra batch entries: the episode class's base index + 1 (the training
  ensemble leaves it out) and the query's base-class label (B,S,S) in 0..15."""
  import numpy as np
  rng = np.random.default_rng(7)
  return {"base_class": np.full((case.batch,), 3, np.int32),
          "query_base_label": rng.integers(0, 16, (case.batch, case.size, case.size)
                                           ).astype(np.int32)}


def _torch_optimizer(case, model):
  """The official training script's optimiser of ``case.model`` on the baseline ``model``."""
  import torch
  if case.model in STAGE2:
    # BAM's get_optim / MSANet's one group: the meta learner (freeze_modules took the rest).
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05,
                           momentum=0.9, weight_decay=1e-4)
  if case.model == "panet":
    # kaixin96/PANet train.py: SGD over all parameters (the whole encoder trains).
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
  # PFENet / ASGNet: the backbone (``layer*``) requires_grad False, SGD on the head.
  head = []
  for n, p in model.named_parameters():
    if n.startswith("layer"):
      p.requires_grad_(False)
    else:
      head.append(p)
  return torch.optim.SGD(head, lr=0.025, momentum=0.9, weight_decay=1e-4)


def _torch_model(case):
  """The PyTorch baseline of ``case.model``: (module, forward(x, s_x, s_y) -> out dict,
  loss(out, y) -> scalar), or None when the model has none (benchmarks/eval_memory.py uses it
  too)."""
  import numpy as np
  import torch
  if case.model == "panet":
    from tests import torch_panet_ref as ref
    if case.backbone != "vgg":
      return None
    model = ref.FewShotSeg(cfg={"align": True})
    b, n, k, size = case.batch, case.way, case.shot, case.size
    _, s, lab, _ = _inputs(k, size, b, n)
    # The official data loader's work, off the model's clock: way x shot x [B,3,H,W] images
    # and getMask's fg (label 1) / bg (label 0 or 255; 254 is neither) masks as float.
    supp = torch.from_numpy(s.transpose(0, 1, 4, 2, 3).copy()).view(b, n, k, 3, size, size)
    lab = torch.from_numpy(lab).view(b, n, k, size, size)
    fore = (lab == 1).float()
    back = ((lab == 0) | (lab == 255)).float()
    supp_l = [[supp[:, w, j].contiguous() for j in range(k)] for w in range(n)]
    fore_l = [[fore[:, w, j].contiguous() for j in range(k)] for w in range(n)]
    back_l = [[back[:, w, j].contiguous() for j in range(k)] for w in range(n)]

    def forward(x, s_x, s_y):
      del s_x, s_y  # nested above, as the official loader hands them over
      return model(supp_l, fore_l, back_l, [x])

    def loss(out, y):
      if "par_skipped" in out:  # what the official alignLoss skipped (it does less work)
        forward.skipped = out["par_skipped"].tolist()
      return ref.total_loss(out, y)
    return model, forward, loss
  if case.model in STAGE2:
    layers = "vgg" if case.backbone == "vgg" else BACKBONES[case.backbone][1]
    if case.model == "bam":
      from tests import torch_bam_ref as ref
      model = ref.RefBAM(layers, 16, case.shot)
    else:
      from tests import torch_msanet_ref as ref
      model = ref.RefMSANet(layers, 16, case.shot)
    extra = _stage2_targets(case)
    cat_idx = torch.from_numpy(extra["base_class"] - 1).long()
    y_b = torch.from_numpy(extra["query_base_label"]).long()
    loss_terms = ref.bam_loss if case.model == "bam" else ref.msanet_loss

    def forward(x, s_x, s_y):
      return model(x, s_x, s_y, cat_idx=cat_idx)

    def loss(out, y):
      main, aux1, aux2 = loss_terms(out, y, y_b)
      return main + aux1 + aux2
    return model, forward, loss
  if case.model == "pfenet":
    from tests import torch_pfenet_ref as ref
    layers = "vgg" if case.backbone == "vgg" else BACKBONES[case.backbone][1]
    model = ref.RefPFENet(layers=layers, shot=case.shot)
    return model, model, ref.reference_loss
  if case.model == "asgnet":
    from tests import torch_asgnet_ref as ref
    if case.backbone == "vgg":
      return None
    # top2_gap off: a topk that only the parity tests read; the official forward has none.
    model = ref.RefASGNet(depth=BACKBONES[case.backbone][1], shot=case.shot, top2_gap=False)
    _, _, lab, _ = _inputs(case.shot, case.size, case.batch)
    # The official data loader computes the seeds on the host, off the model's clock.
    seeds = torch.from_numpy(np.stack([
        [ref.place_seed_points((lab[i, j] == 1).astype(np.float32)) for j in range(case.shot)]
        for i in range(case.batch)]))

    def loss(out, y):
      out["logits"].max(1)  # the official train forward also returns out.max(1)[1]
      return ref.reference_loss(out, y)
    return model, lambda x, s_x, s_y: model(x, s_x, s_y, seeds), loss
  return None


def run_torch(case, warmup, repeats):
  import torch
  from tests import torch_resnet_ref
  torch.set_num_threads(os.cpu_count() or 1)
  built = None if case.kind == "sgc" else _torch_model(case)
  if built is None:
    return None
  model, forward, loss_fn = built
  torch_resnet_ref.randomize_(model, seed=0)
  q, s, lab, y = _inputs(case.shot, case.size, case.batch, case.way)
  x = torch.from_numpy(q.transpose(0, 3, 1, 2).copy())
  s_x = torch.from_numpy(s.transpose(0, 1, 4, 2, 3).copy())
  s_y = torch.from_numpy(lab).float()

  if case.kind == "eval":
    model.eval()

    def fn():
      with torch.no_grad():
        forward(x, s_x, s_y)
    return _time(fn, warmup, repeats)

  # Train as the official scripts: the model's official optimiser (PFENet/ASGNet: backbone
  # requires_grad False, only the head in it; PANet: every parameter), the whole model in train
  # mode.
  model.train()
  opt = _torch_optimizer(case, model)
  yt = torch.from_numpy(y).long()

  def fn():
    opt.zero_grad()
    loss_fn(forward(x, s_x, s_y), yt).backward()
    opt.step()
  median = _time(fn, warmup, repeats)
  if getattr(forward, "skipped", None) is not None:
    _NOTES["par_skipped"] = forward.skipped
  return median


def _child(args):
  case = parse_case(args.case)
  if args.impl == "jax":
    median = run_jax(case, args.warmup, args.repeats, args.train_bn)
  else:
    median = run_torch(case, args.warmup, args.repeats)
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps({"median_s": median, "peak_mb": peak_mb, **_NOTES}))


def _select(cases_arg, models_arg):
  names = [c.strip() for c in cases_arg.split(",") if c.strip()] if cases_arg else list(CASES)
  for name in names:
    if name not in CASES:
      sys.exit(f"unknown case {name!r}; choose from {', '.join(CASES)}")
  if models_arg:
    models = {m.strip() for m in models_arg.split(",") if m.strip()}
    known = {parse_case(c).model for c in CASES}
    if models - known:
      sys.exit(f"unknown model(s) {sorted(models - known)}; cases exist for {sorted(known)}")
    names = [n for n in names if parse_case(n).model in models]
  return names


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--cases", default="", help="comma-separated case names (default: all)")
  p.add_argument("--models", default="", help="comma-separated model names, e.g. pfenet")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
  p.add_argument("--train_bn", choices=["batch_stats", "frozen"], default="batch_stats",
                 help="fss_jax's backbone BN in the train cases: batch_stats (the official "
                      "scripts' work, default) or frozen (fss_jax's default config; the "
                      "baseline keeps the official batch statistics)")
  p.add_argument("--impl", choices=["jax", "torch"], help=argparse.SUPPRESS)
  p.add_argument("--case", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.impl:
    return _child(args)
  if args.repeats < 1 or args.warmup < 0:
    sys.exit("--repeats must be >= 1 and --warmup >= 0")

  names = _select(args.cases, args.models)
  impls = ["jax"] + ([] if args.no_torch else ["torch"])
  env = {**os.environ,
         "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
  rows = []
  for name in names:
    res = {}
    for impl in impls:
      cmd = [sys.executable, os.path.abspath(__file__), "--impl", impl, "--case", name,
             "--warmup", str(args.warmup), "--repeats", str(args.repeats),
             "--train_bn", args.train_bn]
      print(f"[{name}] {impl} ...", file=sys.stderr, flush=True)
      out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
      if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        res[impl] = "error"
        continue
      res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
    rows.append((name, res))

  models = sorted({parse_case(n).model for n in names})
  print(f"\nModel speed on CPU ({os.cpu_count()} cores), median of {args.repeats} after "
        f"{args.warmup} warm-up; random weights; peak = process max RSS; fss_jax train "
        f"cases with {args.train_bn} backbone BN")
  if not args.no_torch:
    print("Baseline (PyTorch, same run):")
    for m in models:
      print(f"  {m}: {BASELINES.get(m, 'none')}")
  width = max([len(n) for n in names] + [4]) + 2
  print(f"{'case':<{width}}{'fss_jax s':>11}{'peak MB':>9}{'baseline s':>12}{'peak MB':>9}"
        f"{'speed-up':>10}")

  def cells(r):
    if r == "error":
      return "error", "-"
    if not r or r["median_s"] is None:  # not run, or no baseline for this case
      return "-", "-"
    return f"{r['median_s']:.3f}", f"{r['peak_mb']:.0f}"

  for name, res in rows:
    j, t = res.get("jax"), res.get("torch")
    (jt, jm), (tt, tm) = cells(j), cells(t)
    ok = lambda r: isinstance(r, dict) and r["median_s"] is not None
    sp = f"{t['median_s'] / j['median_s']:.2f}x" if ok(j) and ok(t) else "-"
    print(f"{name:<{width}}{jt:>11}{jm:>9}{tt:>12}{tm:>9}{sp:>10}")
  print("speed-up = baseline s / fss_jax s")
  for name, res in rows:
    t = res.get("torch")
    if isinstance(t, dict) and "par_skipped" in t:
      print(f"{name}: baseline PAR skipped ways per episode {t['par_skipped']} (a skipped way "
            "is no work in the official code; fss_jax computes and masks it)")
  if "asgnet" in models and not args.no_torch:
    print(FOOTNOTE)


if __name__ == "__main__":
  main()
