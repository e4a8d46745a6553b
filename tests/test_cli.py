"""scripts/train.py and evaluate.py as a user runs them (subprocesses): config errors as one or
two lines with exit code 2, a second trainer on a workdir refused (exit 3), SIGTERM → saved and
exit 143, a resume with another config refused (exit 2)."""
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from fss_jax import configs_lib
from fss_jax.data import dataset_dir as dataset_dir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=configs/tiny_asgnet.py"


def _env():
  env = dict(os.environ)
  # This checkout's package, whatever the editable install points at.
  env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  env.setdefault("JAX_PLATFORMS", "cpu")
  return env


def _run(script, *args, timeout=120):
  return subprocess.run([sys.executable, f"scripts/{script}", *args], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("script,args,expect", [
    ("train.py", ["--config.train.lrr=1"],
     '--config.train.lrr: the config has no field \'lrr\'. Did you mean "lr" instead of "lrr"?'),
    ("train.py", ["--config.trian.lr=1"], 'Did you mean "train" instead of "trian"?'),
    ("train.py", ["--config.train.learning_rate=1"], "Fields of config.train: accept_changes, "),
    ("train.py", ["--config.data.fold=abc"], "--config.data.fold=abc: invalid literal for int()"),
    ("train.py", ["--config=configs/tiny_asgnet.py:split=1"],
     "Unknown config argument key 'split' in 'split=1'; allowed keys: amm, backbone, depth"),
    ("train.py", ["--config.data.fold=7"], "config.data.fold = 7: must be in [0, 4)."),
    ("train.py", ["--config=configs/nope.py"], "No such file or directory: 'configs/nope.py'"),
    ("train.py", ["--config.data.data_dir="], "config.data.data_dir is empty"),
    ("evaluate.py", ["--config.model.bnn_mode=frozen"], 'Did you mean "bn_mode"'),
    ("evaluate.py", ["--config.data.image_size=64"], "config.data.image_size = 64: must be 8k+1"),
])
def test_config_errors_are_short_with_exit_code_2(tmp_path, script, args, expect):
  """User report: an unknown --config key printed a 50-line traceback before "Did you mean"."""
  workdir = ["--workdir", str(tmp_path / "run")] if script == "train.py" else []
  out = _run(script, TINY, "--config.data.data_dir=/nonexistent", *workdir, *args)
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  assert "Traceback" not in out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) <= 2 and lines[0].startswith(f"{script}: error: "), out.stderr
  assert expect in out.stderr, out.stderr
  assert not os.path.exists(tmp_path / "run")  # nothing started


def _lines(stream, q):
  for line in iter(stream.readline, ""):
    q.put(line)
  q.put(None)


def _wait_for(q, text, timeout, seen):
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    try:
      line = q.get(timeout=max(0.1, end - time.monotonic()))
    except queue.Empty:
      break
    if line is None:
      break
    seen.append(line)
    if text in line:
      return True
  return False


def test_second_trainer_refused_sigterm_exits_143_changed_config_refused(tmp_path):
  """User reports: two trainers on one workdir both finished with exit 0; SIGTERM exited 0
  although the run did not finish; resuming with another config proceeded silently."""
  data_dir = str(tmp_path / "synthetic")
  config = configs_lib.load_config("configs/tiny_asgnet.py")
  config.data.data_dir = data_dir
  dataset_dir_lib.prepare(config)  # generated once, here
  workdir = str(tmp_path / "run")
  args = [TINY, f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
          "--config.train.total_steps=100000", "--config.train.eval_every=0",
          "--config.train.checkpoint_every=100000", "--config.train.log_every=1"]
  with open(tmp_path / "first.err", "w") as err:
    first = subprocess.Popen([sys.executable, "scripts/train.py", *args], cwd=REPO, env=_env(),
                             stdout=subprocess.PIPE, stderr=err, text=True)
    try:
      q, seen = queue.Queue(), []
      threading.Thread(target=_lines, args=(first.stdout, q), daemon=True).start()
      assert _wait_for(q, " loss ", 240, seen), "".join(seen) + open(tmp_path / "first.err").read()
      lock = json.load(open(os.path.join(workdir, "train.lock")))
      assert (lock["host"], lock["pid"]) == (socket.gethostname(), first.pid)

      second = _run("train.py", *args, timeout=90)
      assert second.returncode == 3, second.stderr[-2000:]
      assert f"host {socket.gethostname()}, PID {first.pid}" in second.stderr
      assert "Traceback" not in second.stderr

      first.send_signal(signal.SIGTERM)
      assert _wait_for(q, "stopped at step", 120, seen), "".join(seen)
      assert first.wait(timeout=120) == 143
    finally:
      if first.poll() is None:
        first.kill()
        first.wait()
  assert not os.path.exists(os.path.join(workdir, "train.lock"))
  assert os.listdir(os.path.join(workdir, "checkpoints"))  # saved

  changed = _run("train.py", *args, "--config.train.lr=0.5", "--config.data.fold=2")
  assert changed.returncode == 2, changed.stderr[-2000:]
  assert "Traceback" not in changed.stderr
  assert "data.fold: 0 → 2" in changed.stderr and "train.lr: 0.01 → 0.5" in changed.stderr
