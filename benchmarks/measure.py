"""What the benchmark scripts share: timing, compiled memory and the truncated rollout's length.

The scripts run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path``.
"""

import statistics
import time

import jax
import jax.numpy as jnp

from danceopd_jax.core.schedule import sample_query_indices


def median_seconds(fn, repeats: int) -> float:
    """Median wall seconds of ``fn()`` (blocked on its outputs) over ``repeats`` calls after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(compiled) -> int:
    """Device memory a compiled program holds at once (XLA buffer assignment): arguments, outputs
    not aliased to them, temporaries."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def expected_rollout_steps(batch: int, queries: int, steps: int, sampler: str, draws: int = 2000) -> float:
    """Mean Euler steps of the truncated rollout: ``E[max(query indices of a batch)]`` (Monte Carlo)."""
    keys = jax.random.split(jax.random.key(0), draws)
    maxima = jax.vmap(lambda key: jnp.max(sample_query_indices(key, batch, queries, steps, sampler)))(keys)
    return float(jnp.mean(maxima))
