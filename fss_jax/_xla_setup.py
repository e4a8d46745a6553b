"""XLA flags for CPU runs, set before JAX initialises its backend.

By default (jax 0.10.x) XLA-CPU routes every convolution through its YNNPACK fusion path. Turning
that off (``--xla_cpu_experimental_ynn_fusion_type=`` with an empty value) makes the ResNet
forward 1.1-1.3x faster and convolution backward passes ~2.4x faster on a 2-core AVX2 machine
(measured with ``benchmarks/model_speed.py``). The flag only affects the CPU backend.

Set ``FSS_JAX_KEEP_XLA_FLAGS=1`` to leave ``XLA_FLAGS`` untouched.

``release_heap_after_compiles`` (installed by ``fss_jax.models``): an XLA compilation of a
ResNet-50 model allocates a few hundred MB of short-lived host memory (LLVM, HLO passes, on
several threads). glibc keeps the freed pages in its per-thread arenas instead of returning
them to the OS, so they stay resident for the life of the process, under the executable's own
buffers; the eval forward's temporary buffer is a fresh mmap on top. Calling glibc's
``malloc_trim(0)`` after each long compilation hands the free pages back: ASGNet R50 1-shot
eval at 473² peaks at ~0.8 GB instead of ~1.06 GB (``benchmarks/model_speed.py``,
``benchmarks/eval_memory.py --both``). The trim takes ~0.1 s after a multi-second compile and
nothing at run time; results are unchanged. Set ``FSS_JAX_NO_MALLOC_TRIM=1`` to turn it off;
it is a no-op where libc has no ``malloc_trim``.
"""
import ctypes
import os
import sys

_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# Compilations shorter than this leave little behind; skipping them keeps the many small
# (eager-op) compilations free of the trim's cost (~0.3 ms on a small heap).
MIN_TRIM_COMPILE_S = 0.5
_trim_installed = False
_trim = None  # glibc's malloc_trim once installed (a module global, so tests can watch it)


def configure_cpu_flags() -> bool:
  """Adds the CPU convolution flag to ``XLA_FLAGS`` unless the user set it or JAX already started.

  Returns True when the flag was added.
  """
  if os.environ.get("FSS_JAX_KEEP_XLA_FLAGS"):
    return False
  flags = os.environ.get("XLA_FLAGS", "")
  if _YNN_FLAG in flags:
    return False
  if _backend_started():
    return False
  os.environ["XLA_FLAGS"] = (flags + " " + _YNN_FLAG + "=").strip()
  return True


def _backend_started() -> bool:
  xb = sys.modules.get("jax._src.xla_bridge")
  return bool(xb is not None and getattr(xb, "_backends", None))


def _malloc_trim():
  """glibc's ``malloc_trim`` as a callable, or None (another libc, or no libc.so.6)."""
  try:
    fn = ctypes.CDLL("libc.so.6").malloc_trim
  except (OSError, AttributeError):
    return None
  fn.argtypes = [ctypes.c_size_t]
  fn.restype = ctypes.c_int
  return fn


def release_heap_after_compiles() -> bool:
  """After every XLA compilation of ``MIN_TRIM_COMPILE_S`` or longer (or executable loaded from
  the persistent cache in that time), returns glibc's free heap pages to the OS (see the module
  docstring). Idempotent; imports jax. Returns True when the hook is (already) installed.
  """
  global _trim_installed, _trim
  if _trim_installed:
    return True
  if os.environ.get("FSS_JAX_NO_MALLOC_TRIM"):
    return False
  _trim = _malloc_trim()
  if _trim is None:
    return False
  import jax  # pylint: disable=g-import-not-at-top

  def listener(event: str, duration_secs: float, **_) -> None:
    if event == _COMPILE_EVENT and duration_secs >= MIN_TRIM_COMPILE_S:
      _trim(0)

  jax.monitoring.register_event_duration_secs_listener(listener)
  _trim_installed = True
  return True
