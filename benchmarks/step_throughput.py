"""Throughput of the DanceOPD train step at real model sizes (random weights): step time,
samples/s, TFLOP/s, MFU, peak device memory, and where the time goes (rollout, teacher and
student passes), with the truncated rollout and with the full-length one.

    python benchmarks/step_throughput.py --peak-tflops 989 --out docs/PERFORMANCE.md   # one H100
    python benchmarks/step_throughput.py --models DiT-tiny/2,MMDiT-tiny --resolutions 64 \\
        --batch-size 2 --rollout-steps 4 --dtype float32                             # CPU check

Every (model, resolution) runs in its own process (``--one``), so peak device memory is that
configuration's alone and one that runs out of memory does not stop the others. With
``--compilation-cache DIR`` the processes keep their compiled programs in DIR, so a second call on
the same shapes (another ``--profile``, the passes after the step) skips compiles that take
minutes on a GPU; the step's compile time then reads ``(cached)``.

The step is the paper's (docs/METHOD.md): per-step routing to one expert field, an Euler rollout of
``--rollout-steps`` (16) from noise on the shifted grid, K = 1 query state from ``low_t``, the
expert's velocity there, the float32 MSE, AdamW (lr 2e-4, weight decay 0, clip 1.0), bf16
compute with float32 parameters. It is built from the same pieces as ``train.setup_run``
(``core.step.make_loss_fn``, ``make_train_step``, ``parallel`` shardings, state donated); the
data pipeline is left out (a fixed random batch on the device).

Models (latents of a VAE with 8x downsampling: 256 px -> 32x32, 512 px -> 64x64):

  DiT-B/2, DiT-XL/2  class-conditional DiT (1000 classes, as in Peebles & Xie), 4 latent
                     channels; the student is fully trained, the expert is another DiT.
  SD3.5-M            ``MMDIT_PRESETS["sd35_medium"]`` (2.24B), 16 channels, text of 77 CLIP +
                     256 T5 tokens (4096 wide) and a 2048 pooled vector; the student is a
                     rank-128 LoRA (alpha 128) on attention q, k, v, out and the MLPs over the
                     frozen base, and the expert is the same base plus another rank-128 LoRA,
                     as in the paper's realism run.
  DiT-tiny/2, MMDiT-tiny  small stand-ins for a CPU check.

FLOPs are model FLOPs, counted on the traced programs of the step's passes (``pass_flops``,
``measure.matmul_flops``: 2*m*n*k per matrix product and convolution, attention included,
elementwise work not), traced with remat 'none' and XLA attention: the count is the same for
every attention kernel and leaves out remat's recomputation (hardware FLOPs would count it). A
traced forward equals the analytic ``models.dit.forward_flops`` / ``models.mmdit.forward_flops``
exactly (tests/test_benchmarks.py). Per step:

  rollout  the rollout student's preparation (a LoRA student's adapter fold, once per step)
           plus one forward on B samples per Euler step run: for each timed step, the max of the
           query indices its loss really draws (the step's key, ``rollout_trips``) when truncated,
           N - 1 when not
  teacher  the expert field on B*K states (two forwards with CFG; an SD3 expert's LoRA runs
           unfolded, its products counted)
  student  forward + backward on B*K states as traced: about 3 forwards for a fully trained
           student; a LoRA student's backward computes input gradients through the frozen base
           (attention's twice: no weights), plus the adapters' own products

MFU = the timed steps' FLOPs / their time / (``--peak-tflops`` x devices). The H100 SXM's dense bf16
peak is 989 TFLOP/s (datasheet); a large bf16 matrix product reaches about 800 on the
machines this was measured on, so 80% MFU is the practical ceiling.

Where the time goes: the rollout (truncated and full), the teacher forward and the student's
forward + backward are each jitted alone on the same shapes and timed; ``other`` is the step
minus those three (loss, optimizer update, the step's glue).
"""

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from danceopd_jax import build, parallel
from danceopd_jax.config_lib import SD3_LORA_TARGETS, base_config
from danceopd_jax.core.fields import cfg_field, inference_field, model_field, unconditional
from danceopd_jax.core.compute_dtype import cast_to_compute_dtype
from danceopd_jax.core.objectives import frozen_student, per_sample_mse
from danceopd_jax.core.rollout import rollout_query_states
from danceopd_jax.core.schedule import sample_query_indices, sigma_grid
from danceopd_jax.core.step import init_train_state, make_loss_fn, make_lr_schedule, make_optimizer, make_train_step
from danceopd_jax.models import dit, layers, lora, mmdit
from danceopd_jax.models.init_keys import InitKeys
import kernel_profile
import measure
from measure import median_seconds, peak_bytes, step_flops

