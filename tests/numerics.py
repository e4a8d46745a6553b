"""Parity bounds grounded in measured float32 noise (for every parity test).

A float32 result can only match an oracle up to float32 rounding, and how large that rounding
gets depends on the computation (53 batch-statistics BatchNorms amplify it; a frozen network does
not) and on the CPU (AVX2, AVX-512 and AMX kernels sum in different orders). So a parity check
runs the oracle twice, in float64 (the value) and in float32 (the noise gauge), and bounds ours:

    rel_err(ours_float32, oracle_float64) <= FACTOR * rel_err(oracle_float32, oracle_float64) + FLOOR

FACTOR = 4: ours and the oracle are two float32 roundings of one computation, with other
summation orders (XLA vs oneDNN kernels); measured ratios ours/oracle were 0.5–2 (e.g. the
deep-stem ResNet in batch-statistics mode, layer4: 1.28e-4 against PyTorch float32's 8.0e-5 on
an AVX-512 EPYC). FLOOR = 2e-6 covers outputs whose oracle float32 error happens to be ~0
(a few float32 ulps, 1.2e-7 each). A wrong eps, a dropped term or a mis-ordered concat moves
results by 1e-3 or more, far above these bounds (see the tests' mutation notes).
"""
import json
import os

import numpy as np

FACTOR = 4.0
FLOOR = 2e-6
# FSS_NUMERICS_LOG=path appends one JSON line per comparison (test, name, error, oracle noise,
# bound), e.g. to measure the ratios above on a new CPU:
#   FSS_NUMERICS_LOG=/tmp/n.jsonl python -m pytest -q tests/test_*parity*.py tests/test_resnet.py
LOG = os.environ.get("FSS_NUMERICS_LOG")


def _log(name, err, noise=None, limit=None):
  if LOG:
    with open(LOG, "a") as f:
      f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
                          "name": name, "err": err, "noise": noise, "bound": limit}) + "\n")


def child_xla_flags(*flags: str) -> str:
  """XLA_FLAGS for a test's subprocess: ``flags`` plus this process's instruction-set limit
  (``--xla_cpu_max_isa=...``, see tests/README.md), so a suite run under the AVX2 restriction
  restricts its subprocesses too."""
  isa = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith("--xla_cpu_max_isa")]
  return " ".join(isa + list(flags))


