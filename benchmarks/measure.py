"""What the benchmark scripts share: timing, compiled memory, the truncated rollout's length and
the matrix-product FLOPs of a traced program.

The scripts run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path``.
"""

import math
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


def matmul_flops(jaxpr) -> int:
    """FLOPs of the matrix products of a jaxpr: ``2 * m * n * k`` per ``dot_general`` and per
    convolution (2 x output elements x the kernel's reduction size), through nested jaxprs (jit,
    remat, custom derivatives); a ``scan`` body counts once per iteration and a ``cond`` its
    costliest branch. A ``while`` loop has no trip count to multiply by: an error (count its body
    apart). Elementwise work is not counted. Traced before XLA's optimisations, so what it counts
    is what the program asks for: a backward pass's transposed products, not a fused kernel's.
    """
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
            rhs_free = [size for d, size in enumerate(rhs) if d not in (*rhs_contract, *rhs_batch)]
            total += 2 * math.prod(lhs) * math.prod(rhs_free)
        elif name == "conv_general_dilated":
            rhs, out = eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape
            total += 2 * math.prod(out) * math.prod(rhs) // rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
        elif name == "while":
            raise ValueError("matmul_flops: a while loop's trip count is unknown; count its body apart")
        elif name == "cond":
            total += max(matmul_flops(branch.jaxpr) for branch in eqn.params["branches"])
        else:
            inner = [matmul_flops(getattr(sub, "jaxpr", sub)) for sub in _sub_jaxprs(eqn)]
            total += sum(inner) * (eqn.params["length"] if name == "scan" else 1)
    return total


def _sub_jaxprs(eqn) -> list:
    """The jaxprs an equation calls (jit, remat, custom_jvp / custom_vjp, scan bodies)."""
    found = []
    for value in eqn.params.values():
        for sub in value if isinstance(value, (list, tuple)) else [value]:
            if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                found.append(sub)
    return found
