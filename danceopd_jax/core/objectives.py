"""Training objectives. Each returns the float32 loss of every sample in the batch, shape [B].

``student(params, x, t, cond) -> v`` is the student's apply function; ``target`` is the routed
teacher field (see ``routing``). Batches are dicts ``{"image": x0 [B,...], "cond": {...}}``.

* ``danceopd``: K states of the student's own rollout at Beta-biased query indices,
  ``|| v_student(z_i, t_i, c) - sg(v_target(z_i, t_i, c)) ||^2`` in float32 (docs/METHOD.md steps 2-5).
* ``diffusionopd``: every rollout state, the MSE of state i weighted by ``(sigma_{i+1}-sigma_i)^2 / 2``.
* ``flowopd`` (``flowopd.flowopd_loss``): SDE rollout (noise level ``eta``); the per-step KL
  between the student's and the routed field's transition means is the (clipped, negated)
  advantage of a PPO-clipped policy-gradient objective over all N steps.
* ``offpolicy``: states ``(1 - sigma) x0 + sigma eps`` forward-noised from dataset images, no rollout.
* ``flow_matching``: conditional flow matching from data, target ``eps - x0``, with condition
  dropout so that a CFG (unconditional) branch exists.

Every objective takes ``rows``: ``None`` for a whole batch, or the ``microbatches.BatchRows`` of a
microbatch of gradient accumulation, whose random draws are then the whole batch's restricted to
its rows (``microbatches.draw``), so a sample's loss does not depend on the accumulation.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from danceopd_jax.core import microbatches
from danceopd_jax.core.conditioning import drop_condition, repeat_condition
from danceopd_jax.core.fields import Field
from danceopd_jax.core.microbatches import BatchRows
from danceopd_jax.core.rollout import rollout_query_states, rollout_trajectory
from danceopd_jax.core.schedule import QuerySampler, sample_query_indices, shift_sigma

Student = Callable[[Any, jax.Array, jax.Array, dict], jax.Array]

OBJECTIVES = ("danceopd", "diffusionopd", "flowopd", "offpolicy", "flow_matching")
FLOW_MATCHING_TIMES = ("uniform", "logit_normal")


def per_sample_mse(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over all non-batch axes, in float32."""
    err = prediction.astype(jnp.float32) - jax.lax.stop_gradient(target).astype(jnp.float32)
    return jnp.mean(jnp.square(err), axis=tuple(range(1, err.ndim)))


def frozen_student(student: Student, params) -> Field:
    """The student as a field with gradients cut at its parameters (for rollouts).

    A student with a ``frozen_field(params)`` method (``build.StudentApply``) builds the field
    itself, with its parameters prepared once for the loop (cast to their compute dtype).
    """
    frozen = jax.lax.stop_gradient(params)
    if hasattr(student, "frozen_field"):
        return student.frozen_field(frozen)
    return lambda x, t, cond: student(frozen, x, t, cond)


def _distill_states(student, params, target, states, times, cond) -> jax.Array:
    """Velocity MSE at query states [B, K, ...] -> per-sample loss [B] (mean over the K states)."""
    batch, k = times.shape
    flat_states = states.reshape((batch * k,) + states.shape[2:])
    flat_times = times.reshape(batch * k)
    flat_cond = repeat_condition(cond, k)
    teacher_v = target(flat_states, flat_times, flat_cond)
    student_v = student(params, flat_states, flat_times, flat_cond)
    return per_sample_mse(student_v, teacher_v).reshape(batch, k).mean(axis=1)


def query_indices(
    key: jax.Array, batch_size: int, num_steps: int, num_queries: int, sampler: QuerySampler, rows: BatchRows | None
) -> jax.Array:
    """``sample_query_indices`` [B, K] of a batch, or of a microbatch's rows (``microbatches.draw``)."""
    return microbatches.draw(lambda k, s: sample_query_indices(k, s[0], num_queries, num_steps, sampler), key, (batch_size,), rows)


def danceopd_query_indices(
    key: jax.Array,
    batch_size: int,
    num_steps: int,
    num_queries: int = 1,
    sampler: QuerySampler = "low_t",
    rows: BatchRows | None = None,
) -> jax.Array:
    """The query indices [B, K] that ``danceopd_loss`` draws from its ``key``: the truncated rollout
    runs ``max`` of them Euler steps (benchmarks count a step's forwards with it)."""
    _, index_key = jax.random.split(key)
    return query_indices(index_key, batch_size, num_steps, num_queries, sampler, rows)