SD3_TEXT_LEN = 77 + 256  # CLIP tokens + T5 tokens
NUM_CLASSES = 1000
QUERIES = 1  # K
SAMPLER = "low_t"
PROFILED_STEPS = 2


@dataclasses.dataclass(frozen=True)
class ModelChoice:
    kind: str  # "dit" | "mmdit"
    preset: str
    channels: int
    batch_256: int  # default global batch at 256 px (512 px: a quarter, at least 1)
    lora_rank: int = 0
    overrides: tuple = ()  # extra config fields (tiny stand-ins)


MODELS = {
    "DiT-B/2": ModelChoice("dit", "B", 4, batch_256=64),
    "DiT-XL/2": ModelChoice("dit", "XL", 4, batch_256=32),
    "SD3.5-M": ModelChoice("mmdit", "sd35_medium", 16, batch_256=8, lora_rank=128),
    "DiT-tiny/2": ModelChoice("dit", "tiny", 4, batch_256=2),
    "MMDiT-tiny": ModelChoice(
        "mmdit", "sd35_medium", 16, batch_256=2, lora_rank=4,
        overrides=(("num_layers", 2), ("attention_head_dim", 8), ("num_attention_heads", 2), ("joint_attention_dim", 32),
                   ("caption_projection_dim", 16), ("pooled_projection_dim", 16), ("dual_attention_layers", (0,))),
    ),
}  # fmt: skip


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="DiT-B/2,DiT-XL/2,SD3.5-M", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--resolutions", default="256,512", help="comma-separated image sizes in pixels (latent = px / 8)")
    parser.add_argument("--batch-size", type=int, default=0, help="global batch B (0: the model's default, a quarter at 512 px)")
    parser.add_argument("--rollout-steps", type=int, default=16, help="Euler steps N (paper: 16)")
    parser.add_argument("--shift", type=float, default=3.0, help="sigma-grid shift (SD3.5: 3)")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="CFG scale of the expert field (1: no CFG)")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--attention", default="xla", choices=layers.ATTENTION_IMPLEMENTATIONS, help="attention implementation")
    parser.add_argument("--remat", default="none", choices=tuple(layers.REMAT_POLICIES), help="student remat policy")
    parser.add_argument("--cast", default="once", choices=("once", "per_call"),
                        help="frozen parameters in their layers' compute dtype once (as a run does: experts stored so, the "
                             "rollout's student cast before the loop) or cast by each layer on every call, inside the loop")  # fmt: skip
    parser.add_argument("--adapters", default="folded", choices=("folded", "unfolded"),
                        help="a LoRA student's adapters in the rollout: folded into their kernels once per step (as a run "
                             "does) or run as two extra thin products per layer on every Euler step (with --cast once)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=5, help="timed steps, after 2 warm-up steps")
    parser.add_argument("--no-full-rollout", action="store_true", help="skip the step with the full-length rollout")
    parser.add_argument("--no-parts", action="store_true", help="skip timing the rollout, teacher and student passes alone")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s of one device (H100 SXM bf16: 989)")
    parser.add_argument("--out", default=None, help="also write the table (Markdown) here")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help=f"trace {PROFILED_STEPS} steps of each configuration into DIR/<model>_<px>/ and summarise "
                             "the device kernels by category (kernel_profile.py)")  # fmt: skip
    parser.add_argument("--compilation-cache", default=None, metavar="DIR",
                        help="persistent XLA compilation cache: a later call with the same shapes and code loads its "
                             "programs from DIR instead of compiling them (compile s then says 'cached')")  # fmt: skip
    parser.add_argument("--recount", default=None, metavar="JSON",
                        help="count the FLOPs of the results in JSON (an earlier --out's) with this version's counting, "
                             "pair them with the recorded step times and print the MFU; give the run's other flags")  # fmt: skip
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "PX"), help=argparse.SUPPRESS)  # one configuration, JSON out
    args = parser.parse_args(argv)
    for name in args.models.split(","):
        if name not in MODELS:
            parser.error(f"--models: unknown model {name!r}; valid: {', '.join(MODELS)}")
    for px in args.resolutions.split(","):
        if not px.isdigit() or int(px) % 16:
            parser.error(f"--resolutions: {px!r} is not a pixel size divisible by 16 (latent / 8, patch 2)")
    return args


