"""Deterministic (ODE Euler) student rollouts as ``lax.scan`` loops, never differentiated.

Over the grid ``sigma_0 = 1 > ... > sigma_N = 0`` the pre-step states are z_0 (pure noise) ..
z_{N-1}; each step is ``z_{i+1} = z_i + (sigma_{i+1} - sigma_i) * v(z_i, sigma_i, c)`` (docs/METHOD.md
step 2). The outputs pass through ``stop_gradient``: the rollout only generates query states.
"""

import jax
import jax.numpy as jnp

from danceopd_jax.core.conditioning import Condition
from danceopd_jax.core.fields import Field


def euler_step(field: Field, x: jax.Array, sigma: jax.Array, sigma_next: jax.Array, cond: Condition):
    """One Euler step ``x + (sigma_next - sigma) * v(x, sigma, cond)``."""
    t = jnp.full((x.shape[0],), sigma, dtype=jnp.float32)
    v = field(x, t, cond).astype(x.dtype)
    return x + (sigma_next - sigma).astype(x.dtype) * v


def rollout_query_states(
    field: Field, noise: jax.Array, sigmas: jax.Array, cond: Condition, query_indices: jax.Array, truncate: bool = True
) -> tuple[jax.Array, jax.Array]:
    """Roll ``field`` out from ``noise`` and keep the pre-step states at ``query_indices`` [B, K].

    Returns ``(states [B, K, *x.shape[1:]], times [B, K])`` with ``times = sigmas[query_indices]``.
    Only the K selected states are kept, never the whole trajectory.

    The states after the batch's last query index are never used, so with ``truncate`` the loop
    (a ``lax.while_loop``) runs ``max(query_indices)`` Euler steps and stops: the same states from
    fewer forwards (low_t indices average ~0.71 N). ``truncate=False`` runs the fixed-length
    ``lax.scan`` of N - 1 steps (z_{N-1} is the last possible query state). No gradient flows
    through either loop.
    """
    expand = (slice(None), slice(None)) + (None,) * (noise.ndim - 1)

    def keep(x, i, kept):
        return jnp.where((query_indices == i)[expand], x[:, None], kept)

    kept = keep(noise, 0, jnp.zeros(query_indices.shape + noise.shape[1:], noise.dtype))
    if truncate:

        def step(carry):
            i, x, kept = carry
            x = euler_step(field, x, sigmas[i], sigmas[i + 1], cond)
            return i + 1, x, keep(x, i + 1, kept)

        last = jnp.max(query_indices).astype(jnp.int32)
        _, _, kept = jax.lax.while_loop(lambda carry: carry[0] < last, step, (jnp.int32(0), noise, kept))
    else:

        def body(carry, i):
            x, kept = carry
            x = euler_step(field, x, sigmas[i], sigmas[i + 1], cond)
            return (x, keep(x, i + 1, kept)), None

        (_, kept), _ = jax.lax.scan(body, (noise, kept), jnp.arange(sigmas.shape[0] - 2))
    return jax.lax.stop_gradient(kept), sigmas[query_indices]


def rollout_trajectory(
    field: Field, noise: jax.Array, sigmas: jax.Array, cond: Condition
) -> tuple[jax.Array, jax.Array]:
    """All pre-step states ``[N, B, ...]`` (z_0..z_{N-1}) and the final sample z_N ``[B, ...]``."""

    def body(x, i):
        return euler_step(field, x, sigmas[i], sigmas[i + 1], cond), x

    final, states = jax.lax.scan(body, noise, jnp.arange(sigmas.shape[0] - 1))
    return jax.lax.stop_gradient(states), jax.lax.stop_gradient(final)


def sample(field: Field, noise: jax.Array, sigmas: jax.Array, cond: Condition) -> jax.Array:
    """The clean sample z_N of an Euler rollout (inference)."""

    def body(x, i):
        return euler_step(field, x, sigmas[i], sigmas[i + 1], cond), None

    final, _ = jax.lax.scan(body, noise, jnp.arange(sigmas.shape[0] - 1))
    return final