def danceopd_loss(student, params, target, batch, key, *, sigmas, num_queries=1, sampler="low_t", truncate_rollout=True, rows=None):
    """DanceOPD: query K low-noise states of the student's own ODE rollout against the routed field.

    ``truncate_rollout=False`` runs all N - 1 Euler steps instead of stopping at the batch's last
    query index: the same loss from more forwards (``rollout.rollout_query_states``), for benchmarks.
    """
    cond = batch["cond"]
    noise_key, _ = jax.random.split(key)
    noise = microbatches.normal(noise_key, batch["image"].shape, rows)
    indices = danceopd_query_indices(key, noise.shape[0], sigmas.shape[0] - 1, num_queries, sampler, rows)
    states, times = rollout_query_states(frozen_student(student, params), noise, sigmas, cond, indices, truncate_rollout)
    return _distill_states(student, params, target, states, times, cond)


def diffusionopd_loss(student, params, target, batch, key, *, sigmas, rows=None):
    """DiffusionOPD (dense): all N rollout states, state i weighted by ``dt_i^2 / 2``; summed over i."""
    cond = batch["cond"]
    noise = microbatches.normal(key, batch["image"].shape, rows)
    trajectory, _ = rollout_trajectory(frozen_student(student, params), noise, sigmas, cond)
    num_steps, batch_size = trajectory.shape[:2]
    states = jnp.swapaxes(trajectory, 0, 1).reshape((batch_size * num_steps,) + trajectory.shape[2:])
    times = jnp.tile(sigmas[:-1], batch_size)
    flat_cond = repeat_condition(cond, num_steps)
    mse = per_sample_mse(student(params, states, times, flat_cond), target(states, times, flat_cond))
    weights = jnp.square(sigmas[1:] - sigmas[:-1]) / 2.0
    return jnp.sum(mse.reshape(batch_size, num_steps) * weights, axis=1)


def offpolicy_loss(student, params, target, batch, key, *, sigmas, num_queries=1, sampler="low_t", rows=None):
    """Off-policy distillation: teacher queried on forward-noised dataset images at grid times."""
    x0 = batch["image"].astype(jnp.float32)
    noise_key, index_key = jax.random.split(key)
    num_steps = sigmas.shape[0] - 1
    indices = query_indices(index_key, x0.shape[0], num_steps, num_queries, sampler, rows)
    times = sigmas[indices]
    noise = microbatches.normal(noise_key, (x0.shape[0], num_queries) + x0.shape[1:], rows)
    expand = times.reshape(times.shape + (1,) * (x0.ndim - 1))
    states = (1.0 - expand) * x0[:, None] + expand * noise
    return _distill_states(student, params, target, states, times, batch["cond"])


def sample_training_times(key, batch_size: int, kind: str = "logit_normal") -> jax.Array:
    """Flow-matching times ``u`` in (0, 1): ``uniform``, or ``logit_normal`` (``sigmoid(n)``,
    ``n ~ N(0, 1)``: SD3's default, Esser et al. 2024, Sec. 3.1), which puts more training on
    the middle of the path where the layout forms."""
    if kind == "uniform":
        return jax.random.uniform(key, (batch_size,), jnp.float32)
    if kind == "logit_normal":
        return jax.nn.sigmoid(jax.random.normal(key, (batch_size,), jnp.float32))
    raise ValueError(f"unknown flow-matching time sampler {kind!r}; valid: {', '.join(FLOW_MATCHING_TIMES)}")


def flow_matching_loss(student, params, batch, key, *, shift=1.0, condition_dropout=0.0, time_sampler="logit_normal", rows=None):
    """Conditional flow matching: ``|| v(x_s, s, c) - (eps - x0) ||^2``, ``x_s = (1-s) x0 + s eps``.

    ``s = shift(u)`` with ``u`` from ``sample_training_times``; the condition is dropped (null
    prompt/label, source kept) with probability ``condition_dropout`` per sample, so the model
    also learns the CFG branch.
    """
    x0 = batch["image"].astype(jnp.float32)
    noise_key, time_key, drop_key = jax.random.split(key, 3)
    noise = microbatches.normal(noise_key, x0.shape, rows)
    times = microbatches.draw(lambda k, s: sample_training_times(k, s[0], time_sampler), time_key, (x0.shape[0],), rows)
    sigma = shift_sigma(times, shift)
    expand = sigma.reshape((-1,) + (1,) * (x0.ndim - 1))
    states = (1.0 - expand) * x0 + expand * noise
    drop = microbatches.draw(lambda k, s: jax.random.bernoulli(k, condition_dropout, s), drop_key, (x0.shape[0],), rows)
    cond = drop_condition(batch["cond"], drop)
    return per_sample_mse(student(params, states, sigma, cond), noise - x0)
