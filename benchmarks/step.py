"""DanceOPD train-step benchmark: compile time, step time, samples/s, FLOPs, utilisation, the
step with the train state donated against the same step without donation, the truncated rollout
against the full-length ``lax.scan``, and the scan against a Python loop of jitted Euler steps.

    python benchmarks/step.py                                  # CPU defaults, a few minutes
    python benchmarks/step.py --presets S,B,L --image-size 64 --batch-size 32 \\
        --rollout-steps 32 --dtype bfloat16 --peak-tflops 989  # one H100 (bf16 dense peak)

The run is ``configs/smoke.py`` (per-step routing over a ``t2i`` and an ``edit`` expert) with the
student and both experts at one DiT preset, all random non-zero fields (``zero_init=False``: a
zero-init student's rollout never moves, which would make the rollout check vacuous). The ``t2i``
route gets weight 0, so every timed step takes the ``edit`` route and costs the same FLOPs; the
``t2i`` expert is still compiled into the step's ``lax.switch``.

Defaults are sized for a 2-core CPU, where image 32, B=8, N=16 took 47 s a step at DiT-S (DiT-B
about 4x that): image 16, batch 2, 4 rollout steps, 3 timed steps; ``tiny,S,B`` in about 4 minutes. On CPU read the ratios, not the absolute times
(DESIGN.md, "Performance: how to measure"); the GPU run passes bigger settings.

FLOPs per step are counted with ``models.dit.forward_flops`` (2*m*n*k per matmul, attention over
image + ``condition.text_len`` text tokens + source tokens when the model ``use_source``):

  rollout  the student's forwards on B samples that the truncated rollout runs: E[max query
           index of the batch] (Monte Carlo over 2000 draws of the sampler), at most N - 1
  teacher  one forward of the routed expert on B*K query states, twice when ``cfg_scale != 1``
  student  forward + backward on B*K query states, counted as 3 forwards

Not counted: the optimizer update and elementwise work (norms, softmax, activations).
Utilisation divides FLOP/s by ``--peak-tflops`` (per device) times the device count.

Donation: ``run.train_step`` donates the train state (its buffers are reused for the new state);
the comparison jits the same ``run.step_fn`` with the same output shardings and no donation, and
times it on the same batches, the two steps taking turns (donate/keep < 1: donation faster);
``mem`` is the ratio of their compiled peak memory (arguments + outputs - aliased + temporaries,
from XLA's memory analysis).
"""

import argparse
import functools
import importlib.util
import pathlib
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from danceopd_jax import build, parallel
from danceopd_jax.core.rollout import euler_step, rollout_query_states
from danceopd_jax.core.schedule import sample_query_indices, sigma_grid
from danceopd_jax.models.dit import forward_flops
from danceopd_jax.train import setup_run
from measure import expected_rollout_steps, median_seconds, peak_bytes

ROUTE = "edit"  # the only route with weight > 0
SMOKE_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "smoke.py"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,S,B", help="comma-separated DiT presets of student and experts")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=2, help="global samples per step (B)")
    parser.add_argument("--rollout-steps", type=int, default=4, help="Euler steps of the rollout (N)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after 2 warm-up steps")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s of one device")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="CFG scale of both expert fields")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    return parser.parse_args(argv)


