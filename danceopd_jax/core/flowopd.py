"""Flow-OPD baseline (docs/METHOD.md, "Baselines"): SDE rollout, teacher transition-mean KL as the
per-step advantage, PPO-clipped policy-gradient objective.

Convention as everywhere (``schedule``): ``x_sigma = (1 - sigma) x0 + sigma noise``,
``v = noise - x0``, sigma runs 1 -> 0 over ``sigmas`` [N+1], ``dt = sigma_next - sigma < 0``.

The stochastic transition of Flow-GRPO's SDE sampler, which Flow-OPD uses (noise level
``eta``, paper 0.7)::

    std   = eta * sqrt(sigma / (1 - sigma))                       ("diffusion std")
    mean  = x * (1 + std^2 / (2 sigma) * dt) + v * (1 + std^2 (1 - sigma) / (2 sigma)) * dt
    x'    ~ N(mean, (std * sqrt(-dt))^2)                          ("step std")

With ``eta = 0`` the mean is the Euler ODE step ``x + v dt``.

Per rollout step i and sample b, with ``mu_s`` / ``mu_t`` the student / routed-teacher
transition means at the same state ``x_i`` (the two Gaussians share the step std)::

    KL_i  = mean_pixels (sg(mu_s) - mu_t)^2 / (2 std_i^2)
    A_i   = sg(clip(kl_scale * KL_i, -advantage_clip, +advantage_clip))       (kl_scale = -1)
    logp  = -mean_pixels (x_{i+1} - mu_s)^2 / (2 (std_i sqrt(-dt_i))^2)      (constants dropped)
    r_i   = exp(logp - sg(logp_old))
    L_i   = max(-A_i r_i, -A_i clip(r_i, 1 - ppo_clip, 1 + ppo_clip))
    loss  = mean_i L_i                                                        -> [B]

Readings (deliberate; see ``flowopd_loss`` for details):

* ``KL_i`` is normalised by the *diffusion* std ``std_i``, not by the step std
  ``std_i sqrt(-dt_i)``: the authors' release (``danceopd/core/flowopd.py``) and Flow-GRPO's KL
  term both divide by ``2 std^2``. This is ``|dt_i|`` times the exact KL between the two
  transition Gaussians. It is a mean over pixels, not a sum, so that the clip at +-5 acts on a
  per-dimension quantity that does not grow with resolution.
* ``KL_i`` depends on the state ``x_i`` but not on the sampled ``x_{i+1}``, so
  ``E[A_i grad logp_i | x_i] = 0``: in expectation over the rollout noise this objective's
  gradient is zero (the clipped ratio is inside its range, since ``r = 1`` in value). Only its
  variance moves the student; ``tests/test_flowopd.py`` checks this property.
* Dense: every one of the N rollout steps contributes (the authors' paper configs query 16
  states of a 16-step rollout), one rollout and one update per sample.
* "Group size 16" is, in the authors' code, the number of rollouts sharing one prompt; the
  advantage is the dense per-step KL and is not group-normalised, so here the batch plays the
  group and no group normalisation is applied.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from danceopd_jax.core import microbatches
from danceopd_jax.core.conditioning import Condition, repeat_condition
from danceopd_jax.core.fields import Field
from danceopd_jax.core.microbatches import BatchRows
from danceopd_jax.core.objectives import frozen_student


@dataclasses.dataclass(frozen=True)
class FlowOPDOptions:
    """The Flow-OPD knobs (``config.flowopd``); defaults are the paper's / authors' values."""

    eta: float = 0.7  # SDE noise level
    kl_scale: float = -1.0  # advantage = kl_scale * KL
    advantage_clip: float = 5.0  # |advantage| <= advantage_clip
    ppo_clip: float = 1e-4  # ratio clipped to [1 - ppo_clip, 1 + ppo_clip]


class SDERollout(NamedTuple):
    """A stochastic student rollout, all ``[N, B, ...]``, float32, no gradient."""

    states: jax.Array  # pre-step states x_0 (pure noise) .. x_{N-1}
    next_states: jax.Array  # the sampled x_1 .. x_N
    means: jax.Array  # the student's transition means at x_0 .. x_{N-1}


def sde_std(sigma, eta: float, sigma_cap) -> jax.Array:
    """Diffusion std ``eta * sqrt(sigma / (1 - sigma))``, with the denominator's sigma capped.

    At ``sigma == 1`` the formula is infinite. As Flow-GRPO does (``sigma_max = sigmas[1]``, used
    in ``1 - sigma`` when ``sigma == 1``) and the authors' release likewise, ``1 - sigma`` becomes
    ``1 - min(sigma, sigma_cap)`` with ``sigma_cap = sigmas[1]``; the numerator keeps ``sigma``. On a
    decreasing grid this changes only the first step. ``sigma`` broadcasts (scalar or array).
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    return eta * jnp.sqrt(sigma / (1.0 - jnp.minimum(sigma, sigma_cap)))


