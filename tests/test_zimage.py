"""Z-Image transformer against diffusers' ``ZImageTransformer2DModel``, basic (T2I) and omni (edit) modes.

A tiny random reference is saved with ``save_pretrained`` and loaded through our loader and
``config.json``. Every weight is re-drawn at random (the pad tokens are zeros and adaLN is the
identity otherwise). diffusers is called as its pipelines call it: a list of channel-first
``[C, 1, H, W]`` latents (omni: ``[source, target]`` per sample, ``image_noise_mask=[0, 1]``,
three caption segments), Z-Image time ``1 - sigma``; its output is negated and made channels-last.
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from diffusers import ZImageTransformer2DModel
from flax import nnx

from danceopd_jax.models import lora, zimage
from danceopd_jax.models.weights import WeightsMismatch, open_safetensors, write_safetensors

from conftest import xla_flops

TINY = zimage.ZIMAGE_PRESETS["tiny"]
# Latent 10 x 8: 20 image tokens (padded to 32); 40 text rows; captions of 37 and 21 tokens (padded
# to 64 and 32); omni segments of different lengths, none a multiple of 32.
B, H, W, C, L, D_CAP = 2, 10, 8, 4, 40, 16
BASIC_LENGTHS = np.array([37, 21])
SEGMENTS = np.array([[5, 19, 3], [7, 11, 4]], np.int32)
SIGMA = np.array([0.3, 0.8], np.float32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("zimage_transformer"))
    torch.manual_seed(0)
    reference = ZImageTransformer2DModel(**TINY).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "pad_token" in name:
                p.normal_(0, 0.5)
            elif p.ndim == 2:
                p.normal_(0, p.shape[1] ** -0.5)
            else:
                p.normal_(0, 0.1)
    reference.save_pretrained(folder)
    return reference, folder


def inputs():
    rng = np.random.default_rng(0)
    x, source = rng.standard_normal((2, B, H, W, C)).astype(np.float32)
    text = rng.standard_normal((B, L, D_CAP)).astype(np.float32)
    return x, source, text


def prefix_mask(lengths) -> np.ndarray:
    return np.arange(L)[None] < np.asarray(lengths)[:, None]


def channels_first(latent: np.ndarray) -> torch.Tensor:
    """[H, W, C] -> the pipelines' [C, 1, H, W]."""
    return torch.from_numpy(np.ascontiguousarray(latent.transpose(2, 0, 1)))[:, None]


def our_velocity(outputs) -> np.ndarray:
    """diffusers' list of [C, 1, H, W] outputs -> our velocity [B, H, W, C] (negated)."""
    return np.stack([-o[:, 0].permute(1, 2, 0).numpy() for o in outputs])


def diffusers_basic(reference, x, text, lengths) -> np.ndarray:
    """``pipeline_z_image``'s call: one latent and one caption (its valid tokens) per sample."""
    with torch.no_grad():
        out = reference(
            x=[channels_first(xi) for xi in x],
            t=torch.from_numpy(1 - SIGMA),
            cap_feats=[torch.from_numpy(text[i, :n]) for i, n in enumerate(lengths)],
            return_dict=False,
        )[0]
    return our_velocity(out)


def diffusers_omni(reference, x, source, text, segments) -> np.ndarray:
    """``pipeline_z_image_omni``'s call with one condition image: [source, target], noise mask [0, 1]."""
    ends = np.cumsum(segments, axis=1)
    with torch.no_grad():
        out = reference(
            x=[[channels_first(source[i]), channels_first(x[i])] for i in range(B)],
            t=torch.from_numpy(1 - SIGMA),
            cap_feats=[[torch.from_numpy(text[i, e - n : e]) for n, e in zip(segments[i], ends[i])] for i in range(B)],
            siglip_feats=[None] * B,
            image_noise_mask=[[0, 1]] * B,
            return_dict=False,
        )[0]
    return our_velocity(out)


_forward = jax.jit(lambda state, x, t, cond, graphdef: nnx.merge(graphdef, state)(x, t, cond), static_argnums=4)


