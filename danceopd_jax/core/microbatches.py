"""Gradient accumulation: one optimizer step over A microbatches, drawing the whole batch's randomness.

Microbatch ``m`` of a batch of B rows holds rows ``m, m + A, m + 2A, ...`` (``split``): strided, so
that each device's contiguous shard of the batch (B / D rows, a multiple of A) holds B / (A D) rows
of every microbatch and the split moves no data between devices. A loss evaluated on a microbatch
gets its ``BatchRows`` and makes every random draw with a batch axis through ``draw``: the draw of
the whole batch, restricted to the microbatch's rows. The noise, query indices, times and routes of
every sample are therefore those of the step without accumulation, and the mean of the microbatch
gradients is that step's gradient ``(1/B) sum_b grad l_b`` up to float summation order: A changes
the step's memory, not its result.
"""

from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class BatchRows:
    """Which rows of the whole batch a microbatch holds: ``index, index + count, ...``."""

    index: jax.Array  # the microbatch, 0 <= index < count (traced inside the accumulation loop)
    count: int = flax.struct.field(pytree_node=False)  # A, the number of microbatches


def split(tree: Any, count: int) -> Any:
    """Every ``[B, ...]`` leaf as ``[A, B / A, ...]``, entry ``m`` microbatch ``m`` (strided rows)."""

    def one(a):
        if a.shape[0] % count:
            raise ValueError(f"a batch of {a.shape[0]} rows does not split into {count} microbatches")
        return jnp.swapaxes(a.reshape((a.shape[0] // count, count) + a.shape[1:]), 0, 1)

    return jax.tree.map(one, tree)


def merge(a: jax.Array) -> jax.Array:
    """Inverse of ``split`` for one ``[A, B / A, ...]`` array: the rows back in batch order."""
    return jnp.swapaxes(a, 0, 1).reshape((a.shape[0] * a.shape[1],) + a.shape[2:])


def take(a: jax.Array, rows: BatchRows) -> jax.Array:
    """The rows of the whole batch's ``a`` [B, ...] that microbatch ``rows`` holds: [B / A, ...]."""
    strided = a.reshape((a.shape[0] // rows.count, rows.count) + a.shape[1:])
    return jax.lax.dynamic_index_in_dim(strided, rows.index, axis=1, keepdims=False)


def draw(sample: Callable[[jax.Array, tuple], jax.Array], key: jax.Array, shape: tuple, rows: BatchRows | None) -> jax.Array:
    """``sample(key, shape)`` for a batch-major ``shape``; for a microbatch (``rows``), the rows it
    holds of the whole batch's draw ``sample(key, (A * shape[0],) + shape[1:])``."""
    if rows is None:
        return sample(key, tuple(shape))
    return take(sample(key, (shape[0] * rows.count,) + tuple(shape[1:])), rows)


def normal(key: jax.Array, shape: tuple, rows: BatchRows | None = None) -> jax.Array:
    """float32 standard normal noise of a batch-major ``shape`` (``draw``)."""
    return draw(lambda k, s: jax.random.normal(k, s, jnp.float32), key, shape, rows)


def group_sizes(sizes: Sequence[int], count: int) -> list[int]:
    """The route groups (``routing.split_groups``) of a microbatch of a grouped batch: ``size / A`` of
    each, since strided rows take every A-th row of every group when each group divides by A."""
    if any(size % count for size in sizes):
        raise ValueError(f"route groups {list(sizes)} do not each split into {count} microbatches")
    return [size // count for size in sizes]
