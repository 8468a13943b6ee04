"""``InitKeys`` draws ``nnx.Rngs(seed)``'s keys: a model gets the same weights, bit for bit (the
time it saves: ``benchmarks/model_init.py``)."""

import jax
import numpy as np
import pytest
from flax import nnx

from danceopd_jax.models.dit import DiT, dit_config
from danceopd_jax.models.init_keys import InitKeys


@pytest.mark.parametrize("seed", [0, 7])
def test_the_key_sequence_is_nnx_rngs_params_sequence_eagerly_and_under_jit(seed):
    def keys(rngs):
        return jax.random.key_data(jax.numpy.stack([rngs.params() for _ in range(40)]))

    expected = np.asarray(keys(nnx.Rngs(seed)))
    assert len(np.unique(expected, axis=0)) == 40
    np.testing.assert_array_equal(np.asarray(keys(InitKeys(seed))), expected)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda: keys(InitKeys(seed)))()), expected)


def test_a_model_initialised_under_jit_gets_the_weights_nnx_rngs_gives_it():
    """As ``parallel.create_sharded_state`` builds a random model."""
    config = dit_config("tiny", image_size=8, channels=4, text_dim=16, use_source=True, zero_init=False)

    def weights(rngs_of):
        state = jax.jit(lambda: nnx.state(DiT(config, rngs=rngs_of(3))))()
        return [(path, np.asarray(leaf[...])) for path, leaf in nnx.to_flat_state(state)]

    expected, got = weights(nnx.Rngs), weights(InitKeys)
    assert len(expected) > 20 and [path for path, _ in got] == [path for path, _ in expected]
    for (path, a), (_, b) in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
