"""Building blocks shared by the transformers (``dit.py``, ``mmdit.py``) and the other NNX models.

  * sharding: ``partitioned`` annotates an initialiser with logical axis names
    (``nnx.with_partitioning``, sharded eagerly only under a mesh); ``constrain`` pins an
    activation to the layout its logical names get under the active rules (MaxText's activation
    names ``ACTIVATION_AXES``; ``TOKENS``, ``HEADS`` and ``MLP_HIDDEN`` name the hot tensors);
  * ``linear``: an ``nnx.Linear`` with logical axis names on kernel and bias (LoRA wraps it);
  * pure functions: ``patchify`` / ``unpatchify``, the sinusoidal ``timestep_embedding``,
    ``layer_norm`` without affine parameters, the adaLN ``modulate``;
  * settings checked by the model configs: ``REMAT_POLICIES`` and the attention
    implementations (``check_attention``).

Without a mesh or without rules (one device, or tracing outside ``parallel.sharding_context``)
parameters are created unsharded and the activation constraints are no-ops.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd
from jax.sharding import PartitionSpec

ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed", "activation_heads", "activation_mlp")

TOKENS = ("activation_batch", "activation_length", "activation_embed")  # [B, S, D]
HEADS = ("activation_batch", "activation_length", "activation_heads", None)  # [B, S, H, Dh]
MLP_HIDDEN = ("activation_batch", "activation_length", "activation_mlp")  # [B, S, mlp]

FREQUENCY_DIM = 256  # sinusoidal timestep frequencies (DiT's TimestepEmbedder, SD3's Timesteps)

# Which activations of a block the backward pass keeps (the rest are recomputed): ``none`` keeps
# all (no remat), ``dots`` keeps the matmul outputs without batch dimensions (recomputes norms,
# softmax, activations), ``full`` keeps only the block's input (recomputes the whole block).
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}

# ``jax.nn.dot_product_attention`` implementations: XLA's (any device and dtype) or cuDNN's fused
# flash attention (NVIDIA GPUs, float16/bfloat16 compute only).
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")

XAVIER_INIT = nnx.initializers.xavier_uniform()
NORMAL_INIT = nnx.initializers.normal(0.02)
ZEROS_INIT = nnx.initializers.zeros_init()


def check_attention(owner: str, attention: str, dtype: str) -> None:
    """Raise ``ValueError`` unless ``attention`` is an implementation that runs in ``dtype``."""
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"{owner}.attention must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, got {attention!r}")
    if attention == "cudnn" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"{owner}.attention 'cudnn' needs dtype bfloat16 or float16, got {dtype!r}")


# ------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------


def attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str, key_mask: jax.Array | None = None) -> jax.Array:
    """``softmax(q k^T / sqrt(Dh)) v`` over the valid keys: q [B, T, H, Dh], k and v [B, S, H, Dh],
    ``key_mask`` bool [B, S] (None: all valid) -> [B, T, H, Dh]. ``"cudnn"`` goes through
    ``even_length_attention``, in the shapes cuDNN's fused kernel takes."""
    if implementation == "cudnn":
        return even_length_attention(q, k, v, implementation, key_mask)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def even_length_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str, key_mask: jax.Array | None = None) -> jax.Array:
    """``attention`` computed on q, k, v padded to even lengths, in cuDNN's accepted shapes.

    cuDNN's fused kernel takes only even sequence lengths when differentiated (SD3's joint
    sequence is 256 image + 333 text = 589 tokens at 256 px). An odd length is padded by one
    token, kept out of the keys and sliced off the output. Without a key mask, cuDNN's padding
    mask (``key_value_seq_lengths``) drops the pad. A key mask goes in whole, as [B, 1, T, S]:
    the only mask shape cuDNN takes.
    """
    t, s = q.shape[1], k.shape[1]
    pad = lambda y: jnp.pad(y, ((0, 0), (0, y.shape[1] % 2), (0, 0), (0, 0)))  # noqa: E731
    q, k, v = pad(q), pad(k), pad(v)
    mask = lengths = None
    if key_mask is not None:
        key_mask = jnp.pad(key_mask, ((0, 0), (0, s % 2)), constant_values=False)
        mask = jnp.broadcast_to(key_mask[:, None, None, :], (q.shape[0], 1, q.shape[1], k.shape[1]))
    elif s % 2:
        lengths = jnp.full((q.shape[0],), s, jnp.int32)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, key_value_seq_lengths=lengths, implementation=implementation)
    return out[:, :t]


def patchify(x: jax.Array, p: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], patches in row-major order, (p, p, C) inside."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, p: int, h: int, w: int, c: int) -> jax.Array:
    """Inverse of ``patchify`` for an image of ``h`` x ``w`` pixels with ``c`` channels."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def timestep_embedding(t: jax.Array, dim: int = FREQUENCY_DIM, max_period: float = 1e4):
    """Sinusoidal embedding [cos, sin] of scalar timesteps t [B] -> [B, dim] (DiT, float32)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation ``x * (1 + scale) + shift`` with per-sample shift/scale [B, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters; statistics in float32, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


# ------------------------------------------------------------------------------------------
# Sharding annotations and the annotated linear layer
# ------------------------------------------------------------------------------------------


def partitioned(init, names):
    """``init`` annotated with logical axis names; sharded eagerly only when a mesh is set."""
    eager = nnx.using_eager_sharding() and not jax.sharding.get_abstract_mesh().empty
    return nnx.with_partitioning(init, names, eager_sharding=eager)


def constrain(x: jax.Array, names: tuple) -> jax.Array:
    """``x`` pinned (``with_sharding_constraint``) to the layout the active logical axis rules give
    ``names``; a no-op without a mesh or without rules. A name the rules lack is an error."""
    if jax.sharding.get_abstract_mesh().empty or not spmd.get_logical_axis_rules():
        return x
    return jax.lax.with_sharding_constraint(x, spmd.get_pspec(PartitionSpec(*names)))


def linear(d_in, d_out, names, dtype, rngs, init=XAVIER_INIT, zero=False) -> nnx.Linear:
    """Linear with kernel axes ``names`` and bias axis ``names[1]``; ``zero`` zero-inits both."""
    return nnx.Linear(
        d_in,
        d_out,
        dtype=dtype,
        kernel_init=partitioned(ZEROS_INIT if zero else init, names),
        bias_init=partitioned(ZEROS_INIT, names[1:]),
        rngs=rngs,
    )


def rematerialised(apply: Callable, policy: str) -> Callable:
    """``apply(module, *args)`` whose activations the backward pass recomputes as
    ``REMAT_POLICIES[policy]`` says (``"none"``: ``apply`` itself).

    ``jax.checkpoint`` over the module's split state, not ``nnx.remat``: ``nnx.remat`` raises
    ``TraceContextError`` when the model is merged inside a ``lax.scan`` / ``while_loop`` body,
    as the rollout does. The module must not mutate its state (no batch statistics).
    """
    if policy == "none":
        return apply

    def run(module: nnx.Module, *args):
        graphdef, state = nnx.split(module)
        pure = lambda state, *args: apply(nnx.merge(graphdef, state), *args)  # noqa: E731
        return jax.checkpoint(pure, policy=REMAT_POLICIES[policy])(state, *args)

    return run
