"""Qwen3's decoder as Z-Image's text encoder: transformers' ``Qwen3Model`` ``hidden_states[-2]`` in NNX.

A port of transformers 5.25 ``models/qwen3/modeling_qwen3.py`` (Qwen Team, "Qwen3 Technical
Report", 2025), the ``text_encoder/`` (Qwen3-4B) of Z-Image. Each decoder layer is pre-norm:

    h' = h + o(attn(RMS(h)))            attn: causal GQA over RoPE-rotated, per-head RMS-normed q, k
    h  = h' + down(silu(gate(RMS(h'))) * up(RMS(h')))

``RMS`` is ``x / sqrt(mean(x^2) + eps) * weight`` with float32 statistics (``Qwen3RMSNorm``);
``q_norm`` and ``k_norm`` apply it over ``head_dim`` of each head, before RoPE. Attention logits
are scaled by ``head_dim ** -0.5``; ``num_key_value_heads`` k/v heads each serve
``num_attention_heads / num_key_value_heads`` consecutive query heads (``repeat_kv``). RoPE is
the default type (Su et al., "RoFormer", 2021, in transformers' rotate-half layout): the
frequencies ``rope_theta ** (-2i / head_dim)`` for i < head_dim / 2, each used for two halves of
the head (``cos`` and ``sin`` of ``position * frequency`` concatenated twice).

What is computed is ``hidden_states[-2]`` only, the tensor Z-Image's pipelines read: transformers'
``output_hidden_states`` are the embeddings, then the outputs of layers 0 .. n-2, then the final
``norm`` of layer n-1's output (``utils/output_capturing.py`` replaces the last layer's output by
``last_hidden_state``), so ``hidden_states[-2]`` is the output of layer n-2, the input of the last
layer (the embeddings for a one-layer model). The last layer and the final norm are therefore not
built: ``torch_names`` does not map them and the loader skips their tensors.

Several sequences may share one row (``segment_ids``): a token attends to the tokens before it in
its own segment, and its RoPE position counts from its segment's first token, which is exactly
what encoding each segment as its own sequence gives. With a 0/1 attention mask as the segment
ids this is transformers' causal mask combined with a right-padding mask, on the valid tokens.

Parameters are float32; matmuls run in ``dtype``; norm statistics, RoPE, attention logits and
softmax are float32; the output is float32.

Logical axis names (``LOGICAL_AXES``): ``vocab`` (token rows), ``embed`` (hidden_size),
``heads`` (num_attention_heads * head_dim), ``kv_heads`` (num_key_value_heads * head_dim),
``mlp`` (intermediate_size), ``norm`` (head_dim of q_norm and k_norm).
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from danceopd_jax.models.init_keys import InitKeys
from danceopd_jax.models.layers import partitioned
from danceopd_jax.models.weights import TensorSource, load_module, open_safetensors, param_shapes

LOGICAL_AXES = ("vocab", "embed", "heads", "kv_heads", "mlp", "norm")

_normal = nnx.initializers.normal(0.02)
_ones = nnx.initializers.ones_init()


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Shape of a Qwen3 decoder, with transformers' ``Qwen3Config`` names and defaults.

    ``rope_theta`` is ``rope_parameters["rope_theta"]`` of transformers 5 (``rope_theta`` of
    older configs). ``dtype`` is the compute dtype; parameters are float32 and the output float32.
    """

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"Qwen3Config.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Qwen3Config.num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"Qwen3Config.head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
            raise ValueError(f"Qwen3Config.dtype must be a float dtype, got {self.dtype!r}")


_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps")


