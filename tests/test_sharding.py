"""Tests for fss_jax.train.sharding; multi-device cases run in subprocesses.

The main pytest process keeps its single CPU device: the 4-device and 2-process cases set
``--xla_force_host_platform_device_count`` in child processes only.
"""
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from fss_jax.train import sharding
import numerics

_FOUR_DEVICES = textwrap.dedent("""
    import numpy as np
    import jax
    from fss_jax.train import sharding
    assert jax.device_count() == 4, jax.devices()
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.shape == (4,)
    assert sharding.local_batch_size(8, mesh) == 8
    for bad in (6, 2):
      try:
        sharding.local_batch_size(bad, mesh)
        raise AssertionError("no error for %d" % bad)
      except ValueError as e:
        assert "not divisible by the number of devices (4)" in str(e), e
    batch = {"query": np.arange(8 * 3 * 2, dtype=np.float32).reshape(8, 3, 2),
             "meta": {"class_id": np.arange(8, dtype=np.int32) + 10}}
    g = sharding.host_batch_to_global(batch, mesh)
    assert g["query"].shape == (8, 3, 2) and g["meta"]["class_id"].shape == (8,)
    assert g["query"].sharding == sharding.data_sharding(mesh)
    pairs = ((g["query"], batch["query"]), (g["meta"]["class_id"], batch["meta"]["class_id"]))
    for arr, ref in pairs:
      shards = sorted(arr.addressable_shards, key=lambda s: s.index[0].start)
      assert len(shards) == 4
      for i, s in enumerate(shards):
        assert s.index[0] == slice(2 * i, 2 * i + 2), s.index
        np.testing.assert_array_equal(np.asarray(s.data), ref[2 * i:2 * i + 2])
    np.testing.assert_array_equal(np.asarray(g["query"]), batch["query"])
    try:
      sharding.host_batch_to_global({"x": np.zeros((6, 2))}, mesh)
      raise AssertionError("no error")
    except ValueError as e:
      assert "batch['x']" in str(e) and "4 local devices" in str(e), e
    r = jax.device_put(np.ones(3), sharding.replicated(mesh))
    assert all(np.asarray(s.data).shape == (3,) for s in r.addressable_shards)
    # A jitted reduction over the sharded batch sees the whole global batch.
    total = jax.jit(lambda b: b["query"].sum())(g)
    assert float(total) == float(batch["query"].sum())
    print("OK")
""")

_TWO_PROCESSES = textwrap.dedent("""
    import numpy as np
    from fss_jax.train import sharding
    assert sharding.maybe_initialize_distributed(None)  # from the environment
    import jax
    pid = jax.process_index()
    assert jax.process_count() == 2 and jax.device_count() == 4
    mesh = sharding.make_mesh()
    n = sharding.local_batch_size(8, mesh)
    assert n == 4
    local = {"x": np.arange(n * 3).reshape(n, 3) + 100 * pid}
    g = sharding.host_batch_to_global(local, mesh)
    assert g["x"].shape == (8, 3)
    for s in g["x"].addressable_shards:
      start = s.index[0].start
      assert start // 4 == pid, (pid, s.index)
      np.testing.assert_array_equal(np.asarray(s.data), local["x"][start % 4:start % 4 + 2])
    jax.distributed.shutdown()
    print("OK", pid)
""")


def _child_env(devices, **extra):
  env = dict(os.environ)
  for k in (sharding.ENV_FLAG, sharding.COORDINATOR_ENV, sharding.NUM_PROCESSES_ENV,
            sharding.PROCESS_ID_ENV):
    env.pop(k, None)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = numerics.child_xla_flags(f"--xla_force_host_platform_device_count={devices}")
  env.update(extra)
  return env


def test_four_host_devices_global_batch(tmp_path):
  script = tmp_path / "four.py"
  script.write_text(_FOUR_DEVICES)
  out = subprocess.run([sys.executable, str(script)], env=_child_env(4), capture_output=True,
                       text=True, timeout=120, check=False)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_distributed(tmp_path):
  script = tmp_path / "two.py"
  script.write_text(_TWO_PROCESSES)
  common = {sharding.ENV_FLAG: "1", sharding.COORDINATOR_ENV: f"localhost:{_free_port()}",
            sharding.NUM_PROCESSES_ENV: "2"}
  procs = [subprocess.Popen(
      [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=_child_env(2, **common, **{sharding.PROCESS_ID_ENV: str(pid)})) for pid in (0, 1)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=120))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for pid, (p, (stdout, stderr)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0 and f"OK {pid}" in stdout, stderr[-3000:]


def test_initialisation_decision(monkeypatch):
  for k in (sharding.ENV_FLAG, sharding.COORDINATOR_ENV):
    monkeypatch.delenv(k, raising=False)
  assert not sharding.should_initialize_distributed(None)  # never by default
  assert sharding.maybe_initialize_distributed(None) is False
  assert sharding.maybe_initialize_distributed(False) is False
  assert sharding.should_initialize_distributed(True)
  monkeypatch.setenv(sharding.ENV_FLAG, "1")
  assert sharding.should_initialize_distributed(None)
  assert not sharding.should_initialize_distributed(False)
  monkeypatch.setenv(sharding.ENV_FLAG, "0")
  assert not sharding.should_initialize_distributed(None)
  monkeypatch.setenv(sharding.COORDINATOR_ENV, "10.0.0.1:1234")
  assert sharding.should_initialize_distributed(None)


def test_single_device_in_main_process():
  mesh = sharding.make_mesh()
  assert mesh.devices.size == jax.device_count() == 1
  assert sharding.local_batch_size(3) == 3
  with pytest.raises(ValueError, match="positive"):
    sharding.local_batch_size(0)
  g = sharding.host_batch_to_global({"a": np.arange(6).reshape(3, 2)}, mesh)
  np.testing.assert_array_equal(np.asarray(g["a"]), np.arange(6).reshape(3, 2))
  with pytest.raises(ValueError, match="scalar"):
    sharding.host_batch_to_global({"a": np.float32(1)}, mesh)
  with pytest.raises(ValueError, match="different leading sizes"):
    sharding.host_batch_to_global({"a": np.zeros((2, 1)), "b": np.zeros((3,))}, mesh)