def batch_size(choice: ModelChoice, px: int, args) -> int:
    return args.batch_size or max(1, choice.batch_256 * 256**2 // px**2)


# ---------------------------------------------------------------- models


def model_config(choice: ModelChoice, latent: int, args, *, zero_init: bool = False):
    """The ``DiTConfig`` / ``MMDiTConfig`` of ``choice`` at a latent side; random non-zero fields."""
    common = dict(dtype=args.dtype, remat=args.remat, attention=args.attention, **dict(choice.overrides))
    if choice.kind == "dit":
        return dit.dit_config(choice.preset, image_size=latent, channels=choice.channels, num_classes=NUM_CLASSES,
                              zero_init=zero_init, **common)  # fmt: skip
    return mmdit.mmdit_config(choice.preset, sample_size=latent, **common)


def condition(choice: ModelChoice, config, batch: int, key) -> dict:
    """A random condition batch: class labels (DiT) or SD3 text + pooled embeddings (MMDiT)."""
    if choice.kind == "dit":
        return {"label": jax.random.randint(key, (batch,), 0, NUM_CLASSES)}
    k1, k2 = jax.random.split(key)
    return {
        "text": jax.random.normal(k1, (batch, SD3_TEXT_LEN, config.joint_attention_dim), jnp.float32),
        "pooled": jax.random.normal(k2, (batch, config.pooled_projection_dim), jnp.float32),
    }


def null_condition(choice: ModelChoice) -> callable:
    """The CFG null: the null label (DiT) or zero text and pooled embeddings (MMDiT)."""
    if choice.kind == "dit":
        return unconditional
    return lambda cond: jax.tree.map(jnp.zeros_like, cond)


@dataclasses.dataclass
class Models:
    """The student's ``apply(params, x, t, cond)`` (``build.StudentApply``), its trainable params
    and the frozen experts pytree with its route-field builder, as ``train.setup_run`` builds them;
    ``student_params(params, experts)`` is what ``apply`` takes (a LoRA student adds the base)."""

    apply: callable
    student_params: callable
    params: nnx.State
    experts: dict
    expert_shardings: dict
    route_fields: callable


def random_state(abstract, shardings, seed: int):
    """Random values in the shapes, dtypes and shardings of an abstract model state, drawn on the
    host and put on the devices: N(0, 1/fan_in) for matrices, kernels and tables (fan_in: all
    axes but the last), ones for norm scales, zeros for biases.

    The timings need real-sized, finite weights, not the modules' own initialisers. A traced
    init compiles kernels per initialiser on a GPU, which took 128 s for the two DiT-XL/2 models
    on an H100 (184 s for SD3.5-M): the largest fixed cost of a benchmark call in a lease.
    """
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)

    def draw(index, path, a):  # one generator per leaf: the draws run in parallel threads
        if a.ndim >= 2:
            x = np.random.default_rng([seed, index]).standard_normal(a.shape, np.float32)
            x *= 1 / np.sqrt(np.prod(a.shape[:-1]))
            return x.astype(a.dtype, copy=False)
        fill = np.ones if "scale" in jax.tree_util.keystr(path) else np.zeros
        return fill(a.shape, a.dtype)

    with concurrent.futures.ThreadPoolExecutor() as pool:
        leaves = list(pool.map(draw, range(len(paths_and_leaves)), *zip(*paths_and_leaves, strict=True)))
    return jax.device_put(treedef.unflatten(leaves), shardings)


class UnfoldedStudent(build.StudentApply):
    """``StudentApply`` whose rollout field keeps a LoRA student's adapters unfolded (cast once)."""

    def frozen_field(self, params):
        return inference_field(self.graphdef, *self.states(params))


