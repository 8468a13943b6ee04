"""Shared layer pieces (``models/layers.py``) that no single model test covers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from danceopd_jax.models.layers import attention, even_length_attention


@pytest.mark.parametrize("masked", [False, True])
def test_even_length_padding_leaves_attention_and_its_gradient_unchanged(masked):
    """The padding cuDNN needs (odd lengths -> one masked key, the extra query dropped) gives the
    same output and gradients as attention on the odd lengths; here both run on XLA."""
    kq, kk, kv, km = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (2, 5, 2, 8))  # T = 5
    k = jax.random.normal(kk, (2, 7, 2, 8))  # S = 7
    v = jax.random.normal(kv, (2, 7, 2, 8))
    mask = jax.random.bernoulli(km, 0.7, (2, 7)).at[:, 0].set(True) if masked else None

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v, "xla", mask)))

    out, padded = attention(q, k, v, "xla", mask), even_length_attention(q, k, v, "xla", mask)
    assert padded.shape == out.shape == (2, 5, 2, 8)
    np.testing.assert_allclose(padded, out, rtol=0, atol=1e-6)
    grads = [jax.grad(loss, argnums=(1, 2, 3))(fn, q, k, v) for fn in (attention, even_length_attention)]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    if masked:  # the mask is honoured: changing a masked-out value changes nothing
        hidden = int(np.argmin(np.asarray(mask[0])))
        moved = even_length_attention(q, k, v.at[0, hidden].add(10.0), "xla", mask)
        np.testing.assert_allclose(moved, padded, rtol=0, atol=1e-6)
