"""Routing samples to capability fields (docs/METHOD.md step 1).

* per step (paper default, the authors' "granularity: optimizer_step"): one route for the whole
  step, drawn on the host from (seed, step) so the data pipeline can draw that route's bucket;
  the target field is chosen on device with ``lax.switch``.
* per sample: the batch is a concatenation of fixed-size route groups (sizes apportioned from
  the route weights); each group is queried against its own field.
* soft mixing (baseline): every sample's target is the weighted sum of all fields.
* learned: a classifier of the condition picks every sample's field inside the step
  (``core/router.py``); the data is one unlabelled pool of all routes' buckets.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from danceopd_jax.core.fields import Field, linear_combination

ROUTING_MODES = ("per_step", "per_sample", "soft", "learned")


def normalized_weights(weights: Sequence[float]) -> np.ndarray:
    """Route weights as probabilities; negative or all-zero weights are an error."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError("need at least one route weight")
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise ValueError(f"route weights must be finite and >= 0, got {list(weights)}")
    if w.sum() <= 0:
        raise ValueError(f"route weights are all zero: {list(weights)}")
    return w / w.sum()


def route_for_step(seed: int, step: int, weights: Sequence[float]) -> int:
    """The route of optimizer step ``step``: a draw that depends only on ``(seed, step)``."""
    rng = np.random.default_rng([seed, step])
    return int(rng.choice(len(weights), p=normalized_weights(weights)))


def group_sizes(batch_size: int, weights: Sequence[float]) -> list[int]:
    """Split ``batch_size`` samples into route groups in proportion to the weights.

    Largest-remainder apportionment: sizes sum to ``batch_size`` and each is within one sample of
    ``batch_size * w_m``; ties go to the earlier route.
    """
    share = normalized_weights(weights) * batch_size
    sizes = np.floor(share).astype(int)
    remainder_order = np.argsort(-(share - sizes), kind="stable")
    sizes[remainder_order[: batch_size - sizes.sum()]] += 1
    return sizes.tolist()


def per_step_field(fields: Sequence[Field], route: jax.Array) -> Field:
    """The field of the step's route (an int32 scalar traced into the step) via ``lax.switch``."""
    if len(fields) == 1:
        return fields[0]

    def routed(x, t, cond):
        return jax.lax.switch(route, list(fields), x, t, cond)

    return routed


def split_groups(tree, sizes: Sequence[int], blocks: int = 1) -> list:
    """Split a batch (any pytree of arrays with a leading batch axis) into its route groups.

    A batch holds ``blocks`` consecutive blocks (one per data-loading host), each the route groups
    of ``sizes`` samples in order, each sample repeated r times (sample-major, e.g. K query states
    per rollout). Group m collects its rows from every block, in batch order. Static slices only.
    """
    rows = jax.tree.leaves(tree)[0].shape[0]
    total = sum(sizes)
    repeats, rest = divmod(rows, blocks * total)
    if rest:
        raise ValueError(f"batch of {rows} rows is not a multiple of {blocks} blocks x {total} routed samples")
    bounds = np.concatenate([[0], np.cumsum(sizes)]) * repeats

    def take(a, lo, hi):
        blocked = a.reshape((blocks, total * repeats) + a.shape[1:])
        return blocked[:, lo:hi].reshape((blocks * (hi - lo),) + a.shape[1:])

    return [jax.tree.map(lambda a: take(a, lo, hi), tree) for lo, hi in zip(bounds[:-1], bounds[1:])]


def merge_groups(groups: Sequence[jax.Array], blocks: int = 1) -> jax.Array:
    """Inverse of ``split_groups`` for one array: put the groups' rows back into batch order."""
    blocked = [g.reshape((blocks, -1) + g.shape[1:]) for g in groups]
    merged = jnp.concatenate(blocked, axis=1)
    return merged.reshape((-1,) + merged.shape[2:])


def per_sample_field(fields: Sequence[Field], sizes: Sequence[int], blocks: int = 1) -> Field:
    """Group ``m`` of every block (see ``split_groups``) goes to ``fields[m]``; empty groups are skipped."""

    def routed(x, t, cond):
        groups = split_groups((x, t, cond), sizes, blocks)
        outputs = [field(*group).astype(jnp.float32) for field, group, size in zip(fields, groups, sizes) if size]
        return merge_groups(outputs, blocks)

    return routed


def soft_mixing_field(fields: Sequence[Field], weights: Sequence[float]) -> Field:
    """The soft-mixing baseline target: ``sum_m w_m v_m`` with normalised route weights."""
    return linear_combination(fields, normalized_weights(weights).tolist())
