"""One optimizer step as a pure function: routed objective -> grads -> optax -> new state.

``make_train_step`` returns ``step(state, experts, batch, route) -> (state, metrics)``, ready for
``jax.jit`` with shardings and a donated ``state`` (``train.setup_run``; a run builds it inside its
jitted step from the step's numbers, ``step_numbers.make_step``). Only the student's parameters are
differentiated and updated; the expert states enter as frozen inputs.
"""

import dataclasses
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import optax

from danceopd_jax.core import flowopd, microbatches, objectives, router, routing
from danceopd_jax.core.fields import Field
from danceopd_jax.core.microbatches import BatchRows
from danceopd_jax.core.schedule import QuerySampler

# (params, experts, batch, route, key[, rows=BatchRows]) -> per-sample float32 loss [B]; ``rows`` is
# passed for the microbatches of gradient accumulation only (``core/microbatches.py``)
LossFn = Callable[..., jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs from the student side; experts are never part of it."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array  # raw key data; the key of step s is fold_in(key, s) (``step_key``)


def step_key(rng: jax.Array, step) -> jax.Array:
    """The random key of train step ``step`` of a state whose raw key data is ``rng``."""
    return jax.random.fold_in(jax.random.wrap_key_data(rng), step)


def init_train_state(params, optimizer: optax.GradientTransformation, seed: int, use_ema: bool) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def make_lr_schedule(peak, warmup_steps: int, total_steps: int, decay: str) -> optax.Schedule:
    """Linear warmup to ``peak`` (a number or a traced scalar) then ``constant`` or ``cosine`` decay to 0 at ``total_steps``."""
    if decay == "constant":
        after = optax.constant_schedule(peak)
    elif decay == "cosine":
        after = optax.cosine_decay_schedule(peak, max(total_steps - warmup_steps, 1))
    else:
        raise ValueError(f"unknown lr decay {decay!r}; valid: constant, cosine")
    if warmup_steps <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), after], [warmup_steps])


