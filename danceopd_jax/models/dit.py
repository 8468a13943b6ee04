"""DiT: a diffusion transformer that predicts the flow-matching velocity ``v(x, t, cond)``.

Architecture of Peebles & Xie, "Scalable Diffusion Models with Transformers" (ICCV 2023):
patchified image tokens with a fixed 2D sin-cos positional embedding, a conditioning vector
``c`` (timestep + label + pooled text) that drives adaLN-Zero blocks, and a zero-initialised
final layer, so a freshly initialised model predicts exactly zero velocity.

Two conditioning routes beyond the paper's class labels share one joint self-attention:

  * text: projected text tokens are appended to the sequence (masked out of the attention keys
    by ``text_mask``), and their masked mean is added to ``c``;
  * edit source (``use_source``): the clean source image is patchified by its own projection,
    given the image positional embedding plus a learned source-type embedding, and appended to
    the sequence; a sample's source tokens are masked out of the keys where ``source_mask`` is
    False. The source is never noised.

The sequence is ``[image, text, source]``; image tokens are always valid keys, so no attention
row is empty, and only image tokens are decoded.

Every parameter carries logical axis names (``nnx.with_partitioning``): ``embed`` (hidden),
``heads`` (num_heads * head_dim), ``mlp`` (MLP hidden), ``adaln`` (modulation outputs),
``patch`` (p * p * C), ``text_embed`` (text_dim), ``vocab`` (label rows), ``freq`` (timestep
frequencies). Hidden -> hidden projections outside attention (timestep MLP, pooled text) use
``('mlp', 'embed')`` so that no mesh axis appears twice in one spec. Logical axis rules must
name every axis in ``LOGICAL_AXES`` (map the unsharded ones to ``None``). Parameters are
sharded at creation when a mesh is set (``jax.set_mesh``); without one they are created
unsharded, so the model also builds on a single device.

The hot activations are pinned to the layout of their logical names (``layers.ACTIVATION_AXES``,
MaxText's names) under the active rules: the token stream between blocks ``TOKENS``, the
attention's q/k/v ``HEADS`` and the MLP hidden ``MLP_HIDDEN``. Without a mesh or rules (one
device, or tracing outside ``parallel.sharding_context``) the constraints are no-ops.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from danceopd_jax.core.conditioning import NULL_LABEL, Condition
from danceopd_jax.models.layers import (
    ACTIVATION_AXES,
    FREQUENCY_DIM,
    HEADS,
    MLP_HIDDEN,
    NORMAL_INIT,
    REMAT_POLICIES,
    TOKENS,
    attention,
    check_attention,
    constrain,
    layer_norm,
    linear,
    modulate,
    partitioned,
    patchify,
    rematerialised,
    timestep_embedding,
    unpatchify,
)

LOGICAL_AXES = ("embed", "heads", "mlp", "adaln", "patch", "text_embed", "vocab", "freq", *ACTIVATION_AXES)

PRESETS = {
    "tiny": dict(hidden_size=32, depth=2, num_heads=2),
    "mini": dict(hidden_size=64, depth=4, num_heads=4),  # the shapes world on a CPU
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Shape of a DiT. ``num_classes``/``text_dim`` 0 switch that conditioning off.

    ``dtype`` is the compute dtype; parameters are always float32 and the output is float32.
    """

    image_size: int
    hidden_size: int
    depth: int
    num_heads: int
    channels: int = 3
    patch_size: int = 2
    mlp_ratio: float = 4.0
    num_classes: int = 0
    text_dim: int = 0
    use_source: bool = False
    dtype: str = "float32"
    zero_init: bool = True  # adaLN-Zero; False gives a random non-zero field (stand-in experts)
    remat: str = "none"  # rematerialise each block in the backward pass: layers.REMAT_POLICIES
    attention: str = "xla"  # layers.ATTENTION_IMPLEMENTATIONS

    def __post_init__(self):
        for name in ("image_size", "channels", "patch_size", "hidden_size", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"DiTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"DiTConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.num_classes < 0 or self.text_dim < 0:
            raise ValueError("DiTConfig.num_classes and text_dim must be >= 0 (0 = unused)")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.hidden_size % 4:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by 4 (2D sin-cos embedding)"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"DiTConfig.remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")
        if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
            raise ValueError(f"DiTConfig.dtype must be a float dtype, got {self.dtype!r}")
        check_attention("DiTConfig", self.attention, self.dtype)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.channels

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


def dit_config(preset: str, **overrides) -> DiTConfig:
    """A ``DiTConfig`` from a named size (``PRESETS``) with field overrides (e.g. image_size)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; valid presets: {sorted(PRESETS)}")
    return DiTConfig(**{**PRESETS[preset], **overrides})


# ------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------


def sincos_pos_embed_2d(dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2D sin-cos positional embedding [grid_size**2, dim] (MAE / DiT)."""

    def embed_1d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_w, grid_h = np.meshgrid(np.arange(grid_size), np.arange(grid_size))
    emb = np.concatenate([embed_1d(dim // 2, grid_w), embed_1d(dim // 2, grid_h)], axis=1)
    return emb.astype(np.float32)


# ------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------


class DiTBlock(nnx.Module):
    """Transformer block with adaLN-Zero conditioning (DiT paper, Sec. 3.2, Fig. 3).

    ``shift/scale/gate`` for attention and MLP come from a zero-initialised
    ``Linear(SiLU(c))``, so each block starts as the identity.
    """

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        d, dt = config.hidden_size, jnp.dtype(config.dtype)
        self.num_heads = config.num_heads
        self.implementation = config.attention
        self.modulation = linear(d, 6 * d, ("embed", "adaln"), dt, rngs, zero=config.zero_init)
        self.q = linear(d, d, ("embed", "heads"), dt, rngs)
        self.k = linear(d, d, ("embed", "heads"), dt, rngs)
        self.v = linear(d, d, ("embed", "heads"), dt, rngs)
        self.out = linear(d, d, ("heads", "embed"), dt, rngs)
        self.fc1 = linear(d, config.mlp_hidden, ("embed", "mlp"), dt, rngs)
        self.fc2 = linear(config.mlp_hidden, d, ("mlp", "embed"), dt, rngs)

    def __call__(self, x: jax.Array, c: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        """x [B, S, D], c = SiLU(conditioning) [B, D], key_mask bool [B, S] (None: all keys valid)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(self.modulation(c), 6, -1)
        h = self.attention(modulate(layer_norm(x), shift_a, scale_a), key_mask)
        x = constrain(x + gate_a[:, None] * h, TOKENS)
        h = constrain(jax.nn.gelu(self.fc1(modulate(layer_norm(x), shift_m, scale_m)), approximate=True), MLP_HIDDEN)
        return constrain(x + gate_m[:, None] * self.fc2(h), TOKENS)

    def attention(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        """Multi-head self-attention over valid keys (``config.attention`` implementation)."""
        b, s, d = x.shape
        heads = lambda y: constrain(y.reshape(b, s, self.num_heads, d // self.num_heads), HEADS)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        o = attention(q, k, v, self.implementation, key_mask)
        return self.out(o.reshape(b, s, d))


class DiT(nnx.Module):
    """Flow-matching velocity model ``v = DiT(x, t, cond)`` (Peebles & Xie 2023, adaLN-Zero)."""

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, dt = config.hidden_size, jnp.dtype(config.dtype)
        self.patch_embed = linear(config.patch_dim, d, ("patch", "embed"), dt, rngs)
        self.time_fc1 = linear(FREQUENCY_DIM, d, ("freq", "mlp"), dt, rngs, init=NORMAL_INIT)
        self.time_fc2 = linear(d, d, ("mlp", "embed"), dt, rngs, init=NORMAL_INIT)
        if config.num_classes:
            self.label_embed = nnx.Embed(
                config.num_classes + 1,  # last row: the null label (classifier-free guidance)
                d,
                dtype=dt,
                embedding_init=partitioned(NORMAL_INIT, ("vocab", "embed")),
                rngs=rngs,
            )
        if config.text_dim:
            self.text_proj = linear(config.text_dim, d, ("text_embed", "embed"), dt, rngs)
            self.text_pool = linear(d, d, ("mlp", "embed"), dt, rngs)
        if config.use_source:
            self.source_embed = linear(config.patch_dim, d, ("patch", "embed"), dt, rngs)
            self.source_type = nnx.Param(partitioned(NORMAL_INIT, ("embed",))(rngs.params(), (d,)))
        self.blocks = nnx.List([DiTBlock(config, rngs=rngs) for _ in range(config.depth)])
        self.final_modulation = linear(d, 2 * d, ("embed", "adaln"), dt, rngs, zero=config.zero_init)
        self.final_proj = linear(d, config.patch_dim, ("embed", "patch"), dt, rngs, zero=config.zero_init)

    def __call__(self, x: jax.Array, t: jax.Array, cond: Condition) -> jax.Array:
        """x [B, H, W, C] noisy state, t [B] sigma in [0, 1], cond -> velocity [B, H, W, C] f32."""
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        b = x.shape[0]
        pos = jnp.asarray(sincos_pos_embed_2d(cfg.hidden_size, cfg.grid_size), dt)

        tokens = [self.patch_embed(patchify(x.astype(dt), cfg.patch_size)) + pos]
        masks = [jnp.ones((b, cfg.num_patches), bool)]  # image tokens are always valid keys
        c = self.time_fc2(nnx.silu(self.time_fc1(timestep_embedding(t * 1000).astype(dt))))

        if cfg.num_classes:
            label = cond["label"]
            c = c + self.label_embed(jnp.where(label == NULL_LABEL, cfg.num_classes, label))
        if cfg.text_dim:
            text_mask = cond["text_mask"].astype(bool)
            text = self.text_proj(cond["text"].astype(dt))
            weights = text_mask[..., None].astype(jnp.float32)
            pooled = (text * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
            c = c + self.text_pool(pooled.astype(dt))
            tokens.append(text)
            masks.append(text_mask)
        if cfg.use_source:
            source = patchify(cond["source"].astype(dt), cfg.patch_size)
            tokens.append(self.source_embed(source) + pos + self.source_type[...].astype(dt))
            source_mask = cond["source_mask"].astype(bool)[:, None]
            masks.append(jnp.broadcast_to(source_mask, (b, cfg.num_patches)))

        h = constrain(jnp.concatenate(tokens, axis=1), TOKENS)
        key_mask = jnp.concatenate(masks, axis=1) if len(masks) > 1 else None  # image tokens only: no mask
        c = nnx.silu(c)

        def apply(block: DiTBlock, h: jax.Array) -> jax.Array:
            return block(h, c, key_mask)

        apply = rematerialised(apply, cfg.remat)
        for block in self.blocks:
            h = apply(block, h)

        shift, scale = jnp.split(self.final_modulation(c), 2, -1)
        out = self.final_proj(modulate(layer_norm(h[:, : cfg.num_patches]), shift, scale))
        v = unpatchify(out, cfg.patch_size, cfg.image_size, cfg.image_size, cfg.channels)
        return v.astype(jnp.float32)


def forward_flops(config: DiTConfig, batch_size: int, text_len: int = 0) -> int:
    """Analytical FLOPs of one ``DiT`` forward pass.

    Counts 2*m*n*k for every matrix product: patch/source/text projections, timestep MLP,
    pooled-text projection, per-block adaLN modulation, q/k/v/out projections, attention
    QK^T and AV over the full sequence (image + text tokens when ``text_dim`` > 0 + source
    tokens when ``use_source``), the MLP, and the final adaLN + output projection. Elementwise
    work (norms, softmax, activations, embedding lookups) is not counted.
    """
    cfg, b, d = config, batch_size, config.hidden_size
    n = cfg.num_patches
    text_len = text_len if cfg.text_dim else 0
    s = n + text_len + (n if cfg.use_source else 0)

    embed = 2 * b * n * cfg.patch_dim * d
    embed += 2 * b * (FREQUENCY_DIM * d + d * d)  # timestep MLP
    if cfg.text_dim:
        embed += 2 * b * text_len * cfg.text_dim * d + 2 * b * d * d
    if cfg.use_source:
        embed += 2 * b * n * cfg.patch_dim * d

    block = 2 * b * d * 6 * d  # adaLN modulation
    block += 2 * b * s * d * 4 * d  # q, k, v, out
    block += 2 * 2 * b * s * s * d  # QK^T and AV
    block += 2 * 2 * b * s * d * cfg.mlp_hidden  # fc1, fc2

    final = 2 * b * d * 2 * d + 2 * b * n * d * cfg.patch_dim
    return embed + cfg.depth * block + final
