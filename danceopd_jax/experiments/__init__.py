"""The capability benchmark's experiments: ``python -m danceopd_jax.experiments.reproduce``."""
