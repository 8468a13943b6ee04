"""Exact velocity fields and densities of the field world's Gaussian-mixture targets.

Convention (docs/METHOD.md step 2): ``x_t = (1 - t) x0 + t eps``, ``eps ~ N(0, I)``, velocity
``v = eps - x0``, ``t = 1`` noise, ``t = 0`` data. For a target ``x0 ~ sum_k w_k N(m_k, S_k)``
with diagonal ``S_k`` and ``a = 1 - t``, given component k the pair (x0, eps) and x_t are jointly
Gaussian:

    x_t | k ~ N(a m_k, C_k),   C_k = a^2 S_k + t^2 I,
    Cov(eps, x_t | k) = t I,   Cov(x0, x_t | k) = a S_k,

so the marginal at t is the mixture ``p_t(x) = sum_k w_k N(x; a m_k, C_k)`` and

    E[eps | x_t = x, k] = t C_k^{-1} (x - a m_k),
    E[x0 | x_t = x, k]  = m_k + a S_k C_k^{-1} (x - a m_k),
    v_k(x)  = E[eps - x0 | x_t = x, k] = (t I - a S_k) C_k^{-1} (x - a m_k) - m_k,
    v(x, t) = sum_k gamma_k(x) v_k(x),
    gamma_k(x) = softmax_k( log w_k + log N(x; a m_k, C_k) ).

Stability: the responsibilities come from a log-sum-exp (``jax.nn.softmax`` of log terms), and
``C_k >= min(S_k, 1) / 2`` on [0, 1] (every ``S_k > 0``), so nothing divides by zero. At ``t = 1``
``C_k = I``, every ``gamma_k = w_k`` and ``v = x - E[x0]``. At ``t = 0`` exactly ``C_k = S_k`` and
every ``v_k = -x``, so ``v(x, 0) = -x`` (``E[eps | x0] = 0``) whatever the responsibilities; the
formula is used as is, no special case. ``-inf`` log weights switch components off.
"""

import jax
import jax.numpy as jnp

from danceopd_jax.core.conditioning import Condition
from danceopd_jax.core.fields import Field
from danceopd_jax.fieldworld.targets import FieldWorld, components, to_layout, to_world


def marginal_log_terms(x: jax.Array, t: jax.Array, means: jax.Array, variances: jax.Array, log_weights: jax.Array):
    """``(log w_k + log N(x; a m_k, C_k) [B, K], C_k [B, K, D], x - a m_k [B, K, D])`` at times t [B]."""
    a = (1.0 - t)[:, None, None]
    covariance = a**2 * variances + jnp.square(t)[:, None, None]
    residual = x[:, None, :] - a * means
    log_normal = -0.5 * jnp.sum(jnp.square(residual) / covariance + jnp.log(2 * jnp.pi * covariance), -1)
    return log_weights + log_normal, covariance, residual


def mixture_velocity(x: jax.Array, t: jax.Array, means: jax.Array, variances: jax.Array, log_weights: jax.Array) -> jax.Array:
    """``v(x, t) = sum_k gamma_k v_k`` [B, D] (module docstring) of per-sample mixtures [B, K, D]."""
    log_terms, covariance, residual = marginal_log_terms(x, t, means, variances, log_weights)
    gamma = jax.nn.softmax(log_terms, axis=-1)
    a = (1.0 - t)[:, None, None]
    per_component = (t[:, None, None] - a * variances) / covariance * residual - means
    return jnp.einsum("bk,bkd->bd", gamma, per_component)


def mixture_log_density(x: jax.Array, t: jax.Array, means: jax.Array, variances: jax.Array, log_weights: jax.Array) -> jax.Array:
    """``log p_t(x) = logsumexp_k (log w_k + log N(x; a m_k, C_k))`` [B]; ``t = 0`` is the target's."""
    return jax.nn.logsumexp(marginal_log_terms(x, t, means, variances, log_weights)[0], axis=-1)


def exact_field(world: FieldWorld, realism: bool = False) -> Field:
    """The exact field ``(x, t, cond) -> v`` of the world's targets (``targets.components``;
    ``realism`` for the realism target), for points [B, ..., D] in the world frame.

    The flow commutes with the rotation ``Q`` (the noise is isotropic):
    ``v_world(x) = Q v_layout(Q^T x)``. jit-able; ``cond`` as in ``targets``; works under
    ``core.fields.cfg_field`` and the core's rollouts unchanged.
    """

    def field(x, t, cond: Condition):
        v = mixture_velocity(to_layout(world, x), t.astype(jnp.float32), *components(world, cond, realism))
        return to_world(world, v).reshape(x.shape)

    return field


def log_density(world: FieldWorld, x: jax.Array, t: jax.Array, cond: Condition, realism: bool = False) -> jax.Array:
    """``log p_t(x | cond)`` [B] of the noised marginal at times t [B] (``t = 0``: the exact target
    density), for world-frame points [B, ..., D]; the rotation has determinant +-1."""
    return mixture_log_density(to_layout(world, x), t.astype(jnp.float32), *components(world, cond, realism))
