r"""ASGNet, ASGNet + prior, ASGNet + AMM and PFENet on the procedural default, side by side.

Trains each model with its ``configs/synthetic_*.py`` config (the same data, steps, schedule and
seed: only the model differs), one ``scripts/train.py`` run after the other, scores each best
checkpoint again with ``scripts/evaluate.py`` under ``--protocol`` (default ``bam``: 5 seeds x
1000 episodes that the checkpoint was not selected on), then prints one table: novel-class mIoU
of the in-training evaluations (the best one with its step, and the last one), FB-IoU at the best
step, and the protocol's mIoU (mean ± std over seeds) and FB-IoU of the best checkpoint. The
in-training evaluations are the selection episodes (200, seed 321): the best of them is an
optimistic estimate; the protocol's is not. A run or evaluation already done in ``--workdir`` is
not repeated, so the table can be re-printed (``--table_only``) or completed after an
interruption.

  python benchmarks/variants.py --workdir=workdirs/variants          # ~20 min on 2 CPU cores
  python benchmarks/variants.py --workdir=workdirs/variants --table_only

Extra ``--config.*`` overrides for every run go after ``--`` (e.g. ``-- --config.train.seed=1``).
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "asgnet": "configs/synthetic_asgnet.py",
    "asgnet_prior": "configs/synthetic_asgnet.py:prior=true",
    "asgnet_amm": "configs/synthetic_asgnet.py:amm=true",
    "pfenet": "configs/synthetic_pfenet.py",
}
SELECT = "select/miou"


def train(name: str, workdir: str, extra: list) -> float:
  """Runs scripts/train.py for one variant (skipped when its final_metrics.json exists);
  returns the wall time in seconds (0 when skipped)."""
  if os.path.exists(os.path.join(workdir, "final_metrics.json")):
    print(f"{name}: finished run in {workdir}, not trained again")
    return 0.0
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "train.py"),
         f"--config={os.path.join(ROOT, VARIANTS[name])}", f"--workdir={workdir}", *extra]
  print(f"{name}: {' '.join(cmd)}", flush=True)
  start = time.monotonic()
  subprocess.run(cmd, check=True, cwd=ROOT)
  return time.monotonic() - start


def evaluate(name: str, workdir: str, protocol: str, extra: list) -> str:
  """Scores the run's best checkpoint under ``protocol`` (skipped when done); returns the JSON
  path."""
  out = os.path.join(workdir, f"eval_{protocol}.json")
  if not os.path.exists(out):
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"),
           f"--config={os.path.join(ROOT, VARIANTS[name])}", f"--workdir={workdir}",
           f"--config.eval.protocol={protocol}", f"--output={out}", "--noprogress", *extra]
    print(f"{name}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
  return out


def summarize(workdir: str, protocol: str) -> dict:
  """Best and last in-training novel mIoU (and FB-IoU at the best) from metrics.jsonl, and the
  final evaluation from final_metrics.json."""
  rows = []
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if SELECT in row:
        rows.append(row)
  if not rows:
    raise ValueError(f"{workdir}/metrics.jsonl has no '{SELECT}' rows (did the run evaluate?)")
  # A resumed run may log a step twice: keep the last entry of each step.
  by_step = {r["step"]: r for r in rows}
  steps = sorted(by_step)
  best = max(steps, key=lambda s: (by_step[s][SELECT], -s))
  with open(os.path.join(workdir, f"eval_{protocol}.json"), encoding="utf-8") as f:
    final = json.load(f)
  return {"best": by_step[best][SELECT], "best_step": best,
          "best_fbiou": by_step[best]["select/fbiou"], "last": by_step[steps[-1]][SELECT],
          "last_step": steps[-1], "start": by_step[steps[0]][SELECT] if steps[0] == 0 else None,
          "final": final["miou"]["mean"], "final_std": final["miou"]["std"],
          "final_fbiou": final["fbiou"]["mean"], "runs": len(final["per_seed"]),
          "episodes": final.get("episodes")}


def table(summaries: dict, protocol: str) -> str:
  pct = lambda x: "–" if x is None else f"{100 * x:.1f}"
  first = next(iter(summaries.values()))
  lines = [f"| model | step 0 | best (step) | FB-IoU at best | last (step) | best checkpoint, "
           f"`{protocol}` protocol ({first['runs']} x {first['episodes']}): mIoU / FB-IoU |",
           "|---|---|---|---|---|---|"]
  for name, s in summaries.items():
    lines.append(f"| {name} | {pct(s['start'])} | {pct(s['best'])} ({s['best_step']}) | "
                 f"{pct(s['best_fbiou'])} | {pct(s['last'])} ({s['last_step']}) | "
                 f"{pct(s['final'])} ± {pct(s['final_std'])} / {pct(s['final_fbiou'])} |")
  return "\n".join(lines)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  extra = []
  if "--" in argv:
    i = argv.index("--")
    argv, extra = argv[:i], argv[i + 1:]
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="one sub-directory per model")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"comma-separated subset of {', '.join(VARIANTS)}")
  parser.add_argument("--protocol", default="bam",
                      help="evaluation protocol of the best checkpoints (config.eval.protocol)")
  parser.add_argument("--table_only", action="store_true", help="only print the table")
  args = parser.parse_args(argv)
  names = [n for n in args.variants.split(",") if n]
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
  if not args.table_only:
    for name in names:
      seconds = train(name, os.path.join(args.workdir, name), extra)
      if seconds:
        print(f"{name}: trained and evaluated in {seconds / 60:.1f} min", flush=True)
      evaluate(name, os.path.join(args.workdir, name), args.protocol, extra)
  summaries = {n: summarize(os.path.join(args.workdir, n), args.protocol) for n in names}
  print("\nnovel-class mIoU / FB-IoU (%), procedural dataset, fold 0, 1-shot")
  print(table(summaries, args.protocol))


if __name__ == "__main__":
  main()
