"""Z-Image: the single-stream DiT of Z-Image (Alibaba Tongyi), a port of diffusers' ``ZImageTransformer2DModel``.

Source: diffusers 0.42 ``models/transformers/transformer_z_image.py`` (the model) and
``pipelines/z_image/pipeline_z_image.py`` (text-to-image, "basic" mode) /
``pipeline_z_image_omni.py`` (in-context editing, "omni" mode), which say how the model is called.
It computes what diffusers computes, on channels-last latents, with every shape static:

  * embedders: image tokens ``x_embedder(patchify_2(x))``; caption tokens
    ``cap_embedder = Linear(RMSNorm(text))``; ``temb = t_embedder(t_z * t_scale)``, a
    [cos, sin] sinusoid of 256 frequencies through Linear(256, 1024), SiLU, Linear(1024, A),
    ``A = min(dim, 256)`` (``TimestepEmbedder``);
  * every image and every caption segment is padded to a multiple of ``SEQ_MULTI_OF`` = 32
    tokens with the learned ``x_pad_token`` / ``cap_pad_token``; these pad tokens are real,
    attended tokens (``_pad_with_ids``, ``_prepare_sequence``);
  * ``noise_refiner``: modulated blocks over the image tokens; ``context_refiner``: unmodulated
    blocks over the caption tokens; then ``layers``: modulated blocks over the joint sequence;
  * a block (``ZImageTransformerBlock``) with sandwich RMSNorms, adaLN scale and tanh gate (no
    shift), ``(scale_msa, gate_msa, scale_mlp, gate_mlp) = adaLN_modulation(temb)`` (a Linear of
    temb itself, no SiLU)::

        x += tanh(gate_msa) * attention_norm2(attn(attention_norm1(x) * (1 + scale_msa)))
        x += tanh(gate_mlp) * ffn_norm2(ffn(ffn_norm1(x) * (1 + scale_mlp)))

    (refiners without modulation: scale 1, gate 1). Attention: per-head RMS q/k-norm (eps
    1e-5), 3-axis RoPE, ``n_heads`` heads for q, k and v (diffusers passes ``n_kv_heads`` to
    nothing: its k/v always have ``n_heads`` heads, so ``config_from_diffusers`` accepts and
    drops it), SwiGLU ``w2(SiLU(w1 x) * w3 x)`` with hidden ``int(dim / 3 * 8)``;
  * ``final_layer``: ``linear(LayerNorm(x) * (1 + adaLN_modulation(SiLU(temb))))``, unpatchify.

RoPE (``RopeEmbedder``): a token at position ids ``(p0, p1, p2)`` rotates the pairs
``(2k, 2k+1)`` of q and k by ``p_a * theta^(-2k/d_a)`` for axis ``a`` over its ``axes_dims[a]``
channels; angles are looked up in diffusers' float32 tables of ``axes_lens[a]`` rows (positions
beyond a table clamp to its last row, where torch would raise). Position ids, as diffusers makes
them (``patchify_and_embed``, ``patchify_and_embed_omni``, ``_pad_with_ids``):

  * basic: caption token k of a caption padded to P tokens is at ``(1 + k, 0, 0)``; image token
    (h, w) at ``(P + 1, h, w)``; image pad tokens at ``(0, 0, 0)``;
  * omni with segments of lengths ``l_0, l_1, l_2`` (padded ``P_j``): segment j starts at
    ``s_j = 1 + sum_{i<j} (l_i + 2)``, its end is ``e_j = s_j + l_j``; the source image is at
    ``(e_0, h, w)``, the target at ``(e_1, h, w)``. Quirk reproduced: ``_pad_with_ids`` gives a
    caption segment ``P_j`` grid ids ``s_j .. s_j + P_j - 1`` (the grid already spans the pad)
    and then appends ``P_j - l_j`` more ids ``(0, 0, 0)`` for the pad, so the id list of a
    segment is longer than the segment. The segments' lists are concatenated and caption token
    n takes entry n: later segments' ids are shifted by the leftover zeros of the segments
    before them (segment 1's first ``P_0 - l_0`` tokens get segment 0's zeros, its token k >=
    ``P_0 - l_0`` gets ``s_1 + k - (P_0 - l_0)``; likewise for segment 2). In the real template
    segment 0 is a few tokens, so most of the instruction's first 32 tokens sit at (0, 0, 0).
    In basic mode the leftover zeros fall after the caption and are never used.

Which timestep modulates which token (``image_noise_mask``, ``select_per_token``): basic mode
uses the noisy ``temb`` everywhere. Omni mode mixes per token the noisy ``temb`` and the clean
one (``t_z = 1``): the source image and caption segment 0 are clean, the target image and
segments 1 and 2 noisy (segment j takes ``image_noise_mask[j]``, or 1 past its end). Only the
target image's tokens are decoded.

Interface (``ZImageTransformer.__call__``): ``x`` [B, H, W, C] noisy target latent, ``t`` [B]
sigma in [0, 1] of the project's flow ``x_t = (1 - t) x0 + t noise``; returns the float32
velocity ``noise - x0`` [B, H, W, C]. Z-Image's time runs the other way (its ``t_z = 1`` is
clean, the pipelines pass ``(1000 - timestep) / 1000``) and it predicts ``x0 - noise`` (the
pipelines negate its output), so the embedder sees ``t_scale * (1 - t)`` and the output is
negated. ``cond`` keys (``core/conditioning.py``):

  ``text``          [B, L, cap_feat_dim] caption features, valid tokens first (padded to L);
  ``text_mask``     bool [B, L], True for the valid prefix: its count is the caption length;
  with ``config.use_source`` also
  ``source``        [B, H, W, C] clean source latent (same size as ``x``; any values where absent);
  ``source_mask``   bool [B], False: no source, the sample computes diffusers' basic mode
                    with the whole valid prefix as its one caption;
  ``text_segments`` int32 [B, 3], read only where ``source_mask``: the lengths of the omni
                    template's three caption segments, one after another in the valid prefix
                    (``"<|im_start|>user\\n<|vision_start|>"``, ``"<|vision_end|>" + instruction
                    + "<|im_end|>\\n<|im_start|>assistant\\n<|vision_start|>"``,
                    ``"<|vision_end|><|im_end|>"``); they should sum to the text_mask count and
                    are clipped to it (so an all-False ``text_mask`` is an empty caption).

Fixed layout (attention is order-free given positions, masks and modulation, so one layout
serves both modes and the result is diffusers'): the joint sequence is ``[target (Pi), source
(Pi, use_source only), caption slot (Lc)]`` with ``Pi = ceil32((H/2)(W/2))`` and
``Lc = ceil32(L)`` (+ 64 with ``use_source``: three segments padded separately need at most
two more blocks of 32). Key masks drop an absent source and the caption slot past the sample's
padded caption; the noise refiner runs over ``[target, source]``, the context refiner over the
caption slot. ``config.use_source`` adds no parameters: one weights folder loads either way.
SigLIP features (``siglip_feat_dim``) are not supported.

Precision: parameters float32; the token projections (x_embedder, q/k/v/out, SwiGLU,
final linear) run in the compute ``dtype``; the residual streams, RMSNorm/LayerNorm statistics,
RoPE, attention softmax, the timestep and caption embedders, the adaLN linears and the
modulation run in float32 (diffusers keeps ``t_embedder`` and ``cap_embedder`` in full
precision too, ``_skip_layerwise_casting_patterns``); the output is float32.

Logical axis names on every variable: ``embed`` (dim), ``heads`` (n_heads * head_dim), ``mlp``
(SwiGLU hidden; also the timestep MLP's 1024 hidden), ``adaln`` (modulation outputs), ``temb``
(the timestep embedding, A), ``patch`` (p*p*C into ``x_embedder`` / out of ``final_layer``),
``text_embed`` (cap_feat_dim), ``freq`` (timestep frequencies), ``norm`` (every RMSNorm scale:
map it unsharded). Activations are pinned with ``layers.constrain``: the token streams at entry
and after every residual update ``TOKENS``, q/k/v ``HEADS``, the SwiGLU hidden ``MLP_HIDDEN``.
"""