def config_from_hf(d: dict, **overrides) -> Qwen3Config:
    """A ``Qwen3Config`` from a transformers ``config.json`` dict (plus e.g. ``dtype``).

    RoPE comes from ``rope_parameters`` (transformers 5) or ``rope_scaling`` (older), with
    ``rope_theta`` inside it or beside it (default 10000), as transformers' ``RotaryEmbeddingConfigMixin``
    reads them. Keys that only concern training, generation or the LM head are ignored. A
    ``model_type`` other than ``qwen3``, a RoPE type other than ``default``, sliding-window layers,
    ``attention_bias`` true or a ``hidden_act`` other than ``silu`` raise a ``ValueError`` naming the key.
    """
    if d.get("model_type", "qwen3") != "qwen3":
        raise ValueError(f"config.json: model_type {d['model_type']!r} is not Qwen3 (qwen3)")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"config.json: RoPE type {rope_type!r} is not supported (only the default RoPE)")
    if d.get("use_sliding_window") or any(t != "full_attention" for t in d.get("layer_types") or ()):
        raise ValueError("config.json: sliding-window attention (use_sliding_window, layer_types) is not supported")
    if d.get("attention_bias"):
        raise ValueError("config.json: attention_bias is true; Qwen3's projections without bias are supported")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {d['hidden_act']!r} is not supported (silu)")
    values = {k: d[k] for k in _HF_KEYS if d.get(k) is not None}
    if "num_key_value_heads" in d and d["num_key_value_heads"] is None:  # transformers: None means MHA
        values["num_key_value_heads"] = d.get("num_attention_heads", Qwen3Config.num_attention_heads)
    values["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", Qwen3Config.rope_theta)))
    try:
        return Qwen3Config(**{**values, **overrides})
    except ValueError as e:
        raise ValueError(f"config.json: {e}") from None