def build_models(choice: ModelChoice, config, mesh, rules, cfg_scale: float, cast_once: bool = True, fold: bool = True,
                 abstract: bool = False) -> Models:
    """The models of one configuration; ``cast_once=False`` keeps every frozen parameter in float32
    and gives the student no ``frozen_field`` (each layer then casts on every call); ``fold=False``
    keeps the rollout student's adapters unfolded; ``abstract`` gives shapes and dtypes only (to trace)."""

    def stored(graphdef, frozen, shardings, *context):
        if not cast_once:
            return frozen
        if abstract:
            return jax.eval_shape(lambda f, *c: cast_to_compute_dtype(graphdef, f, *c)[0], frozen, *context)
        return build.frozen_in_compute_dtype(graphdef, frozen, shardings, *context)

    def state(abstract_state, shardings, seed: int):
        return abstract_state if abstract else random_state(abstract_state, shardings, seed)

    def student(graphdef):
        apply = (build.StudentApply if fold else UnfoldedStudent)(graphdef)
        return apply if cast_once else lambda p, x, t, cond: apply(p, x, t, cond)

    null = null_condition(choice)
    if choice.kind == "dit":
        graphdef, abstract_state, shardings = parallel.abstract_model_state(lambda: dit.DiT(config, rngs=InitKeys(0)), mesh, rules)
        params, expert = (state(abstract_state, shardings, seed) for seed in (0, 1))
        with parallel.sharding_context(mesh, rules):
            expert = stored(graphdef, expert, shardings)  # as train.setup_run stores experts
        fields = lambda e: [cfg_field(model_field(graphdef, e["expert"]), cfg_scale, null)]  # noqa: E731
        student_params = lambda p, e: p  # noqa: E731
        return Models(student(graphdef), student_params, params, {"expert": expert}, {"expert": shardings}, fields)

    def make_lora():
        model = mmdit.MMDiT(config, rngs=InitKeys(0))
        lora.add_lora(model, rank=choice.lora_rank, alpha=choice.lora_rank, targets=SD3_LORA_TARGETS.split(","), rngs=InitKeys(1))
        return model

    graphdef, abstract_state, _ = parallel.abstract_model_state(make_lora, mesh, rules)
    graphdef, abstract_lora, abstract_base = nnx.split(nnx.merge(graphdef, abstract_state), lora.LoRAParam, ...)
    lora_shardings, base_shardings = (parallel.shardings_of(a, mesh, rules) for a in (abstract_lora, abstract_base))
    params, delta = (state(abstract_lora, lora_shardings, seed) for seed in (0, 2))  # delta: the expert's LoRA
    base = state(abstract_base, base_shardings, 1)
    with parallel.sharding_context(mesh, rules):
        base = stored(graphdef, base, base_shardings, params)  # as build.load_folder_models
        delta = stored(graphdef, delta, lora_shardings, base)
    fields = lambda e: [cfg_field(model_field(graphdef, e["delta"], e["base"]), cfg_scale, null)]  # noqa: E731
    student_params = lambda p, e: {"lora": p, "base": e["base"]}  # noqa: E731
    experts, shardings = {"base": base, "delta": delta}, {"base": base_shardings, "delta": lora_shardings}
    return Models(student(graphdef), student_params, params, experts, shardings, fields)


# ---------------------------------------------------------------- FLOPs


def mesh_and_rules(choice: ModelChoice):
    """A data-parallel mesh over every device and the run's logical axis rules for the model's axes."""
    logical = dit.LOGICAL_AXES if choice.kind == "dit" else mmdit.LOGICAL_AXES + lora.LORA_AXES
    rules = parallel.axis_rules({k: v for k, v in base_config().logical_axis_rules.items() if k in logical}, logical)
    return parallel.make_mesh({"data": -1}), rules


def pass_flops(choice: ModelChoice, latent: int, batch: int, args, mesh, rules) -> dict[str, int]:
    """Model FLOPs of the step's passes, counted on their traced programs (``measure.pass_flops``;
    module docstring): one rollout forward (Euler step), the once-per-step preparation of the
    rollout's student (adapter fold), the teacher and the student's forward + backward. Traced
    with remat 'none' and XLA attention, whatever the run uses: recomputation is not model work,
    and the count is the same for every attention kernel."""
    counting = argparse.Namespace(**{**vars(args), "remat": "none", "attention": "xla"})
    config = model_config(choice, latent, counting)
    models = build_models(choice, config, mesh, rules, args.cfg_scale, cast_once=args.cast == "once",
                          fold=args.adapters == "folded", abstract=True)  # fmt: skip
    image = jax.ShapeDtypeStruct((batch, latent, latent, choice.channels), jnp.float32)
    times = jax.ShapeDtypeStruct((batch,), jnp.float32)
    cond = jax.eval_shape(lambda: condition(choice, config, batch, jax.random.key(0)))
    teacher = lambda e, x, t, c: models.route_fields(e)[0](x, t, c)  # noqa: E731
    inputs = (image, times, cond)  # K = 1: the query states have the rollout's shapes
    return measure.pass_flops(models.apply, models.student_params, teacher, models.params, models.experts, inputs, inputs)