import dataclasses
import functools
import json
import os
from typing import NamedTuple

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
    partitioned,
    patchify,
    rematerialised,
    timestep_embedding,
    unpatchify,
)
from danceopd_jax.models.weights import load_state, open_safetensors, param_shapes

LOGICAL_AXES = ("embed", "heads", "mlp", "adaln", "temb", "patch", "text_embed", "freq", "norm", *ACTIVATION_AXES)

SEQ_MULTI_OF = 32  # every image and caption segment is padded to a multiple of this
ADALN_EMBED_DIM = 256  # the timestep embedding is min(dim, 256) wide
TIMESTEP_HIDDEN = 1024  # TimestepEmbedder(mid_size=1024)
PATCH_SIZE = 2  # all_patch_size = [2], all_f_patch_size = [1]: the only patchification supported
QK_NORM_EPS = 1e-5  # Attention(eps=1e-5), whatever norm_eps says
FINAL_NORM_EPS = 1e-6  # FinalLayer's LayerNorm
SEGMENTS = 3  # caption segments of the omni template with one condition image

# Configs of the released transformers (the ``config.json`` of each diffusers folder).
ZIMAGE_PRESETS = {
    # the released 6B Z-Image transformer: diffusers' default config
    "z_image": dict(
        all_patch_size=[2],
        all_f_patch_size=[1],
        in_channels=16,
        dim=3840,
        n_layers=30,
        n_refiner_layers=2,
        n_heads=30,
        n_kv_heads=30,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=2560,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[32, 48, 48],
        axes_lens=[1024, 512, 512],
    ),
    # for tests: head_dim 32 = 8 + 12 + 12
    "tiny": dict(
        in_channels=4,
        dim=64,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[8, 12, 12],
        axes_lens=[256, 32, 32],
    ),
}


