"""The tiny random Z-Image folder (``models/tiny_zimage.py``): written from scratch, it is a diffusers
``ZImagePipeline`` that generates, our loaders read every component and compute what diffusers
computes, the teacher LoRA loads in diffusers, the edit manifest's images open, and the command
writes it (the same bytes for the same seed) or refuses a non-empty ``--out`` in one line."""

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

from danceopd_jax.data import scenes
from danceopd_jax.models import vae, zimage
from danceopd_jax.models.init_keys import InitKeys
from danceopd_jax.models.tiny_zimage import EDIT_TASKS, IMAGE_SIZE, WORDS, main, write_tiny_zimage
from danceopd_jax.models.weights import load_module, open_safetensors
from danceopd_jax.models.zimage_prompts import encode_prompts, load_zimage_text_encoder

ROOT = pathlib.Path(__file__).resolve().parents[1]
CAPACITY = 64  # text rows of our encodings (every prompt here is shorter)
SIGMA = 0.6
EDIT_COLUMNS = ["uid", "task", "prompt", "source_image", "target_image"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return write_tiny_zimage(str(tmp_path_factory.mktemp("tiny_zimage")))


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import ZImagePipeline

    return ZImagePipeline.from_pretrained(folder)


def prompts(folder) -> list[str]:
    with open(os.path.join(folder, "prompts.txt"), encoding="utf-8") as f:
        return f.read().splitlines()


def edit_rows(folder) -> list[dict]:
    with open(os.path.join(folder, "edits", "edits.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def latent() -> np.ndarray:
    """[1, 8, 8, 16]: a 64 x 64 image's latent."""
    return np.random.default_rng(0).standard_normal((1, 8, 8, 16)).astype(np.float32)


def diffusers_velocity(transformer, x: np.ndarray, embeds: torch.Tensor) -> np.ndarray:
    """``pipeline_z_image``'s transformer call on one channels-last latent, as our velocity: Z-Image
    time ``1 - sigma``, a [C, 1, H, W] latent, the output negated and made channels-last."""
    with torch.no_grad():
        out = transformer(
            x=[torch.from_numpy(np.ascontiguousarray(x[0].transpose(2, 0, 1)))[:, None]],
            t=torch.tensor([1 - SIGMA]),
            cap_feats=[embeds],
            return_dict=False,
        )[0]
    return -out[0][:, 0].permute(1, 2, 0).numpy()[None]


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_the_folder_is_a_diffusers_zimage_pipeline_that_generates(folder, pipe):
    """Every weight file loads with no missing, unexpected or mis-shaped key (the text encoder's
    unused last layer and norm included); a 2-step 64 x 64 generation with CFG gives finite pixels."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Model

    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "ZImagePipeline" and index["text_encoder"] == ["transformers", "Qwen3Model"]
    for cls, name in ((ZImageTransformer2DModel, "transformer"), (AutoencoderKL, "vae"), (Qwen3Model, "text_encoder")):
        _, info = cls.from_pretrained(os.path.join(folder, name), output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (name, info)
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    assert pipe.vae.config.scaling_factor == 0.3611 and pipe.vae.config.shift_factor == 0.1159
    images = pipe(
        prompts(folder)[0], height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=2, guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images  # fmt: skip
    assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(images).all()


def test_our_loaders_read_every_component_and_compute_what_diffusers_computes(folder, pipe):
    """Our Qwen3 encoding of a prompt, the transformer's velocity on it and the VAE decode match
    diffusers' components from the folder (text 1e-5, velocity and pixels 1e-4)."""
    prompt = prompts(folder)[0]
    encoder = load_zimage_text_encoder(folder)
    cond = encode_prompts(encoder, [prompt], CAPACITY)
    with torch.no_grad():
        embeds = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=CAPACITY)[0][0]
    n = int(cond["text_mask"][0].sum())
    assert n == embeds.shape[0] and max_diff(cond["text"][0, :n], embeds.numpy()) <= 1e-5

    model = zimage.load_zimage(os.path.join(folder, "transformer"))
    assert zimage.param_count(model.config) == sum(p.numel() for p in pipe.transformer.parameters())
    x = latent()
    ours = nnx.jit(lambda m, x, t, cond: m(x, t, cond))(model, jnp.asarray(x), jnp.asarray([SIGMA]), cond)
    expected = diffusers_velocity(pipe.transformer, x, embeds)
    assert np.abs(expected).max() > 0.1  # every part computes something
    assert max_diff(ours, expected) <= 1e-4
    with torch.no_grad():
        other = pipe.encode_prompt(prompts(folder)[1], do_classifier_free_guidance=False)[0][0]
    assert max_diff(diffusers_velocity(pipe.transformer, x, other), expected) > 1e-3  # the prompt matters

    with open(os.path.join(folder, "vae", "config.json")) as f:
        config = vae.config_from_diffusers(json.load(f))
    make = lambda: vae.AutoencoderKL(config, rngs=InitKeys(0))  # noqa: E731
    decoder = load_module(make, open_safetensors(os.path.join(folder, "vae")), vae.torch_names(config))
    with torch.no_grad():
        z = torch.from_numpy(x.transpose(0, 3, 1, 2)) / config.scaling_factor + config.shift_factor
        pixels = pipe.vae.decode(z, return_dict=False)[0].permute(0, 2, 3, 1).numpy()
    assert pixels.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert max_diff(vae.images_from_latents(decoder, jnp.asarray(x)), pixels) <= 1e-4


def test_the_teacher_lora_loads_in_diffusers_and_changes_the_transformer(folder, pipe):
    """Rank 4 on to_q, to_k, to_v and to_out.0 of all four attentions (refiners and layers)."""
    x, embeds = latent(), torch.randn(12, 32, generator=torch.Generator().manual_seed(0))
    plain = diffusers_velocity(pipe.transformer, x, embeds)
    pipe.load_lora_weights(folder, weight_name="teacher_lora.safetensors")
    try:
        adapted_modules = sorted(name for name, m in pipe.transformer.named_modules() if hasattr(m, "lora_A"))
        adapted = diffusers_velocity(pipe.transformer, x, embeds)
    finally:
        pipe.unload_lora_weights()
    blocks = ["noise_refiner.0", "context_refiner.0", "layers.0", "layers.1"]
    assert adapted_modules == sorted(f"{b}.attention.{p}" for b in blocks for p in ("to_q", "to_k", "to_v", "to_out.0"))
    assert max_diff(adapted, plain) > 1e-2
    assert max_diff(diffusers_velocity(pipe.transformer, x, embeds), plain) == 0.0  # unloaded again


def test_the_prompts_and_the_edit_manifest(folder):
    """Prompts and instructions are spelled in the tokenizer's vocabulary words; the manifest has one
    pair per shapes-world edit kind in the OmniEdit columns, its images 64 x 64 RGB PNGs beside it."""
    texts = prompts(folder) + [row["prompt"] for row in edit_rows(folder)]
    assert len(prompts(folder)) == 8 and all(texts)
    assert {w for text in texts for w in text.split()} <= set(WORDS)
    rows = edit_rows(folder)
    assert [row["task"] for row in rows] == list(EDIT_TASKS) == [*scenes.LOCAL_EDITS, *scenes.GLOBAL_EDITS]
    for row in rows:
        assert list(row) == EDIT_COLUMNS
        pixels = []
        for column in ("source_image", "target_image"):
            with Image.open(os.path.join(folder, "edits", row[column])) as image:
                assert (image.format, image.mode, image.size) == ("PNG", "RGB", (IMAGE_SIZE, IMAGE_SIZE))
                pixels.append(np.asarray(image))
        assert not np.array_equal(*pixels), row["uid"]  # the edit changes the image


def files(folder) -> dict[str, str]:
    """``{relative path: SHA-256}`` of every file under ``folder``."""
    root = pathlib.Path(folder)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_the_command_writes_the_same_folder_and_refuses_a_non_empty_out(folder, tmp_path, capsys):
    out = tmp_path / "tiny"
    made = subprocess.run([sys.executable, "-m", "danceopd_jax.models.tiny_zimage", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    assert made.stdout == f"wrote a tiny random Z-Image diffusers folder to {out}\n"
    assert files(out) == files(folder)  # a pure function of the seed
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(out)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"error: --out {out} exists and is not an empty folder\n"
    assert files(out) == files(folder)  # left as it was