def velocity(model, x, t, cond) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(state, x, t, cond, graphdef))


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_float32_parity_basic_mode(saved):
    """Two captions of different lengths (37, 21), 20 image tokens: max error ~1e-5 (of ~4)."""
    reference, folder = saved
    with open(os.path.join(folder, "config.json")) as f:
        config = zimage.config_from_diffusers(json.load(f))
    model = zimage.load_zimage(folder)
    assert model.config == config and not config.use_source
    assert zimage.param_count(config) == sum(p.numel() for p in reference.parameters())

    x, _, text = inputs()
    cond = {"text": text, "text_mask": prefix_mask(BASIC_LENGTHS)}
    expected = diffusers_basic(reference, x, text, BASIC_LENGTHS)
    v = velocity(model, x, SIGMA, cond)
    assert v.dtype == np.float32 and v.shape == (B, H, W, C)
    assert np.abs(expected).max() > 1
    assert max_diff(v, expected) <= 1e-4
    # Text rows past the mask are not read; the caption pad token is.
    junk = {**cond, "text": np.where(cond["text_mask"][..., None], text, 7.0)}
    assert max_diff(velocity(model, x, SIGMA, junk), v) <= 1e-6
    nnx.update(model, {"cap_pad_token": nnx.Param(jnp.zeros((1, config.dim)))})
    assert max_diff(velocity(model, x, SIGMA, cond), v) > 1e-2


def test_float32_parity_omni_and_mixed_batches(saved):
    """``use_source``: an edit batch (source + target, 3 segments each) against diffusers' omni
    mode; a mixed batch against omni for the edit sample and basic for the other; an all-basic
    batch equals the plain model's output. Max errors ~2e-5."""
    reference, folder = saved
    model = zimage.load_zimage(folder, use_source=True)
    x, source, text = inputs()
    edit = {
        "text": text,
        "text_mask": prefix_mask(SEGMENTS.sum(1)),
        "source": source,
        "source_mask": np.array([True, True]),
        "text_segments": SEGMENTS,
    }
    omni = diffusers_omni(reference, x, source, text, SEGMENTS)
    assert np.abs(omni).max() > 1
    assert max_diff(velocity(model, x, SIGMA, edit), omni) <= 1e-4

    # Sample 1 without a source: basic mode over its whole valid prefix (text_segments not read).
    mixed = {**edit, "source_mask": np.array([True, False]), "text_mask": prefix_mask([SEGMENTS[0].sum(), BASIC_LENGTHS[1]])}
    basic = diffusers_basic(reference, x, text, BASIC_LENGTHS)
    v = velocity(model, x, SIGMA, mixed)
    assert max_diff(v[0], omni[0]) <= 1e-4 and max_diff(v[1], basic[1]) <= 1e-4
    assert max_diff(omni[1], basic[1]) > 1e-2  # the two modes differ

    no_source = {**edit, "source_mask": np.array([False, False]), "text_mask": prefix_mask(BASIC_LENGTHS), "source": 0 * source}
    plain = velocity(zimage.load_zimage(folder), x, SIGMA, {"text": text, "text_mask": no_source["text_mask"]})
    assert max_diff(velocity(model, x, SIGMA, no_source), plain) <= 1e-5
    # An empty caption (conditioning.unconditional's all-False mask) stays finite.
    empty = {**edit, "text_mask": np.zeros((B, L), bool)}
    assert np.isfinite(velocity(model, x, SIGMA, empty)).all()


