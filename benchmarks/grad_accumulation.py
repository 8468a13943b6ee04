"""Gradient accumulation: the memory and time of one DanceOPD train step over the same batch in A
microbatches (``config.grad_accum_steps``, ``core/microbatches.py``).

    python benchmarks/grad_accumulation.py                     # CPU: DiT-B/2, 128 px, batch 16, A = 1, 2, 4, 8
    python benchmarks/grad_accumulation.py --model SD3.5-M --px 1024 --batch-size 4 --accum 1,2,4 \\
        --remat full --attention cudnn                         # one H100: the paper's SD3.5-M step (batch 4, A = 4)

The step is ``step_throughput.py``'s (the paper's DanceOPD step on random weights, the truncated
rollout, AdamW; ``step_throughput.timed_step``), compiled once per A on the same models, state and
batch in this process. Per A:

  memory   the compiled step's device memory from XLA's buffer assignment (``measure.peak_bytes``:
           arguments, outputs not aliased to them, temporaries) and its temporaries alone
  time     the median of ``--steps`` steps after two warm-up steps
  loss     the first step's loss from the same state: the same for every A (same samples, same
           randomness), to float summation order

Ratios are against A = 1 in the same run. The temporaries are the activations of the rollout, the
teacher and the student's forward and backward on B / A samples, plus the gradient accumulator
(one float32 copy of the trainable parameters) when A > 1.
"""

import argparse
import json
import shlex
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

from danceopd_jax import parallel
from danceopd_jax.commands import ArgumentParser
from danceopd_jax.models import layers
from measure import peak_bytes
from step_throughput import MODELS, build_models, mesh_and_rules, model_config, time_train_steps, timed_step

MIB = 2**20


def parse_args(argv):
    parser = ArgumentParser(prog="benchmarks/grad_accumulation.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="DiT-B/2", choices=tuple(MODELS), help="model (step_throughput.py's)")
    parser.add_argument("--px", type=int, default=128, help="image size in pixels (latent = px / 8)")
    parser.add_argument("--batch-size", type=int, default=16, help="global batch B")
    parser.add_argument("--accum", default="1,2,4,8", help="comma-separated microbatch counts A; each divides B")
    parser.add_argument("--rollout-steps", type=int, default=16, help="Euler steps N (paper: 16)")
    parser.add_argument("--shift", type=float, default=3.0, help="sigma-grid shift (SD3.5: 3)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--attention", default="xla", choices=layers.ATTENTION_IMPLEMENTATIONS, help="attention implementation")
    parser.add_argument("--remat", default="none", choices=tuple(layers.REMAT_POLICIES), help="student remat policy")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per A, after 2 warm-up steps (0: memory and first loss only)")
    parser.add_argument("--out", default=None, help="also write the table (Markdown) here")
    args = parser.parse_args(argv)
    if args.steps < 0:
        parser.error(f"--steps: must be >= 0, got {args.steps}")
    if args.px % 16:
        parser.error(f"--px: {args.px} is not divisible by 16 (latent / 8, patch 2)")
    try:
        args.accum = [int(a) for a in args.accum.split(",")]
    except ValueError:
        parser.error(f"--accum: {args.accum!r} is not a comma-separated list of integers")
    bad = [a for a in args.accum if a < 1 or args.batch_size % a or (args.batch_size // a) % jax.device_count()]
    if bad:
        parser.error(f"--accum: {bad} do not split the batch of {args.batch_size} into microbatches over {jax.device_count()} device(s)")
    return args


def measure_accumulations(args) -> list[dict]:
    """One row per A: memory, step time and first loss (module docstring)."""
    choice = MODELS[args.model]
    latent = args.px // 8
    flags = argparse.Namespace(**vars(args), cfg_scale=1.0)
    config = model_config(choice, latent, flags)
    mesh, rules = mesh_and_rules(choice)
    models = build_models(choice, config, mesh, rules, 1.0)
    step = timed_step(choice, config, models, mesh, rules, latent, args.batch_size, flags)
    rows = []
    with parallel.sharding_context(mesh, rules):
        for accum in args.accum:
            compiled, state, compile_s, _ = step.compile(grad_accum_steps=accum)
            state, metrics = compiled(state, models.experts, step.batch, jnp.int32(0))  # the first step, from seed 0's state
            step_s = None
            if args.steps:
                times, state = time_train_steps(compiled, state, models.experts, step.batch, args.steps)
                step_s = statistics.median(times)
            memory = compiled.memory_analysis()
            rows.append(dict(accum=accum, microbatch=args.batch_size // accum, peak_bytes=peak_bytes(compiled),
                             temp_bytes=memory.temp_size_in_bytes, step_s=step_s, compile_s=compile_s,
                             loss=float(metrics["loss"])))  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
            del compiled, state
    return rows


def table(args, rows: list[dict]) -> str:
    base = rows[0]
    lines = [
        f"{args.model} at {args.px} px (latent {args.px // 8}), batch {args.batch_size}, {args.rollout_steps}-step rollout, "
        f"{args.dtype}, remat {args.remat}, attention {args.attention}; {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}",
        "",
        f"`{shlex.join(['python', 'benchmarks/grad_accumulation.py', *sys.argv[1:]])}`",
        "",
        f"| A | samples per microbatch | step memory MiB | x A={base['accum']} | temporaries MiB | x A={base['accum']} | "
        f"step s | x A={base['accum']} | first loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        timed = f"{r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f}" if r["step_s"] is not None else "- | -"
        lines.append(
            f"| {r['accum']} | {r['microbatch']} | {r['peak_bytes'] / MIB:.1f} | {r['peak_bytes'] / base['peak_bytes']:.2f} | "
            f"{r['temp_bytes'] / MIB:.1f} | {r['temp_bytes'] / base['temp_bytes']:.2f} | {timed} | {r['loss']:.6f} |"
        )
    spread = max(r["loss"] for r in rows) - min(r["loss"] for r in rows)
    lines += ["", f"First-step losses differ by at most {spread:.1e} ({spread / abs(base['loss']):.1e} relative)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rows = measure_accumulations(args)
    text = table(args, rows)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    if not np.allclose([r["loss"] for r in rows], rows[0]["loss"], rtol=1e-4):
        sys.exit("error: the first-step losses differ between accumulations: " + ", ".join(f"A={r['accum']}: {r['loss']}" for r in rows))


if __name__ == "__main__":
    main()
