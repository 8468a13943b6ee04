"""Single-file SD3 transformers (``models/sd3_original.py``): a tiny random diffusers
``SD3Transformer2DModel`` (SD3.5-style: dual attention in the first and the last block, RMS
qk-norm) is written in Stability AI's original naming by an inverse mapping written out here;
diffusers' own converter must turn that file back into the model's state dict exactly, and our
loader must read it into an MMDiT whose output is diffusers' (fp32 <= 1e-4)."""

import re

import jax
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from flax import nnx

from danceopd_jax.models import mmdit, sd3, sd3_original
from danceopd_jax.models.weights import WeightsError, WeightsMismatch, load_state, open_safetensors, write_safetensors

from conftest import SD35_TINY, diffusers_velocity

PREFIX = "model.diffusion_model."
# Other parts of an all-in-one Stability AI file: VAE and text encoders, ignored by the loader.
OTHER_PARTS = {
    "first_stage_model.decoder.conv_in.weight": np.ones((4, 4, 3, 3), np.float32),
    "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": np.ones(8, np.float32),
}

# diffusers module -> original module: outside the blocks, and per block (text stream "context_block").
TOP = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
BLOCK = {
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "attn2.to_out.0": "x_block.attn2.proj",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
FUSED = {  # original fused qkv <- diffusers q, k, v
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
}


def swap_halves(a: np.ndarray) -> np.ndarray:
    n = a.shape[0] // 2
    return np.concatenate([a[n:], a[:n]])


def to_original(state: dict[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
    """A diffusers state dict in Stability AI's naming: q, k, v fused; the (scale, shift) adaLNs of
    ``norm_out`` and of the last block's text stream back in (shift, scale) order."""
    out = {"pos_embed": state["pos_embed.pos_embed"]}
    for key, value in state.items():
        module, leaf = key.rsplit(".", 1)
        if module in TOP:
            out[f"{TOP[module]}.{leaf}"] = swap_halves(value) if module == "norm_out.linear" else value
        elif m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module):
            i, inner = int(m[1]), m[2]
            if inner in BLOCK:
                last_text_adaln = inner == "norm1_context.linear" and i == num_layers - 1
                out[f"joint_blocks.{i}.{BLOCK[inner]}.{leaf}"] = swap_halves(value) if last_text_adaln else value
    for i in range(num_layers):
        for fused, parts in FUSED.items():
            for leaf in ("weight", "bias"):
                names = [f"transformer_blocks.{i}.{p}.{leaf}" for p in parts]
                if names[0] in state:
                    out[f"joint_blocks.{i}.{fused}.{leaf}"] = np.concatenate([state[n] for n in names])
    return out


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**SD35_TINY).eval()
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero would otherwise make the blocks the identity
            torch.nn.init.normal_(p, std=0.2)
    return model


@pytest.fixture(scope="module")
def state(reference) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in reference.state_dict().items()}


@pytest.fixture(scope="module")
def original_file(state, tmp_path_factory) -> str:
    """The model as an all-in-one original checkpoint: the transformer under ``PREFIX`` beside VAE/text keys."""
    path = str(tmp_path_factory.mktemp("original") / "sd3.5_tiny.safetensors")
    tensors = {PREFIX + k: v for k, v in to_original(state, SD35_TINY["num_layers"]).items()}
    write_safetensors(path, {**tensors, **OTHER_PARTS})
    return path