def test_position_ids_match_diffusers(saved):
    """``caption_layout`` + ``image_positions`` give diffusers' RoPE ids, the ``_pad_with_ids``
    shift of later caption segments included, in both modes."""
    reference, _ = saved
    x, source, text = inputs()
    gh, gw = H // 2, W // 2
    caption_layout = jax.jit(zimage.caption_layout, static_argnums=(2, 3))
    for i in range(B):
        ends = np.cumsum(SEGMENTS[i])
        segments = [torch.from_numpy(text[i, e - n : e]) for n, e in zip(SEGMENTS[i], ends)]
        images = [[channels_first(source[i]), channels_first(x[i])]]
        out = reference.patchify_and_embed_omni(images, [segments], [None], 2, 1, [[0, 1]])
        cap_ids, image_ids = out[5][0].numpy(), out[4][0].numpy()
        layout = caption_layout(jnp.asarray(SEGMENTS[i : i + 1]), jnp.array([True]), L, zimage.caption_capacity(L, True))
        n_cap = len(out[1][0])
        assert int(layout.valid.sum()) == n_cap and not layout.valid[0, n_cap:].any()
        np.testing.assert_array_equal(np.asarray(layout.position[0, :n_cap]), cap_ids[:n_cap, 0])
        assert (cap_ids[:n_cap, 1:] == 0).all()
        source_ids = zimage.image_positions(layout.source_start, gh, gw, 32)[0]
        target_ids = zimage.image_positions(layout.target_start, gh, gw, 32)[0]
        np.testing.assert_array_equal(np.concatenate([source_ids, target_ids]), image_ids)
        assert layout.position[0, 32] == 0  # segment 1's first slot: a pad id left over from segment 0

        out = reference.patchify_and_embed([channels_first(x[i])], [torch.from_numpy(text[i, : BASIC_LENGTHS[i]])], 2, 1)
        layout = caption_layout(jnp.array([[BASIC_LENGTHS[i], 0, 0]]), jnp.array([False]), L, zimage.caption_capacity(L, False))
        n_cap = len(out[1][0])
        np.testing.assert_array_equal(np.asarray(layout.position[0, :n_cap]), out[4][0].numpy()[:n_cap, 0])
        np.testing.assert_array_equal(zimage.image_positions(layout.target_start, gh, gw, 32)[0], out[3][0].numpy())


def test_bfloat16_compute_close_to_float32_reference(saved):
    """bf16 token projections (float32 params, streams, norms, RoPE, softmax, modulation): the
    output is float32 and within 3% of the reference's largest value (measured 0.75%)."""
    reference, folder = saved
    model = zimage.load_zimage(folder, use_source=True, dtype="bfloat16")
    x, source, text = inputs()
    cond = {
        "text": text,
        "text_mask": prefix_mask(SEGMENTS.sum(1)),
        "source": source,
        "source_mask": np.array([True, True]),
        "text_segments": SEGMENTS,
    }
    expected = diffusers_omni(reference, x, source, text, SEGMENTS)
    v = velocity(model, x, SIGMA, cond)
    assert v.dtype == np.float32
    error = max_diff(v, expected)
    assert 0 < error <= 0.03 * np.abs(expected).max(), error


def test_misshaped_or_missing_tensor_raises_weights_mismatch(saved, tmp_path):
    _, folder = saved
    tensors = dict(open_safetensors(folder))
    key = "layers.0.attention.to_q.weight"
    tensors[key] = tensors[key][:, :-1]
    del tensors["noise_refiner.0.adaLN_modulation.0.bias"]
    write_safetensors(str(tmp_path / "diffusion_pytorch_model.safetensors"), tensors)
    shutil.copy(os.path.join(folder, "config.json"), tmp_path / "config.json")
    with pytest.raises(WeightsMismatch, match=r"mis-shaped: layers\.0\.attention\.to_q\.weight") as error:
        zimage.load_zimage(str(tmp_path))
    assert "missing: noise_refiner.0.adaLN_modulation.0.bias" in str(error.value)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"siglip_feat_dim": 32}, "siglip_feat_dim 32 is not supported"),
        ({"all_patch_size": [2, 4], "all_f_patch_size": [1, 1]}, r"all_patch_size \[2, 4\] is not supported"),
        ({"all_patch_size": 2}, "all_patch_size 2 is not supported"),
        ({"all_f_patch_size": [2]}, r"all_f_patch_size \[2\] is not supported"),
        ({"use_fancy_thing": True}, "unsupported ZImageTransformer2DModel config keys: use_fancy_thing"),
        ({"axes_dims": [8, 8, 8]}, r"head_dim = dim / n_heads = 32 must equal sum\(axes_dims\) = 24"),
        ({"n_heads": 3}, "dim 64 must be divisible by n_heads 3"),
        ({"axes_dims": [16, 16]}, "axes_dims must be 3 positive integers"),
        ({"axes_dims": [7, 13, 12]}, "axes_dims must be even"),
        ({"n_layers": 0}, "n_layers must be an integer >= 1"),
        ({"qk_norm": "rms_norm"}, "qk_norm must be a bool"),
    ],
)
def test_bad_config_raises_value_error(change, match):
    with pytest.raises(ValueError, match=match):
        zimage.config_from_diffusers({"_class_name": "ZImageTransformer2DModel", **TINY, **change})


