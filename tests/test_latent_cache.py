"""The latent cache of image buckets on a model folder (``data/latent_cache.py``): the VAE mode of the
bucket's pixels (against our VAE and diffusers'), encoded once and reused by content, re-encoded for
a changed file or another VAE; bad input in one line; the SD3 off-policy and Z-Image T2I + edit smoke
configs trained through the command; a resumed run encodes nothing."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import ROOT, load_config, main_command
from danceopd_jax import build, train
from danceopd_jax.config_validation import ConfigError, validate
from danceopd_jax.data import latent_cache
from danceopd_jax.data.example_files import write_example_files
from danceopd_jax.data.image_files import pixels
from danceopd_jax.models import folder_vae, vae
from danceopd_jax.models.tiny_sd3 import write_tiny_sd3
from danceopd_jax.models.tiny_zimage import write_tiny_zimage
from danceopd_jax.models.weights import open_safetensors, write_safetensors

PIXELS = 64  # the smoke configs' 8 x 8 latents through the tiny folders' 8x VAE


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory) -> str:
    return write_tiny_sd3(str(tmp_path_factory.mktemp("tiny_sd3")))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    """Example files at 64 px: 6 captioned images (t2i/) and 4 edit pairs (edits.jsonl)."""
    out = str(tmp_path_factory.mktemp("example_files_64"))
    write_example_files(out, num_t2i=6, num_edits=4, size=PIXELS)
    return out


def offpolicy_config(model_dir: str, data_dir: str, **overrides):
    return load_config("sd3_offpolicy_smoke", data_dir, model_dir=model_dir, **overrides)


def counting_encoder(monkeypatch) -> list[int]:
    """Counts the images each ``encode_images`` call encodes (still encoding them)."""
    calls, encode = [], latent_cache.encode_images
    monkeypatch.setattr(latent_cache, "encode_images", lambda model_dir, todo, log=print: calls.append(len(todo)) or encode(model_dir, todo, log))
    return calls


def cache(config, workdir):
    """``(sources, table, encoded)`` of ``build.image_latents`` for ``config``'s buckets (the config validated first)."""
    validate(config)
    return build.image_latents(config, build.bucket_sources(config), workdir and str(workdir), log=lambda line: None)


# ---------------------------------------------------------------- what is cached


def test_the_cache_holds_the_vae_mode_of_the_buckets_pixels(sd3_folder, images, tmp_path):
    """Each record's image is the mode of the folder VAE's posterior at the pixels the bucket reads,
    shifted and scaled: our VAE run directly, and diffusers' ``latent_dist.mode()`` (1e-4)."""
    config = offpolicy_config(sd3_folder, images)
    sources, table, encoded = cache(config, tmp_path)
    files = sources["images"].files
    assert encoded == len(table) == len(files) == 6
    expected_pixels = np.stack([pixels(open(ex.images["image"].path, "rb").read(), PIXELS, "center_crop") for ex in files.examples])
    cached = np.stack([sources["images"][i]["image"] for i in range(len(files))])
    assert cached.shape == (6, 8, 8, 16) and cached.dtype == np.float32

    ours = np.asarray(vae.latents_from_images(folder_vae.load_vae(sd3_folder), expected_pixels))
    np.testing.assert_allclose(cached, ours, atol=1e-5)

    import torch
    from diffusers import AutoencoderKL

    def diffusers_latents(dtype):
        model = AutoencoderKL.from_pretrained(os.path.join(sd3_folder, "vae")).eval().to(dtype)
        with torch.no_grad():
            mode = model.encode(torch.from_numpy(expected_pixels).to(dtype).permute(0, 3, 1, 2)).latent_dist.mode()
        return ((mode - model.config.shift_factor) * model.config.scaling_factor).permute(0, 2, 3, 1).double().numpy()

    # The tiny random VAE amplifies float32 rounding: diffusers in float32 is itself ~4e-4 from its float64
    # result. The cache must be as close to that exact mode as diffusers' float32 is, and within 1e-4 of
    # it relative to the largest latent.
    exact, float32 = diffusers_latents(torch.float64), diffusers_latents(torch.float32)
    error, theirs = np.abs(cached - exact).max(), np.abs(float32 - exact).max()
    assert error <= max(theirs, 1e-4 * np.abs(exact).max()), (error, theirs)
    metadata = json.loads(open_safetensors(table.where).metadata[latent_cache.ENCODED_BY])
    assert metadata == {"vae": folder_vae.vae_digest(sd3_folder), "pixel_size": PIXELS, "latent": "mode"}


