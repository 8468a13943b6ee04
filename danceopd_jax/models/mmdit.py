"""MMDiT: the Stable Diffusion 3 / 3.5 transformer, a port of diffusers' ``SD3Transformer2DModel``.

Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3,
ICML 2024), Sec. 4 and Fig. 2; the SD3.5 additions (RMS qk-norm, MMDiT-X extra self-attention)
as implemented in diffusers 0.42 (``transformer_sd3.py``, ``attention.py`` JointTransformerBlock,
``attention_processor.py`` JointAttnProcessor2_0, ``embeddings.py``, ``normalization.py``).
It computes what diffusers computes, on channels-last latents:

  * image tokens: a stride-``p`` conv on the latent (``pos_embed.proj``) plus the centre crop of
    a fixed ``pos_embed_max_size``^2 2D sin-cos table (``pos_embed.pos_embed``, a persistent buffer
    in diffusers, loaded from the weights here too, see ``Buffer``);
  * conditioning ``temb = MLP(sinusoid(1000 t)) + MLP(pooled)``; caption tokens
    ``context_embedder(text)``; every adaLN linear sees ``SiLU(temb)``;
  * joint blocks: both streams adaLN-Zero modulated (shift, scale, gate; Fig. 2), one attention
    over ``[image, text]`` with separate q/k/v projections per stream and, with
    ``qk_norm="rms_norm"``, RMS-normalised queries and keys per head. Blocks listed in
    ``dual_attention_layers`` (SD3.5, MMDiT-X) add an image-only self-attention ``attn2``
    with its own (shift, scale, gate), 9 modulation chunks in all. The last block is
    ``context_pre_only``: its text stream is only normalised (2-chunk adaLN, (scale, shift)
    order) to serve as keys/values, and the text stream ends there;
  * ``norm_out`` (adaLN, (scale, shift) order), ``proj_out`` and unpatchify.

Text attends without a mask (SD3 attends over all text tokens, padding included): ``cond``'s
``text_mask`` is ignored. The timestep is ``1000 * t`` for sigma ``t`` in [0, 1], as the SD3
flow-matching scheduler passes it; the output is the velocity ``noise - x0`` of
``x_t = (1 - t) x0 + t noise``, float32, [B, H, W, C].

Precision: parameters float32; the token projections run in the compute ``dtype``; both
residual streams, norms' statistics, attention logits/softmax, the conditioning MLPs, the adaLN
linears and the modulation itself run in float32; the output is float32.

Logical axis names on every variable (``nnx.with_partitioning``): ``embed`` (hidden),
``heads`` (num_heads * head_dim), ``mlp`` (MLP hidden), ``adaln`` (modulation outputs),
``patch`` (latent channels into the patch conv / p*p*C out of ``proj_out``), ``text_embed``
(joint_attention_dim), ``pooled`` (pooled_projection_dim), ``freq`` (timestep frequencies),
``norm`` (qk-norm scales, head_dim: map it unsharded). Hidden -> hidden projections outside
attention (the conditioning MLPs' second layers) use ``('mlp', 'embed')`` as in ``dit.py``.

Activations are pinned as in ``dit.py`` (``layers.constrain``; no-ops without a mesh or rules):
both token streams after every residual update ``TOKENS`` [B, S, D], each stream's q/k/v
``HEADS`` [B, S, H, Dh], the MLP hidden ``MLP_HIDDEN``. So the rules must also name
``layers.ACTIVATION_AXES`` (part of ``LOGICAL_AXES``).
"""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from danceopd_jax.core.conditioning import Condition
from danceopd_jax.models.init_keys import InitKeys
from danceopd_jax.models.layers import (
    ACTIVATION_AXES,
    FREQUENCY_DIM,
    HEADS,
    MLP_HIDDEN,
    NORMAL_INIT,
    REMAT_POLICIES,
    TOKENS,
    XAVIER_INIT,
    ZEROS_INIT,
    attention,
    check_attention,
    constrain,
    layer_norm,
    linear,
    modulate,
    partitioned,
    rematerialised,
    timestep_embedding,
    unpatchify,
)
from danceopd_jax.models.weights import load_state, open_safetensors, param_shapes

