"""The condition pytree every field and model takes, and its unconditional (CFG-null) form.

A condition is a dict of batched arrays; a model reads the keys it was built for:

  ``text``         float32 [B, L, D]  text-embedding sequence (zero where masked)
  ``text_mask``    bool    [B, L]     True for real tokens; all False = the empty prompt
  ``label``        int32   [B]        class label; ``NULL_LABEL`` (-1) = no label
  ``source``       float32 [B, H, W, C] clean source image of an edit (zeros when absent)
  ``source_mask``  bool    [B]        True where the sample has a source image

Every bucket of one run emits the same keys, so one compiled step serves all routes.
"""

from typing import Any

import jax
import jax.numpy as jnp

Condition = dict[str, Any]

NULL_LABEL = -1


def unconditional(cond: Condition) -> Condition:
    """The CFG null condition: empty prompt and no label; the edit source is kept (docs/METHOD.md, CFG field)."""
    null = dict(cond)
    if "text" in cond:
        null["text"] = jnp.zeros_like(cond["text"])
        null["text_mask"] = jnp.zeros_like(cond["text_mask"])
    if "label" in cond:
        null["label"] = jnp.full_like(cond["label"], NULL_LABEL)
    return null


def drop_condition(cond: Condition, drop: jax.Array) -> Condition:
    """Per-sample condition dropout: where ``drop`` [B] is True the sample gets the null condition."""
    null = unconditional(cond)

    def select(kept, dropped):
        mask = drop.reshape(drop.shape + (1,) * (kept.ndim - 1))
        return jnp.where(mask, dropped, kept)

    return jax.tree.map(select, cond, null)


def repeat_condition(cond: Condition, repeats: int) -> Condition:
    """Repeat every sample ``repeats`` times along the batch axis (sample-major, like ``jnp.repeat``)."""
    return jax.tree.map(lambda a: jnp.repeat(a, repeats, axis=0), cond)


def concat_conditions(conds: list[Condition]) -> Condition:
    """Concatenate conditions along the batch axis."""
    return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *conds)
