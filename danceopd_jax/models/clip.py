"""CLIP's text tower with its projection: transformers' ``CLIPTextModelWithProjection`` in NNX.

A port of transformers 5.23 ``models/clip/modeling_clip.py`` (Radford et al., "Learning
Transferable Visual Models From Natural Language Supervision", ICML 2021), the text encoders
``text_encoder/`` (CLIP ViT-L/14) and ``text_encoder_2/`` (OpenCLIP ViT-bigG/14) of Stable
Diffusion 3:

    h_0 = token_embedding[ids] + position_embedding[0..S-1]
    h_l = h'_l + fc2(act(fc1(LN2(h'_l)))),  h'_l = h_{l-1} + out_proj(attn(LN1(h_{l-1})))
    pooled = final_layer_norm(h_L)[eos position],  text_embeds = pooled @ text_projection

Attention is causal (a token sees itself and the tokens before it) with logits scaled by
``head_dim ** -0.5``; an optional padding ``attention_mask`` also hides padded keys. ``act`` is
``quick_gelu`` (``x * sigmoid(1.702 x)``, CLIP-L) or the exact ``gelu`` (CLIP-G).

The EOS position follows transformers: configs with the legacy ``eos_token_id`` 2 (SD3's
encoders) take the argmax of the ids (the EOS has the highest id of CLIP's vocabulary);
others take the first position holding ``eos_token_id``.

``hidden_states`` are transformers' ``output_hidden_states``: the embeddings, then every layer's
output before the final layer norm (``num_hidden_layers + 1`` arrays); SD3 uses
``hidden_states[-2]``. Parameters are float32; matmuls run in ``dtype``; attention logits,
softmax and layer-norm statistics are float32; outputs are float32.

Logical axis names (``LOGICAL_AXES``): ``vocab`` (token rows), ``positions`` (position rows),
``embed`` (hidden), ``heads`` (num_heads * head_dim), ``mlp`` (MLP hidden), ``projection``
(projected pooled output).
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from danceopd_jax.models.init_keys import InitKeys
from danceopd_jax.models.layers import NORMAL_INIT, ZEROS_INIT, partitioned
from danceopd_jax.models.weights import param_shapes

LOGICAL_AXES = ("vocab", "positions", "embed", "heads", "mlp", "projection")

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}
LEGACY_EOS_TOKEN_ID = 2  # configs from before transformers PR #24773: EOS = argmax of the ids

_ones = nnx.initializers.ones_init()


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Shape of a CLIP text tower, with transformers' ``CLIPTextConfig`` names and defaults.

    ``dtype`` is the compute dtype; parameters are float32 and outputs float32.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"CLIPTextConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIPTextConfig.hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIPTextConfig.hidden_act must be one of {', '.join(ACTIVATIONS)}, got {self.hidden_act!r}")
        if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
            raise ValueError(f"CLIPTextConfig.dtype must be a float dtype, got {self.dtype!r}")


_HF_KEYS = tuple(f.name for f in dataclasses.fields(CLIPTextConfig) if f.name != "dtype")


def config_from_hf(d: dict, **overrides) -> CLIPTextConfig:
    """A ``CLIPTextConfig`` from a transformers ``config.json`` dict (plus e.g. ``dtype``).

    Keys that only concern training or other towers (dropout, initialisation, bos/pad ids) are
    ignored. A ``model_type`` other than ``clip_text_model``, an unsupported ``hidden_act`` or a
    list-valued ``eos_token_id`` raise a ``ValueError`` naming the key.
    """
    if d.get("model_type", "clip_text_model") != "clip_text_model":
        raise ValueError(f"config.json: model_type {d['model_type']!r} is not a CLIP text model (clip_text_model)")
    if not isinstance(d.get("eos_token_id", 0), int):
        raise ValueError(f"config.json: eos_token_id must be one integer, got {d['eos_token_id']!r}")
    try:
        return CLIPTextConfig(**{**{k: d[k] for k in _HF_KEYS if d.get(k) is not None}, **overrides})
    except ValueError as e:
        raise ValueError(f"config.json: {e}") from None


def _linear(d_in, d_out, names, dtype, rngs, use_bias=True) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=partitioned(NORMAL_INIT, names),
        bias_init=partitioned(ZEROS_INIT, names[1:]),
        rngs=rngs,
    )


def _layer_norm(config: CLIPTextConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm with float32 statistics (two-pass variance, as torch), result in the compute dtype."""
    return nnx.LayerNorm(
        config.hidden_size,
        epsilon=config.layer_norm_eps,
        dtype=jnp.dtype(config.dtype),
        use_fast_variance=False,
        scale_init=partitioned(_ones, ("embed",)),
        bias_init=partitioned(ZEROS_INIT, ("embed",)),
        rngs=rngs,
    )


