"""Experiment configs: one ``get_config(arg)`` per file (see ``fss_jax/configs_lib.py``)."""