def test_config_overrides_and_validation():
    # n_kv_heads is dropped: diffusers ignores it too
    config = zimage.config_from_diffusers({**TINY, "n_kv_heads": 1}, dtype="bfloat16", use_source=True)
    assert config.dtype == "bfloat16" and config.use_source and config.axes_dims == (8, 12, 12)
    with pytest.raises(ValueError, match="remat must be one of none, dots, full"):
        dataclasses.replace(config, remat="some")
    with pytest.raises(ValueError, match="attention 'cudnn' needs dtype bfloat16 or float16"):
        dataclasses.replace(config, attention="cudnn", dtype="float32")
    with pytest.raises(ValueError, match="unknown Z-Image preset"):
        zimage.zimage_config("z_image_2")


def test_real_preset_is_diffusers_default_config():
    """diffusers' default ``ZImageTransformer2DModel()`` is Z-Image: 6,154,908,736 parameters
    (6.15B; counted on the meta device), the same count as ours."""
    with torch.device("meta"):
        reference = ZImageTransformer2DModel()
    config = zimage.zimage_config("z_image", remat="full")
    assert zimage.config_from_diffusers(dict(reference.config), remat="full") == config
    count = zimage.param_count(config)
    print(f"Z-Image transformer parameters: {count:,}")
    assert count == sum(p.numel() for p in reference.parameters())
    assert abs(count - 6.15e9) <= 0.01 * 6.15e9
    names = zimage.torch_names(config)
    assert set(names.values()) == {k for k, _ in reference.named_parameters()}


EXPECTED_AXES = {
    "x_embedder.kernel": ("patch", "embed"),
    "t_embedder.linear_1.kernel": ("freq", "mlp"),
    "t_embedder.linear_2.kernel": ("mlp", "temb"),
    "cap_embedder.norm.scale": ("norm",),
    "cap_embedder.linear.kernel": ("text_embed", "embed"),
    "x_pad_token": (None, "embed"),
    "cap_pad_token": (None, "embed"),
    "noise_refiner.0.adaLN_modulation.kernel": ("temb", "adaln"),
    "layers.1.attention.to_q.kernel": ("embed", "heads"),
    "layers.1.attention.to_out.kernel": ("heads", "embed"),
    "layers.1.attention.norm_k.scale": ("norm",),
    "context_refiner.0.feed_forward.w1.kernel": ("embed", "mlp"),
    "context_refiner.0.feed_forward.w2.kernel": ("mlp", "embed"),
    "layers.0.ffn_norm2.scale": ("norm",),
    "final_layer.adaLN_modulation.kernel": ("temb", "adaln"),
    "final_layer.linear.kernel": ("embed", "patch"),
}


def test_every_variable_has_logical_axis_names_and_a_torch_name(saved):
    config = zimage.zimage_config("tiny")
    abstract = nnx.state(nnx.eval_shape(lambda: zimage.ZImageTransformer(config, rngs=nnx.Rngs(0))))
    found = {}
    for path, var in nnx.to_flat_state(abstract):
        name, axes = ".".join(map(str, path)), var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == len(var.shape), name
        named = [a for a in axes if a is not None]
        assert set(named) <= set(zimage.LOGICAL_AXES) and len(set(named)) == len(named), (name, axes)
        found[name] = tuple(axes)
    assert {k: found[k] for k in EXPECTED_AXES} == EXPECTED_AXES
    names = zimage.torch_names(config)
    assert set(names) == set(found) and set(names.values()) == set(open_safetensors(saved[1]))
    assert names["final_layer.adaLN_modulation.kernel"] == "all_final_layer.2-1.adaLN_modulation.1.weight"
    assert names["layers.0.adaLN_modulation.bias"] == "layers.0.adaLN_modulation.0.bias"
    assert names["t_embedder.linear_2.kernel"] == "t_embedder.mlp.2.weight"


