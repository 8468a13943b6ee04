"""``train_and_evaluate(config, workdir)``: the training loop of every method (DanceOPD and baselines).

Sections follow big_vision's ``train.py``: config check, mesh, input, models, optimizer and
state, the jitted step, checkpoint/resume, loop. Only the student is trained and checkpointed.

What a run survives (README, "What survives what"): a kill at any step (resume from the newest
readable checkpoint reproduces the uninterrupted run bit-exactly), SIGTERM or Ctrl-C (finish the
step, save, ``Preempted``; a second Ctrl-C stops at once), a corrupt newest checkpoint (fall back
to the one before), and non-finite losses (an error before anything is saved, or skipped steps
with ``skip_nonfinite_steps``).
"""

import dataclasses
import functools
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from danceopd_jax import build, checkpoints, parallel, step_numbers, training_samples
from danceopd_jax.config_validation import ConfigError, validate, with_defaults
from danceopd_jax.core.route_weights import RouteWeights
from danceopd_jax.models import backbones
from danceopd_jax.core.step import TrainState, init_train_state
from danceopd_jax.step_numbers import BoundStep


LOSS_LOG = "losses.jsonl"
ROUTER_REPORT = "router.json"  # a learned router's accuracy, label counts and confusion matrix


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def _check_layout(config: ConfigDict, mesh) -> None:
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % batch_devices:
        raise ConfigError(
            f"config.batch_size: {config.batch_size} is not divisible by data x fsdp = {batch_devices} devices"
        )
    accum = config.grad_accum_steps
    if config.batch_size % (accum * batch_devices):
        raise ConfigError(
            f"config.grad_accum_steps: {accum} microbatches of the batch of {config.batch_size} do not each split over "
            f"data x fsdp = {batch_devices} devices; use a divisor of {config.batch_size // batch_devices}"
        )
    if config.batch_size % jax.process_count():
        raise ConfigError(f"config.batch_size: {config.batch_size} is not divisible by {jax.process_count()} processes")
    grouped = len(build.step_group_sizes(config)) > 1  # raises when the route groups do not divide over the processes
    parallel.check_batch_layout(mesh.devices, grouped=grouped)


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclasses.dataclass
class _Flushed:
    """What a metric window gives at a log point."""

    last: int  # the last step in the window
    scalars: dict[str, float]  # averages over the window's steps (``skipped_steps``: their count)
    rate: float  # steps/s over the window
    mean_rate: float  # steps/s over every timed step of this process so far (the ETA's: windows with a checkpoint save are slower)
    losses: list[dict]  # per step: {"step", "loss" (None when not finite), "route" (None unless per-step routing)[, "weights"]}


class _MetricWindow:
    """Per-step device metrics kept until the next log point, then fetched in one transfer."""

    def __init__(self, route_names: list[str], per_step_routing: bool, skip_nonfinite: bool, log_weights: bool):
        self.route_names = route_names
        self.per_step_routing = per_step_routing
        self.skip_nonfinite = skip_nonfinite
        self.log_weights = log_weights  # a route schedule that changes the weights: log them per step
        self.pending: list[tuple[int, int, Any, np.ndarray]] = []  # step, route, device metrics, route weights
        self.started = time.perf_counter()
        self.untimed = 0  # pending steps before ``started`` (the compiled first step): not in the rate
        self.timed_steps, self.timed_seconds = 0, 0.0  # over every flushed window: the mean rate

    def restart_clock(self) -> None:
        """Time the window from now: the steps already pending do not count towards its rate."""
        self.started, self.untimed = time.perf_counter(), len(self.pending)

    def add(self, step: int, route: int, metrics, weights: np.ndarray) -> None:
        self.pending.append((step, route, metrics, weights))

    def _check_finite(self, step: int, route: int, metrics) -> None:
        if not np.isfinite(metrics["loss"]) or not np.isfinite(metrics["grad_norm"]):
            where = f"route {self.route_names[route]!r}" if self.per_step_routing else "the batch"
            raise FloatingPointError(
                f"non-finite loss {metrics['loss']} or grad norm {metrics['grad_norm']} at step {step} on {where}"
            )

    def flush(self) -> _Flushed:
        """The window's summary; a non-finite loss is an error naming step and route (unless the step was skipped)."""
        fetched = jax.device_get([m for _, _, m, _ in self.pending])
        sums: dict[str, list[float]] = {}
        losses, skipped = [], 0
        for (step, route, _, weights), metrics in zip(self.pending, fetched):
            loss = float(metrics["loss"])
            losses.append({"step": step, "loss": loss if np.isfinite(loss) else None,
                           "route": self.route_names[route] if self.per_step_routing else None})  # fmt: skip
            if self.log_weights:
                losses[-1]["weights"] = [round(float(w), 6) for w in weights]
            if metrics["skipped_steps"]:
                skipped += 1
                continue
            self._check_finite(step, route, metrics)
            for key in ("loss", "grad_norm", "lr"):
                sums.setdefault(key, []).append(float(metrics[key]))
            routes = [route] if self.per_step_routing else range(len(self.route_names))
            for index in routes:
                value = float(metrics["group_loss"][0 if self.per_step_routing else index])
                if np.isfinite(value):
                    sums.setdefault(f"loss/{self.route_names[index]}", []).append(value)
        now = time.perf_counter()
        timed = len(self.pending) - self.untimed
        rate = timed / max(now - self.started, 1e-9) if timed else float("nan")
        if timed:
            self.timed_steps, self.timed_seconds = self.timed_steps + timed, self.timed_seconds + now - self.started
        mean_rate = self.timed_steps / max(self.timed_seconds, 1e-9) if self.timed_steps else float("nan")
        last = self.pending[-1][0]
        scalars = {key: float(np.mean(values)) for key, values in sums.items()}
        if self.log_weights:
            scalars.update({f"route_weight/{name}": float(w) for name, w in zip(self.route_names, self.pending[-1][3])})
        self.pending, self.started, self.untimed = [], now, 0
        if self.skip_nonfinite:
            scalars["skipped_steps"] = skipped
        return _Flushed(last, scalars, rate, mean_rate, losses)


