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


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("lengths", [(5, 7), (6, 8)])
def test_cudnn_attention_gets_even_lengths_and_a_full_mask(monkeypatch, masked, lengths):
    """What cuDNN's fused kernel needs (jax's cuDNN layout checks; an H100 run raised on each):
    even T and S when differentiated, and a mask as [B, 1, T, S], not [B, 1, 1, S]. CPU has no
    cuDNN, so the call is recorded and answered by XLA."""
    t, s = lengths
    q, k, v = (jax.random.normal(jax.random.key(i), (2, n, 2, 8)) for i, n in enumerate((t, s, s)))
    mask = jnp.ones((2, s), bool).at[1, -2].set(False) if masked else None
    calls, real = [], jax.nn.dot_product_attention

    def recorded(q, k, v, *, mask=None, key_value_seq_lengths=None, implementation=None):
        calls.append((q.shape, k.shape, None if mask is None else mask.shape, key_value_seq_lengths))
        return real(q, k, v, mask=mask, key_value_seq_lengths=key_value_seq_lengths, implementation="xla")

    monkeypatch.setattr(jax.nn, "dot_product_attention", recorded)
    out = attention(q, k, v, "cudnn", mask)
    monkeypatch.undo()
    [(q_shape, k_shape, mask_shape, kv_lengths)] = calls
    assert q_shape[1] % 2 == 0 and k_shape[1] % 2 == 0
    assert mask_shape in (None, (2, 1, q_shape[1], k_shape[1]))
    if not masked and s % 2:  # the pad key is dropped by cuDNN's padding mask
        np.testing.assert_array_equal(kv_lengths, [s, s])
    np.testing.assert_allclose(out, attention(q, k, v, "xla", mask), rtol=0, atol=1e-6)