def load_smoke_config():
    """``get_config()`` of ``configs/smoke.py`` (``configs/`` is not a package)."""
    spec = importlib.util.spec_from_file_location("configs_smoke", SMOKE_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def benchmark_config(preset: str, args):
    """The smoke config resized, with student and experts at ``preset`` and only the edit route live."""
    config = load_smoke_config()
    config.image_size = args.image_size
    config.batch_size = args.batch_size
    config.rollout_steps = args.rollout_steps
    for model in [config.student, *config.experts.values()]:
        model.preset, model.dtype, model.zero_init = preset, args.dtype, False
    for field in config.fields.values():
        field.cfg_scale = args.cfg_scale
    config.routes.t2i.weight = 0.0
    return config



def step_flops(config) -> dict[str, int]:
    """FLOPs of one DanceOPD step by part (see the module docstring), and their total."""
    b, k = config.batch_size, config.queries_per_rollout
    n = expected_rollout_steps(b, k, config.rollout_steps, config.query_sampler)
    text_len = config.condition.text_len
    field = config.fields[config.routes[ROUTE].field]
    student = build.model_config(config, config.student)
    teacher = build.model_config(config, config.experts[field.expert])
    parts = {
        "rollout": int(n * forward_flops(student, b, text_len)),
        "teacher": (2 if field.cfg_scale != 1.0 else 1) * forward_flops(teacher, b * k, text_len),
        "student": 3 * forward_flops(student, b * k, text_len),
    }
    parts["total"] = sum(parts.values())
    return parts


def draw_batches(run, count: int) -> list:
    """``count`` (route, batch) pairs from the run's pipeline, drawn before any timing."""
    return [run.global_batch(step) for step in range(count)]


def compile_step(step, run, route, batch):
    """A jitted ``step`` lowered and compiled ahead of time for the run's state; returns ``(executable, seconds)``."""
    start = time.perf_counter()
    compiled = step.lower(run.state, run.experts, batch, jnp.int32(route)).compile()
    return compiled, time.perf_counter() - start



def time_steps(run, compiled: dict, batches, warmup: int = 2) -> dict[str, float]:
    """Median seconds of a step of each executable over ``batches[warmup:]``. The executables take
    turns on every batch (a change of machine load hits them alike); the state is threaded through
    all of them (a donating one consumes it)."""
    state, times = run.state, {name: [] for name in compiled}
    for route, batch in batches:
        for name, step in compiled.items():
            start = time.perf_counter()
            state, metrics = step(state, run.experts, batch, jnp.int32(route))
            jax.block_until_ready((state, metrics))
            times[name].append(time.perf_counter() - start)
    run.state = state
    return {name: statistics.median(seconds[warmup:]) for name, seconds in times.items()}


def rollout_fns(run, noise, cond, indices):
    """Three rollouts of the run's student, each returning the pre-step states at ``indices`` [B, K, ...].

    ``truncated()``: ``core.rollout.rollout_query_states`` as the train step runs it (a
    ``lax.while_loop`` that stops at the batch's last query index), jitted as a whole.
    ``scan()``: the same with ``truncate=False`` (a ``lax.scan`` of all N - 1 steps).
    ``loop()``: the same ``euler_step`` jitted alone and called N - 1 times from Python.
    """
    config = run.config
    graphdef = parallel.abstract_model_state(build.model_factory(config, config.student), run.mesh, run.rules)[0]
    apply = build.StudentApply(graphdef)
    sigmas = sigma_grid(config.rollout_steps, config.shift)
    host_sigmas = [np.float32(s) for s in np.asarray(sigmas)]
    params = run.state.params

    @functools.partial(jax.jit, static_argnames="truncate")
    def jitted(params, noise, cond, indices, truncate):
        return rollout_query_states(apply.frozen_field(params), noise, sigmas, cond, indices, truncate)[0]

    @jax.jit
    def one_step(params, x, sigma, sigma_next, cond):
        return euler_step(functools.partial(apply, params), x, sigma, sigma_next, cond)

    def loop():
        x, states = noise, [noise]
        for sigma, sigma_next in zip(host_sigmas[:-2], host_sigmas[1:-1], strict=True):
            x = one_step(params, x, sigma, sigma_next, cond)
            states.append(x)
        trajectory = jnp.stack(states, axis=1)  # [B, N, ...]: z_0 .. z_{N-1}
        return jnp.take_along_axis(trajectory, indices.reshape(indices.shape + (1,) * (noise.ndim - 1)), axis=1)

    return {
        "truncated": lambda: jitted(params, noise, cond, indices, truncate=True),
        "scan": lambda: jitted(params, noise, cond, indices, truncate=False),
        "loop": loop,
    }


def rollout_comparison(run, batch, repeats: int, tolerance: float) -> dict:
    """Median seconds of the truncated, scan and Python-loop rollouts on the same params, noise and
    query indices, and whether their kept states agree: ``{name}_s``, ``max_diff``, ``allclose``."""
    config = run.config
    key_noise, key_index = jax.random.split(jax.random.key(config.seed))
    noise = jax.random.normal(key_noise, batch["image"].shape, jnp.float32)
    indices = sample_query_indices(key_index, noise.shape[0], config.queries_per_rollout, config.rollout_steps)
    fns = rollout_fns(run, noise, batch["cond"], indices)
    result = {f"{name}_s": median_seconds(fn, repeats) for name, fn in fns.items()}
    states = {name: np.asarray(fn()) for name, fn in fns.items()}
    diffs = [np.abs(states[name] - states["scan"]) for name in ("truncated", "loop")]
    result["max_diff"] = float(max(np.max(d) for d in diffs))
    result["allclose"] = all(np.allclose(states[n], states["scan"], rtol=tolerance, atol=tolerance) for n in ("truncated", "loop"))
    return result



def benchmark_preset(preset: str, args) -> dict:
    """All figures of one preset: compile, step time, samples/s, FLOPs, donation, scan vs loop rollout."""
    config = benchmark_config(preset, args)
    run = setup_run(config)
    with parallel.sharding_context(run.mesh, run.rules):
        batches = draw_batches(run, 2 + args.steps)
        assert all(route == list(config.routes).index(ROUTE) for route, _ in batches)
        donated, compile_s = compile_step(run.train_step, run, *batches[0])
        no_donation = jax.jit(run.step_fn, out_shardings=(run.state_shardings, parallel.replicated(run.mesh)))
        kept = compile_step(no_donation, run, *batches[0])[0]
        step_s = time_steps(run, {"donated": donated, "kept": kept}, batches)
        tolerance = 1e-5 if args.dtype == "float32" else 1e-2
        rollouts = rollout_comparison(run, batches[0][1], args.steps, tolerance)
    params = sum(x.size for x in jax.tree.leaves(run.state.params))
    return dict(
        preset=preset,
        batch_size=config.batch_size,
        params=params,
        compile_s=compile_s,
        step_s=step_s["donated"],
        kept_step_s=step_s["kept"],
        donated_memory=peak_bytes(donated) / peak_bytes(kept),
        flops=step_flops(config),
        **rollouts,
    )


def gflop(flops: int) -> str:
    """GFLOP with three significant digits, or whole GFLOP from 100 up."""
    gigaflops = flops / 1e9
    return f"{gigaflops:.3g}" if gigaflops < 100 else f"{gigaflops:,.0f}"


def format_row(result: dict, peak_tflops, num_devices: int) -> list[str]:
    """One table row; utilisation only when the peak is known."""
    flops, step_s = result["flops"], result["step_s"]
    achieved = flops["total"] / step_s
    row = [
        result["preset"],
        f"{result['params'] / 1e6:.2f}",
        f"{result['compile_s']:.1f}",
        f"{step_s * 1e3:.1f}",
        f"{result['batch_size'] / step_s:.2f}",
        *(gflop(flops[part]) for part in ("rollout", "teacher", "student", "total")),
        f"{achieved / 1e12:.3g}",
    ]
    if peak_tflops:
        row.append(f"{100 * achieved / (peak_tflops * 1e12 * num_devices):.1f}")
    same = "yes" if result["allclose"] else "NO"
    row += [
        f"{step_s / result['kept_step_s']:.2f}",
        f"{result['donated_memory']:.2f}",
        f"{result['truncated_s'] / result['scan_s']:.2f}",
        f"{result['scan_s'] / result['loop_s']:.2f}",
        f"{same} ({result['max_diff']:.1e})",
    ]
    return row


def print_table(results: list[dict], args) -> None:
    header = ["preset", "params M", "compile s", "step ms", "samples/s", "rollout GF", "teacher GF", "student f+b GF",
              "total GF", "TFLOP/s"]
    if args.peak_tflops:
        header.append("util %")
    header += ["donate/keep", "mem", "trunc/full", "scan/loop", "allclose (max diff)"]
    rows = [header] + [format_row(r, args.peak_tflops, jax.device_count()) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))


def main(argv) -> None:
    args = parse_args(argv)
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} x {device.device_kind}; "
          f"command: {shlex.join([sys.argv[0], *argv])}")
    config = benchmark_config(args.presets.split(",")[0], args)
    print(f"image {args.image_size}, B {args.batch_size}, K {config.queries_per_rollout}, N {args.rollout_steps}, "
          f"text_len {config.condition.text_len}, source tokens counted (use_source: student "
          f"{config.student.use_source}, {ROUTE} expert {config.experts.edit_expert.use_source}), "
          f"cfg {args.cfg_scale}, dtype {args.dtype}, route {ROUTE}; step = median of {args.steps} after 2 warm-up; "
          f"donate/keep = step with / without the state donated (time, mem = compiled peak memory), trunc/full = truncated / full-scan rollout time, "
          f"scan/loop = full scan / Python loop (< 1: first faster)", flush=True)
    results = [benchmark_preset(preset, args) for preset in args.presets.split(",")]
    print_table(results, args)


if __name__ == "__main__":
    main(sys.argv[1:])
