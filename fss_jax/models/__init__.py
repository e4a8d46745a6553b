"""Models (``registry``) and their parts.

Importing this package installs ``fss_jax._xla_setup.release_heap_after_compiles``: glibc's free
heap is returned to the OS after each long XLA compilation, so that the compiler's transient
memory does not stay resident under the compiled model's buffers.
"""
from fss_jax import _xla_setup

_xla_setup.release_heap_after_compiles()
