"""Tests for danceopd_jax.models.vae against diffusers' AutoencoderKL (tiny random models, CPU)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from flax import nnx

from danceopd_jax.models import vae
from danceopd_jax.models.vae import (
    SD3_VAE,
    AutoencoderKL,
    VAEConfig,
    config_from_diffusers,
    images_from_latents,
    latents_from_images,
    torch_names,
)
from danceopd_jax.models.weights import (
    TensorSource,
    WeightsMismatch,
    check_names,
    load_module,
    open_safetensors,
    param_shapes,
)

TINY = dict(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    layers_per_block=1,
    norm_num_groups=4,
    latent_channels=16,
    sample_size=16,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    mid_block_add_attention=True,
)
B, SIZE = 2, 16
IMAGES = np.random.RandomState(0).uniform(-1, 1, (B, SIZE, SIZE, 3)).astype(np.float32)
LATENTS = np.random.RandomState(1).randn(B, SIZE // 2, SIZE // 2, 16).astype(np.float32)


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2)


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module", params=[True, False], ids=["quant_convs", "no_quant_convs"])
def reference(request, tmp_path_factory):
    """(torch model, its saved folder) with every parameter perturbed (GroupNorm scales/biases
    start at 1/0), quant_conv and post_quant_conv on or off."""
    torch.manual_seed(0)
    model = TorchAutoencoderKL(**TINY, use_quant_conv=request.param, use_post_quant_conv=request.param).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("vae")
    model.save_pretrained(folder)
    return model, folder


def load(folder, **overrides) -> AutoencoderKL:
    with open(folder / "config.json") as f:
        config = config_from_diffusers(json.load(f), **overrides)
    return load_module(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)), open_safetensors(str(folder)), torch_names(config))


def torch_moments(model) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        posterior = model.encode(nchw(IMAGES)).latent_dist
    return nhwc(posterior.mean), nhwc(posterior.logvar)


def torch_decode(model, latents: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return nhwc(model.decode(nchw(latents)).sample)


def test_encode_and_decode_match_diffusers(reference):
    model, folder = reference
    ours = load(folder)
    assert (ours.quant_conv is not None) == (ours.post_quant_conv is not None) == (model.quant_conv is not None)
    mean, logvar = ours.encode(jnp.asarray(IMAGES))
    ref_mean, ref_logvar = torch_moments(model)
    assert mean.shape == (B, SIZE // 2, SIZE // 2, 16) and mean.dtype == jnp.float32
    assert np.abs(ref_mean).max() > 0.5 and np.abs(ref_logvar).max() > 0.5  # not trivially small
    np.testing.assert_allclose(mean, ref_mean, atol=1e-4, rtol=0)
    np.testing.assert_allclose(logvar, ref_logvar, atol=1e-4, rtol=0)

    images = ours.decode(jnp.asarray(LATENTS))
    ref_images = torch_decode(model, LATENTS)
    assert images.shape == (B, SIZE, SIZE, 3) and images.dtype == jnp.float32
    assert np.abs(ref_images).max() > 0.5
    np.testing.assert_allclose(images, ref_images, atol=1e-4, rtol=0)


def test_latent_helpers_follow_the_sd3_pipelines(reference):
    """img2img: (mode - shift) * scale; text-to-image: decode(latents / scale + shift)."""
    model, folder = reference
    ours = load(folder)
    shift, scale = TINY["shift_factor"], TINY["scaling_factor"]
    ref_mean, _ = torch_moments(model)
    np.testing.assert_allclose(latents_from_images(ours, jnp.asarray(IMAGES)), (ref_mean - shift) * scale, atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        images_from_latents(ours, jnp.asarray(LATENTS)), torch_decode(model, LATENTS / scale + shift), atol=1e-4, rtol=0
    )

    key = jax.random.key(3)
    mean, logvar = ours.encode(jnp.asarray(IMAGES))
    sample = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    sampled = latents_from_images(ours, jnp.asarray(IMAGES), key)
    np.testing.assert_allclose(sampled, (sample - shift) * scale, atol=1e-6, rtol=0)
    assert np.abs(sampled - latents_from_images(ours, jnp.asarray(IMAGES))).min() > 0


def test_bfloat16_compute_is_close_to_float32(reference):
    """bfloat16 convolutions and projections (float32 norms, softmax, params): moments and images
    within 5% of the reference's largest magnitude."""
    model, folder = reference
    ours = load(folder, dtype="bfloat16")
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(ours, nnx.Param)))
    mean, logvar = ours.encode(jnp.asarray(IMAGES))
    images = ours.decode(jnp.asarray(LATENTS))
    assert mean.dtype == logvar.dtype == images.dtype == jnp.float32
    ref_mean, ref_logvar = torch_moments(model)
    ref_images = torch_decode(model, LATENTS)
    for ours_x, ref_x in ((mean, ref_mean), (logvar, ref_logvar), (images, ref_images)):
        error = np.abs(np.asarray(ours_x) - ref_x).max()
        assert 0 < error <= 0.05 * np.abs(ref_x).max()


