"""T5's encoder: transformers' ``T5EncoderModel`` in NNX (SD3's ``text_encoder_3``, T5 v1.1 XXL).

A port of transformers 5.23 ``models/t5/modeling_t5.py`` (Raffel et al., "Exploring the Limits
of Transfer Learning with a Unified Text-to-Text Transformer", JMLR 2020):

    h_0 = shared[ids]
    h'_l = h_{l-1} + o(attn(RMS(h_{l-1})))        logits = q k^T + bias  (no 1/sqrt(d_kv) scaling:
    h_l = h'_l + wo(ff(RMS(h'_l)))                 T5 folds it into the initialisation)
    out = RMS(h_L)

``RMS`` is T5's layer norm: ``x / sqrt(mean(x^2) + eps) * scale``, no mean subtraction, no bias,
statistics in float32. ``ff`` is ``act(wi x)`` or, for ``feed_forward_proj`` ``"gated-*"`` (T5
v1.1), ``act(wi_0 x) * (wi_1 x)``; ``"gated-gelu"`` uses the tanh approximation (transformers'
``gelu_new``). ``bias`` is the relative position bias: a table ``[num_buckets, num_heads]`` looked
up at the bidirectional log-spaced bucket of ``key - query`` (``relative_position_bucket``); only
the first layer has the table and every layer reuses its bias. An ``attention_mask`` hides padded
keys.

Parameters are float32; matmuls run in ``dtype``; attention logits (bias included), softmax and
norm statistics are float32; the output is float32.

Logical axis names (``LOGICAL_AXES``): ``vocab`` (token rows), ``embed`` (d_model), ``heads``
(num_heads * d_kv), ``mlp`` (d_ff), ``buckets`` and ``bias_heads`` (rows and columns of the
relative position bias table).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from danceopd_jax.models.init_keys import InitKeys
from danceopd_jax.models.layers import partitioned
from danceopd_jax.models.weights import param_shapes

LOGICAL_AXES = ("vocab", "embed", "heads", "mlp", "buckets", "bias_heads")

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}

_normal = nnx.initializers.normal(1.0)
_ones = nnx.initializers.ones_init()


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Shape of a T5 encoder, with transformers' ``T5Config`` names and defaults.

    ``dtype`` is the compute dtype; parameters are float32 and the output float32.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"T5Config.{name} must be >= 1, got {getattr(self, name)}")
        if self.relative_attention_num_buckets < 4 or self.relative_attention_max_distance < 1:
            raise ValueError("T5Config.relative_attention_num_buckets must be >= 4 and relative_attention_max_distance >= 1")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"T5Config.feed_forward_proj {self.feed_forward_proj!r}: activation must be one of "
                f"{', '.join(ACTIVATIONS)}, optionally prefixed by 'gated-'"
            )
        if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
            raise ValueError(f"T5Config.dtype must be a float dtype, got {self.dtype!r}")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """The FFN activation's transformers name (``"gated-gelu"`` means ``gelu_new``, as in transformers)."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.removeprefix("gated-")


_HF_KEYS = tuple(f.name for f in dataclasses.fields(T5Config) if f.name != "dtype")


def config_from_hf(d: dict, **overrides) -> T5Config:
    """A ``T5Config`` from a transformers ``config.json`` dict (plus e.g. ``dtype``).

    Keys that only concern training or the decoder are ignored. A ``model_type`` other than
    ``t5``, ``is_decoder`` true or an unsupported ``feed_forward_proj`` raise a ``ValueError``
    naming the key.
    """
    if d.get("model_type", "t5") != "t5":
        raise ValueError(f"config.json: model_type {d['model_type']!r} is not T5 (t5)")
    if d.get("is_decoder", False):
        raise ValueError("config.json: is_decoder is true; only T5's encoder is supported")
    try:
        return T5Config(**{**{k: d[k] for k in _HF_KEYS if d.get(k) is not None}, **overrides})
    except ValueError as e:
        raise ValueError(f"config.json: {e}") from None


