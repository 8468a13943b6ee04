"""``train_and_evaluate(config, workdir)``: the training loop of every method (DanceOPD and baselines).

Sections follow big_vision's ``train.py``: config check, mesh, input, models, optimizer and
state, the jitted step, checkpoint/resume, loop. Only the student is trained and checkpointed.
"""

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from clu import metric_writers
from ml_collections import ConfigDict

from danceopd_jax import build, checkpoints, parallel
from danceopd_jax.config_validation import ConfigError, validate
from danceopd_jax.models.dit import LOGICAL_AXES
from danceopd_jax.core.step import TrainState, init_train_state, make_lr_schedule, make_optimizer, make_train_step


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


def _check_layout(config: ConfigDict, mesh) -> None:
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % batch_devices:
        raise ConfigError(
            f"config.batch_size: {config.batch_size} is not divisible by data x fsdp = {batch_devices} devices"
        )
    if config.batch_size % jax.process_count():
        raise ConfigError(f"config.batch_size: {config.batch_size} is not divisible by {jax.process_count()} processes")


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _MetricWindow:
    """Per-step device metrics kept until the next log point, then fetched in one transfer."""

    def __init__(self, route_names: list[str], per_step_routing: bool):
        self.route_names = route_names
        self.per_step_routing = per_step_routing
        self.pending: list[tuple[int, int, Any]] = []
        self.started = time.perf_counter()

    def add(self, step: int, route: int, metrics) -> None:
        self.pending.append((step, route, metrics))

    def flush(self) -> tuple[int, dict[str, float], float]:
        """``(last step, averaged scalars, steps/s)``; a non-finite loss is an error naming step and route."""
        fetched = jax.device_get([m for _, _, m in self.pending])
        sums: dict[str, list[float]] = {}
        for (step, route, _), metrics in zip(self.pending, fetched):
            if not np.isfinite(metrics["loss"]) or not np.isfinite(metrics["grad_norm"]):
                where = f"route {self.route_names[route]!r}" if self.per_step_routing else "the batch"
                raise FloatingPointError(
                    f"non-finite loss {metrics['loss']} or grad norm {metrics['grad_norm']} at step {step} on {where}"
                )
            for key in ("loss", "grad_norm", "lr"):
                sums.setdefault(key, []).append(float(metrics[key]))
            routes = [route] if self.per_step_routing else range(len(self.route_names))
            for index in routes:
                value = float(metrics["group_loss"][0 if self.per_step_routing else index])
                if np.isfinite(value):
                    sums.setdefault(f"loss/{self.route_names[index]}", []).append(value)
        now = time.perf_counter()
        rate = len(self.pending) / max(now - self.started, 1e-9)
        last = self.pending[-1][0]
        self.pending, self.started = [], now
        return last, {key: float(np.mean(values)) for key, values in sums.items()}, rate


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
    train_step: Callable

    def global_batch(self, step: int) -> tuple[int, dict]:
        """The route of ``step`` and its batch as global arrays sharded over (data, fsdp)."""
        route, groups = build.step_route_and_groups(self.config, step)
        local = build.draw_batch(self.batches, groups)
        batch = jax.tree.map(lambda a: jax.make_array_from_process_local_data(self.batch_sharding, a), local)
        return route, batch


