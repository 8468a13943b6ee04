"""DanceOPD train-step benchmark: compile time, step time, samples/s, FLOPs, utilisation, the
step with the train state donated against the same step without donation, the truncated rollout
against the full-length ``lax.scan``, and the scan against a Python loop of jitted Euler steps.

    python benchmarks/step.py                                  # CPU defaults, a few minutes
    python benchmarks/step.py --presets S,B,L --image-size 64 --batch-size 32 \\
        --rollout-steps 32 --dtype bfloat16 --peak-tflops 989  # one H100 (bf16 dense peak)

The run is ``configs/smoke.py`` (per-step routing over a ``t2i`` and an ``edit`` expert) with the
student and both experts at one DiT preset, all random non-zero fields (``zero_init=False``: a
zero-init student's rollout never moves, which would make the rollout check vacuous). The ``t2i``
route gets weight 0, so every timed step takes the ``edit`` route; the ``t2i`` expert is still
compiled into the step's ``lax.switch``.

Defaults are sized for a 2-core CPU, where image 32, B=8, N=16 took 47 s a step at DiT-S (DiT-B
about 4x that): image 16, batch 2, 4 rollout steps, 3 timed steps; ``tiny,S,B`` in about 4 minutes. On CPU read the ratios, not the absolute times;
the GPU run passes bigger settings.

FLOPs are model FLOPs counted on the traced programs of the step's passes, as
``step_throughput.py`` counts them (``measure.pass_flops``, ``measure.matmul_flops``: 2*m*n*k per
matrix product and convolution, attention over image + text + source tokens included), traced
from the run's own student and ``edit`` field with remat 'none' and XLA attention:

  rollout  one forward of the student on B samples per Euler step its truncated rollout runs:
           for each timed step the max of the query indices its loss draws from the step's key
           (``measure.rollout_trips``), at most N - 1; the mean over the timed steps
  teacher  the routed expert field on the B*K query states (two forwards when ``cfg_scale != 1``)
  student  forward + backward on the B*K query states, as traced (just under 3 forwards: the
           patch embedding has no input gradient)

Not counted: the optimizer update and elementwise work (norms, softmax, activations). The parts
add up to the whole train step's traced count with its rollout loop run that many times
(tests/test_benchmarks.py). FLOP/s is the mean FLOPs of the timed (donated) steps over their
median time; utilisation divides it by ``--peak-tflops`` (per device) times the device count.

Donation: ``run.train_step`` donates the train state (its buffers are reused for the new state);
the comparison jits the same step (``run.step_fn.step``, the step numbers an argument as in
``run.train_step``) with the same output shardings and no donation, and
times it on the same batches, the two steps taking turns (donate/keep < 1: donation faster);
``mem`` is the ratio of their compiled peak memory (arguments + outputs - aliased + temporaries,
from XLA's memory analysis).
"""

import functools
import importlib.util
import math
import pathlib
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from danceopd_jax import build, parallel
from danceopd_jax.commands import ArgumentParser, fail
from danceopd_jax.config_validation import ConfigError, validate
from danceopd_jax.core.rollout import euler_step, rollout_query_states
from danceopd_jax.core.schedule import sample_query_indices, sigma_grid
from danceopd_jax.models.dit import PRESETS
from danceopd_jax.step_numbers import BoundStep
from danceopd_jax.train import setup_run
from measure import median_seconds, pass_flops, peak_bytes, query_shapes, rollout_trips, step_flops

ROUTE = "edit"  # the only route with weight > 0
SMOKE_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "smoke.py"