def relative_position_bucket(relative_position: np.ndarray, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's bidirectional bucket of ``key - query`` offsets (transformers' ``_relative_position_bucket``).

    Half the buckets per direction; within a direction, offsets below ``num_buckets / 4`` get
    their own bucket and larger ones log-spaced buckets up to ``max_distance`` (clipped).
    Computed on the host in float32 like the reference, so bucket edges agree exactly.
    """
    half = num_buckets // 2
    bucket = (relative_position > 0).astype(np.int64) * half
    n = np.abs(relative_position)
    max_exact = half // 2
    ratio = np.maximum(n, max_exact).astype(np.float32) / np.float32(max_exact)  # the max only avoids log(0)
    log_ratio = np.log(ratio) / np.float32(math.log(max_distance / max_exact))
    large = np.minimum(max_exact + (log_ratio * np.float32(half - max_exact)).astype(np.int64), half - 1)
    return bucket + np.where(n < max_exact, n, large)


def _linear(d_in, d_out, names, dtype, rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, kernel_init=partitioned(_normal, names), rngs=rngs)


def _rms_norm(config: T5Config, rngs: nnx.Rngs) -> nnx.RMSNorm:
    """T5LayerNorm: RMS normalisation with float32 statistics, result in the compute dtype."""
    return nnx.RMSNorm(
        config.d_model,
        epsilon=config.layer_norm_epsilon,
        dtype=jnp.dtype(config.dtype),
        scale_init=partitioned(_ones, ("embed",)),
        rngs=rngs,
    )


class T5Block(nnx.Module):
    """One encoder layer: pre-RMS-norm self-attention with an additive bias, then the FFN."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        d, inner, dt = config.d_model, config.num_heads * config.d_kv, jnp.dtype(config.dtype)
        self.num_heads, self.d_kv, self.is_gated = config.num_heads, config.d_kv, config.is_gated
        self.act = ACTIVATIONS[config.activation]
        self.attention_norm = _rms_norm(config, rngs)
        self.q = _linear(d, inner, ("embed", "heads"), dt, rngs)
        self.k = _linear(d, inner, ("embed", "heads"), dt, rngs)
        self.v = _linear(d, inner, ("embed", "heads"), dt, rngs)
        self.o = _linear(inner, d, ("heads", "embed"), dt, rngs)
        self.ff_norm = _rms_norm(config, rngs)
        if config.is_gated:
            self.wi_0 = _linear(d, config.d_ff, ("embed", "mlp"), dt, rngs)
            self.wi_1 = _linear(d, config.d_ff, ("embed", "mlp"), dt, rngs)
        else:
            self.wi = _linear(d, config.d_ff, ("embed", "mlp"), dt, rngs)
        self.wo = _linear(config.d_ff, d, ("mlp", "embed"), dt, rngs)

    def __call__(self, x: jax.Array, bias: jax.Array, key_mask: jax.Array) -> jax.Array:
        """x [B, S, D], bias float32 [1, H, S, S], key_mask bool [B, S]."""
        x = x + self.attention(self.attention_norm(x), bias, key_mask)
        h = self.ff_norm(x)
        h = self.act(self.wi_0(h)) * self.wi_1(h) if self.is_gated else self.act(self.wi(h))
        return x + self.wo(h)

    def attention(self, x: jax.Array, bias: jax.Array, key_mask: jax.Array) -> jax.Array:
        b, s, _ = x.shape
        heads = lambda y: y.reshape(b, s, self.num_heads, self.d_kv)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.o(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, s, self.num_heads * self.d_kv))


class T5EncoderModel(nnx.Module):
    """T5 encoder stack (transformers' ``T5EncoderModel``): ids -> final hidden states."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        dt = jnp.dtype(config.dtype)
        self.shared = nnx.Embed(
            config.vocab_size, config.d_model, dtype=dt,
            embedding_init=partitioned(_normal, ("vocab", "embed")), rngs=rngs,
        )
        self.relative_attention_bias = nnx.Embed(
            config.relative_attention_num_buckets, config.num_heads,
            embedding_init=partitioned(_normal, ("buckets", "bias_heads")), rngs=rngs,
        )
        self.block = nnx.List([T5Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_layer_norm = _rms_norm(config, rngs)

    def position_bias(self, length: int) -> jax.Array:
        """float32 [1, num_heads, length, length]: the learned bias at each (query, key) bucket."""
        positions = np.arange(length)
        buckets = relative_position_bucket(
            positions[None, :] - positions[:, None],
            self.config.relative_attention_num_buckets,
            self.config.relative_attention_max_distance,
        )
        return self.relative_attention_bias(jnp.asarray(buckets)).transpose(2, 0, 1)[None]

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids int [B, S]; attention_mask [B, S] 1 = real token -> last hidden state float32 [B, S, d_model]."""
        key_mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        bias = self.position_bias(input_ids.shape[1])
        h = self.shared(input_ids)
        for block in self.block:
            h = block(h, bias, key_mask)
        return self.final_layer_norm(h).astype(jnp.float32)


# Older transformers saved the tied embedding twice; the encoder's copy is the same tensor.
IGNORED_TORCH_KEYS = (r"encoder\.embed_tokens\.weight",)

_BLOCK_TORCH_NAMES = {
    "attention_norm": "layer.0.layer_norm",
    "q": "layer.0.SelfAttention.q",
    "k": "layer.0.SelfAttention.k",
    "v": "layer.0.SelfAttention.v",
    "o": "layer.0.SelfAttention.o",
    "ff_norm": "layer.1.layer_norm",
    "wi": "layer.1.DenseReluDense.wi",
    "wi_0": "layer.1.DenseReluDense.wi_0",
    "wi_1": "layer.1.DenseReluDense.wi_1",
    "wo": "layer.1.DenseReluDense.wo",
}


def torch_names(config: T5Config) -> dict[str, str]:
    """``{NNX param path: transformers state-dict key}`` of ``T5EncoderModel`` (all leaves are torch ``weight``s).

    Load with ``ignore=IGNORED_TORCH_KEYS``.
    """
    abstract = nnx.split(nnx.eval_shape(lambda: T5EncoderModel(config, rngs=InitKeys(0))))[1]
    names = {}
    for path in param_shapes(abstract):
        parts = path.split(".")
        if parts[0] == "block":
            _, index, module, _ = parts
            names[path] = f"encoder.block.{index}.{_BLOCK_TORCH_NAMES[module]}.weight"
        elif parts[0] == "relative_attention_bias":
            names[path] = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        elif parts[0] == "final_layer_norm":
            names[path] = "encoder.final_layer_norm.weight"
        else:
            names[path] = "shared.weight"
    return names