def test_remat_changes_memory_not_math(saved):
    _, folder = saved
    x, _, text = inputs()
    cond = {"text": text, "text_mask": prefix_mask(BASIC_LENGTHS)}

    def loss_and_grads(remat):
        graphdef, state = nnx.split(zimage.load_zimage(folder, remat=remat))
        loss = lambda s: jnp.mean(jnp.square(nnx.merge(graphdef, s)(x, SIGMA, cond)))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(state), str(jax.make_jaxpr(loss)(state))

    (plain_loss, plain_grads), plain_jaxpr = loss_and_grads("none")
    (loss, grads), jaxpr = loss_and_grads("full")
    assert float(plain_loss) > 0 and abs(float(loss) - float(plain_loss)) <= 1e-6 * float(plain_loss)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert "remat" in jaxpr and "remat" not in plain_jaxpr
    assert np.abs(np.asarray(grads["x_pad_token"][...])).max() > 0


@pytest.mark.parametrize("use_source", [False, True])
def test_forward_flops_matches_xla(use_source):
    config = zimage.config_from_diffusers({**TINY, "dim": 128, "n_heads": 4, "n_layers": 1}, use_source=use_source)
    size, text_len = 16, 24
    graphdef, state = nnx.split(nnx.eval_shape(lambda: zimage.ZImageTransformer(config, rngs=nnx.Rngs(0))))
    x = jnp.zeros((B, size, size, C))
    cond = {"text": jnp.zeros((B, text_len, D_CAP)), "text_mask": jnp.ones((B, text_len), bool)}
    if use_source:
        cond |= {"source": x, "source_mask": jnp.ones(B, bool), "text_segments": jnp.zeros((B, 3), jnp.int32)}
    xla = xla_flops(lambda s, x, t, c: nnx.merge(graphdef, s)(x, t, c), state, x, jnp.zeros(B), cond)
    ours = zimage.forward_flops(config, B, (size // 2) ** 2, text_len)
    assert abs(ours - xla) / xla < 0.05, (ours, xla)  # measured 2.0% (basic) and 2.4% (use_source) under


LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out", "w1", "w2", "w3"]


def test_lora_targets_and_peft_adapter_parity(saved, tmp_path):
    """``add_lora`` with diffusers-style targets wraps every attention and SwiGLU projection; a
    PEFT LoRA (ranks 4 and 2, alphas 8 and 2) saved by diffusers on the torch model loads as a
    delta over our base and matches torch with the adapter (float32, 1e-4)."""
    _, folder = saved
    config = zimage.zimage_config("tiny")
    names = zimage.torch_names(config)
    blocks = config.n_layers + 2 * config.n_refiner_layers
    adapted = lora.add_lora(zimage.load_zimage(folder), rank=2, alpha=2, targets=LORA_TARGETS, rngs=nnx.Rngs(0))
    linears = [p.removesuffix(".kernel") for p in zimage.linear_torch_names(config)]
    assert sorted(adapted) == sorted(p for p in linears if p.rsplit(".", 1)[-1] in LORA_TARGETS)
    assert len(adapted) == 7 * blocks

    reference = ZImageTransformer2DModel.from_pretrained(folder).eval()
    torch.manual_seed(1)
    reference.add_adapter(
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            rank_pattern={"to_v": 2},
            alpha_pattern={"w2": 2},
            target_modules=["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"],
            init_lora_weights=False,
        )
    )
    reference.save_lora_adapter(str(tmp_path / "adapter"))
    x, _, text = inputs()
    expected = diffusers_basic(reference, x, text, BASIC_LENGTHS)

    base = zimage.load_zimage(folder)
    graphdef, delta = lora.load_lora_deltas(base, names, *lora.read_lora(str(tmp_path / "adapter")))
    teacher = nnx.merge(graphdef, nnx.state(base), delta)
    attention, ff = teacher.layers[0].attention, teacher.layers[0].feed_forward
    scales = (attention.to_q.rank, attention.to_q.scale, attention.to_v.rank, attention.to_v.scale, ff.w2.scale)
    assert scales == (4, 2.0, 2, 4.0, 0.5)
    cond = {"text": text, "text_mask": prefix_mask(BASIC_LENGTHS)}
    assert max_diff(expected, velocity(base, x, SIGMA, cond)) > 1e-2  # the adapter matters
    assert max_diff(velocity(teacher, x, SIGMA, cond), expected) <= 1e-4