def parse_args(argv):
    parser = ArgumentParser(prog="benchmarks/step.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,S,B", help="comma-separated DiT presets of student and experts")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=2, help="global samples per step (B)")
    parser.add_argument("--rollout-steps", type=int, default=4, help="Euler steps of the rollout (N)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after 2 warm-up steps")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s of one device")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="CFG scale of both expert fields")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    args = parser.parse_args(argv)
    for name in args.presets.split(","):
        if name not in PRESETS:
            parser.error(f"--presets: unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    for flag in ("image_size", "batch_size", "rollout_steps", "steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.peak_tflops is not None and not (math.isfinite(args.peak_tflops) and args.peak_tflops > 0):
        parser.error(f"--peak-tflops must be a positive number, got {args.peak_tflops}")
    if not (math.isfinite(args.cfg_scale) and args.cfg_scale >= 0):
        parser.error(f"--cfg-scale must be a finite number >= 0, got {args.cfg_scale}")
    for name in args.presets.split(","):  # the rest (image size against the patch, ...) as a run checks it
        try:
            validate(benchmark_config(name, args))
        except ConfigError as error:
            parser.error(f"preset {name}: {error}")
    return args


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



def timed_flops(run, batch: dict, steps) -> dict:
    """FLOPs of the timed steps by part (module docstring): ``rollout`` (mean over ``steps``),
    ``teacher``, ``student``, ``total`` (the mean step), and what they come from: the passes
    (``measure.pass_flops``) and each step's Euler steps (``rollout_trips``). The passes are traced
    from the run's student and its ``edit`` field, built anew with remat 'none' and XLA attention."""
    config = run.config.copy_and_resolve_references()
    for spec in [config.student, *config.experts.values()]:
        spec.remat, spec.attention = "none", "xla"
    graphdef = lambda spec: parallel.abstract_model_state(build.model_factory(config, spec), run.mesh, run.rules)[0]  # noqa: E731
    fields = build.route_fields_builder(config, {name: graphdef(spec) for name, spec in config.experts.items()})
    route = list(config.routes).index(ROUTE)
    teacher = lambda experts, x, t, cond: fields(experts)[route](x, t, cond)  # noqa: E731
    image = jax.ShapeDtypeStruct(batch["image"].shape, jnp.float32)  # the rollout's noise
    rollout = (image, jax.ShapeDtypeStruct(image.shape[:1], jnp.float32), batch["cond"])
    queries = query_shapes(rollout, config.queries_per_rollout)
    passes = pass_flops(build.StudentApply(graphdef(config.student)), lambda p, e: p, teacher, run.state.params, run.experts,
                        rollout, queries)  # fmt: skip
    trips = rollout_trips(config.seed, config.batch_size, config.rollout_steps, config.queries_per_rollout,
                          config.query_sampler, steps)  # fmt: skip
    parts = {
        "rollout": passes["prepare"] + statistics.mean(trips) * passes["forward"],
        "teacher": passes["teacher"],
        "student": passes["student"],
        "total": statistics.mean(step_flops(passes, n) for n in trips),
    }
    return dict(parts, passes=passes, rollout_trips=trips)


def draw_batches(run, count: int) -> list:
    """``count`` (route, batch) pairs from the run's pipeline, drawn before any timing."""
    return [run.global_batch(step) for step in range(count)]


def compile_step(step: BoundStep, run, route, batch) -> tuple[BoundStep, float]:
    """A jitted ``step`` lowered and compiled ahead of time for the run's state; returns ``(executable, seconds)``."""
    start = time.perf_counter()
    compiled = step.lower(run.state, run.experts, batch, jnp.int32(route)).compile()
    return BoundStep(compiled, step.numbers), time.perf_counter() - start



def time_steps(run, compiled: dict, batches, warmup: int = 2) -> tuple[dict[str, float], dict[str, list[int]]]:
    """Median seconds of a step of each executable over ``batches[warmup:]``, and the train steps
    (``state.step``) each executable's timed calls ran. The executables take turns on every batch (a
    change of machine load hits them alike); the state is threaded through all of them (a donating
    one consumes it), so each call runs the next train step."""
    state, times, ran = run.state, {name: [] for name in compiled}, {name: [] for name in compiled}
    step_number = int(state.step)
    for route, batch in batches:
        for name, step in compiled.items():
            start = time.perf_counter()
            state, metrics = step(state, run.experts, batch, jnp.int32(route))
            jax.block_until_ready((state, metrics))
            times[name].append(time.perf_counter() - start)
            ran[name].append(step_number)
            step_number += 1
    run.state = state
    medians = {name: statistics.median(seconds[warmup:]) for name, seconds in times.items()}
    return medians, {name: steps[warmup:] for name, steps in ran.items()}


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
        no_donation = jax.jit(run.step_fn.step, out_shardings=(run.state_shardings, parallel.replicated(run.mesh)))
        no_donation = BoundStep(no_donation, run.step_fn.numbers)  # the same program as run.train_step, but donation
        kept = compile_step(no_donation, run, *batches[0])[0]
        step_s, ran = time_steps(run, {"donated": donated, "kept": kept}, batches)
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
        donated_memory=peak_bytes(donated.step) / peak_bytes(kept.step),
        flops=timed_flops(run, batches[0][1], ran["donated"]),
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
    try:
        results = [benchmark_preset(preset, args) for preset in args.presets.split(",")]
    except ConfigError as error:  # what only the devices can tell (the batch against the mesh)
        fail(error)
    print_table(results, args)


if __name__ == "__main__":
    main(sys.argv[1:])