def rollout_trips(batch: int, args, steps) -> list[int]:
    """Euler steps the truncated rollout of each train step in ``steps`` runs (``measure.rollout_trips``;
    a state initialised with seed 0, as ``run_one``'s)."""
    return measure.rollout_trips(0, batch, args.rollout_steps, QUERIES, SAMPLER, steps)


def timed_flops(choice: ModelChoice, latent: int, batch: int, args, mesh, rules) -> dict:
    """The passes' FLOPs (``pass_flops``), the Euler steps of each timed step's truncated rollout
    (``rollout_trips``), and the mean FLOPs of a timed step with the truncated and the full rollout."""
    passes = pass_flops(choice, latent, batch, args, mesh, rules)
    trips = rollout_trips(batch, args, range(WARMUP_STEPS, WARMUP_STEPS + args.steps))
    return dict(passes, rollout_trips=trips, step=statistics.mean(step_flops(passes, n) for n in trips),
                step_full=step_flops(passes, args.rollout_steps - 1))  # fmt: skip


# ---------------------------------------------------------------- timing




def device_peak_bytes() -> int | None:
    """The device allocator's peak bytes in use so far in this process (None where not reported)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


WARMUP_STEPS = 2


def time_train_steps(step, state, experts, batch, steps: int):
    """``(seconds of each timed step, final state)``: ``steps`` steps after ``WARMUP_STEPS``; the state is donated."""
    times, route = [], jnp.int32(0)
    for i in range(steps + WARMUP_STEPS):
        start = time.perf_counter()
        state, metrics = step(state, experts, batch, route)
        jax.block_until_ready((state, metrics))
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - start)
    if not np.isfinite(float(metrics["loss"])):
        raise FloatingPointError(f"non-finite loss {float(metrics['loss'])}")
    return times, state


def trace_dir(root: str, model_name: str, px: int) -> str:
    return os.path.join(root, f"{model_name.replace('/', '')}_{px}")


def profile_steps(step, state, experts, batch, log_dir: str):
    """``(kernel summary per step or None on a backend without device events, final state)`` of
    ``PROFILED_STEPS`` steps traced by the profiler into ``log_dir``."""
    with jax.profiler.trace(log_dir):
        for _ in range(PROFILED_STEPS):
            state, metrics = step(state, experts, batch, jnp.int32(0))
            jax.block_until_ready((state, metrics))
    return kernel_profile.summarise(kernel_profile.latest_trace(log_dir), PROFILED_STEPS), state


def part_times(models: Models, batch: dict, sigmas, args, repeats: int) -> dict[str, float]:
    """Median seconds of the rollout (truncated, full), the teacher forward and the student f+b alone."""
    n, b = args.rollout_steps, batch["image"].shape[0]
    params, experts, cond = models.params, models.experts, batch["cond"]
    noise = jax.random.normal(jax.random.key(1), batch["image"].shape, jnp.float32)
    index_keys = iter(jax.random.split(jax.random.key(2), 4 * (repeats + 1)))
    indices = lambda: sample_query_indices(next(index_keys), b, QUERIES, n, SAMPLER)  # noqa: E731

    @functools.partial(jax.jit, static_argnames="truncate")
    def rollout(params, experts, noise, cond, indices, truncate):
        field = frozen_student(models.apply, models.student_params(params, experts))
        return rollout_query_states(field, noise, sigmas, cond, indices, truncate)

    states, times = rollout(params, experts, noise, cond, indices(), True)
    states, times = states[:, 0], times[:, 0]  # K = 1

    @jax.jit
    def teacher(experts, states, times, cond):
        return models.route_fields(experts)[0](states, times, cond)

    target = teacher(experts, states, times, cond)

    @jax.jit
    def student(params, experts, states, times, cond, target):
        def loss(p):
            return jnp.mean(per_sample_mse(models.apply(models.student_params(p, experts), states, times, cond), target))

        return jax.value_and_grad(loss)(params)

    out = {
        "rollout_s": median_seconds(lambda: rollout(params, experts, noise, cond, indices(), True), repeats),
        "teacher_s": median_seconds(lambda: teacher(experts, states, times, cond), repeats),
        "student_s": median_seconds(lambda: student(params, experts, states, times, cond, target), repeats),
    }
    if not args.no_full_rollout:
        out["rollout_full_s"] = median_seconds(lambda: rollout(params, experts, noise, cond, indices(), False), repeats)
    return out


def use_compilation_cache(directory: str) -> list[int]:
    """Keep every compiled program in ``directory`` (however short its compile) and count the
    programs loaded from it: the returned one-element list is the running count of cache hits."""
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    hits = [0]

    def count(event: str, **_) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            hits[0] += 1

    jax.monitoring.register_event_listener(count)
    return hits


@dataclasses.dataclass
class TimedStep:
    """What every compiled variant of one configuration's train step shares: the optimizer, the
    train state's init and shardings, the sigma grid and a fixed random batch on the devices."""

    models: Models
    mesh: Any
    rules: Any
    optimizer: Any
    lr: Any
    init: Callable
    state_shardings: Any
    sigmas: jax.Array
    batch: dict

    def compile(self, truncate: bool = True, grad_accum_steps: int = 1, cache_hits: list[int] | None = None):
        """``(compiled step, a fresh train state, compile seconds, loaded from the compilation cache)``
        of the DanceOPD step (``make_loss_fn`` + ``make_train_step``), state donated; call it inside
        ``parallel.sharding_context``."""
        models, b = self.models, self.batch["image"].shape[0]
        loss = make_loss_fn("danceopd", models.apply, models.route_fields, routing_mode="per_step", route_weights=[1.0],
                            group_sizes=[b], sigmas=self.sigmas, num_queries=QUERIES, sampler=SAMPLER, truncate_rollout=truncate)  # fmt: skip
        inner = loss
        loss = lambda params, experts, *rest, **kw: inner(models.student_params(params, experts), experts, *rest, **kw)  # noqa: E731
        replicated, batch_sharding = parallel.replicated(self.mesh), parallel.batch_sharding(self.mesh)
        step = jax.jit(
            make_train_step(loss, self.optimizer, self.lr, group_sizes=[b], grad_accum_steps=grad_accum_steps),
            in_shardings=(self.state_shardings, models.expert_shardings, batch_sharding, replicated),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=0,
        )
        hits = cache_hits or [0]
        state = jax.jit(self.init, out_shardings=self.state_shardings)(models.params)
        start, before = time.perf_counter(), hits[0]
        compiled = step.lower(state, models.experts, self.batch, jnp.int32(0)).compile()
        return compiled, state, time.perf_counter() - start, hits[0] > before


