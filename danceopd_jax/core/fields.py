"""Velocity fields: any function ``(x, t, cond) -> v`` over the shared flow state space.

A frozen expert model is a field (``model_field``; ``inference_field`` inside loops); so are
operators on fields: the CFG field ``u + a * (c - u)`` and linear combinations
``sum_k w_k v_k`` (docs/METHOD.md, "Fields").
Plain user functions with the same signature are fields too.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from danceopd_jax.core.compute_dtype import cast_to_compute_dtype
from danceopd_jax.core.conditioning import Condition, concat_conditions, unconditional

Field = Callable[[jax.Array, jax.Array, Condition], jax.Array]


def model_field(graphdef: nnx.GraphDef, *states: nnx.State) -> Field:
    """A field evaluated by an NNX model rebuilt from its graphdef and (frozen) state pytrees.

    Several states are the parts of one model split by filters, e.g. a shared base and a LoRA
    delta (``models.lora``): M LoRA experts over one base hold the base once.
    """

    def field(x, t, cond):
        return nnx.merge(graphdef, *states)(x, t, cond)

    return field


def inference_field(graphdef: nnx.GraphDef, *states: nnx.State) -> Field:
    """``model_field`` for a loop (rollout, sampler): each layer's parameters are cast to its
    compute dtype once, here, not on every call in the loop; the same output bit for bit
    (``compute_dtype``). Not for states that are differentiated."""
    return model_field(graphdef, *cast_to_compute_dtype(graphdef, *states))


def is_guided(scale: float) -> bool:
    """Whether classifier-free guidance at ``scale`` changes the field: every scale but 1 (``cfg_field``)."""
    return float(scale) != 1.0


def cfg_field(field: Field, scale: float, null: Callable[[Condition], Condition] = unconditional) -> Field:
    """Classifier-free guidance ``v_u + scale * (v_c - v_u)`` with ``v_u = field(x, t, null(cond))``.

    Conditional and unconditional branches run as one batch of 2B. A Python ``scale == 1`` is the plain
    field; a traced ``scale`` (a jitted argument: one program for every scale of a sweep) always guides.
    """
    if not isinstance(scale, jax.Array) and not is_guided(scale):
        return field

    def guided(x, t, cond):
        batch = x.shape[0]
        both = field(
            jnp.concatenate([x, x]), jnp.concatenate([t, t]), concat_conditions([cond, null(cond)])
        )
        v_cond, v_uncond = both[:batch], both[batch:]
        return v_uncond + scale * (v_cond - v_uncond)

    return guided


def linear_combination(fields: Sequence[Field], weights: Sequence[float]) -> Field:
    """The composite field ``sum_k w_k v_k`` (also the soft-mixing target)."""
    if len(fields) != len(weights) or not fields:
        raise ValueError(f"need one weight per field, got {len(fields)} fields and {len(weights)} weights")

    def combined(x, t, cond):
        return sum(w * f(x, t, cond) for f, w in zip(fields, weights))

    return combined
