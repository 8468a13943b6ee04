"""A sweep over one config key: the first train step of each point, each in a new process sharing a
persistent compilation cache, with the step's numbers as arguments of the compiled step (as a run
takes them, ``danceopd_jax/step_numbers.py``) against compiled in as constants.

    python benchmarks/sweep_compile.py                                     # 3 learning rates (CPU, ~1 min)
    python benchmarks/sweep_compile.py --key fields.edit.cfg_scale --values 2,3,4.5
    python benchmarks/sweep_compile.py --key rollout_steps --values 4,6     # not a step number: both compile
    python benchmarks/sweep_compile.py --ways arguments                     # only the way a run takes them

The run is ``benchmarks/step.py``'s (configs/smoke.py with student and experts at ``--preset``,
every step on the edit route). Per way, the points run in order, each in a new process with the
way's own cache (``jax_persistent_cache_min_compile_time_secs`` 0: every program is kept), as
the jobs of a sweep would: ``first`` is the wall time of the first train step (trace, then
compile or load from the cache, then run), ``then`` of the next step, ``compiled`` whether the
point added a train-step program to the cache. On CPU read the ratios, not the absolute times.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from danceopd_jax import step_numbers
from danceopd_jax.commands import ArgumentParser
from danceopd_jax.config_validation import ConfigError, validate
from danceopd_jax.models.dit import PRESETS
from danceopd_jax.train import setup_run
from step import benchmark_config

WAYS = ("arguments", "constants")
STEP_PROGRAMS = ("jit_step-", "jit_constant_step-")  # the cache entries of a train step, each way (its function's name)


def parse_value(text: str):
    """A config value from the command line: an int, else a float, else the string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def sweep_config(args, value):
    """``benchmark_config`` with ``args.key`` set to ``value``; KeyError when the config has no such key."""
    config = benchmark_config(args.preset, argparse.Namespace(image_size=args.image_size, batch_size=2, rollout_steps=4,
                                                              dtype="float32", cfg_scale=args.cfg_scale))  # fmt: skip
    *parents, leaf = args.key.split(".")
    node = config
    for name in [*parents, leaf]:
        if not hasattr(node, "keys") or name not in node:
            raise KeyError(args.key)
        node, parent = node[name], node
    try:
        parent[leaf] = value
    except TypeError:
        raise TypeError(f"expected a {type(node).__name__}") from None
    return config


def parse_args(argv):
    parser = ArgumentParser(prog="benchmarks/sweep_compile.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--key", default="optimizer.learning_rate", help="dotted config key the sweep varies")
    parser.add_argument("--values", default="1e-3,3e-4,1e-4", help="comma-separated values of --key, in sweep order")
    parser.add_argument("--preset", default="tiny", help=f"DiT preset of student and experts, of {', '.join(PRESETS)}")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--cfg-scale", type=float, default=2.0, help="CFG scale of both expert fields")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, of {', '.join(WAYS)}")
    parser.add_argument("--point", choices=WAYS, help=argparse.SUPPRESS)  # one point in this process (internal)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.ways = args.ways.split(",")
    if set(args.ways) - set(WAYS):
        parser.error(f"--ways: unknown {sorted(set(args.ways) - set(WAYS))}; valid: {', '.join(WAYS)}")
    if args.preset not in PRESETS:
        parser.error(f"--preset: unknown preset {args.preset!r}; valid: {', '.join(PRESETS)}")
    args.values = [parse_value(v) for v in args.values.split(",")]
    if len(args.values) < 2 and not args.point:
        parser.error(f"--values: a sweep needs at least 2 values, got {args.values}")
    for value in args.values:
        try:
            validate(sweep_config(args, value))
        except KeyError:
            parser.error(f"--key: the config has no key {args.key!r}")
        except (ConfigError, TypeError) as error:
            parser.error(f"--values: {args.key}={value!r}: {error}")
    return args


def step_programs(cache: str) -> int:
    return sum(name.startswith(STEP_PROGRAMS) for name in os.listdir(cache)) if os.path.isdir(cache) else 0


def run_point(args) -> dict:
    """The first two train steps of one point, in this process, with ``args.cache``."""
    run = setup_run(sweep_config(args, args.values[0]))
    step = run.train_step
    if args.point == "constants":
        step = jax.jit(step_numbers.with_constants(run.step_fn.step, run.step_fn.numbers), donate_argnums=0)
    before = step_programs(args.cache)
    state, seconds = run.state, []
    for index in range(2):
        route, batch = run.global_batch(index)
        start = time.perf_counter()
        state, metrics = step(state, run.experts, batch, jnp.int32(route))
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - start)
    return {"first": seconds[0], "then": seconds[1], "compiled": step_programs(args.cache) > before}


def point_in_new_process(args, way: str, value, cache: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--key", args.key, "--values", str(value), "--preset", args.preset,
           "--image-size", str(args.image_size), "--cfg-scale", str(args.cfg_scale), "--point", way, "--cache", cache]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"point {args.key}={value} ({way}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.point:
        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        print(json.dumps(run_point(args)))
        return
    print(f"python benchmarks/sweep_compile.py {shlex.join(argv)}".rstrip())
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; DiT preset {args.preset}, image {args.image_size}; "
          f"one new process per point; seconds")  # fmt: skip
    print(f"| {args.key} | way | first | then | compiled |")
    print("|---|---|---:|---:|---|")
    with tempfile.TemporaryDirectory() as caches:
        for way in args.ways:
            for value in args.values:
                r = point_in_new_process(args, way, value, os.path.join(caches, way))
                print(f"| {value} | {way} | {r['first']:.2f} | {r['then']:.3f} | {'yes' if r['compiled'] else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