class _LossLog:
    """``WORKDIR/losses.jsonl``: one JSON line ``{"step", "loss", "route"}`` per step, from process 0.

    Written at every log point. On resume from checkpoint step S, lines of steps after S (written
    before the run was stopped) are dropped, so that every step appears once.
    """

    def __init__(self, workdir: str, resume_step: int, enabled: bool):
        self.path = os.path.join(workdir, LOSS_LOG) if enabled and jax.process_index() == 0 else None
        if self.path and os.path.exists(self.path):
            self._truncate(resume_step)

    def _truncate(self, step: int) -> None:
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if entry["step"] <= step:
                    kept.append(json.dumps(entry) + "\n")
        with open(self.path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

    def write(self, losses: list[dict]) -> None:
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(entry) + "\n" for entry in losses)


class Preempted(Exception):
    """The run got SIGTERM (or, in one process, Ctrl-C: SIGINT), saved a checkpoint at ``step`` and
    stopped; running it again resumes there."""

    def __init__(self, step: int, directory: str, signal_name: str = "SIGTERM"):
        what = "interrupted (SIGINT)" if signal_name == "SIGINT" else "preempted (SIGTERM)"
        super().__init__(f"{what}: saved a checkpoint at step {step} in {directory}; run the same command again to resume")
        self.step = step
        self.signal_name = signal_name
        self.exit_code = 130 if signal_name == "SIGINT" else 0  # a shell's code for Ctrl-C; SIGTERM: resumable, not a failure


