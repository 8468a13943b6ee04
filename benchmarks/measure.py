"""What the benchmark scripts share: timing, compiled memory, and the FLOPs of a DanceOPD step
counted on traced programs (the matrix products of each pass, the Euler steps each step's
truncated rollout runs).

The scripts run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path``.
"""

import math
import statistics
import time

import jax
import jax.numpy as jnp

from danceopd_jax.core.conditioning import repeat_condition
from danceopd_jax.core.objectives import danceopd_query_indices, frozen_student, per_sample_mse
from danceopd_jax.core.step import step_key


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


def matmul_flops(jaxpr, while_trips: int | None = None) -> int:
    """FLOPs of the matrix products of a jaxpr: ``2 * m * n * k`` per ``dot_general`` and per
    convolution (2 x output elements x the kernel's reduction size), through nested jaxprs (jit,
    remat, custom derivatives); a ``scan`` body counts once per iteration and a ``cond`` its
    costliest branch. A ``while`` loop has no trip count in the program: its body counts
    ``while_trips`` times (every while loop of the program alike), and without ``while_trips`` it is
    an error (count its body apart). Elementwise work is not counted. Traced before XLA's
    optimisations, so what it counts is what the program asks for: a backward pass's transposed
    products, not a fused kernel's.
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
            if while_trips is None:
                raise ValueError("matmul_flops: a while loop's trip count is unknown; pass while_trips or count its body apart")
            body, test = (matmul_flops(eqn.params[f].jaxpr, while_trips) for f in ("body_jaxpr", "cond_jaxpr"))
            total += while_trips * body + (while_trips + 1) * test
        elif name == "cond":
            total += max(matmul_flops(branch.jaxpr, while_trips) for branch in eqn.params["branches"])
        else:
            inner = [matmul_flops(getattr(sub, "jaxpr", sub), while_trips) for sub in _sub_jaxprs(eqn)]
            total += sum(inner) * (eqn.params["length"] if name == "scan" else 1)
    return total


def traced_flops(fn, *inputs) -> int:
    """``matmul_flops`` of ``fn`` traced on ``inputs`` (arrays or ``jax.ShapeDtypeStruct``s)."""
    return matmul_flops(jax.make_jaxpr(fn)(*inputs).jaxpr)


def pass_flops(student, student_params, teacher, params, experts, rollout_inputs, query_inputs) -> dict[str, int]:
    """Model FLOPs of the passes of a DanceOPD step, each counted on its traced program:

      forward  one Euler step of the rollout: the rollout's student field
               (``objectives.frozen_student``) on ``rollout_inputs``, ``(x, t, cond)`` of B samples
      prepare  that field's once-per-step preparation (a LoRA student's adapter fold; else 0)
      teacher  ``teacher(experts, x, t, cond)``, the routed expert field, on ``query_inputs``
               (the B*K query states)
      student  the student's forward + backward: the gradient of its MSE in ``params`` on ``query_inputs``

    ``student(full_params, x, t, cond)`` is the student's apply and ``student_params(params,
    experts)`` its full parameters from the trained ones (a LoRA student's adapters and the frozen
    base). ``forward`` and ``prepare`` come from the field built once and called once and twice.
    """

    def field_calls(calls: int) -> int:
        def run(params, experts, x, t, c):
            field = frozen_student(student, student_params(params, experts))
            return sum(field(x, t, c) for _ in range(calls))

        return traced_flops(run, params, experts, *rollout_inputs)

    def student_pass(params, experts, x, t, c):
        loss = lambda p: jnp.mean(per_sample_mse(student(student_params(p, experts), x, t, c), x))  # noqa: E731
        return jax.value_and_grad(loss)(params)

    once, twice = field_calls(1), field_calls(2)
    return {
        "forward": twice - once,
        "prepare": 2 * once - twice,
        "teacher": traced_flops(teacher, experts, *query_inputs),
        "student": traced_flops(student_pass, params, experts, *query_inputs),
    }


def query_shapes(rollout_inputs, queries: int):
    """The ``(states, times, cond)`` shapes of the K query states of each of B rollout samples
    (``objectives``: states and times flattened to B*K, the condition repeated)."""
    x, t, cond = rollout_inputs
    k = lambda shape: (shape[0] * queries, *shape[1:])  # noqa: E731
    repeated = jax.eval_shape(lambda c: repeat_condition(c, queries), cond)
    return jax.ShapeDtypeStruct(k(x.shape), x.dtype), jax.ShapeDtypeStruct(k(t.shape), t.dtype), repeated


def rollout_trips(seed: int, batch: int, rollout_steps: int, queries: int, sampler: str, steps) -> list[int]:
    """Euler steps the truncated rollout of each train step in ``steps`` runs: the max of the query
    indices its loss draws (``objectives.danceopd_query_indices``) from the step's key
    (``core.step.step_key`` of a train state initialised with ``seed``)."""
    rng = jax.random.key_data(jax.random.key(seed))
    return [int(jnp.max(danceopd_query_indices(step_key(rng, s), batch, rollout_steps, queries, sampler))) for s in steps]


def step_flops(passes: dict[str, int], trips: int) -> int:
    """Model FLOPs of one step whose rollout runs ``trips`` Euler steps."""
    return passes["prepare"] + trips * passes["forward"] + passes["teacher"] + passes["student"]


def _sub_jaxprs(eqn) -> list:
    """The jaxprs an equation calls (jit, remat, custom_jvp / custom_vjp, scan bodies)."""
    found = []
    for value in eqn.params.values():
        for sub in value if isinstance(value, (list, tuple)) else [value]:
            if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                found.append(sub)
    return found
