"""fss_jax: few-shot semantic segmentation (ASGNet and neighbours) in JAX/Flax.

Importing the package tunes XLA's CPU backend (see ``fss_jax._xla_setup``) before JAX starts.
"""
from fss_jax import _xla_setup

_xla_setup.configure_cpu_flags()

__version__ = "0.1.0"