def setup_run(config: ConfigDict, devices=None) -> Run:
    """Check the config, then build mesh, data, models, sharded train state and the jitted step."""
    # ---------------------------------------------------------------- config, mesh
    validate(config)
    mesh = parallel.make_mesh(config.mesh, devices)
    rules = parallel.axis_rules(config.logical_axis_rules, LOGICAL_AXES)
    _check_layout(config, mesh)

    # ---------------------------------------------------------------- input
    batches = build.make_batches(config)
    batch_sharding = parallel.batch_sharding(mesh)

    # ---------------------------------------------------------------- models
    student_graphdef, student_params, _ = build.load_model(config, config.student, mesh, rules)
    experts, expert_shardings, expert_graphdefs = {}, {}, {}
    if config.method != "flow_matching":
        for name, spec in config.experts.items():
            expert_graphdefs[name], experts[name], expert_shardings[name] = build.load_model(config, spec, mesh, rules)

    # ---------------------------------------------------------------- optimizer, state
    opt = config.optimizer
    lr_schedule = make_lr_schedule(opt.learning_rate, opt.warmup_steps, config.num_train_steps, opt.decay)
    optimizer = make_optimizer(lr_schedule, weight_decay=opt.weight_decay, grad_clip=opt.grad_clip, b1=opt.b1, b2=opt.b2)
    use_ema = opt.ema_decay > 0

    def init_state(params):
        return init_train_state(params, optimizer, config.seed, use_ema)

    abstract_state = jax.eval_shape(init_state, student_params)
    state_shardings = parallel.shardings_of(abstract_state, mesh, rules)
    with parallel.sharding_context(mesh, rules):
        state = jax.jit(init_state, out_shardings=state_shardings, donate_argnums=0)(student_params)

    # ---------------------------------------------------------------- the jitted step
    loss_fn = build.make_loss(config, student_graphdef, expert_graphdefs)
    step_fn = make_train_step(
        loss_fn,
        optimizer,
        lr_schedule,
        group_sizes=build.step_group_sizes(config),
        group_blocks=jax.process_count(),
        ema_decay=opt.ema_decay,
    )
    replicated = parallel.replicated(mesh)
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_shardings, expert_shardings, batch_sharding, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    return Run(config, mesh, rules, state, abstract_state, state_shardings, experts, batches, batch_sharding, loss_fn, train_step)


def train_and_evaluate(config: ConfigDict, workdir: str) -> TrainState:
    run = setup_run(config)
    state, batches = run.state, run.batches
    route_names = list(config.routes)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    _log(f"mesh {dict(run.mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
         f"{jax.process_count()} process(es); method {config.method}, routing {config.routing}")
    _log(f"student: {num_params:,} parameters; experts: {', '.join(run.experts) or 'none'} (frozen)")

    # ---------------------------------------------------------------- checkpoint / resume
    if jax.process_index() == 0:
        checkpoints.save_run_config(config, workdir)
    manager = checkpoints.make_manager(workdir, config.keep_checkpoints)
    start = manager.latest_step() or 0
    if start:
        abstract = checkpoints.abstract_like(run.abstract_state, run.state_shardings)
        state, data_state = checkpoints.restore(manager, start, abstract)
        batches.set_state(data_state)
        _log(f"Resuming from step {start} (checkpoint in {checkpoints.checkpoint_dir(workdir)})")
    if start >= config.num_train_steps:
        _log(f"Nothing to do: checkpoint step {start} >= num_train_steps {config.num_train_steps}")
        manager.close()
        return state

    # ---------------------------------------------------------------- loop
    # TensorBoard scalars from process 0 only; progress lines are printed by ``_log``.
    writer = metric_writers.SummaryWriter(workdir) if jax.process_index() == 0 else metric_writers.MultiWriter([])
    window = _MetricWindow(route_names, config.routing == "per_step")
    compile_started = time.perf_counter()
    with parallel.sharding_context(run.mesh, run.rules):
        for step in range(start, config.num_train_steps):
            route, batch = run.global_batch(step)
            state, metrics = run.train_step(state, run.experts, batch, jnp.int32(route))
            window.add(step + 1, route, metrics)
            if step == start:
                jax.block_until_ready(metrics)
                _log(f"step {step + 1}: compiled and ran the first step in {time.perf_counter() - compile_started:.1f}s")
                window.started = time.perf_counter()
            done = step + 1
            is_checkpoint = done % config.checkpoint_every == 0 or done == config.num_train_steps
            if done % config.log_every == 0 or is_checkpoint:
                last, scalars, rate = window.flush()
                scalars["steps_per_sec"] = rate
                writer.write_scalars(last, scalars)
                per_route = " ".join(f"{n}={scalars[f'loss/{n}']:.4f}" for n in route_names if f"loss/{n}" in scalars)
                eta = _format_eta((config.num_train_steps - done) / rate)
                _log(f"step {done}/{config.num_train_steps} loss {scalars['loss']:.4f} [{per_route}] "
                     f"grad_norm {scalars['grad_norm']:.3f} lr {scalars['lr']:.2e} {rate:.2f} steps/s ETA {eta}")
            if is_checkpoint:
                checkpoints.save(manager, done, state, batches.get_state())
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    _log(f"done: step {config.num_train_steps}; checkpoints in {checkpoints.checkpoint_dir(workdir)}")
    return state