def timed_step(choice: ModelChoice, config, models: Models, mesh, rules, latent: int, b: int, args) -> TimedStep:
    """The paper's optimizer (AdamW, lr 2e-4 constant, no weight decay, clip 1.0), a state with seed 0
    and a batch of ``b`` random latents and conditions."""
    lr = make_lr_schedule(2e-4, 0, 1000, "constant")
    optimizer = make_optimizer(lr, weight_decay=0.0, grad_clip=1.0)
    init = lambda p: init_train_state(p, optimizer, 0, use_ema=False)  # noqa: E731
    state_shardings = parallel.shardings_of(jax.eval_shape(init, models.params), mesh, rules)
    key_image, key_cond = jax.random.split(jax.random.key(0))
    batch = jax.device_put(
        {"image": jax.random.normal(key_image, (b, latent, latent, choice.channels)), "cond": condition(choice, config, b, key_cond)},
        parallel.batch_sharding(mesh),
    )
    return TimedStep(models, mesh, rules, optimizer, lr, init, state_shardings, sigma_grid(args.rollout_steps, args.shift), batch)


def run_one(model_name: str, px: int, args) -> dict:
    """All figures of one (model, resolution), in this process."""
    cache_hits = use_compilation_cache(args.compilation_cache) if args.compilation_cache else [0]
    choice = MODELS[model_name]
    latent, b = px // 8, batch_size(choice, px, args)
    config = model_config(choice, latent, args)
    mesh, rules = mesh_and_rules(choice)

    start = time.perf_counter()
    models = build_models(choice, config, mesh, rules, args.cfg_scale, cast_once=args.cast == "once", fold=args.adapters == "folded")
    jax.block_until_ready((models.params, models.experts))
    build_s = time.perf_counter() - start
    step = timed_step(choice, config, models, mesh, rules, latent, b, args)

    flops = timed_flops(choice, latent, b, args, mesh, rules)
    result = dict(model=model_name, px=px, latent=latent, batch=b, device=jax.devices()[0].device_kind,
                  devices=jax.device_count(), build_s=build_s, cast=args.cast, adapters=args.adapters,
                  params=sum(x.size for x in jax.tree.leaves(models.params)),
                  frozen=sum(x.size for x in jax.tree.leaves(models.experts)),
                  frozen_bytes=sum(x.nbytes for x in jax.tree.leaves(models.experts)), flops=flops)  # fmt: skip
    with parallel.sharding_context(mesh, rules):
        for truncate in (True, False) if not args.no_full_rollout else (True,):
            compiled, state, compile_s, cached = step.compile(truncate, cache_hits=cache_hits)
            name = "step" if truncate else "step_full"
            result[f"{name}_compile_s"], result[f"{name}_cached"] = compile_s, cached
            result[f"{name}_peak_bytes"] = peak_bytes(compiled)
            times, state = time_train_steps(compiled, state, models.experts, step.batch, args.steps)
            result[f"{name}_times_s"], result[f"{name}_s"] = times, statistics.mean(times)
            if truncate:
                result["device_peak_bytes"] = device_peak_bytes()  # the builds and this step so far
            if args.profile and truncate:
                result["kernels"], state = profile_steps(compiled, state, models.experts, step.batch, trace_dir(args.profile, model_name, px))
            del state, compiled
            print(json.dumps(result), flush=True)  # partial: the parent keeps the last complete line
        if not args.no_parts:
            result.update(part_times(models, step.batch, step.sigmas, args, args.steps))
    return result