class _Preemption:
    """SIGTERM (TPU VM maintenance, SLURM, Kubernetes) and Ctrl-C as a flag the loop reads after every step.

    One process: a Python handler sets the flag for either signal; a second Ctrl-C stops at once
    (``KeyboardInterrupt``, nothing saved); the previous handlers come back on exit. Several
    processes: JAX's preemption service (started by ``jax.distributed.initialize``) catches SIGTERM,
    and orbax's ``reached_preemption(step)`` makes every process stop at the same step; Ctrl-C keeps
    Python's default there (every process must stop at the same step, which one signal cannot ensure).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, manager):
        self.manager = manager
        self.requested = None  # the name of the signal that asked the run to stop
        self.previous = {}

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                previous = signal.getsignal(signum)  # None: a handler not set from Python
                if signum == signal.SIGINT and previous == signal.SIG_IGN:
                    continue  # started with Ctrl-C ignored (nohup, a background job of a script): keep it so
                self.previous[signum] = previous
                signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.requested == "SIGINT":
                raise KeyboardInterrupt  # the second Ctrl-C: stop now, without saving
            print("Ctrl-C: finishing this step and saving a checkpoint; press Ctrl-C again to stop without saving",
                  file=sys.stderr, flush=True)  # fmt: skip
        self.requested = self.requested or signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self.manager.reached_preemption(step)
        return self.requested is not None


@jax.jit
def _nonfinite_parts(state: TrainState) -> dict:
    """Per part of the state, whether any floating-point value in it is NaN or infinite."""

    def bad(tree):
        leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
        return functools.reduce(jnp.logical_or, [~jnp.all(jnp.isfinite(x)) for x in leaves], jnp.bool_(False))

    return {"params": bad(state.params), "opt_state": bad(state.opt_state), "ema_params": bad(state.ema_params)}


def _save_checkpoint(manager, step: int, state: TrainState, run: "Run") -> None:
    """Start an asynchronous save, after checking on device that the state is finite: a NaN is never written.

    Beside the train state go the host states: the data streams' positions and the route schedule.
    """
    bad = [name for name, flag in jax.device_get(_nonfinite_parts(state)).items() if flag]
    if bad:
        raise FloatingPointError(f"non-finite values in {', '.join(bad)} after step {step}; checkpoint not written")
    checkpoints.save(manager, step, state, {"buckets": run.batches.get_state(), "route_weights": run.route_weights.get_state()})


@dataclasses.dataclass
class Run:
    """A run's built pieces: sharded student state, frozen experts, data, and the jitted step."""

    config: ConfigDict
    mesh: Any
    rules: Any
    state: TrainState
    abstract_state: Any
    state_shardings: Any
    experts: dict[str, Any]
    batches: Any
    batch_sharding: Any
    loss_fn: Callable  # (params, experts, batch, route, key) -> per-sample loss [B], unjitted
    train_step: BoundStep  # step_fn jitted with the shardings, the train state donated, the step numbers an argument
    step_fn: BoundStep  # (state, experts, batch, route) -> (state, metrics), unjitted
    route_weights: RouteWeights  # the per-step route schedule (host state, checkpointed)
    router_report: dict | None  # a learned router's accuracy and label counts (``build.train_router``)
    student_graphdef: Any  # with ``state.params``, the student model (training samples)

    def global_batch(self, step: int, weights=None) -> tuple[int, dict]:
        """The route of ``step`` (drawn with ``weights``, default: the schedule's) and its batch as
        global arrays sharded over (data, fsdp)."""
        weights = self.route_weights.weights(step) if weights is None else weights
        route, groups = build.step_route_and_groups(self.config, step, weights)
        local = build.draw_batch(self.batches, groups)
        batch = jax.tree.map(lambda a: jax.make_array_from_process_local_data(self.batch_sharding, a), local)
        return route, batch


