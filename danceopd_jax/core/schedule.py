"""Sigma grids for the rollout and the samplers that pick which rollout states are queried.

Convention (docs/METHOD.md, step 2): ``x_sigma = (1 - sigma) * x0 + sigma * noise``, velocity
``v = noise - x0``, sigma runs 1 -> 0 over the grid, Euler step ``x <- x + (sigma_next - sigma) v``.
"""

import jax
import jax.numpy as jnp

QUERY_SAMPLERS = ("low_t", "mid_t", "high_t", "uniform", "stratified")
QuerySampler = str | jax.Array  # a name of QUERY_SAMPLERS, or the (a, b) of a Beta sampler as an array

# Beta(a, b) parameters of the query-time samplers (docs/METHOD.md step 3). u near 1 = low noise.
_BETA_PARAMS = {"low_t": (5.0, 2.0), "mid_t": (5.0, 5.0), "high_t": (2.0, 5.0)}


def shift_sigma(sigma: jax.Array, shift: float) -> jax.Array:
    """SD3 timestep shift ``sigma' = s * sigma / (1 + (s - 1) * sigma)``; ``shift == 1`` is the identity."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


SIGMA_SCHEDULES = ("uniform", "flow_match_euler")
FLOW_MATCH_TRAIN_TIMESTEPS = 1000  # SD3 / SD3.5 schedulers' num_train_timesteps


def sigma_grid(num_steps: int, shift: float = 1.0, schedule: str = "uniform") -> jax.Array:
    """The ``num_steps + 1`` sigmas of an Euler rollout, from 1 (pure noise) to 0 (clean), float32.

    ``uniform``: ``shift(linspace(1, 0, N + 1))``, the SD3 shift of a uniform grid (docs/METHOD.md step 2).

    ``flow_match_euler``: the grid of diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(N)``
    (static shift, ``T = 1000`` training timesteps), which SD3 pipelines sample on and the authors'
    release rolls its SD3.5 student out on: ``shift(linspace(1, sigma_min, N))`` followed by 0,
    where ``sigma_min = shift(1 / T)`` is the shifted end of the training grid (so it is shifted
    twice, as diffusers does). Its last non-zero sigma is small (0.0089 for N = 16, shift 3),
    where the uniform grid's is ``shift(1 / N)`` (0.167).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if schedule == "uniform":
        return shift_sigma(jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32), shift)
    if schedule == "flow_match_euler":
        sigma_min = shift_sigma(1.0 / FLOW_MATCH_TRAIN_TIMESTEPS, shift)
        sigmas = shift_sigma(jnp.linspace(1.0, sigma_min, num_steps, dtype=jnp.float32), shift)
        return jnp.append(sigmas, jnp.zeros((1,), jnp.float32))
    raise ValueError(f"unknown sigma schedule {schedule!r}; valid: {', '.join(SIGMA_SCHEDULES)}")


def beta_parameters(kind: str) -> tuple[float, float] | None:
    """The ``(a, b)`` of a Beta query sampler (``low_t``, ``mid_t``, ``high_t``); None for the others."""
    return _BETA_PARAMS.get(kind)


def sample_query_fractions(key: jax.Array, shape: tuple[int, ...], kind: QuerySampler) -> jax.Array:
    """Fractions ``u`` in [0, 1) of the trajectory to query; the last axis of ``shape`` holds K states.

    ``kind`` is a sampler name or the ``(a, b)`` of a Beta distribution (an array: a step argument,
    so that Beta samplers share one program): ``low_t`` Beta(5,2) (default), ``mid_t`` Beta(5,5),
    ``high_t`` Beta(2,5), ``uniform`` U(0,1), ``stratified`` one uniform draw in each of the K
    strata ``[j/K, (j+1)/K)``.
    """
    if isinstance(kind, str) and kind in _BETA_PARAMS:
        kind = _BETA_PARAMS[kind]
    if not isinstance(kind, str):
        return jax.random.beta(key, kind[0], kind[1], shape, dtype=jnp.float32)
    if kind == "uniform":
        return jax.random.uniform(key, shape, dtype=jnp.float32)
    if kind == "stratified":
        k = shape[-1]
        offsets = jnp.arange(k, dtype=jnp.float32)
        return (offsets + jax.random.uniform(key, shape, dtype=jnp.float32)) / k
    raise ValueError(f"unknown query sampler {kind!r}; valid: {', '.join(QUERY_SAMPLERS)}")


def sample_query_indices(key: jax.Array, batch_size: int, num_states: int, num_steps: int, kind: QuerySampler = "low_t") -> jax.Array:
    """Indices int32 [B, K] into the pre-step states z_0..z_{N-1}: ``i = clamp(int(u * N), 0, N - 1)``
    with ``u`` from ``sample_query_fractions(kind)``.

    z_0 is pure noise and z_{N-1} the last pre-step state; the final clean sample is never queried.
    """
    u = sample_query_fractions(key, (batch_size, num_states), kind)
    return jnp.clip(jnp.floor(u * num_steps).astype(jnp.int32), 0, num_steps - 1)
