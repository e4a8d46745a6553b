"""Resident memory of one eval forward on CPU, stage by stage: fss_jax against its PyTorch baseline.

Each implementation runs in a fresh subprocess. At every stage boundary the child reads VmRSS
(resident now) and VmHWM (the peak since the previous boundary: writing 5 to
/proc/self/clear_refs resets it, Linux only) from /proc/self/status. The process peak is the
largest stage peak, what ``benchmarks/model_speed.py`` reports as ru_maxrss.

  python benchmarks/eval_memory.py                            # ASGNet R50 1-shot 473², batch 1
  python benchmarks/eval_memory.py --model pfenet --shot 5 --size 233
  python benchmarks/eval_memory.py --weights file --evaluator  # what scripts/evaluate.py holds
  python benchmarks/eval_memory.py --no-trim --no-torch        # without the heap release

Stages (fss_jax | PyTorch):
  runtime   import fss_jax + jax, one device op: the XLA CPU client, its thread pools, jaxlib's
            code | import torch, one op
  model     flax and the model module (with --evaluator also the evaluator module, which
            imports the data pipeline) | the reference module built (its weights allocated)
  weights   --weights init: ``registry.init_variables`` (compiles and runs the init program, as
            model_speed.py does), then ``device_put``; --weights file: a .msgpack of the same
            variables read with ``weights.read_model`` (as ``scripts/evaluate.py --checkpoint``),
            then ``device_put`` | ``randomize_`` (new random weights)
  inputs    one random episode batch (model_speed.py's) on the device
  compile   ``jax.jit(...).lower(...).compile()`` of the eval function; the XLA compiler's
            transient memory is the stage peak, the executable what stays | nothing to compile
  call 1    first forward: the executable's temporary buffer (``memory_analysis().temp``) on top
  calls     the other --calls forwards
The eval function is model_speed.py's (``model.apply(train=False)`` logits), or with
--evaluator the evaluator's ``episode_scores`` on mesh-replicated variables and a batch built by
``sharding.host_batch_to_global``, as ``Evaluator.run`` calls it.

fss_jax returns glibc's free heap to the OS after each long XLA compilation
(``fss_jax._xla_setup.release_heap_after_compiles``); --no-trim sets FSS_JAX_NO_MALLOC_TRIM=1 to
show the process without it (the compiler's freed memory then stays resident under the forward).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STAGES = ("runtime", "model", "weights", "inputs", "compile", "call 1", "calls")


class _Meter:
  """Stage marks: (name, RSS MB now, peak MB since the previous mark)."""

  def __init__(self):
    self.rows = []
    self.resettable = True
    self._reset()

  @staticmethod
  def _status():
    with open("/proc/self/status") as f:
      s = f.read()
    return [int(re.search(k + r":\s+(\d+)", s).group(1)) / 1024 for k in ("VmRSS", "VmHWM")]

  def _reset(self):
    try:
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    except OSError:  # the peak then runs on from the process start
      self.resettable = False

  def mark(self, name):
    rss, hwm = self._status()
    self.rows.append((name, rss, hwm))
    self._reset()


def _case(args):
  import model_speed as ms  # pylint: disable=g-import-not-at-top
  return ms, ms.Case(args.model, args.backbone, "eval", args.shot, args.size, 1)


def _config(args):
  from fss_jax import configs_lib  # pylint: disable=g-import-not-at-top
  import model_speed as ms  # pylint: disable=g-import-not-at-top
  config = configs_lib.base_config(args.model)
  configs_lib.set_backbone(config, *ms.BACKBONES[args.backbone])
  config.data.shot = args.shot
  config.data.image_size = args.size
  return config


def run_jax(args, meter):
  import fss_jax  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  jnp.zeros(1).block_until_ready()
  meter.mark("runtime")
  from fss_jax.models import registry  # pylint: disable=g-import-not-at-top
  from fss_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  if args.evaluator:  # the evaluator module imports the data pipeline (Grain, OpenCV): ~60 MB
    from fss_jax.train import evaluator as evaluator_lib  # pylint: disable=g-import-not-at-top
    from fss_jax.train import sharding  # pylint: disable=g-import-not-at-top
    mesh = sharding.make_mesh()
  ms, case = _case(args)
  config = _config(args)
  model = registry.build_model(config)
  meter.mark("model")
  if args.weights_path:
    from fss_jax import weights as weights_lib  # pylint: disable=g-import-not-at-top
    host = weights_lib.read_model(args.weights_path, model, config)
  else:
    host = registry.init_variables(model, args.size, args.shot, jax.random.key(0))
  if args.evaluator:
    variables = jax.device_put(host, sharding.replicated(mesh))
  else:
    variables = jax.device_put(host)
  del host
  jax.block_until_ready(variables)
  meter.mark("weights")
  q, s, lab, y = ms._inputs(case.shot, case.size, 1)  # pylint: disable=protected-access
  host_batch = {"query": q, "supp_images": s, "supp_labels": lab, "query_label": y}
  if args.evaluator:
    batch = sharding.host_batch_to_global(host_batch, mesh)
    lowered = evaluator_lib.episode_scores.lower(model, variables, batch)
  else:
    batch = jax.device_put(host_batch)
    f = jax.jit(lambda v, b: model.apply(v, **step_lib.model_inputs(model, b),
                                         train=False)["logits"])
    lowered = f.lower(variables, batch)
  jax.block_until_ready(batch)
  meter.mark("inputs")
  compiled = lowered.compile()
  del lowered
  ma = compiled.memory_analysis()
  meter.mark("compile")
  for i in range(args.calls):
    jax.block_until_ready(compiled(variables, batch))
    time.sleep(0.5)  # the temporary buffer is freed asynchronously after the output is ready
    if i == 0:
      meter.mark("call 1")
  if args.calls > 1:
    meter.mark("calls")
  if ma is None:
    return {}
  return {"temp_mb": ma.temp_size_in_bytes / 2**20,
          "argument_mb": ma.argument_size_in_bytes / 2**20,
          "output_mb": ma.output_size_in_bytes / 2**20}


def run_torch(args, meter):
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  torch.zeros(1).add_(1)
  meter.mark("runtime")
  from tests import torch_resnet_ref  # pylint: disable=g-import-not-at-top
  ms, case = _case(args)
  built = ms._torch_model(case)  # pylint: disable=protected-access
  if built is None:
    return None
  model, forward, _ = built
  meter.mark("model")
  torch_resnet_ref.randomize_(model, seed=0)
  model.eval()
  meter.mark("weights")
  q, s, lab, _ = ms._inputs(case.shot, case.size, 1)  # pylint: disable=protected-access
  x = torch.from_numpy(q.transpose(0, 3, 1, 2).copy())
  s_x = torch.from_numpy(s.transpose(0, 1, 4, 2, 3).copy())
  s_y = torch.from_numpy(lab).float()
  meter.mark("inputs")
  for i in range(args.calls):
    with torch.no_grad():
      forward(x, s_x, s_y)
    if i == 0:
      meter.mark("call 1")
  if args.calls > 1:
    meter.mark("calls")
  return {}


def write_weights(args):
  """--weights file: the init variables as a .msgpack at args.weights_path (own process)."""
  import jax  # pylint: disable=g-import-not-at-top
  from fss_jax.convert import io  # pylint: disable=g-import-not-at-top
  from fss_jax.models import registry  # pylint: disable=g-import-not-at-top
  model = registry.build_model(_config(args))
  io.save_variables(args.weights_path, registry.init_variables(
      model, args.size, args.shot, jax.random.key(0)))


def _child(args):
  if args.impl == "write":
    return write_weights(args)
  meter = _Meter()
  extra = (run_jax if args.impl == "jax" else run_torch)(args, meter)
  print(json.dumps({"rows": meter.rows, "resettable": meter.resettable,
                    "extra": extra}))


def _spawn(args, impl, env_extra=None, weights_path=None):
  cmd = [sys.executable, os.path.abspath(__file__), "--impl", impl, "--model", args.model,
         "--backbone", args.backbone, "--shot", str(args.shot), "--size", str(args.size),
         "--calls", str(args.calls)]
  if args.evaluator:
    cmd.append("--evaluator")
  if weights_path:
    cmd += ["--weights_path", weights_path]
  env = {**os.environ, **(env_extra or {}),
         "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, HERE, os.environ.get("PYTHONPATH")]))}
  note = " ".join(f"{k}={v}" for k, v in (env_extra or {}).items())
  print(f"[{impl}{' ' + note if note else ''}] ...", file=sys.stderr, flush=True)
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
  if out.returncode != 0:
    sys.exit(f"{impl} child failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1]) if impl != "write" else None


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="asgnet", choices=["asgnet", "pfenet"])
  p.add_argument("--backbone", default="r50", choices=["r50", "r101", "vgg"])
  p.add_argument("--shot", type=int, default=1)
  p.add_argument("--size", type=int, default=473, help="square input side, 8k+1")
  p.add_argument("--calls", type=int, default=3, help="forward calls (>= 1)")
  p.add_argument("--weights", choices=["init", "file"], default="init",
                 help="init: registry.init_variables in the measured process (model_speed.py); "
                      "file: read a .msgpack written by another process (scripts/evaluate.py)")
  p.add_argument("--evaluator", action="store_true",
                 help="compile the evaluator's episode_scores on replicated variables")
  p.add_argument("--no-trim", action="store_true",
                 help="FSS_JAX_NO_MALLOC_TRIM=1: no heap release after compilations")
  p.add_argument("--both", action="store_true",
                 help="fss_jax with and without the heap release, side by side")
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
  p.add_argument("--impl", choices=["jax", "torch", "write"], help=argparse.SUPPRESS)
  p.add_argument("--weights_path", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.impl:
    return _child(args)
  if args.calls < 1:
    sys.exit("--calls must be >= 1")

  columns = []  # (title, result)
  with tempfile.TemporaryDirectory() as tmp:
    weights_path = None
    if args.weights == "file":
      weights_path = os.path.join(tmp, "variables.msgpack")
      _spawn(args, "write", weights_path=weights_path)
    variants = ([("fss_jax", {}), ("fss_jax no trim", {"FSS_JAX_NO_MALLOC_TRIM": "1"})]
                if args.both else
                [("fss_jax no trim" if args.no_trim else "fss_jax",
                  {"FSS_JAX_NO_MALLOC_TRIM": "1"} if args.no_trim else {})])
    for title, env in variants:
      columns.append((title, _spawn(args, "jax", env, weights_path)))
  if not args.no_torch:
    res = _spawn(args, "torch")
    if res is None or not res["rows"]:
      print(f"(no PyTorch baseline for {args.model} {args.backbone})", file=sys.stderr)
    else:
      columns.append(("PyTorch", res))

  print(f"\nEval forward memory on CPU ({os.cpu_count()} cores): {args.model} {args.backbone} "
        f"{args.shot}-shot {args.size}², batch 1, weights: {args.weights}"
        f"{', evaluator episode_scores' if args.evaluator else ''}; MB; "
        "RSS = resident after the stage, peak = highest during it")
  head = f"{'stage':<10}" + "".join(f"{t + ' RSS':>22}{'peak':>7}" for t, _ in columns)
  print(head)
  for stage in STAGES:
    cells = []
    for _, res in columns:
      row = {r[0]: r for r in res["rows"]}.get(stage)
      cells.append(f"{row[1]:>22.0f}{row[2]:>7.0f}" if row else f"{'-':>22}{'-':>7}")
    if any("-" not in c for c in cells):
      print(f"{stage:<10}" + "".join(cells))
  print(f"{'process peak':<10}" + "".join(
      f"{'':>22}{max(r[2] for r in res['rows']):>7.0f}" for _, res in columns))
  for title, res in columns:
    if res.get("extra"):
      e = res["extra"]
      print(f"{title}: XLA memory_analysis: temp {e['temp_mb']:.0f} MB, arguments "
            f"{e['argument_mb']:.0f} MB, output {e['output_mb']:.1f} MB")
    if not res["resettable"]:
      print(f"{title}: /proc/self/clear_refs not writable: each peak runs from the process start")


if __name__ == "__main__":
  main()