def setup_run(config: ConfigDict, devices=None, workdir: str | None = None) -> Run:
    """Check the config, then build mesh, data, models, sharded train state and the jitted step.

    ``workdir`` holds what a run derives once (a model folder run's prompt embeddings and image latents)."""
    # ---------------------------------------------------------------- config, mesh
    validate(config)
    mesh = parallel.make_mesh(config.mesh, devices, config.get("dcn_mesh"))  # run configs saved before dcn_mesh have none
    rules = build.axis_rules(config)
    _check_layout(config, mesh)

    # ---------------------------------------------------------------- input, router
    sources = build.bucket_sources(config)
    prompt_table = None
    if config.model_dir:  # every prompt encoded once by the folder's text encoders, or a given table
        prompt_table = build.folder_prompt_table(config, sources, workdir)
        _log(f"prompt embeddings: {len(prompt_table.prompts)} prompts in {prompt_table.where}")
        sources, latents, encoded = build.image_latents(config, sources, workdir, _log)  # every image VAE-encoded once
        if latents is not None:
            _log(f"image latents: {len(latents)} images in {latents.where} ({encoded} encoded)")
    sources = build.pooled(config, sources)
    batches = build.make_batches(config, sources, prompt_table)
    batch_sharding = parallel.batch_sharding(mesh)
    router_params, router_report = None, None
    if config.routing == "learned":
        router_params, router_report = build.train_router(config, sources[build.POOL])
        _log(f"router: {router_report['labelled']} labelled samples (per route {router_report['label_counts']}), "
             f"held-out accuracy {router_report['heldout_accuracy']:.3f} on {router_report['heldout']}")  # fmt: skip

    # ---------------------------------------------------------------- models
    expert_rules = rules if config.expert_sharding == "like_student" else parallel.replicated_rules(rules)
    if config.model_dir:  # a LoRA student and LoRA/plain experts over one shared base
        student_graphdef, student_params, experts, expert_shardings, expert_graphdefs = build.load_folder_models(
            config, mesh, rules, expert_rules
        )
        null = backbones.of(config).null_condition(prompt_table)
        experts[build.NULL_CONDITION] = parallel.replicate(null, mesh)
        expert_shardings[build.NULL_CONDITION] = jax.tree.map(lambda _: parallel.replicated(mesh), null)
    else:
        student_graphdef, student_params, _ = build.load_model(config, config.student, mesh, rules)
        experts, expert_shardings, expert_graphdefs = {}, {}, {}
    if config.method != "flow_matching" and not config.model_dir:
        for name, spec in config.experts.items():
            expert_graphdefs[name], experts[name], expert_shardings[name] = build.load_model(config, spec, mesh, expert_rules, frozen=True)

    # ---------------------------------------------------------------- optimizer, state
    numbers = step_numbers.step_numbers(config, router_params)
    _, optimizer = step_numbers.make_lr_and_optimizer(config, numbers)
    use_ema = config.optimizer.ema_decay > 0

    def init_state(params):
        return init_train_state(params, optimizer, config.seed, use_ema)

    abstract_state = jax.eval_shape(init_state, student_params)
    state_shardings = parallel.shardings_of(abstract_state, mesh, rules)
    with parallel.sharding_context(mesh, rules):
        state = jax.jit(init_state, out_shardings=state_shardings, donate_argnums=0)(student_params)

    # ---------------------------------------------------------------- the jitted step
    replicated = parallel.replicated(mesh)
    step_fn = step_numbers.make_step(config, student_graphdef, expert_graphdefs)
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_shardings, expert_shardings, batch_sharding, replicated, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    device_numbers = parallel.replicate(numbers, mesh)
    loss_fn = build.make_loss(config, student_graphdef, expert_graphdefs, device_numbers, build.rollout_sigmas(config))
    return Run(
        config, mesh, rules, state, abstract_state, state_shardings, experts, batches, batch_sharding, loss_fn,
        BoundStep(train_step, device_numbers), BoundStep(step_fn, device_numbers), build.make_route_weights(config),
        router_report, student_graphdef,
    )  # fmt: skip


def _resume(run: Run, manager, workdir: str) -> tuple[int, TrainState]:
    """``(start step, state)``: the newest readable checkpoint's, with the data iterators set to it; else 0.

    When there is a checkpoint, the freshly initialised ``run.state`` is freed before it is read and
    ``run.state`` becomes the restored state, so a resumed run never holds two train states.
    """
    if not manager.all_steps():
        return 0, run.state
    jax.tree.map(lambda a: a.delete(), run.state)
    abstract = checkpoints.abstract_like(run.abstract_state, run.state_shardings)
    step, state, host_state = checkpoints.restore_latest(manager, abstract, _warn)  # raises when none is readable
    run.state = state
    run.batches.set_state(host_state["buckets"])
    run.route_weights.set_state(host_state["route_weights"])
    _log(f"Resuming from step {step} (checkpoint in {checkpoints.checkpoint_dir(workdir)})")
    return step, state


def _progress_line(config: ConfigDict, done: int, flushed: _Flushed) -> str:
    scalars = flushed.scalars
    per_route = " ".join(f"{n}={scalars[f'loss/{n}']:.4f}" for n in config.routes if f"loss/{n}" in scalars)
    skipped = f" skipped {scalars['skipped_steps']} non-finite steps" if scalars.get("skipped_steps") else ""
    weights = " ".join(f"{n}={scalars[f'route_weight/{n}']:.2f}" for n in config.routes if f"route_weight/{n}" in scalars)
    weights = f" [weights {weights}]" if weights else ""
    speed = "first step (compile)"  # a window of the first step alone has no rate
    if np.isfinite(flushed.rate):
        eta = _format_eta((config.num_train_steps - done) / flushed.mean_rate)
        speed = f"{flushed.rate:.2f} steps/s (mean {flushed.mean_rate:.2f}) ETA {eta}"
    return (f"step {done}/{config.num_train_steps} loss {scalars.get('loss', float('nan')):.4f} [{per_route}]{weights} "
            f"grad_norm {scalars.get('grad_norm', float('nan')):.3f} lr {scalars.get('lr', float('nan')):.2e}{skipped} "
            f"{speed}")  # fmt: skip