def test_reused_by_content_and_reencoded_for_a_changed_file_or_another_vae(sd3_folder, images, tmp_path, monkeypatch):
    """A second build encodes nothing; a file given new content under its old name re-encodes that file
    only; another VAE re-encodes every image."""
    data = tmp_path / "data"
    shutil.copytree(images, data)
    config = offpolicy_config(sd3_folder, str(data))
    calls = counting_encoder(monkeypatch)
    workdir = tmp_path / "run"
    sources, _, _ = cache(config, workdir)
    assert calls == [6]
    first = [sources["images"][i]["image"] for i in range(6)]

    again, table, encoded = cache(config, workdir)
    assert calls == [6] and encoded == 0 and len(table) == 6
    np.testing.assert_array_equal(again["images"][0]["image"], first[0])

    shutil.copyfile(data / "t2i" / "002.png", data / "t2i" / "000.png")  # another file's content: found by it
    os.utime(data / "t2i", ns=(1, 1))  # the folder is checked again (once per process per listing state)
    sources, table, encoded = cache(config, workdir)
    assert calls == [6] and encoded == 0
    np.testing.assert_array_equal(sources["images"][0]["image"], first[2])

    ImageOps.invert(Image.open(data / "t2i" / "002.png")).save(data / "t2i" / "000.png")  # new content
    os.utime(data / "t2i", ns=(2, 2))
    sources, table, encoded = cache(config, workdir)
    assert calls == [6, 1] and encoded == 1 and len(table) == 6  # the old 000.png's entry is dropped
    assert not np.allclose(sources["images"][0]["image"], first[0]) and not np.allclose(sources["images"][0]["image"], first[2])
    for i in range(1, 6):
        np.testing.assert_array_equal(sources["images"][i]["image"], first[i])

    other = tmp_path / "other_vae"
    shutil.copytree(sd3_folder, other)
    weights = other / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = {k: np.array(v) for k, v in open_safetensors(str(weights)).items()}
    tensors["encoder.conv_in.bias"] = tensors["encoder.conv_in.bias"] + 0.5
    write_safetensors(str(weights), tensors)
    _, _, encoded = cache(offpolicy_config(str(other), str(data)), workdir)
    assert calls == [6, 1, 6] and encoded == 6


def test_a_corrupt_table_is_encoded_again(sd3_folder, images, tmp_path):
    config = offpolicy_config(sd3_folder, images)
    _, table, _ = cache(config, tmp_path)
    with open(table.where, "r+b") as f:
        f.truncate(200)
    _, table, encoded = cache(config, tmp_path)
    assert encoded == len(table) == 6


# ---------------------------------------------------------------- bad input


def test_bad_input_is_one_line_before_anything_is_built(sd3_folder, images, tmp_path):
    small = tmp_path / "small"
    write_example_files(str(small), num_t2i=2, num_edits=1, size=32)
    with pytest.raises(ConfigError, match=r"^config.data.buckets.images.path: .*32x32 is smaller than image_size 64 .*"
                                          r"reads images at image_size 8 x the VAE's 8 = 64 px\)$"):  # fmt: skip
        validate(offpolicy_config(sd3_folder, str(small)))

    def with_vae_config(name, **changes):
        folder = tmp_path / name
        shutil.copytree(sd3_folder, folder)
        path = folder / "vae" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
        return str(folder)

    cases = [
        (with_vae_config("latent8", latent_channels=8), r"^config.channels: 16 latent channels, but .*/vae/config.json encodes image "
                                                        r"bucket 'images' into latent_channels 8$"),
        (with_vae_config("grey", in_channels=1), r"^config.model_dir: .*/vae/config.json has in_channels 1; image files \(bucket 'images'\) are RGB$"),
        (with_vae_config("gelu", act_fn="gelu"), r"^config.model_dir: .*/vae \(it encodes image bucket 'images'\): config act_fn: only 'silu'"),
    ]  # fmt: skip
    for folder, message in cases:
        with pytest.raises(ConfigError, match=message) as error:
            validate(offpolicy_config(folder, images))
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="needs a workdir to encode their images into"):
        cache(offpolicy_config(sd3_folder, images), None)


# ---------------------------------------------------------------- runs through the command


def run_main(config: str, workdir, steps: int, *flags: str) -> subprocess.CompletedProcess:
    command = main_command(f"--config={config}", f"--workdir={workdir}", "--config.loss_log=True", f"--config.num_train_steps={steps}", *flags)
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / train.LOSS_LOG).read_text().splitlines()]


def test_sd3_offpolicy_smoke_trains_on_cached_latents_and_a_resumed_run_encodes_nothing(sd3_folder, images, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    done = run_main(f"{ROOT}/configs/sd3_offpolicy_smoke.py:{images}", workdir, 2, f"--config.model_dir={sd3_folder}")
    assert f"image latents: 6 images in {workdir}/{latent_cache.LATENT_TABLE} (6 encoded)" in done.stdout
    assert "encoded 6/6 images (" in done.stdout
    assert [entry["step"] for entry in losses(workdir)] == [1, 2] and all(np.isfinite(e["loss"]) for e in losses(workdir))

    monkeypatch.setattr(latent_cache, "encode_images", lambda *args: pytest.fail("a resumed run encoded images"))
    train.train_and_evaluate(offpolicy_config(sd3_folder, images, num_train_steps=3, loss_log=True), str(workdir))
    assert [entry["step"] for entry in losses(workdir)] == [1, 2, 3] and np.isfinite(losses(workdir)[-1]["loss"])


def test_zimage_t2i_and_edit_smoke_trains_through_the_command(tmp_path):
    folder = write_tiny_zimage(str(tmp_path / "tiny_zimage"))
    workdir = tmp_path / "run"
    done = run_main(f"{ROOT}/configs/zimage_t2i_edit_smoke.py", workdir, 4, f"--config.model_dir={folder}")
    assert f"image latents: 7 images in {workdir}/{latent_cache.LATENT_TABLE} (7 encoded)" in done.stdout
    steps = losses(workdir)
    assert len(steps) == 4 and all(np.isfinite(e["loss"]) for e in steps)
    assert {e["route"] for e in steps} == {"t2i", "edit"}