def make_optimizer(
    lr_schedule: optax.Schedule, *, weight_decay: float, grad_clip: float, b1: float = 0.9, b2: float = 0.999
) -> optax.GradientTransformation:
    """AdamW after global-norm clipping; weight decay on matrices only (not biases or embeddings rows)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(lr_schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask),
    )


def make_loss_fn(
    method: str,
    student: objectives.Student,
    route_fields: Callable[[Any], Sequence[Field]],
    *,
    routing_mode: str,
    route_weights: Sequence[float],
    group_sizes: Sequence[int],
    group_blocks: int = 1,
    sigmas: jax.Array,
    num_queries: int = 1,
    sampler: QuerySampler = "low_t",
    shift: float = 1.0,
    condition_dropout: float = 0.0,
    fm_time_sampler: str = "logit_normal",
    flowopd_options: flowopd.FlowOPDOptions | None = None,
    router_params: router.RouterParams | None = None,
    router_assign: str = "argmax",
    truncate_rollout: bool = True,
) -> LossFn:
    """Bind a method, a routing mode and the expert fields into ``loss(params, experts, batch, route, key, rows=None)``.

    ``route_fields(experts)`` builds the M route fields from the frozen expert states inside the
    traced step. ``group_sizes`` are the per-sample route groups of one host's batch and
    ``group_blocks`` the number of hosts whose batches are concatenated (``routing.split_groups``);
    a microbatch of gradient accumulation (``rows``) holds ``1/A`` of every group
    (``microbatches.group_sizes``) and draws its rows of the whole batch's randomness.
    ``flowopd_options`` are read by ``method == "flowopd"`` only (default: the paper's values).
    ``routing_mode == "learned"`` routes each sample with the frozen ``router_params``
    (``router.routed_field``, assignment ``router_assign``). ``truncate_rollout=False`` makes
    ``danceopd`` roll out all N - 1 steps (``objectives.danceopd_loss``; same loss, for benchmarks).
    """
    flowopd_kwargs = dataclasses.asdict(flowopd_options or flowopd.FlowOPDOptions())
    if routing_mode == "learned" and router_params is None:
        raise ValueError("routing 'learned' needs router_params (a trained router.train_router)")

    def target_field(experts, route, key, num_samples: int, rows: BatchRows | None) -> Field:
        fields = route_fields(experts)
        if routing_mode == "per_step":
            return routing.per_step_field(fields, route)
        if routing_mode == "per_sample":
            sizes = group_sizes if rows is None else microbatches.group_sizes(group_sizes, rows.count)
            return routing.per_sample_field(fields, sizes, group_blocks)
        if routing_mode == "soft":
            return routing.soft_mixing_field(fields, route_weights)
        if routing_mode == "learned":
            return router.routed_field(fields, router_params, router_assign, jax.random.fold_in(key, 1), num_samples, rows)
        raise ValueError(f"unknown routing {routing_mode!r}; valid: {', '.join(routing.ROUTING_MODES)}")

    def loss(params, experts, batch, route, key, rows: BatchRows | None = None):
        if method == "flow_matching":
            return objectives.flow_matching_loss(
                student, params, batch, key, shift=shift, condition_dropout=condition_dropout, time_sampler=fm_time_sampler,
                rows=rows,
            )
        target = target_field(experts, route, key, batch["image"].shape[0], rows)
        if method == "danceopd":
            return objectives.danceopd_loss(
                student, params, target, batch, key, sigmas=sigmas, num_queries=num_queries, sampler=sampler,
                truncate_rollout=truncate_rollout, rows=rows,
            )
        if method == "diffusionopd":
            return objectives.diffusionopd_loss(student, params, target, batch, key, sigmas=sigmas, rows=rows)
        if method == "flowopd":
            return flowopd.flowopd_loss(student, params, target, batch, key, sigmas=sigmas, rows=rows, **flowopd_kwargs)
        if method == "offpolicy":
            return objectives.offpolicy_loss(
                student, params, target, batch, key, sigmas=sigmas, num_queries=num_queries, sampler=sampler, rows=rows
            )
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(objectives.OBJECTIVES)}")

    return loss


def group_means(per_sample: jax.Array, sizes: Sequence[int], blocks: int = 1) -> jax.Array:
    """Mean loss of each route group (NaN for an empty group); layout as in ``routing.split_groups``."""
    groups = routing.split_groups(per_sample, sizes, blocks)
    return jnp.stack([jnp.mean(group) if size else jnp.float32(jnp.nan) for group, size in zip(groups, sizes)])


def routed_means(per_sample: jax.Array, assignment: jax.Array) -> jax.Array:
    """``[M]`` mean loss of the samples a router gives each route: ``sum_b a_bm l_b / sum_b a_bm``
    (NaN for a route no sample went to); rows of ``per_sample`` may repeat each sample (K queries)."""
    weights = jnp.repeat(assignment, per_sample.shape[0] // assignment.shape[0], axis=0)
    total = jnp.sum(weights, axis=0)
    return jnp.where(total > 0, per_sample @ weights / jnp.maximum(total, 1e-30), jnp.nan)


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    *,
    group_sizes: Sequence[int],
    group_blocks: int = 1,
    ema_decay: float = 0.0,
    skip_nonfinite: bool = False,
    router_params: router.RouterParams | None = None,
    grad_accum_steps: int = 1,
):
    """``step(state, experts, batch, route) -> (new_state, metrics)``; gradients reach only ``state.params``.

    ``grad_accum_steps`` A > 1 evaluates the loss and its gradient on A microbatches of the batch in
    a ``lax.scan`` (``core/microbatches.py``) and applies their mean gradient once: the step's
    activation memory is that of B / A samples, its loss, gradient and update those of the whole
    batch (same samples, same randomness; float summation order aside).

    ``metrics["group_loss"]`` is the mean loss of each route group, or with a learned router
    (``router_params``) of the samples it routes to each field by argmax.

    ``skip_nonfinite``: a step whose loss or gradient norm is not finite keeps the old params,
    optimizer state and EMA (a ``jnp.where`` on device, no host round trip); the step counter still
    advances and ``metrics["skipped_steps"]`` is 1 for it.
    """

    def group_loss(per_sample, cond):
        if router_params is None:
            return group_means(per_sample, group_sizes, group_blocks)
        return routed_means(per_sample, router.route_assignment(router_params, cond, "argmax", None))

    def loss_and_grads(params, experts, batch, route, key):
        """``(mean loss, per-sample losses [B], mean gradient)`` of the batch, in A microbatches."""

        def mean_loss(params, batch, rows):
            microbatch = {} if rows is None else {"rows": rows}  # a loss used without accumulation need not take rows
            per_sample = loss_fn(params, experts, batch, route, key, **microbatch)
            return jnp.mean(per_sample), per_sample

        if grad_accum_steps == 1:
            (loss, per_sample), grads = jax.value_and_grad(mean_loss, has_aux=True)(params, batch, None)
            return loss, per_sample, grads

        def accumulate(grad_sum, microbatch):
            index, rows_batch = microbatch
            rows = BatchRows(index=index, count=grad_accum_steps)
            (_, per_sample), grads = jax.value_and_grad(mean_loss, has_aux=True)(params, rows_batch, rows)
            return jax.tree.map(jnp.add, grad_sum, grads), per_sample

        zeros = jax.tree.map(jnp.zeros_like, params)
        indices = jnp.arange(grad_accum_steps, dtype=jnp.int32)
        grad_sum, per_sample = jax.lax.scan(accumulate, zeros, (indices, microbatches.split(batch, grad_accum_steps)))
        per_sample = microbatches.merge(per_sample)
        return jnp.mean(per_sample), per_sample, jax.tree.map(lambda g: g / grad_accum_steps, grad_sum)

    def step(state: TrainState, experts, batch, route):
        key = step_key(state.rng, state.step)
        loss, per_sample, grads = loss_and_grads(state.params, experts, batch, route, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
        grad_norm = optax.tree.norm(grads)
        skipped = jnp.zeros((), jnp.int32)
        if skip_nonfinite:
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            old = (state.params, state.opt_state, state.ema_params)
            params, opt_state, ema = jax.tree.map(lambda n, o: jnp.where(finite, n, o), (params, opt_state, ema), old)
            skipped = (~finite).astype(jnp.int32)
        metrics = {
            "loss": loss,
            "group_loss": group_loss(per_sample, batch["cond"]),
            "grad_norm": grad_norm,
            "lr": lr_schedule(state.step),
            "skipped_steps": skipped,
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
        return new_state, metrics

    return step