LOGICAL_AXES = ("embed", "heads", "mlp", "adaln", "patch", "text_embed", "pooled", "freq", "norm", *ACTIVATION_AXES)

NORM_EPS = 1e-6  # every LayerNorm and the RMS qk-norm of SD3
QK_NORMS = (None, "rms_norm")
MLP_RATIO = 4  # diffusers FeedForward(mult=4)

# Configs of the released transformers (the ``config.json`` of each diffusers folder).
_SD3_MEDIUM = dict(  # stabilityai/stable-diffusion-3-medium-diffusers
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
    qk_norm=None,
    dual_attention_layers=(),
)
MMDIT_PRESETS = {
    "sd3_medium": _SD3_MEDIUM,
    # stabilityai/stable-diffusion-3.5-medium (MMDiT-X): SD3-Medium's shape with a bigger positional
    # table, RMS qk-norm and the extra self-attention in the first 13 blocks
    "sd35_medium": {**_SD3_MEDIUM, "pos_embed_max_size": 384, "qk_norm": "rms_norm", "dual_attention_layers": tuple(range(13))},
}


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    """``SD3Transformer2DModel``'s config (same names and defaults) plus how to compute.

    ``dtype`` is the compute dtype of the token projections (parameters stay float32, see the
    module docstring); ``remat`` rematerialises each block in the backward pass
    (``layers.REMAT_POLICIES``). ``sample_size`` only sets the positional table's
    frequency scale at initialisation (diffusers' ``base_size``); any latent size up to
    ``pos_embed_max_size * patch_size`` runs.
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"  # layers.ATTENTION_IMPLEMENTATIONS

    def __post_init__(self):
        positive = (
            "sample_size",
            "patch_size",
            "in_channels",
            "num_layers",
            "attention_head_dim",
            "num_attention_heads",
            "joint_attention_dim",
            "caption_projection_dim",
            "pooled_projection_dim",
            "out_channels",
            "pos_embed_max_size",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MMDiTConfig.{name} must be an integer >= 1, got {value!r}")
        if self.sample_size < self.patch_size:
            raise ValueError(f"MMDiTConfig.sample_size {self.sample_size} is smaller than patch_size {self.patch_size}")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(
                f"MMDiTConfig.caption_projection_dim {self.caption_projection_dim} must equal "
                f"num_attention_heads * attention_head_dim = {self.inner_dim} (the text stream's width)"
            )
        if self.inner_dim % 4:
            raise ValueError(f"num_attention_heads * attention_head_dim = {self.inner_dim} must be divisible by 4 (2D sin-cos table)")
        layers = self.dual_attention_layers
        if not isinstance(layers, tuple) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise ValueError(f"MMDiTConfig.dual_attention_layers must be a tuple of ints, got {layers!r}")
        if len(set(layers)) != len(layers) or any(not 0 <= i < self.num_layers for i in layers):
            raise ValueError(
                f"MMDiTConfig.dual_attention_layers must be distinct block indices in [0, {self.num_layers}), got {layers!r}"
            )
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"MMDiTConfig.qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"MMDiTConfig.remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")
        check_attention("MMDiTConfig", self.attention, self.dtype)
        if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
            raise ValueError(f"MMDiTConfig.dtype must be a float dtype, got {self.dtype!r}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden(self) -> int:
        return MLP_RATIO * self.inner_dim


_DIFFUSERS_KEYS = tuple(f.name for f in dataclasses.fields(MMDiTConfig) if f.name not in ("dtype", "remat", "attention"))


def config_from_diffusers(d: dict, **overrides) -> MMDiTConfig:
    """An ``MMDiTConfig`` from a diffusers transformer ``config.json`` dict, with field overrides.

    Keys starting with ``_`` (``_class_name``, ``_diffusers_version``, ...) are ignored; keys
    missing from ``d`` take diffusers' defaults. Any other key, or an unsupported value (e.g.
    ``qk_norm="layer_norm"``, ``pos_embed_max_size=null``), raises a ``ValueError`` naming it.
    """
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    unknown = sorted(set(d) - set(_DIFFUSERS_KEYS))
    if unknown:
        raise ValueError(f"unsupported SD3Transformer2DModel config keys: {', '.join(unknown)}")
    if d.get("out_channels", 16) is None:  # diffusers: out_channels defaults to in_channels
        d["out_channels"] = d.get("in_channels", 16)
    if d.get("pos_embed_max_size", 96) is None:
        raise ValueError("pos_embed_max_size: null (an uncropped positional table) is not supported")
    if "dual_attention_layers" in d:
        if not isinstance(d["dual_attention_layers"], (list, tuple)):
            raise ValueError(f"dual_attention_layers must be a list of block indices, got {d['dual_attention_layers']!r}")
        d["dual_attention_layers"] = tuple(d["dual_attention_layers"])
    if d.get("qk_norm") not in QK_NORMS:
        raise ValueError(f"qk_norm {d['qk_norm']!r} is not supported (supported: {QK_NORMS})")
    return MMDiTConfig(**{**d, **overrides})


def mmdit_config(preset: str, **overrides) -> MMDiTConfig:
    """An ``MMDiTConfig`` of a released model (``MMDIT_PRESETS``) with field overrides (dtype, remat)."""
    if preset not in MMDIT_PRESETS:
        raise ValueError(f"unknown MMDiT preset {preset!r}; valid presets: {sorted(MMDIT_PRESETS)}")
    return config_from_diffusers(MMDIT_PRESETS[preset], **overrides)


# ------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------


def sincos_table(dim: int, grid_size: int, base_size: int) -> jax.Array:
    """diffusers' ``get_2d_sincos_pos_embed(dim, grid_size, base_size)`` [grid_size**2, dim], float32.

    Positions ``i * base_size / grid_size`` per axis; each token gets ``[sin, cos](x * omega)``
    followed by ``[sin, cos](y * omega)``, ``omega_k = 10000^(-k / (dim/4))``, tokens row-major
    (MAE's table with PixArt's position scaling). Traceable, so ``nnx.eval_shape`` stays abstract;
    loaded models replace it with the stored table.
    """
    pos = jnp.arange(grid_size, dtype=jnp.float32) / (grid_size / base_size)
    omega = 1.0 / 10000 ** (jnp.arange(dim // 4, dtype=jnp.float32) / (dim / 4))

    def embed_1d(p):
        out = p.reshape(-1, 1) * omega
        return jnp.concatenate([jnp.sin(out), jnp.cos(out)], axis=1)

    y, x = jnp.meshgrid(pos, pos, indexing="ij")
    return jnp.concatenate([embed_1d(x), embed_1d(y)], axis=1)


def crop_center(table: jax.Array, max_size: int, height: int, width: int) -> jax.Array:
    """The centred ``height`` x ``width`` window of a row-major [max_size**2, D] table -> [h*w, D].

    Offsets ``(max_size - height) // 2`` and ``(max_size - width) // 2`` (diffusers'
    ``PatchEmbed.cropped_pos_embed``).
    """
    if height > max_size or width > max_size:
        raise ValueError(f"latent grid {height}x{width} exceeds pos_embed_max_size {max_size}")
    top, left = (max_size - height) // 2, (max_size - width) // 2
    grid = table.reshape(max_size, max_size, -1)[top : top + height, left : left + width]
    return grid.reshape(height * width, -1)


# ------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------


class Buffer(nnx.Variable):
    """A fixed array stored with the weights (PyTorch's persistent buffer), not a parameter.

    The forward pass reads it through ``stop_gradient``; optimise ``nnx.Param`` only.
    """


class PatchEmbed(nnx.Module):
    """Patchify conv (stride = kernel = patch) plus the centre-cropped sin-cos table."""

    def __init__(self, config: MMDiTConfig, *, rngs: nnx.Rngs):
        p, d, g = config.patch_size, config.inner_dim, config.pos_embed_max_size
        self.patch_size, self.max_size = p, g
        self.proj = nnx.Conv(
            config.in_channels,
            d,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            dtype=jnp.dtype(config.dtype),
            kernel_init=partitioned(XAVIER_INIT, (None, None, "patch", "embed")),
            bias_init=partitioned(ZEROS_INIT, ("embed",)),
            rngs=rngs,
        )
        base_size = config.sample_size // p

        def table(key, shape, dtype=jnp.float32):
            return sincos_table(d, g, base_size)[None].astype(dtype)

        self.pos_embed = Buffer(partitioned(table, (None, None, "embed"))(rngs.params(), (1, g * g, d)))

    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> float32 tokens [B, (H/p)*(W/p), D], row-major."""
        b, h, w, _ = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"latent size {h}x{w} is not divisible by patch_size {self.patch_size}")
        tokens = self.proj(x).reshape(b, (h // self.patch_size) * (w // self.patch_size), -1)
        table = jax.lax.stop_gradient(self.pos_embed[...][0])
        pos = crop_center(table, self.max_size, h // self.patch_size, w // self.patch_size)
        return tokens.astype(jnp.float32) + pos.astype(jnp.float32)


class TwoLayerEmbedder(nnx.Module):
    """``linear_2(SiLU(linear_1(x)))`` in float32: diffusers' TimestepEmbedding / PixArtAlphaTextProjection."""

    def __init__(self, d_in: int, d: int, in_axis: str, *, rngs: nnx.Rngs):
        self.linear_1 = linear(d_in, d, (in_axis, "mlp"), jnp.float32, rngs, init=NORMAL_INIT)
        self.linear_2 = linear(d, d, ("mlp", "embed"), jnp.float32, rngs, init=NORMAL_INIT)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(nnx.silu(self.linear_1(x.astype(jnp.float32))))


class TimeTextEmbed(nnx.Module):
    """``temb = timestep_embedder(sinusoid(timestep)) + text_embedder(pooled)``.

    diffusers' CombinedTimestepTextProjEmbeddings: 256 frequencies, ``flip_sin_to_cos=True``
    ([cos, sin]) and ``downscale_freq_shift=0`` (``freq_k = 10000^(-k/128)``), which is
    ``layers.timestep_embedding``.
    """

    def __init__(self, config: MMDiTConfig, *, rngs: nnx.Rngs):
        self.timestep_embedder = TwoLayerEmbedder(FREQUENCY_DIM, config.inner_dim, "freq", rngs=rngs)
        self.text_embedder = TwoLayerEmbedder(config.pooled_projection_dim, config.inner_dim, "pooled", rngs=rngs)

    def __call__(self, timestep: jax.Array, pooled: jax.Array) -> jax.Array:
        return self.timestep_embedder(timestep_embedding(timestep)) + self.text_embedder(pooled)


class AdaLNModulation(nnx.Module):
    """The ``linear`` of diffusers' AdaLayerNormZero (6 chunks) / SD35AdaLayerNormZeroX (9) /
    AdaLayerNormContinuous (2): ``chunks`` float32 [B, D] pieces of ``linear(SiLU(temb))``."""

    def __init__(self, d: int, chunks: int, *, rngs: nnx.Rngs):
        self.chunks = chunks
        self.linear = linear(d, chunks * d, ("embed", "adaln"), jnp.float32, rngs)

    def __call__(self, c: jax.Array) -> list[jax.Array]:
        """``c = SiLU(temb)`` [B, D], float32."""
        return jnp.split(self.linear(c), self.chunks, axis=-1)


def _rms_norm(config: MMDiTConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    """Per-head RMSNorm over head_dim with a learned scale (diffusers RMSNorm, eps 1e-6)."""
    return nnx.RMSNorm(
        config.attention_head_dim,
        epsilon=NORM_EPS,
        dtype=jnp.dtype(config.dtype),
        scale_init=partitioned(nnx.initializers.ones_init(), ("norm",)),
        rngs=rngs,
    )


class Attention(nnx.Module):
    """diffusers ``Attention`` with ``JointAttnProcessor2_0``.

    Self-attention (``joint=False``: SD3.5's ``attn2``), or joint attention of image tokens and
    text tokens (``joint=True``): each stream has its own q/k/v (``to_*`` / ``add_*_proj``) and
    qk-norms (``norm_*`` / ``norm_added_*``), one softmax attention runs over the concatenated
    ``[image, text]`` sequence and the outputs are split back, projected by ``to_out`` and
    ``to_add_out``. With ``context_pre_only`` the text outputs are discarded (diffusers computes
    and drops them), so the text queries are not computed; ``add_q_proj`` / ``norm_added_q``
    are still held so the parameter tree (and any LoRA file) matches diffusers one-to-one.
    """

    def __init__(self, config: MMDiTConfig, *, joint: bool, context_pre_only: bool = False, rngs: nnx.Rngs):
        d, dt = config.inner_dim, jnp.dtype(config.dtype)
        self.num_heads = config.num_attention_heads
        self.implementation = config.attention
        self.joint, self.context_pre_only = joint, context_pre_only
        self.to_q = linear(d, d, ("embed", "heads"), dt, rngs)
        self.to_k = linear(d, d, ("embed", "heads"), dt, rngs)
        self.to_v = linear(d, d, ("embed", "heads"), dt, rngs)
        self.to_out = linear(d, d, ("heads", "embed"), dt, rngs)
        qk_norm = config.qk_norm is not None
        self.norm_q = _rms_norm(config, rngs) if qk_norm else None
        self.norm_k = _rms_norm(config, rngs) if qk_norm else None
        if joint:
            self.add_q_proj = linear(d, d, ("embed", "heads"), dt, rngs)
            self.add_k_proj = linear(d, d, ("embed", "heads"), dt, rngs)
            self.add_v_proj = linear(d, d, ("embed", "heads"), dt, rngs)
            if not context_pre_only:
                self.to_add_out = linear(d, d, ("heads", "embed"), dt, rngs)
            self.norm_added_q = _rms_norm(config, rngs) if qk_norm else None
            self.norm_added_k = _rms_norm(config, rngs) if qk_norm else None

    def _heads(self, y: jax.Array, norm: nnx.RMSNorm | None = None) -> jax.Array:
        """[B, S, H*Dh] -> [B, S, H, Dh], qk-normalised per head when there is a ``norm``."""
        b, s, hd = y.shape
        y = y.reshape(b, s, self.num_heads, hd // self.num_heads)
        return constrain(y if norm is None else norm(y), HEADS)

    def __call__(self, x: jax.Array, context: jax.Array | None = None):
        """Image tokens x [B, N, D] (and text tokens [B, L, D] when joint) in the compute dtype.

        Returns the image output [B, N, D], or ``(image, text)`` outputs when joint (text
        ``None`` with ``context_pre_only``).
        """
        q, k, v = self._heads(self.to_q(x), self.norm_q), self._heads(self.to_k(x), self.norm_k), self._heads(self.to_v(x))
        if not self.joint:
            o = attention(q, k, v, self.implementation)
            return self.to_out(o.reshape(x.shape[0], x.shape[1], -1))
        ck, cv = self._heads(self.add_k_proj(context), self.norm_added_k), self._heads(self.add_v_proj(context))
        k, v = jnp.concatenate([k, ck], axis=1), jnp.concatenate([v, cv], axis=1)
        n = x.shape[1]
        if not self.context_pre_only:
            cq = self._heads(self.add_q_proj(context), self.norm_added_q)
            q = jnp.concatenate([q, cq], axis=1)
        o = attention(q, k, v, self.implementation)
        o = o.reshape(o.shape[0], o.shape[1], -1)
        image = self.to_out(o[:, :n])
        return image, (None if self.context_pre_only else self.to_add_out(o[:, n:]))


class FeedForward(nnx.Module):
    """diffusers ``FeedForward(activation_fn="gelu-approximate")``: fc2(GELU_tanh(fc1(x))), 4x hidden."""

    def __init__(self, config: MMDiTConfig, *, rngs: nnx.Rngs):
        d, dt = config.inner_dim, jnp.dtype(config.dtype)
        self.fc1 = linear(d, config.mlp_hidden, ("embed", "mlp"), dt, rngs)
        self.fc2 = linear(config.mlp_hidden, d, ("mlp", "embed"), dt, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(constrain(jax.nn.gelu(self.fc1(x), approximate=True), MLP_HIDDEN))


class JointTransformerBlock(nnx.Module):
    """diffusers ``JointTransformerBlock``: an MMDiT block (SD3 Fig. 2), MMDiT-X with ``dual``.

    Image stream: ``x += gate_msa * attn(...)`` (+ ``gate_msa2 * attn2(...)`` when dual, whose
    input is the block input's LayerNorm modulated by (shift_msa2, scale_msa2)), then
    ``x += gate_mlp * ff(modulate(LN(x)))``. Text stream: the same with its own modulation, or,
    when ``context_pre_only`` (the last block), only ``modulate(LN(context), shift, scale)`` with
    (scale, shift) from a 2-chunk adaLN, feeding the attention; the stream then ends.
    """

    def __init__(self, config: MMDiTConfig, *, context_pre_only: bool, dual: bool, rngs: nnx.Rngs):
        d = config.inner_dim
        self.dtype = jnp.dtype(config.dtype)
        self.context_pre_only, self.dual = context_pre_only, dual
        self.norm1 = AdaLNModulation(d, 9 if dual else 6, rngs=rngs)
        self.norm1_context = AdaLNModulation(d, 2 if context_pre_only else 6, rngs=rngs)
        self.attn = Attention(config, joint=True, context_pre_only=context_pre_only, rngs=rngs)
        if dual:
            self.attn2 = Attention(config, joint=False, rngs=rngs)
        self.ff = FeedForward(config, rngs=rngs)
        if not context_pre_only:
            self.ff_context = FeedForward(config, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array, c: jax.Array):
        """Float32 streams x [B, N, D], context [B, L, D]; c = SiLU(temb) [B, D].

        Returns ``(x, context)``; ``context`` is ``None`` after a ``context_pre_only`` block.
        """
        dt = self.dtype
        mods = self.norm1(c)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        normed = layer_norm(x, NORM_EPS)
        if self.context_pre_only:
            c_scale, c_shift = self.norm1_context(c)
            context_in = modulate(layer_norm(context, NORM_EPS), c_shift, c_scale)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(c)
            context_in = modulate(layer_norm(context, NORM_EPS), c_shift_msa, c_scale_msa)

        attn_out, context_attn_out = self.attn(modulate(normed, shift_msa, scale_msa).astype(dt), context_in.astype(dt))
        x = constrain(x + gate_msa[:, None] * attn_out, TOKENS)
        if self.dual:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            x = constrain(x + gate_msa2[:, None] * self.attn2(modulate(normed, shift_msa2, scale_msa2).astype(dt)), TOKENS)
        x = constrain(x + gate_mlp[:, None] * self.ff(modulate(layer_norm(x, NORM_EPS), shift_mlp, scale_mlp).astype(dt)), TOKENS)
        if self.context_pre_only:
            return x, None

        context = constrain(context + c_gate_msa[:, None] * context_attn_out, TOKENS)
        h = modulate(layer_norm(context, NORM_EPS), c_shift_mlp, c_scale_mlp).astype(dt)
        return x, constrain(context + c_gate_mlp[:, None] * self.ff_context(h), TOKENS)


class MMDiT(nnx.Module):
    """Flow-matching velocity ``v = MMDiT(x, t, cond)`` of SD3 / SD3.5 (module docstring).

    ``x`` latents [B, H, W, C] (channels last), ``t`` sigma [B] in [0, 1], ``cond["text"]``
    [B, L, joint_attention_dim] prompt embeddings, ``cond["pooled"]`` [B, pooled_projection_dim];
    other keys are ignored. Returns float32 [B, H, W, out_channels].
    """

    def __init__(self, config: MMDiTConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, dt = config.inner_dim, jnp.dtype(config.dtype)
        self.pos_embed = PatchEmbed(config, rngs=rngs)
        self.time_text_embed = TimeTextEmbed(config, rngs=rngs)
        self.context_embedder = linear(config.joint_attention_dim, config.caption_projection_dim, ("text_embed", "embed"), dt, rngs)
        last = config.num_layers - 1
        self.transformer_blocks = nnx.List(
            [
                JointTransformerBlock(config, context_pre_only=i == last, dual=i in config.dual_attention_layers, rngs=rngs)
                for i in range(config.num_layers)
            ]
        )
        self.norm_out = AdaLNModulation(d, 2, rngs=rngs)
        patch_out = config.patch_size**2 * config.out_channels
        self.proj_out = linear(d, patch_out, ("embed", "patch"), dt, rngs)

    def __call__(self, x: jax.Array, t: jax.Array, cond: Condition) -> jax.Array:
        cfg, dt = self.config, jnp.dtype(self.config.dtype)
        b, h, w, _ = x.shape
        tokens = constrain(self.pos_embed(x.astype(dt)), TOKENS)
        context = constrain(self.context_embedder(cond["text"].astype(dt)).astype(jnp.float32), TOKENS)
        c = nnx.silu(self.time_text_embed(1000.0 * t.astype(jnp.float32), cond["pooled"]))

        def apply(block: JointTransformerBlock, tokens: jax.Array, context: jax.Array):
            return block(tokens, context, c)

        apply = rematerialised(apply, cfg.remat)
        for block in self.transformer_blocks:
            tokens, context = apply(block, tokens, context)

        scale, shift = self.norm_out(c)
        out = self.proj_out(modulate(layer_norm(tokens, NORM_EPS), shift, scale).astype(dt))
        v = unpatchify(out, cfg.patch_size, h, w, cfg.out_channels)
        return v.astype(jnp.float32)


# ------------------------------------------------------------------------------------------
# Weights, sizes, FLOPs
# ------------------------------------------------------------------------------------------

# NNX attribute -> diffusers module/leaf name, per dotted path segment.
_TORCH_SEGMENTS = {"to_out": "to_out.0", "fc1": "net.0.proj", "fc2": "net.2", "kernel": "weight", "scale": "weight"}


def _abstract_model(config: MMDiTConfig) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: MMDiT(config, rngs=InitKeys(0))))


def torch_names_of(abstract: nnx.State) -> dict[str, str]:
    """``torch_names`` from an (abstract) state already at hand, e.g. the base part of a LoRA model."""
    return {p: ".".join(_TORCH_SEGMENTS.get(s, s) for s in p.split(".")) for p in param_shapes(abstract)}


@functools.lru_cache(maxsize=16)
def _torch_names_and_ranks(config: MMDiTConfig) -> tuple[tuple[str, str, int], ...]:
    """``(NNX path, diffusers key, rank of the variable)`` of every variable, from one abstract trace."""
    abstract = _abstract_model(config)[1]
    shapes = param_shapes(abstract)
    return tuple((path, key, len(shapes[path])) for path, key in torch_names_of(abstract).items())


def torch_names(config: MMDiTConfig) -> dict[str, str]:
    """``{dotted NNX path: diffusers state-dict key}`` for every variable of ``MMDiT(config)``.

    The NNX tree mirrors diffusers' module names except: ``attn*.to_out`` is ``to_out.0``,
    ``ff*.fc1`` / ``fc2`` are ``ff*.net.0.proj`` / ``net.2``, linear and conv ``kernel`` and
    RMSNorm ``scale`` are ``weight`` (the loader transposes kernels). ``pos_embed.pos_embed``
    is the positional buffer, as in diffusers. Cached per config: tracing the full-size model
    abstractly takes tens of seconds (NNX's per-variable RNG bookkeeping grows with the trace).
    """
    return {path: key for path, key, _ in _torch_names_and_ranks(config)}


def linear_torch_names(config: MMDiTConfig) -> dict[str, str]:
    """``torch_names`` of the linear layers' kernels (rank 2): the layers a LoRA adapter can sit
    on (``lora.add_lora`` adapts ``nnx.Linear`` only; the patch conv's kernel is rank 4)."""
    return {path: key for path, key, rank in _torch_names_and_ranks(config) if path.endswith(".kernel") and rank == 2}


def load_mmdit(folder: str, **overrides) -> MMDiT:
    """An ``MMDiT`` from a diffusers transformer folder (``config.json`` + safetensors, sharded or not).

    ``overrides`` set ``MMDiTConfig`` fields such as ``dtype`` and ``remat``. Checked like
    ``weights.load_module``: any missing, unexpected or mis-shaped tensor raises ``WeightsMismatch``.
    """
    with open(os.path.join(folder, "config.json")) as f:
        config = config_from_diffusers(json.load(f), **overrides)
    graphdef, abstract = _abstract_model(config)
    return nnx.merge(graphdef, load_state(abstract, open_safetensors(folder), torch_names_of(abstract)))


def param_count(config: MMDiTConfig) -> int:
    """Number of parameters (``nnx.Param``, the positional buffer excluded), as diffusers' ``parameters()``."""
    params = nnx.state(nnx.eval_shape(lambda: MMDiT(config, rngs=InitKeys(0))), nnx.Param)
    return sum(int(np.prod(leaf.shape)) for _, leaf in nnx.to_flat_state(params))


def forward_flops(config: MMDiTConfig, batch_size: int, image_size: int, text_len: int) -> int:
    """Analytical FLOPs of one ``MMDiT`` forward on square latents of side ``image_size``.

    ``image_size`` is the latent height = width (128 for 1024 px with SD3's VAE), ``text_len``
    the prompt length. Counts 2*m*n*k for every matrix product: the patch conv, the timestep,
    pooled and caption projections, per block the adaLN linears, the image q/k/v/out, the text
    k/v (and q/out except in the ``context_pre_only`` last block, whose text queries are not
    computed), QK^T and AV over ``[image, text]`` keys, ``attn2`` in dual blocks, both MLPs,
    then ``norm_out`` and ``proj_out``. Elementwise work (norms, softmax, activations) is not
    counted.
    """
    cfg, b, d = config, batch_size, config.inner_dim
    n, s = (image_size // cfg.patch_size) ** 2, text_len
    p2 = cfg.patch_size**2

    embed = 2 * b * n * p2 * cfg.in_channels * d
    embed += 2 * b * (FREQUENCY_DIM * d + d * d)  # timestep MLP
    embed += 2 * b * (cfg.pooled_projection_dim * d + d * d)  # pooled text MLP
    embed += 2 * b * s * cfg.joint_attention_dim * d  # context_embedder

    total = embed
    for i in range(cfg.num_layers):
        pre_only, dual = i == cfg.num_layers - 1, i in cfg.dual_attention_layers
        queries = n + (0 if pre_only else s)
        block = 2 * b * d * d * ((9 if dual else 6) + (2 if pre_only else 6))  # adaLN linears
        block += 2 * b * n * d * 4 * d  # to_q, to_k, to_v, to_out
        block += 2 * b * s * d * d * (2 if pre_only else 4)  # add_k/v (+ add_q, to_add_out)
        block += 2 * 2 * b * queries * (n + s) * d  # QK^T and AV
        block += 2 * 2 * b * queries * d * cfg.mlp_hidden  # ff (+ ff_context)
        if dual:
            block += 2 * b * n * d * 4 * d + 2 * 2 * b * n * n * d  # attn2
        total += block
    return total + 2 * b * d * 2 * d + 2 * b * n * d * p2 * cfg.out_channels