@dataclasses.dataclass(frozen=True)
class ZImageConfig:
    """``ZImageTransformer2DModel``'s config (same names and defaults) plus how to compute.

    Not fields, checked by ``config_from_diffusers`` instead: ``all_patch_size`` must be [2] and
    ``all_f_patch_size`` [1], ``siglip_feat_dim`` null, and ``n_kv_heads`` is dropped (diffusers
    ignores it). ``use_source`` builds the in-context (omni) edit layout (module docstring);
    ``dtype`` is the compute dtype of the token projections; ``remat`` rematerialises each block
    in the backward pass (``layers.REMAT_POLICIES``); ``attention`` is the implementation
    (``layers.ATTENTION_IMPLEMENTATIONS``).
    """

    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1024, 512, 512)
    use_source: bool = False
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "xla"

    def __post_init__(self):
        for name in ("in_channels", "dim", "n_layers", "n_refiner_layers", "n_heads", "cap_feat_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ZImageConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ("norm_eps", "rope_theta", "t_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"ZImageConfig.{name} must be a number > 0, got {value!r}")
        for name in ("qk_norm", "use_source"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ZImageConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("axes_dims", "axes_lens"):
            value = getattr(self, name)
            positive = isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
            if not positive or len(value) != 3:
                raise ValueError(f"ZImageConfig.{name} must be 3 positive integers (one per position axis), got {value!r}")
        if any(d % 2 for d in self.axes_dims):
            raise ValueError(f"ZImageConfig.axes_dims must be even (RoPE rotates channel pairs), got {self.axes_dims}")
        if self.dim % self.n_heads:
            raise ValueError(f"ZImageConfig.dim {self.dim} must be divisible by n_heads {self.n_heads}")
        if self.head_dim != sum(self.axes_dims):
            raise ValueError(
                f"ZImageConfig: head_dim = dim / n_heads = {self.head_dim} must equal "
                f"sum(axes_dims) = {sum(self.axes_dims)} (RoPE covers every channel)"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ZImageConfig.remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")
        if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
            raise ValueError(f"ZImageConfig.dtype must be a float dtype, got {self.dtype!r}")
        check_attention("ZImageConfig", self.attention, self.dtype)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def temb_dim(self) -> int:
        return min(self.dim, ADALN_EMBED_DIM)

    @property
    def mlp_hidden(self) -> int:
        return int(self.dim / 3 * 8)  # FeedForward(hidden_dim=int(dim / 3 * 8))

    @property
    def patch_dim(self) -> int:
        return PATCH_SIZE * PATCH_SIZE * self.in_channels


_OUR_FIELDS = ("use_source", "dtype", "remat", "attention")
_DIFFUSERS_KEYS = tuple(f.name for f in dataclasses.fields(ZImageConfig) if f.name not in _OUR_FIELDS)
_PATCH_KEYS = {"all_patch_size": [PATCH_SIZE], "all_f_patch_size": [1]}  # the only values supported
_DROPPED_KEYS = (*_PATCH_KEYS, "siglip_feat_dim", "n_kv_heads")  # diffusers keys checked, then dropped


def config_from_diffusers(d: dict, **overrides) -> ZImageConfig:
    """A ``ZImageConfig`` from a diffusers transformer ``config.json`` dict, with field overrides.

    Keys starting with ``_`` are ignored; keys missing from ``d`` take diffusers' defaults.
    ``n_kv_heads`` is dropped (diffusers builds k/v with ``n_heads`` heads regardless). An
    unknown key, ``all_patch_size`` other than [2], ``all_f_patch_size`` other than [1], a set
    ``siglip_feat_dim`` (SigLIP features are not supported) or an invalid value raises one
    ``ValueError`` naming it.
    """
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    unknown = sorted(set(d) - set(_DIFFUSERS_KEYS) - set(_DROPPED_KEYS))
    if unknown:
        raise ValueError(f"unsupported ZImageTransformer2DModel config keys: {', '.join(unknown)}")
    for key, supported in _PATCH_KEYS.items():
        if key in d and (not isinstance(d[key], (list, tuple)) or list(d[key]) != supported):
            raise ValueError(f"{key} {d[key]!r} is not supported (only {supported}: patch 2, one frame)")
    if d.get("siglip_feat_dim") is not None:
        raise ValueError(f"siglip_feat_dim {d['siglip_feat_dim']} is not supported (SigLIP image features are out of scope)")
    d = {k: v for k, v in d.items() if k not in _DROPPED_KEYS}
    for key in ("axes_dims", "axes_lens"):
        if isinstance(d.get(key), list):
            d[key] = tuple(d[key])
    return ZImageConfig(**{**d, **overrides})


def zimage_config(preset: str, **overrides) -> ZImageConfig:
    """A ``ZImageConfig`` of ``ZIMAGE_PRESETS`` with field overrides (use_source, dtype, remat, attention)."""
    if preset not in ZIMAGE_PRESETS:
        raise ValueError(f"unknown Z-Image preset {preset!r}; valid presets: {sorted(ZIMAGE_PRESETS)}")
    return config_from_diffusers(ZIMAGE_PRESETS[preset], **overrides)


# ------------------------------------------------------------------------------------------
# Sequence layout and RoPE (pure functions)
# ------------------------------------------------------------------------------------------


def round_up(n, multiple: int = SEQ_MULTI_OF):
    """``n`` rounded up to a multiple of ``multiple`` (Python or jnp integers)."""
    return (n + multiple - 1) // multiple * multiple


def caption_capacity(text_len: int, use_source: bool) -> int:
    """Length ``Lc`` of the caption slot for ``text_len`` text rows: ``ceil32(L)``, + 64 with a
    source (three segments padded separately take at most two blocks of 32 more than one)."""
    return round_up(text_len) + (SEQ_MULTI_OF * (SEGMENTS - 1) if use_source else 0)


class CaptionLayout(NamedTuple):
    """Where each token of a caption slot comes from (all [B, Lc] but the image starts, [B])."""

    rows: jax.Array  # int32: row of ``cond["text"]`` embedded there (clipped for pad / invalid tokens)
    pad: jax.Array  # bool: segment padding, which is ``cap_pad_token``
    valid: jax.Array  # bool: inside the sample's padded caption (a key); False past it
    position: jax.Array  # int32: RoPE axis-0 id (axes 1, 2 are 0)
    noisy: jax.Array  # bool: modulated by the noisy timestep (else the clean one)
    target_start: jax.Array  # int32 [B]: axis-0 id of the target image
    source_start: jax.Array  # int32 [B]: axis-0 id of the source image


def caption_layout(lengths: jax.Array, has_source: jax.Array, text_len: int, capacity: int) -> CaptionLayout:
    """The caption slot of ``capacity`` tokens for segment ``lengths`` int [B, 3] laid one after
    another in ``text_len`` text rows; samples without a source have lengths ``[L, 0, 0]``.

    Segment j (length ``l_j``, padded ``P_j = ceil32(l_j)``) fills slots ``[sum_{i<j} P_i,
    sum_{i<=j} P_i)``. Positions follow diffusers including the ``_pad_with_ids`` quirk (module
    docstring): the id list is, per segment, ``P_j`` ids from ``s_j`` then ``P_j - l_j`` zeros,
    and slot n takes entry n of the concatenation. Image starts: source at ``e_0``, target at
    ``e_1`` with a source, else at ``P_0 + 1`` (basic mode).
    """
    lengths = lengths.astype(jnp.int32)
    padded = round_up(lengths)
    slot = jnp.arange(capacity, dtype=jnp.int32)[None, :]

    def locate(block_sizes):
        """(block index, offset in the block) of every slot, for consecutive blocks of ``block_sizes``."""
        ends = jnp.cumsum(block_sizes, axis=-1)
        block = jnp.sum(slot[:, :, None] >= ends[:, None, : SEGMENTS - 1], axis=-1)
        start = jnp.take_along_axis(ends - block_sizes, block, axis=1)
        return block, slot - start

    def of(values, index):
        return jnp.take_along_axis(values, index, axis=1)

    segment, offset = locate(padded)
    rows = of(jnp.cumsum(lengths, axis=-1) - lengths, segment) + offset
    id_block, id_offset = locate(2 * padded - lengths)
    starts = 1 + jnp.cumsum(lengths + 2, axis=-1) - (lengths + 2)  # cap_cu_len: +2 per segment
    position = jnp.where(id_offset < of(padded, id_block), of(starts, id_block) + id_offset, 0)
    ends = starts + lengths  # cap_end_pos
    return CaptionLayout(
        rows=jnp.clip(rows, 0, text_len - 1),
        pad=offset >= of(lengths, segment),
        valid=slot < jnp.sum(padded, axis=-1, keepdims=True),
        position=position,
        noisy=(segment > 0) | ~has_source[:, None],
        target_start=jnp.where(has_source, ends[:, 1], padded[:, 0] + 1),
        source_start=ends[:, 0],
    )


def image_positions(start: jax.Array, height: int, width: int, padded: int) -> jax.Array:
    """Position ids int32 [B, padded, 3] of a ``height`` x ``width`` token grid at axis-0 id
    ``start`` [B]: ``(start, h, w)`` row-major, then ``(0, 0, 0)`` for the pad tokens."""
    h, w = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    hw = np.zeros((padded, 2), np.int32)
    hw[: height * width] = np.stack([h.ravel(), w.ravel()], axis=-1)
    first = jnp.where(np.arange(padded) < height * width, start[:, None], 0).astype(jnp.int32)
    return jnp.concatenate([first[..., None], jnp.broadcast_to(hw, (start.shape[0], padded, 2))], axis=-1)


@functools.lru_cache(maxsize=8)
def _rope_tables(theta: float, axes_dims: tuple[int, ...], axes_lens: tuple[int, ...]) -> tuple[tuple[np.ndarray, ...], ...]:
    """diffusers' ``RopeEmbedder.precompute_freqs_cis``: per axis, cos and sin float32
    [axes_lens[a], axes_dims[a] / 2] of ``float32(n * theta^(-2k/d))`` (the product in float64)."""
    tables = []
    for d, e in zip(axes_dims, axes_lens):
        freqs = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
        angles = np.outer(np.arange(e, dtype=np.float64), freqs).astype(np.float32).astype(np.float64)
        tables.append((np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)))
    return tuple(tables)


def rope(config: ZImageConfig, position: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) float32 [B, S, head_dim / 2] of position ids int [B, S, 3] (ids clamp to the tables)."""
    tables = _rope_tables(float(config.rope_theta), config.axes_dims, config.axes_lens)
    cos = [jnp.take(jnp.asarray(c), position[..., a], axis=0, mode="clip") for a, (c, _) in enumerate(tables)]
    sin = [jnp.take(jnp.asarray(s), position[..., a], axis=0, mode="clip") for a, (_, s) in enumerate(tables)]
    return jnp.concatenate(cos, axis=-1), jnp.concatenate(sin, axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the channel pairs (2k, 2k+1) of x [B, S, H, Dh] as complex numbers by (cos, sin)
    [B, S, Dh/2], in float32, back in x's dtype (``apply_rotary_emb`` of ``ZSingleStreamAttnProcessor``)."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, :, None], sin[:, :, None]
    return jnp.stack([re * c - im * s, re * s + im * c], axis=-1).reshape(x.shape).astype(x.dtype)


# ------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------


def _rms_norm(dim: int, eps: float, dtype, rngs: nnx.Rngs) -> nnx.RMSNorm:
    """diffusers ``RMSNorm(dim, eps)`` with a learned scale; statistics in float32, output in ``dtype``."""
    return nnx.RMSNorm(dim, epsilon=eps, dtype=dtype, scale_init=partitioned(nnx.initializers.ones_init(), ("norm",)), rngs=rngs)


def _projection(d_in: int, d_out: int, names: tuple, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """A bias-free ``nnx.Linear`` with logical axis names (Z-Image's attention and SwiGLU)."""
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, kernel_init=partitioned(XAVIER_INIT, names), rngs=rngs)


class Attention(nnx.Module):
    """diffusers ``Attention`` with ``ZSingleStreamAttnProcessor``: q/k/v, per-head RMS q/k-norm,
    RoPE on q and k, softmax attention over the valid keys, ``to_out``; no biases."""

    def __init__(self, config: ZImageConfig, *, rngs: nnx.Rngs):
        d, dt = config.dim, jnp.dtype(config.dtype)
        self.num_heads = config.n_heads
        self.implementation = config.attention
        self.to_q = _projection(d, d, ("embed", "heads"), dt, rngs)
        self.to_k = _projection(d, d, ("embed", "heads"), dt, rngs)
        self.to_v = _projection(d, d, ("embed", "heads"), dt, rngs)
        self.to_out = _projection(d, d, ("heads", "embed"), dt, rngs)
        self.norm_q = _rms_norm(config.head_dim, QK_NORM_EPS, dt, rngs) if config.qk_norm else None
        self.norm_k = _rms_norm(config.head_dim, QK_NORM_EPS, dt, rngs) if config.qk_norm else None

    def _heads(self, y: jax.Array, norm: nnx.RMSNorm | None) -> jax.Array:
        b, s, hd = y.shape
        y = y.reshape(b, s, self.num_heads, hd // self.num_heads)
        return y if norm is None else norm(y)

    def __call__(self, x: jax.Array, rotation: tuple[jax.Array, jax.Array], key_mask: jax.Array | None) -> jax.Array:
        """x [B, S, D] in the compute dtype, ``rotation`` = (cos, sin) [B, S, Dh/2], ``key_mask`` bool [B, S]."""
        q = constrain(apply_rope(self._heads(self.to_q(x), self.norm_q), *rotation), HEADS)
        k = constrain(apply_rope(self._heads(self.to_k(x), self.norm_k), *rotation), HEADS)
        v = constrain(self._heads(self.to_v(x), None), HEADS)
        o = attention(q, k, v, self.implementation, key_mask)
        return self.to_out(o.reshape(x.shape[0], x.shape[1], -1))


class FeedForward(nnx.Module):
    """diffusers Z-Image ``FeedForward``: SwiGLU ``w2(SiLU(w1 x) * w3 x)``, no biases."""

    def __init__(self, config: ZImageConfig, *, rngs: nnx.Rngs):
        d, f, dt = config.dim, config.mlp_hidden, jnp.dtype(config.dtype)
        self.w1 = _projection(d, f, ("embed", "mlp"), dt, rngs)
        self.w2 = _projection(f, d, ("mlp", "embed"), dt, rngs)
        self.w3 = _projection(d, f, ("embed", "mlp"), dt, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.w2(constrain(nnx.silu(self.w1(x)) * self.w3(x), MLP_HIDDEN))


class TransformerBlock(nnx.Module):
    """diffusers ``ZImageTransformerBlock``: sandwich-normed attention and SwiGLU, with adaLN
    scale and tanh gate from the timestep embedding when ``modulation`` (module docstring)."""

    def __init__(self, config: ZImageConfig, *, modulation: bool, rngs: nnx.Rngs):
        d, f32 = config.dim, jnp.float32
        self.dtype = jnp.dtype(config.dtype)
        self.attention = Attention(config, rngs=rngs)
        self.feed_forward = FeedForward(config, rngs=rngs)
        self.attention_norm1 = _rms_norm(d, config.norm_eps, f32, rngs)
        self.ffn_norm1 = _rms_norm(d, config.norm_eps, f32, rngs)
        self.attention_norm2 = _rms_norm(d, config.norm_eps, f32, rngs)
        self.ffn_norm2 = _rms_norm(d, config.norm_eps, f32, rngs)
        self.adaLN_modulation = linear(config.temb_dim, 4 * d, ("temb", "adaln"), f32, rngs, zero=True) if modulation else None

    def _modulation(self, temb: tuple[jax.Array, jax.Array | None], noisy: jax.Array | None) -> list[jax.Array]:
        """``[1 + scale_msa, tanh(gate_msa), 1 + scale_mlp, tanh(gate_mlp)]``, each [B, 1, D] from
        the noisy temb, or per token [B, S, D] choosing the noisy / clean temb by ``noisy`` [B, S]."""

        def chunks(c):
            scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(self.adaLN_modulation(c)[:, None], 4, axis=-1)
            return [1 + scale_msa, jnp.tanh(gate_msa), 1 + scale_mlp, jnp.tanh(gate_mlp)]

        temb_noisy, temb_clean = temb
        if noisy is None:
            return chunks(temb_noisy)
        return [jnp.where(noisy[..., None], n, c) for n, c in zip(chunks(temb_noisy), chunks(temb_clean))]

    def __call__(self, x, rotation, key_mask, temb=None, noisy=None) -> jax.Array:
        """Float32 tokens x [B, S, D]; ``temb`` (noisy, clean or None) [B, A] when modulated;
        ``noisy`` bool [B, S] or None (every token noisy)."""
        dt = self.dtype
        if self.adaLN_modulation is None:
            scale_msa = gate_msa = scale_mlp = gate_mlp = 1.0
        else:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self._modulation(temb, noisy)
        attn = self.attention((self.attention_norm1(x) * scale_msa).astype(dt), rotation, key_mask)
        x = constrain(x + gate_msa * self.attention_norm2(attn.astype(jnp.float32)), TOKENS)
        ff = self.feed_forward((self.ffn_norm1(x) * scale_mlp).astype(dt))
        return constrain(x + gate_mlp * self.ffn_norm2(ff.astype(jnp.float32)), TOKENS)


class TimestepEmbedder(nnx.Module):
    """diffusers Z-Image ``TimestepEmbedder``: ``linear_2(SiLU(linear_1([cos, sin](t f))))`` in
    float32, 256 frequencies ``f_k = 10000^(-k/128)`` (``layers.timestep_embedding``)."""

    def __init__(self, config: ZImageConfig, *, rngs: nnx.Rngs):
        self.linear_1 = linear(FREQUENCY_DIM, TIMESTEP_HIDDEN, ("freq", "mlp"), jnp.float32, rngs, init=NORMAL_INIT)
        self.linear_2 = linear(TIMESTEP_HIDDEN, config.temb_dim, ("mlp", "temb"), jnp.float32, rngs, init=NORMAL_INIT)

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.linear_2(nnx.silu(self.linear_1(timestep_embedding(t))))


class CaptionEmbedder(nnx.Module):
    """diffusers ``cap_embedder = Sequential(RMSNorm(cap_feat_dim), Linear(cap_feat_dim, dim))``, float32."""

    def __init__(self, config: ZImageConfig, *, rngs: nnx.Rngs):
        self.norm = _rms_norm(config.cap_feat_dim, config.norm_eps, jnp.float32, rngs)
        self.linear = linear(config.cap_feat_dim, config.dim, ("text_embed", "embed"), jnp.float32, rngs)

    def __call__(self, text: jax.Array) -> jax.Array:
        return self.linear(self.norm(text.astype(jnp.float32)))


class FinalLayer(nnx.Module):
    """diffusers Z-Image ``FinalLayer``: ``linear(LayerNorm(x) * (1 + adaLN_modulation(SiLU(temb))))``."""

    def __init__(self, config: ZImageConfig, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(config.dtype)
        self.adaLN_modulation = linear(config.temb_dim, config.dim, ("temb", "adaln"), jnp.float32, rngs, zero=True)
        self.linear = linear(config.dim, config.patch_dim, ("embed", "patch"), self.dtype, rngs, zero=True)

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        scale = 1 + self.adaLN_modulation(nnx.silu(temb))
        return self.linear((layer_norm(x, FINAL_NORM_EPS) * scale[:, None]).astype(self.dtype)).astype(jnp.float32)


class ZImageTransformer(nnx.Module):
    """Flow-matching velocity ``v = ZImageTransformer(x, t, cond)`` of Z-Image (module docstring).

    ``x`` [B, H, W, C] noisy latent (H, W even), ``t`` [B] sigma in [0, 1]; ``cond`` as the
    module docstring lists (``text``, ``text_mask``; with ``use_source`` also ``source``,
    ``source_mask``, ``text_segments``). Returns float32 [B, H, W, C]: minus diffusers' output
    at Z-Image time ``1 - t``.
    """

    def __init__(self, config: ZImageConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, dt = config.dim, jnp.dtype(config.dtype)
        self.x_embedder = linear(config.patch_dim, d, ("patch", "embed"), dt, rngs)
        self.t_embedder = TimestepEmbedder(config, rngs=rngs)
        self.cap_embedder = CaptionEmbedder(config, rngs=rngs)
        pad_token = partitioned(ZEROS_INIT, (None, "embed"))
        self.x_pad_token = nnx.Param(pad_token(rngs.params(), (1, d), jnp.float32))
        self.cap_pad_token = nnx.Param(pad_token(rngs.params(), (1, d), jnp.float32))
        def blocks(count: int, modulation: bool) -> nnx.List:
            return nnx.List([TransformerBlock(config, modulation=modulation, rngs=rngs) for _ in range(count)])

        self.noise_refiner = blocks(config.n_refiner_layers, True)
        self.context_refiner = blocks(config.n_refiner_layers, False)
        self.layers = blocks(config.n_layers, True)
        self.final_layer = FinalLayer(config, rngs=rngs)

    def _image_tokens(self, image: jax.Array) -> jax.Array:
        """[B, H, W, C] -> float32 tokens [B, ceil32(HW/4), D]: embedded patches, then ``x_pad_token``."""
        tokens = self.x_embedder(patchify(image.astype(jnp.dtype(self.config.dtype)), PATCH_SIZE)).astype(jnp.float32)
        b, n, d = tokens.shape
        pad = jnp.broadcast_to(self.x_pad_token[...], (b, round_up(n) - n, d))
        return jnp.concatenate([tokens, pad], axis=1)

    def _caption_lengths(self, cond: Condition, has_source: jax.Array) -> jax.Array:
        """Segment lengths int32 [B, 3]: ``[count, 0, 0]`` without a source, else ``text_segments``
        clipped one after another to the text_mask count."""
        count = jnp.sum(cond["text_mask"], axis=-1).astype(jnp.int32)
        basic = jnp.stack([count, jnp.zeros_like(count), jnp.zeros_like(count)], axis=-1)
        if not self.config.use_source:
            return basic
        segments = jnp.maximum(cond["text_segments"].astype(jnp.int32), 0)
        before = jnp.cumsum(segments, axis=-1) - segments
        clipped = jnp.clip(segments, 0, jnp.maximum(count[:, None] - before, 0))
        return jnp.where(has_source[:, None], clipped, basic)

    def __call__(self, x: jax.Array, t: jax.Array, cond: Condition) -> jax.Array:
        cfg = self.config
        b, h, w, c = x.shape
        if h % PATCH_SIZE or w % PATCH_SIZE:
            raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {PATCH_SIZE}")
        gh, gw = h // PATCH_SIZE, w // PATCH_SIZE
        n = gh * gw
        text_len = cond["text"].shape[1]
        has_source = cond["source_mask"].astype(bool) if cfg.use_source else jnp.zeros((b,), bool)
        lengths = self._caption_lengths(cond, has_source)
        layout = caption_layout(lengths, has_source, text_len, caption_capacity(text_len, cfg.use_source))

        # Timestep embeddings: Z-Image time 1 - t (noisy) and 1 (clean, the source's).
        t = t.astype(jnp.float32)
        temb_noisy = self.t_embedder(cfg.t_scale * (1 - t))
        temb = (temb_noisy, self.t_embedder(jnp.full_like(t, cfg.t_scale)) if cfg.use_source else None)

        def run(blocks, tokens, rotation, key_mask, temb=None, noisy=None):
            apply = rematerialised(lambda block, *args: block(*args), cfg.remat)
            for block in blocks:
                tokens = apply(block, tokens, rotation, key_mask, temb, noisy)
            return tokens

        # Images: [target, source], refined together (the source clean, absent ones masked).
        image = self._image_tokens(x)
        image_position = image_positions(layout.target_start, gh, gw, image.shape[1])
        image_mask = image_noisy = None
        if cfg.use_source:
            ones = jnp.ones((b, image.shape[1]), bool)
            source_position = image_positions(layout.source_start, gh, gw, image.shape[1])
            image = jnp.concatenate([image, self._image_tokens(cond["source"])], axis=1)
            image_position = jnp.concatenate([image_position, source_position], axis=1)
            image_mask = jnp.concatenate([ones, ones & has_source[:, None]], axis=1)
            image_noisy = jnp.concatenate([ones, ~ones], axis=1)
        image_rotation = rope(cfg, image_position)
        image = run(self.noise_refiner, constrain(image, TOKENS), image_rotation, image_mask, temb, image_noisy)

        # Caption slot: embedded text rows, segment padding -> cap_pad_token; invalid slots zeroed
        # after refining (a sample without caption tokens has no valid key there).
        caption = self.cap_embedder(cond["text"])
        caption = jnp.take_along_axis(caption, layout.rows[..., None], axis=1)
        caption = jnp.where(layout.pad[..., None], self.cap_pad_token[...], caption)
        zeros = jnp.zeros_like(layout.position)
        caption_rotation = rope(cfg, jnp.stack([layout.position, zeros, zeros], axis=-1))
        caption = run(self.context_refiner, constrain(caption, TOKENS), caption_rotation, layout.valid, None)
        caption = jnp.where(layout.valid[..., None], caption, 0.0)

        # Joint sequence [images, caption]; the target's tokens are decoded.
        tokens = constrain(jnp.concatenate([image, caption], axis=1), TOKENS)
        rotation = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), image_rotation, caption_rotation)
        image_keys = jnp.ones(image.shape[:2], bool) if image_mask is None else image_mask
        key_mask = jnp.concatenate([image_keys, layout.valid], axis=1)
        noisy = None if image_noisy is None else jnp.concatenate([image_noisy, layout.noisy], axis=1)
        tokens = run(self.layers, tokens, rotation, key_mask, temb, noisy)

        out = self.final_layer(tokens[:, :n], temb_noisy)
        return -unpatchify(out, PATCH_SIZE, h, w, c)


# ------------------------------------------------------------------------------------------
# Weights, sizes, FLOPs
# ------------------------------------------------------------------------------------------

# NNX path prefix -> diffusers prefix (first match); the rest of the path goes through _TORCH_SEGMENTS.
_TORCH_PREFIXES = (
    ("x_embedder.", f"all_x_embedder.{PATCH_SIZE}-1."),
    ("final_layer.adaLN_modulation.", f"all_final_layer.{PATCH_SIZE}-1.adaLN_modulation.1."),
    ("final_layer.", f"all_final_layer.{PATCH_SIZE}-1."),
    ("t_embedder.linear_1.", "t_embedder.mlp.0."),
    ("t_embedder.linear_2.", "t_embedder.mlp.2."),
    ("cap_embedder.norm.", "cap_embedder.0."),
    ("cap_embedder.linear.", "cap_embedder.1."),
)
# NNX attribute -> diffusers module/leaf name, per dotted path segment.
_TORCH_SEGMENTS = {"adaLN_modulation": "adaLN_modulation.0", "to_out": "to_out.0", "kernel": "weight", "scale": "weight"}


def _torch_name(path: str) -> str:
    head, rest = next(((theirs, path[len(ours) :]) for ours, theirs in _TORCH_PREFIXES if path.startswith(ours)), ("", path))
    return head + ".".join(_TORCH_SEGMENTS.get(s, s) for s in rest.split("."))


def _abstract_model(config: ZImageConfig) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: ZImageTransformer(config, rngs=InitKeys(0))))


def torch_names_of(abstract: nnx.State) -> dict[str, str]:
    """``torch_names`` from an (abstract) state already at hand, e.g. the base part of a LoRA model."""
    return {p: _torch_name(p) for p in param_shapes(abstract)}


@functools.lru_cache(maxsize=16)
def _torch_names_and_ranks(config: ZImageConfig) -> tuple[tuple[str, str, int], ...]:
    """``(NNX path, diffusers key, rank of the variable)`` of every variable, from one abstract trace."""
    abstract = _abstract_model(config)[1]
    shapes = param_shapes(abstract)
    return tuple((path, key, len(shapes[path])) for path, key in torch_names_of(abstract).items())


def torch_names(config: ZImageConfig) -> dict[str, str]:
    """``{dotted NNX path: diffusers state-dict key}`` for every variable of ``ZImageTransformer(config)``.

    The NNX tree mirrors diffusers' module names except: ``x_embedder`` / ``final_layer`` are
    ``all_x_embedder.2-1`` / ``all_final_layer.2-1``; ``t_embedder.linear_1`` / ``linear_2`` are
    ``t_embedder.mlp.0`` / ``mlp.2``; ``cap_embedder.norm`` / ``linear`` are ``cap_embedder.0`` /
    ``1``; a block's ``adaLN_modulation`` is ``adaLN_modulation.0``, the final layer's
    ``adaLN_modulation.1``; ``to_out`` is ``to_out.0``; linear ``kernel`` and RMSNorm ``scale``
    are ``weight`` (the loader transposes kernels). Cached per config.
    """
    return {path: key for path, key, _ in _torch_names_and_ranks(config)}


def linear_torch_names(config: ZImageConfig) -> dict[str, str]:
    """``torch_names`` of the linear layers' kernels: the layers a LoRA adapter can sit on."""
    return {path: key for path, key, rank in _torch_names_and_ranks(config) if path.endswith(".kernel") and rank == 2}


def load_zimage(folder: str, **overrides) -> ZImageTransformer:
    """A ``ZImageTransformer`` from a diffusers transformer folder (``config.json`` + safetensors,
    sharded or not). ``overrides`` set ``ZImageConfig`` fields (use_source, dtype, remat,
    attention). Any missing, unexpected or mis-shaped tensor raises one ``WeightsMismatch``."""
    with open(os.path.join(folder, "config.json")) as f:
        config = config_from_diffusers(json.load(f), **overrides)
    graphdef, abstract = _abstract_model(config)
    return nnx.merge(graphdef, load_state(abstract, open_safetensors(folder), torch_names_of(abstract)))


def param_count(config: ZImageConfig) -> int:
    """Number of parameters, as diffusers' ``parameters()`` counts them."""
    params = nnx.state(nnx.eval_shape(lambda: ZImageTransformer(config, rngs=InitKeys(0))), nnx.Param)
    return sum(int(np.prod(leaf.shape)) for _, leaf in nnx.to_flat_state(params))


def forward_flops(config: ZImageConfig, batch_size: int, image_tokens: int, text_len: int) -> int:
    """Analytical FLOPs of one ``ZImageTransformer`` forward, as compiled (masked slots included).

    ``image_tokens`` is the target's token count (H/2)(W/2), ``text_len`` the text rows L. Image
    slots are ``Pi = ceil32(image_tokens)`` per image (two with ``use_source``), the caption slot
    ``caption_capacity(L)``. Counts 2*m*n*k for every matrix product: the patch embedding, the
    timestep MLP (twice with ``use_source``: noisy and clean), the caption embedding of the L
    rows, per block the adaLN linear (per temb), q/k/v/out, QK^T and AV over all slots and the
    SwiGLU, then the final layer over the target's real tokens. Elementwise work is not counted.
    """
    cfg, b, d = config, batch_size, config.dim
    images = 2 if cfg.use_source else 1
    temb_count = 2 if cfg.use_source else 1
    pi, lc = round_up(image_tokens), caption_capacity(text_len, cfg.use_source)

    def block(tokens: int, modulated: bool) -> int:
        flops = 2 * b * tokens * d * d * 4  # to_q, to_k, to_v, to_out
        flops += 2 * 2 * b * tokens * tokens * d  # QK^T and AV
        flops += 2 * b * tokens * d * cfg.mlp_hidden * 3  # w1, w3, w2
        return flops + (2 * b * temb_count * cfg.temb_dim * 4 * d if modulated else 0)

    total = 2 * b * images * image_tokens * cfg.patch_dim * d
    total += 2 * b * temb_count * (FREQUENCY_DIM * TIMESTEP_HIDDEN + TIMESTEP_HIDDEN * cfg.temb_dim)
    total += 2 * b * text_len * cfg.cap_feat_dim * d
    total += cfg.n_refiner_layers * (block(images * pi, True) + block(lc, False))
    total += cfg.n_layers * block(images * pi + lc, True)
    return total + 2 * b * cfg.temb_dim * d + 2 * b * image_tokens * d * cfg.patch_dim
