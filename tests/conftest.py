"""Test setup: CPU only, highest matmul precision for parity tests."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
  """One tiny procedural dataset for the trainer tests (the trainer generates it on first use;
  no test writes into it)."""
  return str(tmp_path_factory.mktemp("tiny_data") / "synthetic")