def test_force_upcast_computes_float16_models_in_float32(reference):
    _, folder = reference
    upcast = load(folder, dtype="float16")
    assert upcast.config.compute_dtype == jnp.float32
    np.testing.assert_array_equal(upcast.decode(jnp.asarray(LATENTS)), load(folder).decode(jnp.asarray(LATENTS)))
    assert dataclasses.replace(upcast.config, force_upcast=False).compute_dtype == jnp.float16
    assert dataclasses.replace(upcast.config, dtype="bfloat16").compute_dtype == jnp.bfloat16


def test_misshaped_tensor_raises_weights_mismatch_naming_it(reference):
    _, folder = reference
    with open(folder / "config.json") as f:
        config = config_from_diffusers(json.load(f))
    tensors = dict(open_safetensors(str(folder)))
    tensors["decoder.mid_block.attentions.0.to_q.weight"] = np.zeros((16, 8), np.float32)
    with pytest.raises(WeightsMismatch, match=r"mis-shaped: decoder\.mid_block\.attentions\.0\.to_q\.weight"):
        load_module(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)), TensorSource.from_dict(tensors), torch_names(config))


SD3_DIFFUSERS_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.29.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}


def test_sd3_preset_fits_diffusers_sd3_vae_layout():
    """SD3_VAE is SD3's config.json, and its torch_names cover a diffusers SD3 VAE's state dict
    with matching shapes (built on the meta device: no weights)."""
    assert config_from_diffusers(SD3_DIFFUSERS_CONFIG) == SD3_VAE
    kwargs = {k: v for k, v in SD3_DIFFUSERS_CONFIG.items() if not k.startswith("_")}
    with torch.device("meta"):
        state = TorchAutoencoderKL(**kwargs).state_dict()
    source = TensorSource({k: (lambda: None) for k in state}, {k: tuple(v.shape) for k, v in state.items()}, "sd3")
    targets = param_shapes(nnx.split(nnx.eval_shape(lambda: AutoencoderKL(SD3_VAE, rngs=nnx.Rngs(0))))[1])
    check_names(targets, source, torch_names(SD3_VAE))
    assert len(targets) == len(state)


def test_every_param_has_logical_axis_names():
    abstract = nnx.eval_shape(lambda: AutoencoderKL(config_from_diffusers(TINY), rngs=nnx.Rngs(0)))
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        name, axes = ".".join(map(str, path)), var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), name
        assert set(axes) <= set(vae.LOGICAL_AXES) and len(set(axes)) == len(axes), (name, axes)
        if name.endswith("conv1.kernel"):
            assert tuple(axes) == ("kernel_h", "kernel_w", "channels_in", "channels_out")


@pytest.mark.parametrize(
    "key, value",
    [
        ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
        ("up_block_types", ["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]),
        ("act_fn", "gelu"),
        ("latents_mean", [0.0] * 16),
        ("_class_name", "SD3Transformer2DModel"),
        ("norm_type", "spatial"),
    ],
)
def test_config_from_diffusers_rejects_unsupported_settings_by_key(key, value):
    with pytest.raises(ValueError, match=f"config {key}:"):
        config_from_diffusers({**SD3_DIFFUSERS_CONFIG, key: value})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(norm_num_groups=3), "not divisible by norm_num_groups"),
        (dict(block_out_channels=(8, 16, 16)), "down_block_types has 2 blocks"),
        (dict(scaling_factor=0.0), "scaling_factor"),
        (dict(dtype="int32"), "float dtype"),
    ],
)
def test_vae_config_validation(overrides, message):
    base = {k: v for k, v in TINY.items() if k != "sample_size"}
    with pytest.raises(ValueError, match=message):
        VAEConfig(**{**base, **overrides})