# ---------------------------------------------------------------- table


def run_all(args, argv, header_lines: list[str]) -> list[dict]:
    """Each (model, resolution) in its own process; a failed one is reported and skipped. Each
    result is printed as JSON and the table rewritten (``--out``) as soon as it is in."""
    results = []
    for name in args.models.split(","):
        for px in map(int, args.resolutions.split(",")):
            command = [sys.executable, os.path.abspath(__file__), *argv, "--one", name, str(px)]
            print(f"== {name} at {px} px", flush=True)
            json_lines, other = [], []
            with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
                for line in proc.stdout:  # echoed as they come: a partial result survives a killed run's log
                    (json_lines if line.startswith("{") else other).append(line.rstrip())
                    if line.startswith("{"):
                        print(f"   {line.rstrip()}", flush=True)
            if proc.returncode or not json_lines:
                errors = [line for line in other if "Error" in line] or other or [f"exit {proc.returncode}"]
                print(f"   failed (exit {proc.returncode}): {errors[-1]}", flush=True)
                results.append(dict(model=name, px=px, error=errors[-1]))
                write_outputs(args, header_lines, results)
                continue
            results.append(json.loads(json_lines[-1]))
            print(f"   {summary(results[-1], args)}", flush=True)
            write_outputs(args, header_lines, results)
    return results


def achieved(result: dict, full: bool = False) -> float:
    """Model FLOP/s of the step (truncated rollout, or the full one): the timed steps' FLOPs over their time."""
    return result["flops"]["step_full" if full else "step"] / result["step_full_s" if full else "step_s"]


def mfu(result: dict, args, full: bool = False) -> str:
    if not args.peak_tflops:
        return "-"
    return f"{100 * achieved(result, full) / (args.peak_tflops * 1e12 * result['devices']):.1f}"


def summary(r: dict, args) -> str:
    return (f"B {r['batch']}: step {r['step_s'] * 1e3:.1f} ms, {r['batch'] / r['step_s']:.2f} samples/s, "
            f"{achieved(r) / 1e12:.1f} TFLOP/s, MFU {mfu(r, args)}%, compile {r['step_compile_s']:.0f} s"
            f"{' (cached)' if r['step_cached'] else ''}")  # fmt: skip


def gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.1f}"


