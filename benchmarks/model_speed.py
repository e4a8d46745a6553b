"""ASGNet model speed and memory on CPU: fss_jax against the PyTorch reference, same run.

Each case runs in a fresh subprocess so that its peak resident memory (ru_maxrss) is its own.
Latency = median of --repeats timed calls after --warmup untimed ones (the first includes JIT
compilation). The baseline is the PyTorch oracle of the reference model (tests/torch_asgnet_ref.py,
which follows the reference's per-sample, per-shot loops), with random weights.

  python benchmarks/model_speed.py                 # all cases, table to stdout
  python benchmarks/model_speed.py --cases eval_1shot_473,sgc_5shot_473 --no-torch

Cases:
  eval_{1,5}shot_{473,233}  eval forward, batch 1 (query and shots in one backbone call)
  train_1shot_473_b4        train step: forward + backward + SGD-momentum update of the head
  sgc_5shot_473             seeds + SGC + GPA alone for one 5-shot episode (60x60x256 features)
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ["eval_1shot_473", "eval_5shot_473", "eval_1shot_233", "eval_5shot_233",
         "train_1shot_473_b4", "sgc_5shot_473"]


def _parse(case):
  """'eval_5shot_473' → ('eval', 5, 473, 1); 'train_1shot_473_b4' → ('train', 1, 473, 4)."""
  parts = case.split("_")
  batch = int(parts[3][1:]) if len(parts) > 3 else 1
  return parts[0], int(parts[1][:-4]), int(parts[2]), batch


def _inputs(shot, size, batch):
  import numpy as np
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:size, :size]
  labels = np.zeros((batch, shot, size, size), np.int32)
  for i in range(batch):
    for j in range(shot):
      cy, cx = rng.uniform(0.35, 0.65, 2) * size
      ry, rx = rng.uniform(0.2, 0.3, 2) * size
      labels[i, j][((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
  q = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  s = rng.normal(size=(batch, shot, size, size, 3)).astype(np.float32)
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


def run_jax(case, warmup, repeats):
  import fss_jax  # noqa: F401  (sets XLA's CPU flags before JAX starts its backend)
  import jax
  import jax.numpy as jnp
  import optax
  from fss_jax.models import asgnet, gpa, sgc, ops
  from fss_jax.train import losses

  kind, shot, size, batch = _parse(case)
  q, s, lab, y = _inputs(shot, size, batch)
  q, s, lab, y = map(jnp.asarray, (q, s, lab, y))

  if kind == "sgc":
    h = (size - 1) // 8 + 1
    feat = jax.random.normal(jax.random.key(0), (shot, h, h, 256)) * 0.05
    qf = jax.random.normal(jax.random.key(1), (1, h, h, 256))

    @jax.jit
    def part(feat, qf, lab):
      fg = (lab[0] == 1).astype(jnp.float32)
      soft = ops.resize_bilinear_ac(fg[..., None], (h, h))[..., 0]
      seeds, _ = sgc.place_seeds(fg)
      protos, valid = sgc.sgc_prototypes(feat, soft, seeds, n_iter=5)
      return gpa.allocate(qf, protos.reshape(1, -1, 256), valid.reshape(1, -1))

    fn = lambda: jax.block_until_ready(part(feat, qf, lab))
    return _time(fn, warmup, repeats)

  net = asgnet.ASGNet(depth=50)
  variables = jax.jit(lambda: net.init(jax.random.key(0), q[:1], s[:1], lab[:1], train=False))()
  if kind == "eval":
    f = jax.jit(lambda v, q, s, l: net.apply(v, q, s, l, train=False)["logits"])
    fn = lambda: jax.block_until_ready(f(variables, q, s, lab))
    return _time(fn, warmup, repeats)

  # Train step: SGD with momentum on the head only; backbone frozen (no optimiser state).
  params = variables["params"]
  head = {k: v for k, v in params.items() if k != "backbone"}
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.025, momentum=0.9))
  opt_state = tx.init(head)

  @jax.jit
  def step(head, opt_state, rng):
    def loss_fn(head):
      out = net.apply({**variables, "params": {**head, "backbone": params["backbone"]}},
                      q, s, lab, train=True, rngs={"dropout": rng})
      return losses.asgnet_loss(out["logits"], out["aux_logits"], y)[0]
    loss, g = jax.value_and_grad(loss_fn)(head)
    updates, opt_state = tx.update(g, opt_state, head)
    return optax.apply_updates(head, updates), opt_state, loss

  state = [head, opt_state]

  def fn():
    state[0], state[1], loss = step(state[0], state[1], jax.random.key(1))
    jax.block_until_ready(loss)
  return _time(fn, warmup, repeats)


def run_torch(case, warmup, repeats):
  import numpy as np
  import torch
  sys.path.insert(0, ROOT)
  from tests import torch_asgnet_ref as ref
  torch.set_num_threads(os.cpu_count() or 1)
  kind, shot, size, batch = _parse(case)
  q, s, lab, y = _inputs(shot, size, batch)
  x = torch.from_numpy(q.transpose(0, 3, 1, 2).copy())
  s_x = torch.from_numpy(s.transpose(0, 1, 4, 2, 3).copy())
  s_y = torch.from_numpy(lab).float()
  model = ref.RefASGNet(depth=50, shot=shot)

  def seeds():  # the reference computes seeds on the host, in the data loader
    return torch.from_numpy(np.stack([[ref.place_seed_points((lab[i, j] == 1).astype(np.float32))
                                       for j in range(shot)] for i in range(batch)]))

  if kind == "sgc":
    return None
  if kind == "eval":
    model.eval()

    def fn():
      with torch.no_grad():
        model(x, s_x, s_y, seeds())
    return _time(fn, warmup, repeats)
  model.train()
  head = [p for n, p in model.named_parameters() if not n.startswith("layer")]
  opt = torch.optim.SGD(head, lr=0.025, momentum=0.9, weight_decay=1e-4)
  yt = torch.from_numpy(y).long()

  def fn():
    opt.zero_grad()
    ref.reference_loss(model(x, s_x, s_y, seeds()), yt).backward()
    opt.step()
  return _time(fn, warmup, repeats)


def _child(args):
  fn = run_jax if args.impl == "jax" else run_torch
  median = fn(args.case, args.warmup, args.repeats)
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(json.dumps({"median_s": median, "peak_mb": peak_mb}))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--cases", default=",".join(CASES))
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
  p.add_argument("--impl", choices=["jax", "torch"], help=argparse.SUPPRESS)
  p.add_argument("--case", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.impl:
    return _child(args)

  impls = ["jax"] + ([] if args.no_torch else ["torch"])
  rows = []
  for case in args.cases.split(","):
    if case not in CASES:
      sys.exit(f"unknown case {case!r}; choose from {', '.join(CASES)}")
    res = {}
    for impl in impls:
      cmd = [sys.executable, os.path.abspath(__file__), "--impl", impl, "--case", case,
             "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
      print(f"[{case}] {impl} ...", file=sys.stderr, flush=True)
      out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": ROOT})
      if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        res[impl] = None
        continue
      res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
    rows.append((case, res))

  print(f"\nASGNet R50 on CPU ({os.cpu_count()} cores), median of {args.repeats} after "
        f"{args.warmup} warm-up; peak = process max RSS")
  print(f"{'case':<22}{'fss_jax s':>11}{'peak MB':>9}{'torch ref s':>13}{'peak MB':>9}"
        f"{'speed-up':>10}")
  for case, res in rows:
    j, t = res.get("jax"), res.get("torch")
    jt = f"{j['median_s']:.3f}" if j else "error"
    jm = f"{j['peak_mb']:.0f}" if j else "-"
    tt = f"{t['median_s']:.3f}" if t and t["median_s"] is not None else "-"
    tm = f"{t['peak_mb']:.0f}" if t and t["median_s"] is not None else "-"
    sp = (f"{t['median_s'] / j['median_s']:.2f}x"
          if j and t and t["median_s"] is not None else "-")
    print(f"{case:<22}{jt:>11}{jm:>9}{tt:>13}{tm:>9}{sp:>10}")


if __name__ == "__main__":
  main()