def sde_step_std(sigma, sigma_next, eta: float, sigma_cap) -> jax.Array:
    """Std of the sampled transition, ``std * sqrt(-dt)`` with ``dt = sigma_next - sigma < 0``."""
    dt = jnp.asarray(sigma_next, jnp.float32) - jnp.asarray(sigma, jnp.float32)
    return sde_std(sigma, eta, sigma_cap) * jnp.sqrt(-dt)


def sde_transition_mean(x, v, sigma, sigma_next, eta: float, sigma_cap) -> jax.Array:
    """Mean of the SDE transition from ``x`` at ``sigma`` to ``sigma_next`` under velocity ``v``.

    ``mean = x (1 + std^2 / (2 sigma) dt) + v (1 + std^2 (1 - sigma) / (2 sigma)) dt`` with
    ``std = sde_std(sigma, eta, sigma_cap)`` and ``dt = sigma_next - sigma``; ``eta = 0`` gives
    the Euler step ``x + v dt``. ``sigma``/``sigma_next`` are scalars or broadcast against ``x``.
    Computed in float32.
    """
    x = x.astype(jnp.float32)
    v = v.astype(jnp.float32)
    sigma = jnp.asarray(sigma, jnp.float32)
    dt = jnp.asarray(sigma_next, jnp.float32) - sigma
    var = jnp.square(sde_std(sigma, eta, sigma_cap))
    return x * (1.0 + var / (2.0 * sigma) * dt) + v * (1.0 + var * (1.0 - sigma) / (2.0 * sigma)) * dt


def rollout_sde(
    field: Field, noise: jax.Array, sigmas: jax.Array, cond: Condition, key: jax.Array, eta: float, rows: BatchRows | None = None
) -> SDERollout:
    """Stochastic rollout of ``field`` from ``noise`` over ``sigmas`` as a ``lax.scan``, no gradient.

    Step i samples ``x_{i+1} = mean_i + std_i sqrt(-dt_i) * n_i``, ``n_i ~ N(0, I)`` drawn from
    ``fold_in(key, i)`` (a microbatch's ``rows`` of the whole batch's draw), with
    ``sigma_cap = sigmas[1]`` (see ``sde_std``).
    """
    sigma_cap = sigmas[1]
    batch = noise.shape[0]

    def body(x, i):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        v = field(x, jnp.full((batch,), sigma, jnp.float32), cond)
        mean = sde_transition_mean(x, v, sigma, sigma_next, eta, sigma_cap)
        step_noise = microbatches.normal(jax.random.fold_in(key, i), x.shape, rows)
        x_next = mean + sde_step_std(sigma, sigma_next, eta, sigma_cap) * step_noise
        return x_next, (x, x_next, mean)

    num_steps = sigmas.shape[0] - 1
    _, (states, next_states, means) = jax.lax.scan(body, noise.astype(jnp.float32), jnp.arange(num_steps))
    return SDERollout(*jax.lax.stop_gradient((states, next_states, means)))


