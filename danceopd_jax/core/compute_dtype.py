"""Parameters cast once to the dtype their layers compute in, for loops over a frozen model.

A ``flax.nnx`` ``Linear``, ``Conv`` or ``Embed`` built with ``dtype=bfloat16`` over float32
parameters (mixed precision: float32 master weights, bfloat16 matrix work) converts its kernel,
bias and embedding table to bfloat16 on every call (``promote_dtype``). Inside a rollout's Euler
loop the parameters are loop-invariant, yet XLA keeps that conversion in the loop body: every
Euler step reads the float32 parameters and writes a bfloat16 copy. ``cast_to_compute_dtype``
does the cast once, before the loop. The layer's own cast of an array that already has its
compute dtype is the identity, so the field's output is bit-for-bit the same.

Only parameters whose layer is known to cast them are touched: the direct ``nnx.Param``
attributes (kernel, bias, embedding, LoRA factors) of ``Linear``, ``Conv`` and ``Embed``
modules (and subclasses such as ``models.lora.LoRALinear``) with a ``dtype`` set and flax's
default ``promote_dtype``. Norm scales, which norms apply in float32, and any other parameter
keep their dtype. Cast only frozen uses (under ``stop_gradient``): a parameter differentiated
through several calls would otherwise have its gradient summed in the compute dtype.
"""

from typing import Hashable

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes

CASTING_LAYERS = (nnx.Linear, nnx.Conv, nnx.Embed)

Path = tuple[Hashable, ...]


def compute_dtypes(model: nnx.Module) -> dict[Path, jnp.dtype]:
    """``{state path: compute dtype}`` of every parameter its layer casts on each call."""
    casts = {}
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, CASTING_LAYERS) or node.dtype is None or node.promote_dtype is not dtypes.promote_dtype:
            continue
        for name, value in vars(node).items():
            if isinstance(value, nnx.Param) and jnp.issubdtype(value.dtype, jnp.floating) and value.dtype != node.dtype:
                casts[tuple(path) + (name,)] = jnp.dtype(node.dtype)
    return casts


def _state_path(key_path) -> Path:
    """A ``jax.tree_util`` key path into an ``nnx.State`` -> its flat-state path (the Variable's ``value`` dropped)."""
    return tuple(key.key for key in key_path if isinstance(key, jax.tree_util.DictKey))


def cast_to_compute_dtype(graphdef: nnx.GraphDef, *states: nnx.State) -> tuple[nnx.State, ...]:
    """``states`` (the parts of one model, as given to ``nnx.merge``) with each layer-cast parameter
    already in its layer's compute dtype; every other leaf unchanged."""
    casts = compute_dtypes(nnx.merge(graphdef, *states))
    if not casts:
        return states

    def cast(key_path, leaf):
        dtype = casts.get(_state_path(key_path))
        return leaf if dtype is None else leaf.astype(dtype)

    return tuple(jax.tree_util.tree_map_with_path(cast, state) for state in states)


def abstract_in_compute_dtype(graphdef: nnx.GraphDef, abstract: nnx.State, *context: nnx.State) -> nnx.State:
    """The shapes and dtypes of ``cast_to_compute_dtype(graphdef, abstract, *context)[0]``: the
    target of a frozen state read from weight files straight into its compute dtype."""
    return jax.eval_shape(lambda state, *rest: cast_to_compute_dtype(graphdef, state, *rest)[0], abstract, *context)
