"""One run per workdir (train.lock), the config check on resume, the synthetic cache guard.

fss_jax/train/workdir.py is imported inside the tests that use it directly, so the tests of the
user-visible behaviour (through trainer.train_and_evaluate / dataset_dir.prepare) also run, and
fail, on a tree without it.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

import datagen
from fss_jax.data import dataset_dir as dataset_dir_lib
from fss_jax.data import synthetic
from fss_jax.train import trainer

LOCK = "train.lock"


@pytest.fixture
def data_dir(tiny_data_dir):
  return tiny_data_dir


_config = datagen.tiny_config


def _write_lock(workdir, host, pid, **extra):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, LOCK), "w") as f:
    json.dump({"host": host, "pid": pid, "start_time": "2026-01-01T00:00:00+00:00",
               "command": "python scripts/train.py --workdir=x", **extra}, f)


def _dead_pid():
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


@pytest.fixture
def live_pid():
  p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  yield p.pid
  p.kill()
  p.wait()


def test_resume_with_another_config_is_refused_unless_accepted(data_dir, tmp_path, capsys):
  """User report: resuming with another fold / lr proceeded silently, overwrote config.json and
  final_metrics.json. Also: a stale lock (dead PID, this host) is taken over with a message,
  and the lock is gone after a normal run."""
  workdir = str(tmp_path / "run")
  _write_lock(workdir, socket.gethostname(), _dead_pid())  # a run killed with SIGKILL
  config = _config(data_dir, total_steps=2, eval_every=2, checkpoint_every=2)
  assert trainer.train_and_evaluate(config, workdir)["step"] == 2
  first_out = capsys.readouterr()
  first_run = first_out.out + first_out.err
  saved = {n: open(os.path.join(workdir, n)).read()
           for n in ("config.json", "final_metrics.json")}

  other = _config(data_dir, total_steps=2, eval_every=2, checkpoint_every=2, lr=0.02)
  other.data.fold = 1
  with pytest.raises(ValueError) as e:
    trainer.train_and_evaluate(other, workdir)
  msg = str(e.value)
  assert "data.fold: 0 → 1" in msg and "train.lr: 0.01 → 0.02" in msg, msg
  assert "accept_changes=data.fold,train.lr" in msg
  for n, text in saved.items():  # nothing overwritten
    assert open(os.path.join(workdir, n)).read() == text, n

  more = _config(data_dir, total_steps=3, eval_every=2, checkpoint_every=2)
  with pytest.raises(ValueError, match=r"train.total_steps: 2 → 3"):
    trainer.train_and_evaluate(more, workdir)
  # Accepted explicitly (and a harmless change, log_every, needs no acceptance): continues.
  more.train.accept_changes = "train.total_steps"
  more.train.log_every = 2
  steps = []
  out = trainer.train_and_evaluate(more, workdir, step_hook=lambda s, *_: steps.append(s))
  assert steps == [3] and out["step"] == 3 and not out["stopped"]
  assert json.load(open(os.path.join(workdir, "config.json")))["train"]["total_steps"] == 3
  changes = [json.loads(l) for l in open(os.path.join(workdir, "config_changes.jsonl"))]
  assert [c["changes"] for c in changes] == [{"train.total_steps": [2, 3]}]
  assert not os.path.exists(os.path.join(workdir, LOCK))

  assert "stale lock" in first_run and "not running" in first_run, first_run
  assert not os.path.exists(os.path.join(workdir, LOCK))  # removed after the first run too


def test_second_trainer_is_refused_while_the_lock_is_held(data_dir, tmp_path, live_pid):
  """User report: two trainers on one workdir both ran to the end."""
  workdir = str(tmp_path / "run")
  _write_lock(workdir, socket.gethostname(), live_pid)
  with pytest.raises(RuntimeError) as e:
    trainer.train_and_evaluate(_config(data_dir), workdir)
  msg = str(e.value)
  assert f"host {socket.gethostname()}, PID {live_pid}" in msg and "in use" in msg, msg
  assert json.load(open(os.path.join(workdir, LOCK)))["pid"] == live_pid  # left alone
  assert os.listdir(workdir) == [LOCK]  # refused before writing anything


def test_lock_of_another_host_needs_break_lock(tmp_path):
  from fss_jax.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  _write_lock(workdir, "some-other-host", 12345)
  with pytest.raises(workdir_lib.WorkdirLockedError,
                     match=r"another host: host some-other-host, PID 12345.*break_lock=True"):
    workdir_lib.acquire_lock(workdir)
  messages = []
  lock = workdir_lib.acquire_lock(workdir, break_lock=True, log=messages.append)
  assert "breaking the lock" in messages[0]
  held = json.load(open(os.path.join(workdir, LOCK)))
  assert (held["host"], held["pid"]) == (socket.gethostname(), os.getpid())
  assert set(held) == {"host", "pid", "start_time", "command", "process"}
  assert held["process"] == workdir_lib.process_identity(os.getpid())
  with pytest.raises(workdir_lib.WorkdirLockedError, match="in this process"):
    workdir_lib.acquire_lock(workdir)  # a second run in this process
  lock.release()
  assert not os.path.exists(os.path.join(workdir, LOCK))
  # An unreadable lock (e.g. a run killed while writing it) is not guessed at either.
  with open(os.path.join(workdir, LOCK), "w") as f:
    f.write("")
  with pytest.raises(workdir_lib.WorkdirLockedError, match="cannot be read"):
    workdir_lib.acquire_lock(workdir)
  workdir_lib.acquire_lock(workdir, break_lock=True, log=messages.append).release()


def test_stale_lock_on_this_host_is_taken_over(tmp_path):
  from fss_jax.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  pid = _dead_pid()
  _write_lock(workdir, socket.gethostname(), pid)
  messages = []
  lock = workdir_lib.acquire_lock(workdir, log=messages.append)
  assert "stale lock" in messages[0] and f"PID {pid}" in messages[0]
  assert json.load(open(os.path.join(workdir, LOCK)))["pid"] == os.getpid()
  lock.release()


def test_lock_whose_pid_now_belongs_to_another_process_is_stale(tmp_path, live_pid):
  """A lock left by a killed run whose PID was later given to an unrelated live process (or a
  lock from before a reboot) does not block the workdir; the real holder still does."""
  from fss_jax.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  identity = workdir_lib.process_identity(live_pid)
  assert identity is not None and identity != workdir_lib.process_identity(os.getpid())
  boot, ticks = identity.rsplit(":", 1)
  # The lock's writer: same PID, but it started earlier than the process now holding the PID.
  _write_lock(workdir, socket.gethostname(), live_pid, process=f"{boot}:{int(ticks) - 1}")
  messages = []
  lock = workdir_lib.acquire_lock(workdir, log=messages.append)
  assert "now belongs to another process" in messages[0] and f"PID {live_pid}" in messages[0]
  lock.release()
  _write_lock(workdir, socket.gethostname(), live_pid, process=identity)  # the real holder
  with pytest.raises(workdir_lib.WorkdirLockedError, match=f"PID {live_pid}"):
    workdir_lib.acquire_lock(workdir)


def test_unusable_workdir_is_one_clear_error(tmp_path, monkeypatch):
  from fss_jax.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  (tmp_path / "file").write_text("x")
  with pytest.raises(workdir_lib.WorkdirError, match="Cannot create the run directory"):
    workdir_lib.acquire_lock(str(tmp_path / "file"))
  real_open = os.open

  def read_only(path, flags, *a):
    if path.endswith(LOCK):
      raise PermissionError(13, "Permission denied", path)
    return real_open(path, flags, *a)
  monkeypatch.setattr(os, "open", read_only)
  with pytest.raises(workdir_lib.WorkdirError, match=r"run .*run is not writable \(Permission"):
    workdir_lib.acquire_lock(str(tmp_path / "run"))
  monkeypatch.undo()
  workdir_lib.acquire_lock(str(tmp_path / "run")).release()  # not left marked as held


def test_config_check_allow_list_and_groups(tmp_path):
  from fss_jax.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from fss_jax.train import logging as logging_lib  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)
  config = _config("/data/x")
  logging_lib.save_config(config, workdir)
  new = _config("/data/x", log_every=7, eval_every=3, keep_checkpoints=5)
  new.data.num_workers, new.data.eval_batch_size, new.eval.protocol = 2, 4, "bam"
  new.eval.num_images = 0  # TensorBoard pictures only
  new.data.synthetic.num_train = 30
  # No checkpoints yet: nothing to protect.
  assert workdir_lib.check_resume_config(new, workdir) == []
  os.makedirs(os.path.join(workdir, "checkpoints", "2"))
  with pytest.raises(workdir_lib.ConfigChangedError) as e:
    workdir_lib.check_resume_config(new, workdir, log=lambda _: None)
  assert "data.synthetic.num_train: 24 → 30" in str(e.value)
  assert "log_every" not in str(e.value) and "protocol" not in str(e.value)
  assert "num_images" not in str(e.value)
  new.train.accept_changes = "data.synthetic, train.epochs"  # a group; an unchanged key
  messages = []
  diff = workdir_lib.check_resume_config(new, workdir, log=messages.append)
  assert {k for k, _, _ in diff} == {
      "data.eval_batch_size", "data.num_workers", "data.synthetic.num_train", "eval.protocol",
      "eval.num_images",
      "train.accept_changes", "train.eval_every", "train.keep_checkpoints", "train.log_every"}
  assert "train.epochs, which did not change" in messages[-1]
  # A config.json of before some fields existed: a field at its default is no change (a new
  # field's default keeps the old behaviour); at another value it is a change like any other.
  saved = json.load(open(os.path.join(workdir, "config.json")))
  del saved["train"]["break_lock"], saved["train"]["accept_changes"]
  del saved["data"]["skip_bad_records"], saved["eval"]["num_images"]
  json.dump(saved, open(os.path.join(workdir, "config.json"), "w"))
  assert workdir_lib.check_resume_config(config, workdir) == []
  config.data.skip_bad_records = True
  with pytest.raises(workdir_lib.ConfigChangedError, match="data.skip_bad_records: '<absent>'"):
    workdir_lib.check_resume_config(config, workdir, log=lambda _: None)


def _leftovers(parent, name):
  return sorted(n for n in os.listdir(parent) if n != name)


def test_foreign_folder_as_synthetic_cache_is_refused_without_copies(tmp_path):
  """User report: a non-empty foreign folder as the synthetic cache left a full temporary copy
  per attempt. Also: the run's lock is removed when the run raises."""
  foreign = tmp_path / "photos"
  foreign.mkdir()
  (foreign / "holiday.jpg").write_bytes(b"not ours")
  workdir = str(tmp_path / "run")
  for _ in range(2):
    with pytest.raises(ValueError, match="photos is a non-empty folder .*holiday.jpg.* not a "
                                         "procedural dataset"):
      trainer.train_and_evaluate(_config(str(foreign)), workdir)
  assert _leftovers(str(tmp_path), "photos") == ["run"]  # no temporary copies
  assert os.listdir(foreign) == ["holiday.jpg"]
  assert not os.path.exists(os.path.join(workdir, LOCK))


def test_failed_generation_leaves_no_temporary_folder(tmp_path, monkeypatch):
  def broken(out_dir, **_):
    os.makedirs(out_dir, exist_ok=True)
    open(os.path.join(out_dir, "train-00000-of-00002.tfrecord"), "wb").write(b"x" * 100)
    raise KeyboardInterrupt  # also an interruption
  monkeypatch.setattr(synthetic, "write_synthetic_dataset", broken)
  config = _config(str(tmp_path / "cache" / "synthetic"))
  with pytest.raises(KeyboardInterrupt):
    dataset_dir_lib.prepare(config)
  assert os.listdir(tmp_path / "cache") == []
  # An existing empty folder is fine to generate into (and is replaced).
  monkeypatch.undo()
  empty = tmp_path / "empty"
  empty.mkdir()
  config = _config(str(empty))
  config.data.synthetic.num_train, config.data.synthetic.num_val = 4, 4
  assert dataset_dir_lib.prepare(config) == str(empty)
  assert {"manifest.json", "generator.json"} <= set(os.listdir(empty))
  assert _leftovers(str(tmp_path), "empty") == ["cache"]
