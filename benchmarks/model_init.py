"""Building a model abstractly: the time to trace its construction with ``nnx.Rngs(seed)`` against
``InitKeys(seed)`` (``models/init_keys.py``), which hands out the same keys from a Python counter.

    python benchmarks/model_init.py                                 # DiT-B/2, DiT-XL/2, SD3.5-M (CPU, ~2 min)
    python benchmarks/model_init.py --models DiT-XL/2 --repeats 5

A run builds each model twice without allocating it: ``nnx.eval_shape`` (the abstract state and
its shardings, ``parallel.abstract_model_state``) and the trace of the jitted initialiser
(``parallel.create_sharded_state``); a checkpointed model needs the first only. Per model and key
source, the median over ``--repeats`` of each after one warm-up build, and the ratio of the two
sources in this run. No program is compiled or run: this is Python and tracing time, the same on
any device.
"""

import shlex
import sys

import jax
from flax import nnx

from danceopd_jax.commands import ArgumentParser
from danceopd_jax.models.dit import DiT, dit_config
from danceopd_jax.models.init_keys import InitKeys
from danceopd_jax.models.mmdit import MMDiT, mmdit_config
from measure import median_seconds

# DiTs at 256 px (32 x 32 latents, 4 channels), class-conditional; SD3.5-M at 1024 px (its config).
MODELS = {
    "DiT-B/2": lambda rngs: DiT(dit_config("B", image_size=32, channels=4, num_classes=1000), rngs=rngs),
    "DiT-XL/2": lambda rngs: DiT(dit_config("XL", image_size=32, channels=4, num_classes=1000), rngs=rngs),
    "SD3.5-M": lambda rngs: MMDiT(mmdit_config("sd35_medium"), rngs=rngs),
}
SOURCES = {"nnx.Rngs": nnx.Rngs, "InitKeys": InitKeys}


def parse_args(argv):
    parser = ArgumentParser(prog="benchmarks/model_init.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed builds per model, source and way (median, after one warm-up)")
    args = parser.parse_args(argv)
    args.models = args.models.split(",")
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; valid: {', '.join(MODELS)}")
    if args.repeats < 1:
        parser.error(f"--repeats: must be >= 1, got {args.repeats}")
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    print(f"python benchmarks/model_init.py {shlex.join(argv)}".rstrip())
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}; median of {args.repeats} after one warm-up; seconds")
    print("| model | parameters | way | nnx.Rngs | InitKeys | ratio |")
    print("|---|---:|---|---:|---:|---:|")
    for name in args.models:
        make = MODELS[name]
        params = sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: make(InitKeys(0))), nnx.Param)))
        ways = {
            "eval_shape": lambda rngs_of: nnx.eval_shape(lambda: make(rngs_of(0))),
            "jit trace": lambda rngs_of: jax.jit(lambda: nnx.split(make(rngs_of(0)))[1]).trace(),
        }
        for way, build in ways.items():
            seconds = {source: median_seconds(lambda: build(rngs_of), args.repeats) for source, rngs_of in SOURCES.items()}
            ratio = seconds["nnx.Rngs"] / seconds["InitKeys"]
            print(f"| {name} | {params / 1e6:,.0f}M | {way} | {seconds['nnx.Rngs']:.2f} | {seconds['InitKeys']:.2f} | {ratio:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