def table(results: list[dict], args) -> list[str]:
    head = ["model", "px", "B", "step ms", "samples/s", "TFLOP/s", "MFU %", "peak GiB (XLA / device)",
            "rollout / teacher / student / other ms", "full rollout: step ms", "samples/s", "MFU %", "trunc / full step"]  # fmt: skip
    rows = [head, ["---"] * len(head)]
    for r in results:
        if "error" in r:
            rows.append([r["model"], str(r["px"]), "-", f"failed: {r['error'][:80]}"] + [""] * (len(head) - 4))
            continue
        split = "-"
        if "rollout_s" in r:
            parts = [r["rollout_s"], r["teacher_s"], r["student_s"]]
            split = " / ".join(f"{s * 1e3:.0f}" for s in [*parts, r["step_s"] - sum(parts)])
        full = ["-", "-", "-", "-"]
        if "step_full_s" in r:
            full = [f"{r['step_full_s'] * 1e3:.1f}", f"{r['batch'] / r['step_full_s']:.2f}", mfu(r, args, full=True),
                    f"{r['step_s'] / r['step_full_s']:.2f}"]  # fmt: skip
        rows.append([r["model"], str(r["px"]), str(r["batch"]), f"{r['step_s'] * 1e3:.1f}", f"{r['batch'] / r['step_s']:.2f}",
                     f"{achieved(r) / 1e12:.1f}", mfu(r, args), f"{gib(r['step_peak_bytes'])} / {gib(r['device_peak_bytes'])}",
                     split, *full])  # fmt: skip
    return ["| " + " | ".join(row) + " |" for row in rows]


def kernel_tables(results: list[dict]) -> list[str]:
    """For each profiled configuration: its step's device time by kernel category and longest ops."""
    lines = []
    for r in (r for r in results if "kernels" in r):
        lines += ["", f"### {r['model']} at {r['px']} px, B {r['batch']}: device kernels of one step", ""]
        if r["kernels"] is None:
            lines.append(f"No device events in the trace ({jax.default_backend()} backend): nothing to split.")
            continue
        lines += kernel_profile.table(r["kernels"], achieved(r) * r["step_s"])
    return lines


def header(args, argv) -> list[str]:
    device = jax.devices()[0]
    return [
        f"device: {jax.device_count()} x {device.device_kind} ({jax.default_backend()}); jax {jax.__version__}, "
        f"flax {flax.__version__}, python {platform.python_version()}",
        f"command: python benchmarks/step_throughput.py {shlex.join(argv)}",
        f"XLA_FLAGS: {os.environ.get('XLA_FLAGS') or '(not set)'}",
        f"N {args.rollout_steps} rollout steps (shift {args.shift}), K {QUERIES} ({SAMPLER}), cfg {args.cfg_scale}, "
        f"dtype {args.dtype} (float32 params), attention {args.attention}, remat {args.remat}, cast {args.cast}, adapters {args.adapters}; "
        f"step = mean of {args.steps} after {WARMUP_STEPS} warm-up; MFU (model FLOPs, no recomputation) against {args.peak_tflops or '(no peak given)'} TFLOP/s per device",
    ]


def recount(args) -> list[str]:
    """Markdown rows of ``--recount``: each recorded step time against the FLOPs this version counts
    for it (``timed_flops``), beside the recorded figures. Runs before this counting recorded the
    median step, not the mean."""
    with open(args.recount) as f:
        results = [r for r in json.load(f) if "error" not in r]
    peak = (args.peak_tflops or float("nan")) * 1e12
    rows = ["| model | px | B | step ms (recorded) | recorded TFLOP/s | recorded MFU % | counted TFLOP/s | counted MFU % |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in results:
        choice, b = MODELS[r["model"]], r["batch"]
        counted = timed_flops(choice, r["latent"], b, args, *mesh_and_rules(choice))["step"] / r["step_s"]
        f = r["flops"]
        recorded = f["step"] / r["step_s"] if "step" in f else (f["rollout"] + f["teacher"] + f["student"]) / r["step_s"]
        rows.append(f"| {r['model']} | {r['px']} | {b} | {r['step_s'] * 1e3:.1f} | {recorded / 1e12:.1f} | "
                    f"{100 * recorded / (peak * r['devices']):.1f} | {counted / 1e12:.1f} | {100 * counted / (peak * r['devices']):.1f} |")  # fmt: skip
    return rows


def main(argv) -> None:
    args = parse_args(argv)
    if args.recount:
        print("\n".join(recount(args)))
        return
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args)), flush=True)
        return
    lines = header(args, argv)
    print("\n".join(lines), flush=True)
    results = run_all(args, argv, lines)
    print("\n" + "\n".join([*table(results, args), *kernel_tables(results)]))


def write_outputs(args, header_lines: list[str], results: list[dict]) -> None:
    """The header and table as Markdown at ``--out`` and the raw results as JSON beside it."""
    if not args.out:
        return
    with open(args.out, "w") as f:
        f.write("\n".join([*header_lines, "", *table(results, args), *kernel_tables(results)]) + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