def use_compilation_cache(config: ConfigDict, workdir: str) -> None:
    """Keep compiled programs in ``config.compilation_cache_dir`` (relative to ``workdir``), so a restart
    or another run of the same shapes loads them instead of compiling. A cache the process already has
    (``JAX_COMPILATION_CACHE_DIR``, ``jax.config``, an earlier stage of a pipeline) is kept."""
    if config.compilation_cache_dir and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, config.compilation_cache_dir))


# Keys a resumed run may change: how long, how often, where and how it is laid out, not what it trains.
RESUMABLE_CHANGES = ("num_train_steps", "log_every", "checkpoint_every", "keep_checkpoints", "compilation_cache_dir",
                     "loss_log", "sample_every", "samples_per_route", "skip_nonfinite_steps", "mesh", "dcn_mesh",
                     "logical_axis_rules", "expert_sharding", "grad_accum_steps")  # fmt: skip


def _flat(tree: dict, prefix: str = "") -> dict:
    """``{"a.b": leaf}`` of a nested dict."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_init_checkpoints(config: ConfigDict) -> None:
    """``ConfigError`` for a model with ``init='checkpoint'`` whose workdir holds no checkpoint, or holds
    the checkpoints of a model of another architecture (its ``config.json`` against the model's spec:
    ``build.architecture_changes``; restoring it failed inside orbax), before anything is built."""
    models = {"student": config.student, **{f"experts.{name}": spec for name, spec in config.experts.items()}}
    for key, spec in models.items():
        if spec.get("init") != "checkpoint":
            continue
        if checkpoints.latest_step(spec.checkpoint) is None:
            raise ConfigError(f"config.{key}.checkpoint: no checkpoints under {checkpoints.checkpoint_dir(spec.checkpoint)}")
        if os.path.isfile(os.path.join(spec.checkpoint, checkpoints.CONFIG_FILE)):  # else restore_model_params checks shapes
            changes = build.architecture_changes(config, spec, checkpoints.load_run_config(spec.checkpoint))
            if changes:
                shown = build.shown_architecture_changes(changes, "config", key, f"its {checkpoints.CONFIG_FILE}")
                raise ConfigError(f"config.{key}.checkpoint: {spec.checkpoint} holds a model of another architecture: {shown}")


def config_changes(config: ConfigDict, workdir: str) -> list[str]:
    """``config.KEY SAVED -> NOW`` for every key, outside ``RESUMABLE_CHANGES``, where ``config`` differs
    from the config of the run whose checkpoints ``workdir`` holds; empty when it holds none. Both are
    completed with the defaults of the keys they lack (``with_defaults``), so a config saved before a
    key existed differs only where ``config`` sets it to something else than its default."""
    if checkpoints.latest_step(workdir) is None or not os.path.exists(os.path.join(workdir, checkpoints.CONFIG_FILE)):
        return []
    unset = "(unset)"
    saved = _flat(with_defaults(checkpoints.load_run_config(workdir)))
    given = _flat(with_defaults(config))
    changed = sorted(key for key in saved.keys() | given.keys()
                     if key.split(".")[0] not in RESUMABLE_CHANGES and saved.get(key, unset) != given.get(key, unset))  # fmt: skip
    return [f"config.{key} {saved.get(key, unset)!r} -> {given.get(key, unset)!r}" for key in changed]


def shown_changes(changes: list[str], shown: int = 4) -> str:
    """The first ``shown`` of ``config_changes``, and how many more there are."""
    more = f" and {len(changes) - shown} more" if len(changes) > shown else ""
    return ", ".join(changes[:shown]) + more


def _check_resume(config: ConfigDict, workdir: str) -> None:
    """``ConfigError`` naming the keys where ``config`` differs from the config of the run whose
    checkpoints ``workdir`` holds (``config_changes``): a run resumes with its own config (before
    anything is built or written; before: the new config overwrote the run's ``config.json``)."""
    changes = config_changes(config, workdir)
    if changes:
        raise ConfigError(f"{workdir} holds checkpoints of a run with another config: {shown_changes(changes)}; resume it with its own "
                          f"values (only {', '.join(RESUMABLE_CHANGES[:4])}, mesh and the like may change) or use a new workdir")


def train_and_evaluate(config: ConfigDict, workdir: str) -> TrainState:
    """Train ``config`` in ``workdir``, resuming from its newest readable checkpoint; returns the final state.

    Metrics are checked at every log point and before every checkpoint, so a non-finite loss stops
    the run (``FloatingPointError`` naming step and route) before its state can be saved, unless
    ``skip_nonfinite_steps``. SIGTERM (and in one process Ctrl-C) finishes the current step, saves it
    and raises ``Preempted``.
    """
    validate(config)
    _check_init_checkpoints(config)
    _check_resume(config, workdir)
    use_compilation_cache(config, workdir)
    run = setup_run(config, workdir=workdir)
    num_params = sum(x.size for x in jax.tree.leaves(run.state.params))
    dcn = {axis: size for axis, size in config.get("dcn_mesh", {}).items() if size != 1}
    _log(f"mesh {dict(run.mesh.shape)}{f' (across the DCN: {dcn})' if dcn else ''} over {jax.device_count()} {jax.devices()[0].platform} devices, "
         f"{jax.process_count()} process(es); method {config.method}, routing {config.routing}")
    _log(f"student: {num_params:,} parameters; experts: {', '.join(run.experts) or 'none'} (frozen)")

    # ---------------------------------------------------------------- checkpoint / resume
    if jax.process_index() == 0:
        checkpoints.save_run_config(config, workdir)
        if run.router_report is not None:
            with open(os.path.join(workdir, ROUTER_REPORT), "w", encoding="utf-8") as f:
                json.dump(run.router_report, f, indent=2)
    manager = checkpoints.make_manager(workdir, config.keep_checkpoints)
    try:
        start, state = _resume(run, manager, workdir)
        if start >= config.num_train_steps:
            _log(f"Nothing to do: checkpoint step {start} >= num_train_steps {config.num_train_steps}")
            return state
        with _Preemption(manager) as preemption:
            state = _train_loop(run, state, start, manager, preemption, workdir)
    finally:
        manager.wait_until_finished()  # an asynchronous save in flight completes before the process exits
        manager.close()
    _log(f"done: step {config.num_train_steps}; checkpoints in {checkpoints.checkpoint_dir(workdir)}")
    return state


def _train_loop(run: Run, state: TrainState, start: int, manager, preemption: _Preemption, workdir: str) -> TrainState:
    """Steps ``start .. num_train_steps``: log points, loss log, checkpoints, preemption."""
    config = run.config
    from clu import metric_writers  # imports TensorFlow (2.5 s): here, so that a bad flag or config fails fast

    # TensorBoard scalars from process 0 only; progress lines are printed by ``_log``.
    writer = metric_writers.SummaryWriter(workdir) if jax.process_index() == 0 else metric_writers.MultiWriter([])
    window = _MetricWindow(
        list(config.routes), config.routing == "per_step", config.skip_nonfinite_steps, config.route_weights.schedule != "fixed"
    )
    loss_log = _LossLog(workdir, start, config.loss_log)
    examples = training_samples.route_examples(config) if config.sample_every else None
    compile_started = time.perf_counter()
    try:
        with parallel.sharding_context(run.mesh, run.rules):
            for step in range(start, config.num_train_steps):
                weights = run.route_weights.weights(step)
                route, batch = run.global_batch(step, weights)
                state, metrics = run.train_step(state, run.experts, batch, jnp.int32(route))
                run.route_weights.observe(route, metrics["loss"])  # adaptive: folds in the previous step's loss
                window.add(step + 1, route, metrics, weights)
                if step == start:
                    jax.block_until_ready(metrics)
                    _log(f"step {step + 1}: compiled and ran the first step in {time.perf_counter() - compile_started:.1f}s")
                    window.restart_clock()
                done = step + 1
                preempted = preemption.reached(done) and done < config.num_train_steps  # the last step ends anyway
                is_checkpoint = done % config.checkpoint_every == 0 or done == config.num_train_steps or preempted
                if done % config.log_every == 0 or is_checkpoint:  # always before a save: a NaN stops it here
                    flushed = window.flush()
                    if np.isfinite(flushed.rate):
                        flushed.scalars["steps_per_sec"] = flushed.rate
                    writer.write_scalars(flushed.last, flushed.scalars)
                    loss_log.write(flushed.losses)
                    _log(_progress_line(config, done, flushed))
                if examples and (done % config.sample_every == 0 or done == config.num_train_steps):
                    sampled = state.params if state.ema_params is None else state.ema_params
                    writer.write_images(done, training_samples.sample_images(config, run.student_graphdef, sampled, examples))
                if is_checkpoint:
                    _save_checkpoint(manager, done, state, run)
                if preempted:
                    manager.wait_until_finished()
                    error = Preempted(done, checkpoints.checkpoint_dir(workdir), preemption.requested or "SIGTERM")
                    _log(str(error))
                    raise error
    finally:
        writer.flush()
    return state