def flowopd_loss(
    student,
    params,
    target: Field,
    batch: dict,
    key: jax.Array,
    *,
    sigmas: jax.Array,
    eta: float = 0.7,
    kl_scale: float = -1.0,
    advantage_clip: float = 5.0,
    ppo_clip: float = 1e-4,
    rows: BatchRows | None = None,
) -> jax.Array:
    """Flow-OPD: per-step teacher transition-mean KL as the advantage of a PPO-clipped objective.

    One SDE rollout per sample (``rollout_sde``, frozen student), then at every step i, in one
    batch of ``B * N`` rows (sample-major, as the routing fields expect):

    * the routed teacher's mean ``mu_t`` and the student's mean ``mu_s`` at ``(x_i, sigma_i, c)``;
    * ``KL_i = mean_pixels (sg(mu_s) - mu_t)^2 / (2 std_i^2)``, ``std_i`` the diffusion std
      (module docstring: the authors' normalisation, ``|dt_i|`` times the exact Gaussian KL);
    * ``A_i = sg(clip(kl_scale KL_i, -advantage_clip, advantage_clip))``;
    * ``logp_i = -mean_pixels (x_{i+1} - mu_s)^2 / (2 s_i^2)``, ``s_i = std_i sqrt(-dt_i)``, the
      log-density of the sampled ``x_{i+1}`` under the current student (constants, which cancel
      in the ratio, dropped); ``logp_old`` the same with the rollout's mean. The parameters are
      the rollout's (one update per rollout), so ``r = exp(logp - sg(logp_old)) = 1`` in value
      (up to float rounding) and only its gradient, the score, matters;
    * ``L_i = max(-A_i r_i, -A_i clip(r_i, 1 - ppo_clip, 1 + ppo_clip))``.

    Returns ``mean_i L_i``, float32 [B]; with ``r = 1`` its value is the mean clipped KL.
    "Group size" is the batch: no group normalisation (module docstring).
    """
    cond = batch["cond"]
    noise_key, sde_key = jax.random.split(key)
    noise = microbatches.normal(noise_key, batch["image"].shape, rows)
    rollout = rollout_sde(frozen_student(student, params), noise, sigmas, cond, sde_key, eta, rows)
    num_steps, batch_size = rollout.states.shape[:2]
    item_shape = rollout.states.shape[2:]

    def sample_major(a):  # [N, B, ...] -> [B, N, ...]
        return jnp.swapaxes(a, 0, 1)

    x = sample_major(rollout.states)
    flat_x = x.reshape((batch_size * num_steps,) + item_shape)
    flat_t = jnp.tile(sigmas[:-1], batch_size)
    flat_cond = repeat_condition(cond, num_steps)
    v_teacher = jax.lax.stop_gradient(target(flat_x, flat_t, flat_cond)).astype(jnp.float32)
    v_student = student(params, flat_x, flat_t, flat_cond).astype(jnp.float32)

    per_step = (1, num_steps) + (1,) * len(item_shape)  # sigma_i broadcast over [B, N, ...]
    sigma = sigmas[:-1].reshape(per_step)
    sigma_next = sigmas[1:].reshape(per_step)
    sigma_cap = sigmas[1]

    def unflat(a):
        return a.reshape((batch_size, num_steps) + item_shape)

    mu_s = sde_transition_mean(x, unflat(v_student), sigma, sigma_next, eta, sigma_cap)
    mu_t = sde_transition_mean(x, unflat(v_teacher), sigma, sigma_next, eta, sigma_cap)
    pixels = tuple(range(2, x.ndim))
    std = sde_std(sigmas[:-1], eta, sigma_cap)  # [N]
    step_std = sde_step_std(sigmas[:-1], sigmas[1:], eta, sigma_cap)  # [N]

    kl = jnp.mean(jnp.square(jax.lax.stop_gradient(mu_s) - mu_t), axis=pixels) / (2.0 * jnp.square(std))
    advantage = jax.lax.stop_gradient(jnp.clip(kl_scale * kl, -advantage_clip, advantage_clip))  # [B, N]

    x_next = sample_major(rollout.next_states)
    mu_old = sample_major(rollout.means)
    logp = -jnp.mean(jnp.square(x_next - mu_s), axis=pixels) / (2.0 * jnp.square(step_std))
    logp_old = -jnp.mean(jnp.square(x_next - mu_old), axis=pixels) / (2.0 * jnp.square(step_std))
    ratio = jnp.exp(logp - jax.lax.stop_gradient(logp_old))
    unclipped = -advantage * ratio
    clipped = -advantage * jnp.clip(ratio, 1.0 - ppo_clip, 1.0 + ppo_clip)
    return jnp.mean(jnp.maximum(unclipped, clipped), axis=1)