def velocity(model: mmdit.MMDiT, reference, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """``(ours, diffusers')`` on the same random inputs, NHWC."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 6, 4)).astype(np.float32)
    t = np.array([0.3, 0.9], np.float32)
    cond = {"text": rng.standard_normal((2, 5, 12)).astype(np.float32), "pooled": rng.standard_normal((2, 10)).astype(np.float32)}
    graphdef, params = nnx.split(model)
    ours = jax.jit(lambda p: nnx.merge(graphdef, p)(x, t, cond))(params)
    return np.asarray(ours), diffusers_velocity(reference, x, t, cond)


def load(path: str, dtype: str = "float32") -> mmdit.MMDiT:
    config = mmdit.config_from_diffusers(SD35_TINY, dtype=dtype)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: mmdit.MMDiT(config, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, load_state(abstract, sd3_original.open_transformer(path), mmdit.torch_names_of(abstract)))


def test_the_inverse_mapping_is_what_diffusers_converts_back(state):
    """The original-naming dict written here is the one diffusers' converter maps exactly onto the model's state dict."""
    original = {PREFIX + k: torch.from_numpy(v) for k, v in to_original(state, SD35_TINY["num_layers"]).items()}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert set(converted) == set(state)
    for key, value in converted.items():
        assert torch.equal(value, torch.from_numpy(state[key])), key


def test_original_file_reads_as_the_diffusers_state_dict_and_matches_diffusers(original_file, state, reference):
    tensors = open_safetensors(original_file)
    assert sd3_original.naming(tensors) == "original"
    view = sd3_original.open_transformer(original_file)
    assert set(view) == set(state)  # the VAE and text-encoder tensors are left out
    for key in view:
        np.testing.assert_array_equal(view[key], state[key], err_msg=key)
        assert view.shape(key) == state[key].shape
    ours, theirs = velocity(load(original_file), reference)
    assert np.abs(theirs).max() > 0.5
    assert np.abs(ours - theirs).max() <= 1e-4


def test_original_file_in_bfloat16_compute(original_file, reference):
    """bf16 token projections (params, streams and norms float32): within 3% of the fp32 reference's
    largest value, as for a diffusers folder (``test_mmdit``)."""
    ours, theirs = velocity(load(original_file, "bfloat16"), reference)
    assert 0 < np.abs(ours - theirs).max() <= 0.03 * np.abs(theirs).max()


def test_diffusers_named_single_file_and_load_base(state, reference, original_file, tmp_path):
    """A diffusers-named file loads as is; ``sd3.load_base`` takes either file in place of the folder's weights."""
    path = str(tmp_path / "transformer.safetensors")
    write_safetensors(path, state)
    assert sd3_original.naming(open_safetensors(path)) == "diffusers"
    ours, theirs = velocity(load(path), reference)
    assert np.abs(ours - theirs).max() <= 1e-4

    config = mmdit.config_from_diffusers(SD35_TINY)
    _, abstract = nnx.split(nnx.eval_shape(lambda: mmdit.MMDiT(config, rngs=nnx.Rngs(0))))
    from_diffusers = sd3.load_base("unused-folder", abstract, None, transformer_path=path)
    from_original = sd3.load_base("unused-folder", abstract, None, transformer_path=original_file)
    for (p, a), (_, b) in zip(nnx.to_flat_state(from_diffusers), nnx.to_flat_state(from_original)):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))


def test_bad_files_are_one_clear_error(state, tmp_path):
    original = {PREFIX + k: v for k, v in to_original(state, SD35_TINY["num_layers"]).items()}

    neither = str(tmp_path / "vae.safetensors")
    write_safetensors(neither, OTHER_PARTS)
    with pytest.raises(WeightsError, match=r"vae\.safetensors: not an SD3 transformer checkpoint: neither diffusers names") as error:
        sd3_original.open_transformer(neither)
    assert "\n" not in str(error.value)

    missing = str(tmp_path / "missing.safetensors")
    write_safetensors(missing, {k: v for k, v in original.items() if k != PREFIX + "joint_blocks.1.context_block.attn.ln_k.weight"})
    with pytest.raises(WeightsMismatch, match=r"Stability AI naming.*1 missing: transformer_blocks\.1\.attn\.norm_added_k\.weight"):
        load(missing)

    extra = str(tmp_path / "extra.safetensors")
    write_safetensors(extra, {**original, PREFIX + "joint_blocks.0.x_block.attn.extra.weight": np.ones(3, np.float32)})
    with pytest.raises(WeightsMismatch, match=r"1 unexpected: joint_blocks\.0\.x_block\.attn\.extra\.weight"):
        load(extra)

    misshaped = str(tmp_path / "misshaped.safetensors")
    key = PREFIX + "joint_blocks.0.x_block.attn.qkv.weight"
    write_safetensors(misshaped, {**original, key: original[key][:-3]})
    with pytest.raises(WeightsMismatch, match=r"mis-shaped: transformer_blocks\.0\.attn\.to_k\.weight \[15, 16\]"):
        load(misshaped)