class CLIPAttention(nnx.Module):
    """Multi-head self-attention over the keys ``mask`` allows; logits and softmax in float32."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
        d, dt = config.hidden_size, jnp.dtype(config.dtype)
        self.num_heads = config.num_attention_heads
        self.q_proj = _linear(d, d, ("embed", "heads"), dt, rngs)
        self.k_proj = _linear(d, d, ("embed", "heads"), dt, rngs)
        self.v_proj = _linear(d, d, ("embed", "heads"), dt, rngs)
        self.out_proj = _linear(d, d, ("heads", "embed"), dt, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x [B, S, D], mask bool [B, S, S] (query, key) -> [B, S, D]."""
        b, s, d = x.shape
        head_dim = d // self.num_heads
        heads = lambda y: y.reshape(b, s, self.num_heads, head_dim)
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * head_dim**-0.5
        logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.out_proj(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, s, d))


class CLIPMLP(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
        dt = jnp.dtype(config.dtype)
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = _linear(config.hidden_size, config.intermediate_size, ("embed", "mlp"), dt, rngs)
        self.fc2 = _linear(config.intermediate_size, config.hidden_size, ("mlp", "embed"), dt, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN transformer layer: ``h + attn(LN1(h))``, then ``+ mlp(LN2(.))``."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.self_attn = CLIPAttention(config, rngs=rngs)
        self.layer_norm1 = _layer_norm(config, rngs)
        self.mlp = CLIPMLP(config, rngs=rngs)
        self.layer_norm2 = _layer_norm(config, rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextOutput(NamedTuple):
    """Outputs of ``CLIPTextModelWithProjection``, float32."""

    hidden_states: tuple[jax.Array, ...]  # embeddings + each layer's output, each [B, S, hidden]
    last_hidden_state: jax.Array  # final_layer_norm(hidden_states[-1]) [B, S, hidden]
    text_embeds: jax.Array  # projected pooled (EOS) state [B, projection_dim]


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """[B] index of each sequence's EOS token, by transformers' rule for ``eos_token_id`` (module docstring)."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextModelWithProjection(nnx.Module):
    """CLIP text encoder + projection (transformers' ``CLIPTextModelWithProjection``)."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, dt = config.hidden_size, jnp.dtype(config.dtype)
        self.token_embedding = nnx.Embed(
            config.vocab_size, d, dtype=dt, embedding_init=partitioned(NORMAL_INIT, ("vocab", "embed")), rngs=rngs
        )
        self.position_embedding = nnx.Embed(
            config.max_position_embeddings, d, dtype=dt,
            embedding_init=partitioned(NORMAL_INIT, ("positions", "embed")), rngs=rngs,
        )
        self.layers = nnx.List([CLIPEncoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])
        self.final_layer_norm = _layer_norm(config, rngs)
        self.text_projection = _linear(d, config.projection_dim, ("embed", "projection"), dt, rngs, use_bias=False)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        """input_ids int [B, S] (S <= max_position_embeddings); attention_mask [B, S] 1 = real token."""
        b, s = input_ids.shape
        if s > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {s} exceeds max_position_embeddings {self.config.max_position_embeddings}")
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool)), (b, s, s))
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, :]
        h = self.token_embedding(input_ids) + self.position_embedding(jnp.arange(s))
        hidden_states = [h]
        for layer in self.layers:
            h = layer(h, mask)
            hidden_states.append(h)
        last = self.final_layer_norm(h)
        pooled = last[jnp.arange(b), eos_positions(input_ids, self.config.eos_token_id)]
        f32 = lambda y: y.astype(jnp.float32)
        return CLIPTextOutput(tuple(map(f32, hidden_states)), f32(last), f32(self.text_projection(pooled)))


def torch_names(config: CLIPTextConfig) -> dict[str, str]:
    """``{NNX param path: transformers state-dict key}`` of ``CLIPTextModelWithProjection``."""
    abstract = nnx.split(nnx.eval_shape(lambda: CLIPTextModelWithProjection(config, rngs=InitKeys(0))))[1]
    names = {}
    for path in param_shapes(abstract):
        *module, leaf = path.split(".")
        torch_leaf = "bias" if leaf == "bias" else "weight"  # kernel, scale, embedding -> weight
        module = ".".join(module)
        if module == "text_projection":
            names[path] = f"text_projection.{torch_leaf}"
        elif module in ("token_embedding", "position_embedding"):
            names[path] = f"text_model.embeddings.{module}.{torch_leaf}"
        elif module.startswith("layers."):
            names[path] = f"text_model.encoder.{module}.{torch_leaf}"
        else:
            names[path] = f"text_model.{module}.{torch_leaf}"
    return names
