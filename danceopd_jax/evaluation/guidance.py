"""The effective guidance a model shows, measured against a reference model's CFG direction.

CFG absorption (docs/METHOD.md, "CFG field"): a student distilled from ``v_u + alpha (v_c - v_u)`` of
the anchor and sampled with CFG scale ``beta`` should behave like the anchor guided at about
``alpha * beta``. On states ``x`` of the anchor's own (unguided) rollout, with the anchor's
conditional and unconditional velocities ``a_c``, ``a_u`` and the model's guided velocity
``u = m_u + beta (m_c - m_u)``, the effective guidance is the least-squares ``gamma`` in
``u ~ a_u + gamma (a_c - a_u)``:

    gamma = sum <u - a_u, a_c - a_u> / sum ||a_c - a_u||^2

over all states, samples and pixels. The anchor itself sampled at ``beta`` gives exactly ``beta``.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from danceopd_jax.core.conditioning import unconditional
from danceopd_jax.core.fields import cfg_field, inference_field, is_guided
from danceopd_jax.core.rollout import rollout_trajectory
from danceopd_jax.core.schedule import sigma_grid


@functools.partial(jax.jit, static_argnames=("model_graph", "anchor_graph", "steps", "shift", "guided"))
def _guidance_sums(model_graph: nnx.GraphDef, model_params, anchor_graph: nnx.GraphDef, anchor_params, cond, noise, scale, *, steps, shift, guided):
    """``(numerator, denominator)`` of ``gamma``; ``scale`` is traced (one program for every scale but 1)."""
    anchor = inference_field(anchor_graph, anchor_params)
    model = cfg_field(inference_field(model_graph, model_params), scale if guided else 1.0)
    sigmas = sigma_grid(steps, shift)
    states, _ = rollout_trajectory(anchor, noise, sigmas, cond)  # [N, B, ...]

    def sums(carry, i):
        x = states[i]
        t = jnp.full((x.shape[0],), sigmas[i], jnp.float32)
        a_u = anchor(x, t, unconditional(cond))
        direction = anchor(x, t, cond) - a_u
        u = model(x, t, cond)
        return (carry[0] + jnp.vdot(u - a_u, direction), carry[1] + jnp.vdot(direction, direction)), None

    (numerator, denominator), _ = jax.lax.scan(sums, (jnp.float32(0.0), jnp.float32(0.0)), jnp.arange(steps))
    return numerator, denominator


def effective_guidance(model, anchor, cond: dict, key: jax.Array, *, image_shape, scale: float, steps: int = 16, shift: float = 1.0) -> float:
    """``gamma`` of ``model`` (``(graphdef, params)``) sampled at CFG ``scale``, in units of ``anchor``'s
    CFG direction, on the anchor's rollouts from noise under ``cond`` (a batched condition)."""
    batch = jax.tree.leaves(cond)[0].shape[0]
    noise = jax.random.normal(key, (batch,) + tuple(image_shape), jnp.float32)
    numerator, denominator = _guidance_sums(
        model[0], model[1], anchor[0], anchor[1], cond, noise, jnp.float32(scale), steps=steps, shift=float(shift), guided=is_guided(scale)
    )
    return float(numerator / denominator)
