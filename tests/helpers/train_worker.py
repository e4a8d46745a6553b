"""Runs ``trainer.train_and_evaluate`` in a subprocess and records what each process saw.

  python tests/helpers/train_worker.py CONFIG_SPEC WORKDIR [--override key=value ...]

Honours the ``jax.distributed`` environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID). Writes ``WORKDIR/record_<process>.json``: per step the loss-relevant host batch
indices of this process, and at the end a digest of the parameters.
"""
import argparse
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("config")
  parser.add_argument("workdir")
  parser.add_argument("--override", action="append", default=[])
  args = parser.parse_args()

  from fss_jax.train import sharding
  sharding.maybe_initialize_distributed()
  import jax
  import numpy as np
  from fss_jax import configs_lib
  from fss_jax.train import trainer

  config = configs_lib.load_config(args.config)
  for item in args.override:
    key, value = item.split("=", 1)
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(json.loads(value)) if not isinstance(node[leaf], str) else value

  record = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "device_count": jax.device_count(), "steps": {}}

  def hook(step, state, batch):
    record["steps"][str(step)] = [int(i) for i in np.asarray(batch["index"])]

  result = trainer.train_and_evaluate(config, args.workdir, step_hook=hook)
  # The final state lives in the last checkpoint; digest it from there on every process.
  from fss_jax.train import checkpoint as ckpt_lib
  mgr = ckpt_lib.CheckpointManager(args.workdir)
  restored = mgr.restore(mgr.latest_step())
  leaves = jax.tree.leaves(jax.device_get(restored.state["trainable"]))
  h = hashlib.sha256()
  for x in leaves:
    h.update(np.ascontiguousarray(np.asarray(x)).tobytes())
  record["param_digest"] = h.hexdigest()
  record["final_step"] = result["step"]
  mgr.close()
  path = os.path.join(args.workdir, f"record_{jax.process_index()}.json")
  with open(path, "w") as f:
    json.dump(record, f)


if __name__ == "__main__":
  main()