def float64_copies(net, variables, batch):
  """A model (its backbone's dtype float64), its variables and a batch with every float32 array
  cast to float64: our computation in exact mode (call inside ``jax.enable_x64(True)``)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  net = net.clone(backbone=net.backbone.clone(dtype=jnp.float64))
  cast = lambda x: np.asarray(x, np.float64) if np.asarray(x).dtype == np.float32 else x
  return net, jax.tree.map(cast, variables), jax.tree.map(cast, batch)


class ModelCase:
  """Shared part of the models' parity cases: a subclass sets ``torch32`` (the oracle), ``x``,
  ``s_x``, ``s_y``, ``y`` (NCHW numpy inputs) and calls ``build(config, size, shot)``."""

  def build(self, config, size: int, shot: int):
    """Our model from ``config``, the oracle's weights through the checkpoint importer, and the
    NHWC batch."""
    from fss_jax import weights  # pylint: disable=g-import-not-at-top
    from fss_jax.convert import torch_import  # pylint: disable=g-import-not-at-top
    from fss_jax.models import registry  # pylint: disable=g-import-not-at-top
    self.config = config
    self.net = registry.build_model(config)
    template = registry.variables_template(self.net, size, shot)
    sd = {k: v.numpy() for k, v in self.torch32.state_dict().items()}
    self.variables = torch_import.variables_from_torch(sd, template, weights.model_naming(config))
    self.batch = {"query": self.x.transpose(0, 2, 3, 1),
                  "supp_images": self.s_x.transpose(0, 1, 3, 4, 2),
                  "supp_labels": self.s_y.astype(np.int32),
                  "query_label": self.y.astype(np.int32)}

  def ours(self, exact: bool):
    """(model, variables, batch): float32, or float64 throughout when ``exact`` (call inside
    ``jax.enable_x64(True)``)."""
    if not exact:
      return self.net, self.variables, self.batch
    return float64_copies(self.net, self.variables, self.batch)


def train_step_gradients(net, variables, batch, naming,
                         terms=("main_loss", "aux_loss"), frozen_keys=("backbone",)) -> dict:
  """Loss terms and trainable-parameter gradients through the public ``train_step``, keyed like
  the PyTorch oracle (the loss ``terms``, torch parameter names, OIHW kernels): plain
  SGD with lr 1, so a gradient is old − new (exact to 1e-16 of the weights in float64). Dropout
  off. Call inside ``jax.enable_x64(True)`` with ``float64_copies``. Returns (dict, the state
  after the step: its ``batch_stats`` hold any BatchNorm statistics the step updated)."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from fss_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  tx = optax.sgd(1.0)
  state = step_lib.create_train_state(variables, tx, frozen_keys)
  new, metrics = jax.jit(lambda s, b, r: step_lib.train_step(
      s, b, r, model=net, tx=tx, deterministic=True))(state, batch, jax.random.key(0))
  got = {k: np.asarray(metrics[k]) for k in terms}
  new_flat = flax.traverse_util.flatten_dict(new.trainable)
  for path, old in flax.traverse_util.flatten_dict(state.trainable).items():
    grad = np.asarray(old) - np.asarray(new_flat[path])
    got[naming.key("params", path)] = grad.transpose(3, 2, 0, 1) if grad.ndim == 4 else grad.T
  return got, new


def rel_err(a, b) -> float:
  """max(‖a−b‖/‖b‖, max|a−b|/max|b|) in float64 (0 when both are all zeros)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  scale_n, scale_m = np.linalg.norm(b), np.max(np.abs(b)) if b.size else 0.0
  if scale_n == 0:
    return float(np.max(np.abs(a))) if a.size else 0.0
  return float(max(np.linalg.norm(a - b) / scale_n, np.max(np.abs(a - b)) / scale_m))


def bound(want32, want64, factor: float = FACTOR, floor: float = FLOOR) -> float:
  """The allowed error of a float32 result against ``want64``: factor × the float32 oracle's own
  error + floor."""
  return factor * rel_err(want32, want64) + floor


# Exact mode: both sides in float64. Measured errors are 2e-15..3e-14 (PFENet with ResNet-50 and
# VGG16-bn: forwards and head gradients); 1e-10 leaves room for deeper nets and other CPUs while a
# real difference (a wrong eps, a dropped term) is orders of magnitude larger.
EXACT = 1e-10


def assert_exact(got, want64, name: str = "", limit: float = EXACT) -> float:
  """Asserts rel_err(got, want64) <= EXACT for a float64 result of ours; returns the error."""
  got = np.asarray(got)
  assert got.dtype in (np.float64, np.int64, np.int32) or got.ndim == 0, (
      f"{name}: expected a float64 result in exact mode, got {got.dtype}")
  err = rel_err(got, want64)
  _log(name, err, None, limit)
  assert err <= limit, f"{name}: relative error {err:.3g} > {limit:.3g} in float64"
  return err


def assert_parity(got, want64, want32, name: str = "", factor: float = FACTOR,
                  floor: float = FLOOR) -> float:
  """Asserts rel_err(got, want64) <= bound(want32, want64); returns the error."""
  err = rel_err(got, want64)
  limit = bound(want32, want64, factor, floor)
  _log(name, err, rel_err(want32, want64), limit)
  assert err <= limit, (f"{name}: relative error {err:.3g} > {limit:.3g} "
                        f"(= {factor} x float32 oracle noise {rel_err(want32, want64):.3g} + "
                        f"{floor:g})")
  return err
