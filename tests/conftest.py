"""Test setup: CPU only, highest matmul precision for parity tests."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "FSS_JAX_TEST_NO_XLA_CACHE" not in os.environ:
  # One persistent compilation cache for the session (a fresh temporary folder): the many short
  # training runs of the suite compile the same tiny programs, which are then read back instead
  # of compiled again. Identical programs give identical executables, so no result changes.
  import tempfile  # noqa: E402
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="fss_jax_xla_"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
  """One tiny procedural dataset for the trainer tests (the trainer generates it on first use;
  no test writes into it)."""
  return str(tmp_path_factory.mktemp("tiny_data") / "synthetic")
