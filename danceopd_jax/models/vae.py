"""AutoencoderKL: the KL-regularised image autoencoder of latent diffusion, as SD3 / SD3.5 use it.

A port of diffusers' ``AutoencoderKL`` (0.42.1: ``models/autoencoders/autoencoder_kl.py``, the
``Encoder``/``Decoder`` of ``autoencoders/vae.py``, ``DownEncoderBlock2D``/``UpDecoderBlock2D``/
``UNetMidBlock2D`` of ``unets/unet_2d_blocks.py``, ``ResnetBlock2D``, ``Downsample2D``,
``Upsample2D`` and the mid block's group-normed spatial self-attention) to Flax NNX, after
Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (CVPR 2022):

  encoder: conv_in -> down blocks (resnets, then a stride-2 conv except in the last block)
           -> mid block (resnet, self-attention, resnet) -> GroupNorm, SiLU -> conv_out
           -> [quant_conv] -> moments (mean, logvar) of a diagonal Gaussian;
  decoder: [post_quant_conv] -> conv_in -> mid block -> up blocks (layers_per_block + 1
           resnets, then nearest x2 and a conv except in the last block)
           -> GroupNorm, SiLU -> conv_out.

Layout is NHWC throughout: images [B, H, W, in_channels] in [-1, 1], latents [B, h, w,
latent_channels] with h = H / 2**(len(block_out_channels) - 1). Every GroupNorm has
``norm_num_groups`` groups and epsilon 1e-6 (diffusers' ``resnet_eps`` for the VAE). Parameters
are float32; convolutions and projections run in the compute dtype; group-norm statistics,
attention logits and softmax, the moments and the decoded images are float32.

Parameters carry logical axis names (``LOGICAL_AXES``): conv kernels ``(kernel_h, kernel_w,
channels_in, channels_out)``, attention projections ``(channels_in, channels_out)``, biases
``(channels_out,)``, group-norm scale and bias ``(channels_in,)`` (the channels they normalise).
``parallel.axis_rules({}, LOGICAL_AXES)`` leaves them all unsharded.

NNX attributes carry diffusers' module names, so ``torch_names`` is mechanical: ``kernel`` and a
norm's ``scale`` are torch's ``weight``; ``downsample``/``upsample`` are ``downsamplers.0.conv``/
``upsamplers.0.conv``; an attention's ``to_out`` is ``to_out.0``.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from danceopd_jax.models.init_keys import InitKeys
from danceopd_jax.models.layers import partitioned
from danceopd_jax.models.weights import param_shapes

LOGICAL_AXES = ("kernel_h", "kernel_w", "channels_in", "channels_out")

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
NORM_EPS = 1e-6  # diffusers' resnet_eps and GroupNorm eps of Encoder, Decoder and mid-block attention
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution clamps logvar to this range


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Shape of an ``AutoencoderKL``, with diffusers' config names and defaults.

    ``scaling_factor``/``shift_factor`` map encoder latents to the diffusion model's latents
    (``latents_from_images``). ``dtype`` is the compute dtype (parameters float32, output
    float32); ``force_upcast`` computes in float32 when ``dtype`` is float16, as diffusers'
    pipelines upcast a float16 VAE whose config sets it (float16 overflows in the VAE at high
    resolutions; bfloat16 has float32's range and is left as is).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"VAEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.block_out_channels or min(self.block_out_channels) < 1:
            raise ValueError(f"VAEConfig.block_out_channels must be non-empty and >= 1, got {self.block_out_channels}")
        for name, valid in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            types = getattr(self, name)
            if len(types) != len(self.block_out_channels):
                raise ValueError(
                    f"VAEConfig.{name} has {len(types)} blocks but block_out_channels has {len(self.block_out_channels)}"
                )
            unsupported = [t for t in types if t not in valid]
            if unsupported:
                raise ValueError(f"VAEConfig.{name}: unsupported block type {unsupported[0]!r}; supported: {', '.join(valid)}")
        indivisible = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if indivisible:
            raise ValueError(
                f"VAEConfig.block_out_channels {indivisible[0]} is not divisible by norm_num_groups {self.norm_num_groups}"
            )
        if self.scaling_factor <= 0:
            raise ValueError(f"VAEConfig.scaling_factor must be > 0, got {self.scaling_factor}")
        if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
            raise ValueError(f"VAEConfig.dtype must be a float dtype, got {self.dtype!r}")

    @property
    def compute_dtype(self) -> jnp.dtype:
        """``dtype``, or float32 when ``force_upcast`` and ``dtype`` is float16."""
        if self.force_upcast and jnp.dtype(self.dtype) == jnp.float16:
            return jnp.dtype(jnp.float32)
        return jnp.dtype(self.dtype)


# stabilityai/stable-diffusion-3-medium-diffusers and stable-diffusion-3.5-* ``vae/config.json``.
SD3_VAE = VAEConfig(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

_TUPLE_KEYS = ("down_block_types", "up_block_types", "block_out_channels")
_IGNORED_KEYS = ("sample_size",)  # only sizes diffusers' tiled encode/decode, which is not ported


def config_from_diffusers(d: dict, **overrides) -> VAEConfig:
    """A ``VAEConfig`` from a diffusers ``AutoencoderKL`` ``config.json`` dict (plus e.g. ``dtype``).

    Keys left out take diffusers' defaults (the dataclass mirrors them); ``shift_factor`` null is
    0. Unsupported settings raise a ``ValueError`` naming the key: another ``_class_name``, an
    ``act_fn`` other than SiLU, per-channel ``latents_mean``/``latents_std``, other block types,
    or a key ``AutoencoderKL`` does not have.
    """
    fields = {f.name for f in dataclasses.fields(VAEConfig)} - {"dtype"}
    kwargs = {}
    for key, value in d.items():
        if (key.startswith("_") and key != "_class_name") or key in _IGNORED_KEYS:
            continue
        if key == "_class_name":
            if value != "AutoencoderKL":
                raise ValueError(f"config _class_name: expected 'AutoencoderKL', got {value!r}")
        elif key == "act_fn":
            if value not in ("silu", "swish"):
                raise ValueError(f"config act_fn: only 'silu' is supported, got {value!r}")
        elif key in ("latents_mean", "latents_std"):
            if value is not None:
                raise ValueError(f"config {key}: per-channel latent statistics are not supported (expected null)")
        elif key == "shift_factor":
            kwargs[key] = 0.0 if value is None else float(value)
        elif key in fields:
            kwargs[key] = tuple(value) if key in _TUPLE_KEYS else value
        else:
            raise ValueError(f"config {key}: not an AutoencoderKL setting this port supports")
    for key, valid in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
        unsupported = [t for t in kwargs.get(key, ()) if t not in valid]
        if unsupported:
            raise ValueError(f"config {key}: unsupported block type {unsupported[0]!r}; supported: {', '.join(valid)}")
    return VAEConfig(**{**kwargs, **overrides})


# ------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, eps: float = NORM_EPS) -> jax.Array:
    """GroupNorm (Wu & He 2018) over [B, H, W, C]: statistics per sample and group of C/num_groups
    channels over H, W and the group, in float32; affine per channel; result in x's dtype."""
    b, h, w, c = x.shape
    x32 = x.astype(jnp.float32).reshape(b, h, w, num_groups, c // num_groups)
    mean = x32.mean((1, 2, 4), keepdims=True)
    var = jnp.square(x32 - mean).mean((1, 2, 4), keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def upsample_nearest(x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, 2H, 2W, C], each pixel repeated 2x2 (torch ``interpolate(mode='nearest')``)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


# ------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------

_CONV_AXES = ("kernel_h", "kernel_w", "channels_in", "channels_out")


def _conv(c_in, c_out, kernel_size, dtype, rngs, *, strides=1, padding=None) -> nnx.Conv:
    """Conv2d with torch's zero padding ``kernel_size // 2`` on every side unless ``padding`` is given."""
    pad = kernel_size // 2
    return nnx.Conv(
        c_in,
        c_out,
        (kernel_size, kernel_size),
        strides=strides,
        padding=padding if padding is not None else ((pad, pad), (pad, pad)),
        dtype=dtype,
        kernel_init=partitioned(nnx.initializers.lecun_normal(), _CONV_AXES),
        bias_init=partitioned(nnx.initializers.zeros_init(), ("channels_out",)),
        rngs=rngs,
    )


def _linear(d_in, d_out, dtype, rngs) -> nnx.Linear:
    return nnx.Linear(
        d_in,
        d_out,
        dtype=dtype,
        kernel_init=partitioned(nnx.initializers.lecun_normal(), ("channels_in", "channels_out")),
        bias_init=partitioned(nnx.initializers.zeros_init(), ("channels_out",)),
        rngs=rngs,
    )


class GroupNorm(nnx.Module):
    """``torch.nn.GroupNorm(num_groups, channels, eps=1e-6, affine=True)`` on NHWC (``group_norm``)."""

    def __init__(self, channels: int, num_groups: int):
        self.num_groups = num_groups
        self.scale = nnx.Param(partitioned(nnx.initializers.ones_init(), ("channels_in",))(None, (channels,)))
        self.bias = nnx.Param(partitioned(nnx.initializers.zeros_init(), ("channels_in",))(None, (channels,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return group_norm(x, self.scale[...], self.bias[...], self.num_groups)


class ResnetBlock2D(nnx.Module):
    """``x + conv2(SiLU(norm2(conv1(SiLU(norm1(x))))))`` with a 1x1 ``conv_shortcut`` on x when the
    channel count changes (diffusers ``ResnetBlock2D`` without time embedding, dropout 0)."""

    def __init__(self, c_in: int, c_out: int, config: VAEConfig, *, rngs: nnx.Rngs):
        dt, groups = config.compute_dtype, config.norm_num_groups
        self.norm1 = GroupNorm(c_in, groups)
        self.conv1 = _conv(c_in, c_out, 3, dt, rngs)
        self.norm2 = GroupNorm(c_out, groups)
        self.conv2 = _conv(c_out, c_out, 3, dt, rngs)
        self.conv_shortcut = _conv(c_in, c_out, 1, dt, rngs) if c_in != c_out else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SpatialSelfAttention(nnx.Module):
    """Single-head self-attention over the H*W pixels of a group-normed feature map, with a residual.

    diffusers ``Attention(channels, heads=1, dim_head=channels, norm_num_groups=...,
    residual_connection=True)`` as built by ``UNetMidBlock2D``: ``x + to_out(softmax(q k^T /
    sqrt(C)) v)`` with q, k, v projections of ``group_norm(x)``; logits and softmax in float32.
    """

    def __init__(self, channels: int, config: VAEConfig, *, rngs: nnx.Rngs):
        dt = config.compute_dtype
        self.group_norm = GroupNorm(channels, config.norm_num_groups)
        self.to_q = _linear(channels, channels, dt, rngs)
        self.to_k = _linear(channels, channels, dt, rngs)
        self.to_v = _linear(channels, channels, dt, rngs)
        self.to_out = _linear(channels, channels, dt, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, 1, c)
        o = jax.nn.dot_product_attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens))
        return x + self.to_out(o.reshape(b, h, w, c))


class UNetMidBlock2D(nnx.Module):
    """resnet -> [self-attention] -> resnet at the lowest resolution (diffusers ``UNetMidBlock2D``, one layer)."""

    def __init__(self, channels: int, config: VAEConfig, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, config, rngs=rngs) for _ in range(2)])
        attentions = [SpatialSelfAttention(channels, config, rngs=rngs)] if config.mid_block_add_attention else []
        self.attentions = nnx.List(attentions)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
    """``num_layers`` resnets, then (``add_downsample``) diffusers' ``Downsample2D(padding=0)``:
    zero padding of one row at the bottom and one column at the right, then a 3x3 stride-2 conv."""

    def __init__(self, c_in: int, c_out: int, num_layers: int, add_downsample: bool, config: VAEConfig, *, rngs):
        self.resnets = nnx.List(
            [ResnetBlock2D(c_in if i == 0 else c_out, c_out, config, rngs=rngs) for i in range(num_layers)]
        )
        self.downsample = (
            _conv(c_out, c_out, 3, config.compute_dtype, rngs, strides=2, padding=((0, 1), (0, 1)))
            if add_downsample
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsample is None else self.downsample(x)


class UpDecoderBlock2D(nnx.Module):
    """``num_layers`` resnets, then (``add_upsample``) diffusers' ``Upsample2D``: nearest x2, 3x3 conv."""

    def __init__(self, c_in: int, c_out: int, num_layers: int, add_upsample: bool, config: VAEConfig, *, rngs):
        self.resnets = nnx.List(
            [ResnetBlock2D(c_in if i == 0 else c_out, c_out, config, rngs=rngs) for i in range(num_layers)]
        )
        self.upsample = _conv(c_out, c_out, 3, config.compute_dtype, rngs) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsample is None else self.upsample(upsample_nearest(x))


class Encoder(nnx.Module):
    """Images [B, H, W, in_channels] -> 2 * latent_channels moments (diffusers ``Encoder``, double_z)."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        channels, dt = config.block_out_channels, config.compute_dtype
        self.conv_in = _conv(config.in_channels, channels[0], 3, dt, rngs)
        self.down_blocks = nnx.List(
            [
                DownEncoderBlock2D(
                    channels[max(i - 1, 0)], c, config.layers_per_block, i < len(channels) - 1, config, rngs=rngs
                )
                for i, c in enumerate(channels)
            ]
        )
        self.mid_block = UNetMidBlock2D(channels[-1], config, rngs=rngs)
        self.conv_norm_out = GroupNorm(channels[-1], config.norm_num_groups)
        self.conv_out = _conv(channels[-1], 2 * config.latent_channels, 3, dt, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latents [B, h, w, latent_channels] -> images [B, H, W, out_channels] (diffusers ``Decoder``)."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        reversed_channels, dt = config.block_out_channels[::-1], config.compute_dtype
        self.conv_in = _conv(config.latent_channels, reversed_channels[0], 3, dt, rngs)
        self.mid_block = UNetMidBlock2D(reversed_channels[0], config, rngs=rngs)
        self.up_blocks = nnx.List(
            [
                UpDecoderBlock2D(
                    reversed_channels[max(i - 1, 0)],
                    c,
                    config.layers_per_block + 1,
                    i < len(reversed_channels) - 1,
                    config,
                    rngs=rngs,
                )
                for i, c in enumerate(reversed_channels)
            ]
        )
        self.conv_norm_out = GroupNorm(reversed_channels[-1], config.norm_num_groups)
        self.conv_out = _conv(reversed_channels[-1], config.out_channels, 3, dt, rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """Encoder to a diagonal Gaussian over latents and decoder back to images (diffusers ``AutoencoderKL``)."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        c, dt = config.latent_channels, config.compute_dtype
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        self.quant_conv = _conv(2 * c, 2 * c, 1, dt, rngs) if config.use_quant_conv else None
        self.post_quant_conv = _conv(c, c, 1, dt, rngs) if config.use_post_quant_conv else None

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B, H, W, in_channels] in [-1, 1] -> (mean, logvar) [B, h, w, latent_channels], float32.

        The moments of diffusers' ``DiagonalGaussianDistribution``: the first half of the
        channels is the mean, the second the log-variance, clamped to [-30, 20].
        """
        moments = self.encoder(images.astype(self.config.compute_dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Encoder-scale latents [B, h, w, latent_channels] -> images [B, H, W, out_channels], float32."""
        z = latents.astype(self.config.compute_dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)


def latents_from_images(vae: AutoencoderKL, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Diffusion-model latents of images in [-1, 1]: ``(z - shift_factor) * scaling_factor``.

    ``z`` is the posterior mean, or with ``key`` a sample ``mean + exp(logvar / 2) * eps``,
    eps ~ N(0, I) (``DiagonalGaussianDistribution.sample``); the shift-then-scale order is
    diffusers' SD3 img2img pipeline's (``pipeline_stable_diffusion_3_img2img.prepare_latents``).
    """
    mean, logvar = vae.encode(images)
    z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def images_from_latents(vae: AutoencoderKL, latents: jax.Array) -> jax.Array:
    """Images in about [-1, 1] from diffusion-model latents: decode ``latents / scaling_factor + shift_factor``
    (the inverse of ``latents_from_images``; diffusers' SD3 pipeline ``__call__`` before ``vae.decode``)."""
    return vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor)


# ------------------------------------------------------------------------------------------
# PyTorch names
# ------------------------------------------------------------------------------------------

_TORCH_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_TORCH_MODULES = {"downsample": "downsamplers.0.conv", "upsample": "upsamplers.0.conv", "to_out": "to_out.0"}


def torch_names(config: VAEConfig) -> dict[str, str]:
    """``{NNX parameter path: diffusers state-dict key}`` for every parameter of ``AutoencoderKL(config)``."""
    abstract = nnx.split(nnx.eval_shape(lambda: AutoencoderKL(config, rngs=InitKeys(0))))[1]
    names = {}
    for path in param_shapes(abstract):
        *modules, leaf = path.split(".")
        names[path] = ".".join([_TORCH_MODULES.get(m, m) for m in modules] + [_TORCH_LEAVES[leaf]])
    return names
