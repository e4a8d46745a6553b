"""fss_jax._xla_setup: glibc's free heap goes back to the OS after long XLA compilations."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from fss_jax import _xla_setup
import fss_jax.models  # noqa: F401  (installs the hook)

needs_glibc = pytest.mark.skipif(_xla_setup._malloc_trim() is None,
                                 reason="no glibc malloc_trim on this system")


@needs_glibc
def test_trim_runs_after_a_long_compile_only(monkeypatch):
  assert _xla_setup.release_heap_after_compiles()
  calls = []
  monkeypatch.setattr(_xla_setup, "_trim", lambda pad: calls.append(pad) or 1)
  monkeypatch.setattr(_xla_setup, "MIN_TRIM_COMPILE_S", 1e9)  # nothing compiles that long
  jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()
  assert calls == []
  monkeypatch.setattr(_xla_setup, "MIN_TRIM_COMPILE_S", 0.0)  # every compile counts
  jax.jit(lambda x: jnp.cos(x) * 3)(jnp.ones(3)).block_until_ready()
  assert calls and all(pad == 0 for pad in calls)


def test_trim_can_be_turned_off():
  code = ("import fss_jax.models; from fss_jax import _xla_setup; "
          "print(_xla_setup._trim_installed, _xla_setup.release_heap_after_compiles())")
  env = dict(os.environ, FSS_JAX_NO_MALLOC_TRIM="1")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, timeout=120)
  assert out.stdout.split() == ["False", "False"]