def runs_and_positions(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int32 [B, S] twice: the index of each token's run of equal ``segment_ids`` along its row, and
    its position from the first token of that run."""
    index = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return jnp.cumsum(starts, axis=1, dtype=jnp.int32), index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """float32 [B, S, head_dim] cos and sin of ``position * theta ** (-2i / head_dim)``, each frequency
    twice (transformers' ``compute_default_rope_parameters`` and ``Qwen3RotaryEmbedding``)."""
    inv_freq = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x * cos + rotate_half(x) * sin`` in float32 for x [B, S, H, Dh], cos/sin [B, S, Dh]; x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def _linear(d_in, d_out, names, dtype, rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, kernel_init=partitioned(_normal, names), rngs=rngs)


def _rms_norm(size: int, name: str, config: Qwen3Config, rngs: nnx.Rngs) -> nnx.RMSNorm:
    """Qwen3RMSNorm over the last axis: float32 statistics, result in the compute dtype."""
    return nnx.RMSNorm(
        size, epsilon=config.rms_norm_eps, dtype=jnp.dtype(config.dtype), scale_init=partitioned(_ones, (name,)), rngs=rngs
    )


class Qwen3Attention(nnx.Module):
    """Causal grouped-query attention with per-head q/k RMSNorm and RoPE (``Qwen3Attention``)."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        d, dh, dt = config.hidden_size, config.head_dim, jnp.dtype(config.dtype)
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, dh
        self.q_proj = _linear(d, self.num_heads * dh, ("embed", "heads"), dt, rngs)
        self.k_proj = _linear(d, self.num_kv_heads * dh, ("embed", "kv_heads"), dt, rngs)
        self.v_proj = _linear(d, self.num_kv_heads * dh, ("embed", "kv_heads"), dt, rngs)
        self.o_proj = _linear(self.num_heads * dh, d, ("heads", "embed"), dt, rngs)
        self.q_norm = _rms_norm(dh, "norm", config, rngs)
        self.k_norm = _rms_norm(dh, "norm", config, rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        """x [B, S, D], cos/sin float32 [B, S, Dh], mask bool [B, S, S] (query, key) -> [B, S, D]."""
        b, s, _ = x.shape
        kv, group, dh = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q = apply_rope(self.q_norm(self.q_proj(x).reshape(b, s, kv * group, dh)), cos, sin).reshape(b, s, kv, group, dh)
        k = apply_rope(self.k_norm(self.k_proj(x).reshape(b, s, kv, dh)), cos, sin)
        v = self.v_proj(x).reshape(b, s, kv, dh)
        logits = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * dh**-0.5
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.o_proj(jnp.einsum("bkgqs,bskd->bqkgd", weights, v).reshape(b, s, kv * group * dh))


class Qwen3MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        d, f, dt = config.hidden_size, config.intermediate_size, jnp.dtype(config.dtype)
        self.gate_proj = _linear(d, f, ("embed", "mlp"), dt, rngs)
        self.up_proj = _linear(d, f, ("embed", "mlp"), dt, rngs)
        self.down_proj = _linear(f, d, ("mlp", "embed"), dt, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nnx.Module):
    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        self.input_layernorm = _rms_norm(config.hidden_size, "embed", config, rngs)
        self.self_attn = Qwen3Attention(config, rngs=rngs)
        self.post_attention_layernorm = _rms_norm(config.hidden_size, "embed", config, rngs)
        self.mlp = Qwen3MLP(config, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3TextEncoder(nnx.Module):
    """The embeddings and the first ``num_hidden_layers - 1`` decoder layers of ``Qwen3Model``:
    ids -> ``hidden_states[-2]`` (module docstring)."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=jnp.dtype(config.dtype),
            embedding_init=partitioned(_normal, ("vocab", "embed")), rngs=rngs,
        )
        self.layers = nnx.List([Qwen3DecoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers - 1)])

    def __call__(self, input_ids: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """input_ids int [B, S]; segment_ids int [B, S]: runs of equal ids are separate sequences
        (a 0/1 attention mask is one sequence then padding) -> float32 [B, S, hidden_size].

        Tokens attend causally within their own run; outputs at padding are not transformers'.
        """
        s = input_ids.shape[1]
        runs, positions = runs_and_positions(segment_ids)
        mask = (runs[:, :, None] == runs[:, None, :]) & jnp.tril(jnp.ones((s, s), bool))
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return h.astype(jnp.float32)


def torch_names(config: Qwen3Config) -> dict[str, str]:
    """``{NNX param path: transformers Qwen3Model state-dict key}`` (all leaves are torch ``weight``s)."""
    abstract = nnx.split(nnx.eval_shape(lambda: Qwen3TextEncoder(config, rngs=InitKeys(0))))[1]
    return {path: path.rsplit(".", 1)[0] + ".weight" for path in param_shapes(abstract)}


def unused_torch_keys(config: Qwen3Config) -> tuple[str, ...]:
    """Regexes of the ``Qwen3Model`` tensors ``hidden_states[-2]`` does not read: the last layer and
    the final norm (``load_state``'s ``ignore``)."""
    return (rf"layers\.{config.num_hidden_layers - 1}\..+", r"norm\.weight")


def _decoder_tensors(tensors: TensorSource) -> TensorSource:
    """``Qwen3Model``'s tensors: those of a ``Qwen3ForCausalLM`` checkpoint (``model.*`` beside
    ``lm_head.weight``) lose the ``model.`` prefix and the LM head; others are kept as they are."""
    if any(name.startswith("model.") for name in tensors):
        return tensors.with_prefix_removed("model.")
    return tensors


def load_text_encoder(folder: str, dtype: str = "float32") -> Qwen3TextEncoder:
    """A ``Qwen3TextEncoder`` from a transformers folder (config.json + safetensors, possibly
    sharded with an index), offline. Weights that do not fit raise ``WeightsMismatch`` listing the
    missing, unexpected and mis-shaped keys."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: missing config.json")
    with open(path) as f:
        config = config_from_hf(json.load(f), dtype=dtype)
    make = lambda: Qwen3TextEncoder(config, rngs=InitKeys(0))
    return load_module(make, _decoder_tensors(open_safetensors(folder)), torch_names(config), ignore=unused_torch_keys(config))
