"""The keys a model's initialisers draw, counted in Python instead of in an ``nnx.Rngs`` variable.

``nnx.Rngs(seed).params()`` returns ``fold_in(key(seed), n)`` for its n-th call and stores n + 1 in
a variable. Under ``nnx.eval_shape`` or ``jax.jit`` that count is a tracer, and every store asks the
tracer for its ``sharding``: jax answers with an error whose message walks the whole trace recorded
so far, so building a model abstractly took time quadratic in its number of layers (DiT-XL/2: 3.1 s
of ``eval_shape``, 80% of it in that message; a model is traced twice on random init). ``InitKeys``
hands out the same keys, bit for bit, from a Python counter: DiT-XL/2's ``eval_shape`` takes 0.3 s.

Only for building models: the layers we construct (``nnx.Linear``, ``Conv``, ``Embed``,
``LayerNorm``, ``RMSNorm``) call nothing but ``rngs.params()``; a model that keeps an RNG stream
for its forward pass (dropout) needs a real ``nnx.Rngs``.
"""

import jax


class InitKeys:
    """``nnx.Rngs(seed)``'s ``params()`` key sequence: the n-th call returns ``fold_in(key(seed), n)``."""

    def __init__(self, seed: int):
        self._key = jax.random.key(seed)
        self._count = 0

    def params(self) -> jax.Array:
        key = jax.random.fold_in(self._key, self._count)
        self._count += 1
        return key
