"""A learned router: a light classifier from a sample's condition to the field that should teach it.

The project's source documents describe the router as "a simple classifier (e.g., learned from a
small amount of labeled data)" that "predicts which expert to use for each sample during
training". Here it reads the condition pytree (``core.conditioning``):

    features(c) = [ masked mean of c.text over real tokens ;  c.source_mask ]        (F = D + 1)
    p(m | c)    = softmax(W2 relu(W1 features(c) + b1) + b2)_m                      (an MLP)

trained by cross-entropy on a small labelled set (``train_router``), then frozen and evaluated
inside the jitted train step on every sample of an unlabelled batch (``routed_field``):

    argmax:  v*(x, t, c) = v_{argmax_m p(m|c)}(x, t, c)          (hard routing, the method)
    sample:  v*(x, t, c) = v_{m ~ p(.|c)}(x, t, c)               (hard, drawn per sample)
    soft:    v*(x, t, c) = sum_m p(m|c) v_m(x, t, c)             (the soft-mixing comparison)

Every field is evaluated on the whole batch and the per-sample choice is a weighted sum (a one-hot
weight for hard routing), so the step stays one compiled function with no host round trip; the
expert cost is M query forwards instead of one.
"""

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from danceopd_jax.core import microbatches
from danceopd_jax.core.conditioning import Condition
from danceopd_jax.core.fields import Field
from danceopd_jax.core.microbatches import BatchRows

ASSIGNMENTS = ("argmax", "sample", "soft")

RouterParams = dict[str, jax.Array]


def labelled_count(pool_size: int, label_fraction: float, heldout: int) -> int:
    """How many pool positions the router trains on: the first ``label_fraction`` of those not held out."""
    return int(label_fraction * (pool_size - heldout))


def router_features(cond: Condition) -> jax.Array:
    """``[B, D + 1]`` float32: the masked mean text embedding and the source flag (zeros where absent)."""
    parts = []
    if "text" in cond:
        mask = cond["text_mask"].astype(jnp.float32)[..., None]
        parts.append(jnp.sum(cond["text"] * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0))
    if "source_mask" in cond:
        parts.append(cond["source_mask"].astype(jnp.float32)[:, None])
    if not parts:
        raise ValueError("a learned router needs text or source conditions; this condition has neither")
    return jnp.concatenate(parts, axis=-1).astype(jnp.float32)


def init_router(key: jax.Array, num_features: int, num_routes: int, hidden: int) -> RouterParams:
    """He-initialised MLP weights (zero biases) of ``num_features -> hidden -> num_routes``."""
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (num_features, hidden)) * np.sqrt(2.0 / num_features),
        "b1": jnp.zeros((hidden,)),
        "w2": jax.random.normal(k2, (hidden, num_routes)) * np.sqrt(2.0 / hidden),
        "b2": jnp.zeros((num_routes,)),
    }


def router_logits(params: RouterParams, features: jax.Array) -> jax.Array:
    """``[B, M]`` route logits ``W2 relu(W1 f + b1) + b2``."""
    return jax.nn.relu(features @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def train_router(
    features: np.ndarray,
    labels: np.ndarray,
    num_routes: int,
    *,
    hidden: int,
    steps: int,
    learning_rate: float,
    weight_decay: float,
    seed: int,
) -> RouterParams:
    """Fit the MLP by full-batch AdamW on the mean cross-entropy of ``labels`` (ints in [0, M)).

    Features are used as they come (the hashed text embedding is already of unit scale). One
    jitted ``lax.scan`` over ``steps`` updates; a pure function of its arguments.
    """
    features = jnp.asarray(features, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    if features.ndim != 2 or labels.shape != features.shape[:1] or features.shape[0] == 0:
        raise ValueError(f"need features [N, F] and labels [N] with N >= 1, got {features.shape} and {labels.shape}")
    params = init_router(jax.random.key(seed), features.shape[1], num_routes, hidden)
    optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)

    def loss(p):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(router_logits(p, features), labels))

    @jax.jit
    def fit(p):
        def update(carry, _):
            p, opt_state = carry
            grads = jax.grad(loss)(p)
            updates, opt_state = optimizer.update(grads, opt_state, p)
            return (optax.apply_updates(p, updates), opt_state), None

        (p, _), _ = jax.lax.scan(update, (p, optimizer.init(p)), None, length=steps)
        return p

    return fit(params)


def router_accuracy(params: RouterParams, features: np.ndarray, labels: np.ndarray) -> float:
    """Share of samples whose argmax route is their label."""
    predicted = np.asarray(jnp.argmax(router_logits(params, jnp.asarray(features, jnp.float32)), axis=-1))
    return float(np.mean(predicted == np.asarray(labels)))


def route_probabilities(params: RouterParams, cond: Condition) -> jax.Array:
    """``[B, M]`` float32 ``p(m | c)`` of every sample."""
    return jax.nn.softmax(router_logits(params, router_features(cond)), axis=-1)


def route_assignment(params: RouterParams, cond: Condition, assign: str, key: jax.Array, rows: BatchRows | None = None) -> jax.Array:
    """``[B, M]`` per-sample route weights: one-hot for ``argmax`` / ``sample``, ``p(m | c)`` for ``soft``.

    ``sample`` draws ``argmax(log p + g)``, ``g`` Gumbel noise: ``jax.random.categorical``'s draw,
    written out so that a microbatch (``rows``) takes its rows of the whole batch's noise."""
    probs = route_probabilities(params, cond)
    if assign == "soft":
        return probs
    if assign == "argmax":
        choice = jnp.argmax(probs, axis=-1)
    elif assign == "sample":
        gumbel = microbatches.draw(lambda k, s: jax.random.gumbel(k, s, jnp.float32), key, probs.shape, rows)
        choice = jnp.argmax(gumbel + jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
    else:
        raise ValueError(f"unknown router assignment {assign!r}; valid: {', '.join(ASSIGNMENTS)}")
    return jax.nn.one_hot(choice, probs.shape[-1], dtype=jnp.float32)


def routed_field(
    fields: Sequence[Field], params: Any, assign: str, key: jax.Array, num_samples: int, rows: BatchRows | None = None
) -> Field:
    """``v*(x, t, c) = sum_m a_m(c) v_m(x, t, c)`` with ``a = route_assignment(...)`` (module docstring).

    The rows of ``x`` are ``num_samples`` samples, each as consecutive rows (its K query states or
    N rollout states, ``conditioning.repeat_condition``'s sample-major layout). The assignment is
    made once per sample, from its first row, and repeated over its rows: a sampled route
    (``assign="sample"``) scores all the states of one rollout against one field (docs/METHOD.md step 1).
    """
    num_routes = len(fields)

    def routed(x, t, cond):
        if x.shape[0] % num_samples:
            raise ValueError(f"routed field: {x.shape[0]} rows are not whole repeats of {num_samples} samples")
        repeats = x.shape[0] // num_samples
        first_rows = jax.tree.map(lambda a: a[::repeats], cond)
        weights = jnp.repeat(route_assignment(params, first_rows, assign, key, rows), repeats, axis=0)
        if weights.shape[-1] != num_routes:
            raise ValueError(f"router predicts {weights.shape[-1]} routes, the run has {num_routes}")
        out = 0.0
        for m, field in enumerate(fields):
            w = weights[:, m].reshape((-1,) + (1,) * (x.ndim - 1))
            out = out + w * field(x, t, cond).astype(jnp.float32)
        return out

    return routed
