"""A Z-Image run end to end on the tiny folder in the real format (``models.tiny_zimage``): the
backbone (``models.zimage_backbone``), DanceOPD training and resume, prompt tables with the T2I and
edit templates, the CFG nulls, sampling against a hand-written Euler loop in diffusers, export to
diffusers, and bad input."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from danceopd_jax import build, export, sd3_sampling, train
from danceopd_jax.config_validation import ConfigError, validate
from danceopd_jax.data.prompt_embeddings import load_table
from danceopd_jax.models import backbones, lora, zimage_backbone, zimage_prompts
from danceopd_jax.models.pipeline_folder import ModelFolderError
from danceopd_jax.models.tiny_zimage import write_tiny_zimage
from danceopd_jax.models.weights import WeightsMismatch, open_safetensors, write_safetensors

from conftest import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "zimage_smoke.py"
TEXT_LEN = 64
TRAIN_LR = "--config.optimizer.learning_rate=1e-2"  # moves the LoRA well past the parity tolerances


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return write_tiny_zimage(str(tmp_path_factory.mktemp("tiny_zimage")))


def smoke_config(model_dir: str, **overrides):
    return load_config("zimage_smoke", model_dir=model_dir, **overrides)


def _command(module: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *flags], capture_output=True, text=True, timeout=600, cwd=ROOT)


def _run_main(model_dir: str, workdir: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
    return _command("danceopd_jax.main", f"--config={SMOKE}", f"--config.model_dir={model_dir}", f"--workdir={workdir}",
                    "--config.loss_log=True", TRAIN_LR, *extra)  # fmt: skip


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """``(workdir, first, second)``: the smoke config trained 4 steps, then resumed to 6, through the command."""
    workdir = tmp_path_factory.mktemp("zimage_run")
    first = _run_main(folder, workdir, "--config.num_train_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run_main(folder, workdir, "--config.num_train_steps=6")
    assert second.returncode == 0, second.stderr[-3000:]
    return workdir, first, second


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def test_the_folder_is_the_zimage_family(folder):
    assert backbones.family_of(folder) == "zimage" and backbones.for_folder(folder) is zimage_backbone
    validate(smoke_config(folder))


def test_smoke_config_trains_a_lora_student_and_resumes(folder, trained):
    workdir, first, second = trained
    assert "prompt embeddings: 9 prompts" in first.stdout and "done: step 4" in first.stdout
    assert "resum" in second.stdout.lower() and "done: step 6" in second.stdout
    losses = [json.loads(line) for line in (workdir / "losses.jsonl").read_text().splitlines()]
    assert [e["step"] for e in losses] == [1, 2, 3, 4, 5, 6] and all(np.isfinite(e["loss"]) and e["loss"] > 0 for e in losses)
    table = load_table(str(workdir / build.PROMPT_TABLE))
    assert table.text_shape == (TEXT_LEN, 32) and table.pooled_dim == 0 and table.text_segments_len == 3
    assert set(table.templates) == {"t2i"}
    encoder = zimage_prompts.load_zimage_text_encoder(folder)
    prompt = table.prompts[1]
    text, mask, segments = table(prompt)
    expected = zimage_prompts.encode_prompts(encoder, [prompt], TEXT_LEN)
    assert max_diff(text, expected["text"][0]) <= 1e-5 and np.array_equal(mask, expected["text_mask"][0])
    assert segments[0] == mask.sum() and not segments[1:].any()  # one T2I segment


def test_the_student_is_a_lora_over_the_shared_base_with_the_authors_targets(folder, tmp_path):
    run = train.setup_run(smoke_config(folder), workdir=str(tmp_path))
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(run.state.params)}
    adapted = {name.rsplit(".", 1)[0] for name in names}
    assert all(n.endswith(("lora_a", "lora_b")) for n in names)
    # 2 layers + 1 noise refiner + 1 context refiner, each: to_q, to_k, to_v, to_out, w1, w2, w3
    assert len(adapted) == 4 * 7 and {a.rsplit(".", 1)[-1] for a in adapted} == {"to_q", "to_k", "to_v", "to_out", "w1", "w2", "w3"}
    base = sum(x.size for x in jax.tree.leaves(run.experts[build.SHARED_BASE]))
    assert 0 < sum(x.size for x in jax.tree.leaves(run.experts["teacher"])) < base / 4 and not jax.tree.leaves(run.experts["base"])
    null = run.experts[build.NULL_CONDITION]  # the T2I null only: the run has no edit prompts
    text, mask, segments = load_table(str(tmp_path / build.PROMPT_TABLE))("")
    assert null["text"].shape == (1, TEXT_LEN, 32) and np.array_equal(np.asarray(null["text"][0]), text)
    assert mask.sum() > 0 and segments[0] == mask.sum()  # the empty prompt's chat template has tokens
    state, metrics = run.train_step(run.state, run.experts, run.global_batch(0)[1], jnp.int32(0))
    assert np.isfinite(float(metrics["loss"]))


def test_edit_instructions_use_the_edit_template_and_their_null_keeps_the_source(folder, tmp_path, monkeypatch):
    """A table with edit instructions encodes them through the three-segment template, apart from the same
    text as a T2I prompt; the CFG null of an edit sample is the empty instruction's and keeps its source;
    the table is reused while the folder's encoders are unchanged."""
    path = str(tmp_path / "table.safetensors")
    instruction = "make the circle red"
    table = zimage_backbone.prompt_table(folder, [instruction], path, TEXT_LEN, edit_prompts=[instruction])
    assert sorted(zip(table.templates, table.prompts)) == [("edit", ""), ("edit", instruction), ("t2i", ""), ("t2i", instruction)]
    encoder = zimage_prompts.load_zimage_text_encoder(folder)
    expected = zimage_prompts.encode_prompts(encoder, [instruction], TEXT_LEN, kind="edit")
    text, mask, segments = table(instruction, "edit")
    assert max_diff(text, expected["text"][0]) <= 1e-5 and np.array_equal(segments, expected["text_segments"][0])
    assert np.all(segments > 0) and segments.sum() == mask.sum()
    assert max_diff(text, table(instruction)[0]) > 1e-3  # not the T2I encoding

    null = zimage_backbone.null_condition(table)
    assert null["text"].shape == (2, TEXT_LEN, 32)
    cond = {
        "text": jnp.ones((2, TEXT_LEN, 32)), "text_mask": jnp.ones((2, TEXT_LEN), bool), "text_segments": jnp.ones((2, 3), jnp.int32),
        "source": jnp.arange(2 * 8 * 8 * 16, dtype=jnp.float32).reshape(2, 8, 8, 16), "source_mask": jnp.array([False, True]),
    }  # fmt: skip
    nulled = zimage_backbone.with_null(null)(cond)
    for row, template in enumerate(("t2i", "edit")):
        empty = table("", template)
        for key, value in zip(zimage_backbone.NULL_KEYS, empty):
            np.testing.assert_array_equal(np.asarray(nulled[key][row]), value)
    assert nulled["source"] is cond["source"] and nulled["source_mask"] is cond["source_mask"]

    monkeypatch.setattr(zimage_backbone, "prompt_encoder", lambda *args: pytest.fail("the cached table was encoded again"))
    again = zimage_backbone.prompt_table(folder, [instruction], path, TEXT_LEN, edit_prompts=[instruction])
    assert np.array_equal(again(instruction, "edit")[0], text)


# ------------------------------------------------------------------------------------------
# Sampling and export of the trained run
# ------------------------------------------------------------------------------------------

PROMPTS = ["a small red circle at the top left on a white background", "a large blue square in the center on a black background"]


@pytest.fixture(scope="module")
def student(trained):
    return sd3_sampling.load_student(str(trained[0]))


def _diffusers_velocity(transformer, x, sigma, embeds) -> np.ndarray:
    """``pipeline_z_image``'s transformer call on channels-last latents ``x`` [B, H, W, C] at sigma: Z-Image
    time ``1 - sigma``, [C, 1, H, W] latents, one caption (valid tokens) per sample; the output negated."""
    import torch

    with torch.no_grad():
        out = transformer(
            x=[torch.from_numpy(np.ascontiguousarray(xi.transpose(2, 0, 1)))[:, None] for xi in np.asarray(x)],
            t=torch.full((len(x),), 1 - float(sigma)),
            cap_feats=list(embeds),
            return_dict=False,
        )[0]
    return np.stack([-o[:, 0].permute(1, 2, 0).numpy() for o in out])


def test_samples_match_a_hand_written_euler_loop_with_cfg_in_diffusers(folder, trained):
    """The untrained base's samples against diffusers written out: prompts and the empty prompt by
    ``ZImagePipeline``'s own encoder, the pipeline's sigmas from the folder's scheduler, CFG with
    diffusers' ``guidance_scale`` g = s - 1 (``c + g (c - u)`` is our ``u + s (c - u)``), Euler, and the
    folder's VAE; float32, 1e-4 on the images."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    steps, cfg_scale, seed = 2, 3.0, 3
    base = sd3_sampling.load_student(str(trained[0]), trained=False)
    images = sd3_sampling.generate(base, PROMPTS, steps=steps, cfg_scale=cfg_scale, seed=seed)

    pipe = ZImagePipeline.from_pretrained(folder)
    positive = pipe._encode_prompt(list(PROMPTS), device="cpu", max_sequence_length=TEXT_LEN)
    negative = pipe._encode_prompt([""] * len(PROMPTS), device="cpu", max_sequence_length=TEXT_LEN)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(folder, "scheduler"))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps).tolist(), mu=0.0)
    sigmas = scheduler.sigmas.numpy()
    x = np.asarray(jax.random.normal(jax.random.key(seed), (len(PROMPTS), 8, 8, 16)))
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        c = _diffusers_velocity(pipe.transformer, x, sigma, positive)
        u = _diffusers_velocity(pipe.transformer, x, sigma, negative)
        x = x + (sigma_next - sigma) * (c + (cfg_scale - 1) * (c - u))
    with torch.no_grad():
        z = torch.from_numpy(x).permute(0, 3, 1, 2) / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        expected = pipe.vae.decode(z).sample.clamp(-1, 1).permute(0, 2, 3, 1).numpy()
    assert images.shape == (2, 64, 64, 3) and max_diff(images, expected) <= 1e-4


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "student"
    result = _command("danceopd_jax.export", f"--workdir={trained[0]}", f"--out={out}", "--merged")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def _velocity_inputs(folder):
    """``(x, cond, embeds)``: latents, our condition of ``PROMPTS`` and diffusers' caption features (valid tokens)."""
    import torch

    encoder = zimage_prompts.load_zimage_text_encoder(folder)
    cond = {k: np.array(v) for k, v in zimage_prompts.encode_prompts(encoder, PROMPTS, TEXT_LEN).items()}
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 16)).astype(np.float32)
    embeds = [torch.from_numpy(cond["text"][i, : int(n)].copy()) for i, n in enumerate(cond["text_mask"].sum(-1))]
    return x, cond, embeds


def test_exported_lora_and_merged_transformer_load_in_diffusers_and_reproduce_the_student(folder, trained, student, exported):
    from diffusers import ZImageTransformer2DModel

    out, stdout = exported
    assert "(28 adapted layers, checkpoint step 6, params)" in stdout
    x, cond, embeds = _velocity_inputs(folder)
    t = np.full((2,), 0.6, np.float32)
    ours = student.model()(x, t, cond)
    reference = ZImageTransformer2DModel.from_pretrained(os.path.join(folder, "transformer")).eval()
    base = _diffusers_velocity(reference, x, 0.6, embeds)
    assert max_diff(ours, base) > 3e-3  # the trained LoRA matters (30 x the tolerance)
    reference.load_lora_adapter(str(out), weight_name=export.LORA_FILE)
    assert len([n for n, m in reference.named_modules() if hasattr(m, "lora_A")]) == 28
    assert max_diff(_diffusers_velocity(reference, x, 0.6, embeds), ours) <= 1e-4
    merged, info = ZImageTransformer2DModel.from_pretrained(str(out / "transformer"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert max_diff(_diffusers_velocity(merged.eval(), x, 0.6, embeds), ours) <= 1e-4


def test_sample_command_runs_prompt_tasks_and_refuses_edits_with_one_line(trained, tmp_path):
    out = tmp_path / "z.png"
    result = _command("danceopd_jax.sample", f"--workdir={trained[0]}", f"--prompt={PROMPTS[0]}", "--num=2", "--steps=2",
                      "--cfg_scale=2.0", f"--out={out}")  # fmt: skip
    assert result.returncode == 0 and out.exists(), result.stderr[-3000:]
    result = _command("danceopd_jax.sample", f"--workdir={trained[0]}", f"--prompt={PROMPTS[0]}", "--task=edit", f"--source={out}",
                      f"--out={tmp_path / 'edit.png'}")  # fmt: skip
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: task 'edit' edits a source image, but this model was trained without source")


def test_edit_samples_are_euler_with_the_source_latent_and_the_edit_null(folder, tmp_path):
    """An edit of a run whose student reads sources (the untrained base of configs/zimage_t2i_edit_smoke.py)
    against the loop written out: the instruction through the edit template, the source encoded by
    diffusers' VAE (the mode, shifted and scaled) and kept clean in the condition, CFG against the empty
    instruction with the same source, Euler on the run's grid, diffusers' VAE decode; float32, 1e-4."""
    import torch
    from diffusers import AutoencoderKL

    from danceopd_jax import checkpoints
    from danceopd_jax.core.schedule import sigma_grid
    from danceopd_jax.sampling import read_image

    workdir = tmp_path / "edit_run"
    workdir.mkdir()
    config = load_config("zimage_t2i_edit_smoke", model_dir=folder)
    checkpoints.save_run_config(config, str(workdir))
    base = sd3_sampling.load_student(str(workdir), trained=False)
    source = read_image(os.path.join(folder, "edits", json.loads(open(os.path.join(folder, "edits", "edits.jsonl")).readline())["source_image"]), 64)
    instruction, steps, cfg_scale, seed = "make it night", 2, 3.0, 5
    images = sd3_sampling.generate(base, [instruction], steps=steps, cfg_scale=cfg_scale, seed=seed, sources=[source])

    encoder = zimage_prompts.load_zimage_text_encoder(folder)
    cond = {k: np.asarray(v) for k, v in zimage_prompts.encode_prompts(encoder, [instruction], TEXT_LEN, kind="edit").items()}
    null = {k: np.asarray(v) for k, v in zimage_prompts.encode_null(encoder, TEXT_LEN, kind="edit").items()}
    vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae")).eval()
    with torch.no_grad():
        mode = vae.encode(torch.from_numpy(source[None]).permute(0, 3, 1, 2)).latent_dist.mode()
    latent = ((mode - vae.config.shift_factor) * vae.config.scaling_factor).permute(0, 2, 3, 1).numpy()
    for c in (cond, null):
        c.update(source=latent, source_mask=np.ones(1, bool))
    model = jax.jit(lambda x, t, c: base.model()(x, t, c))
    x = jax.random.normal(jax.random.key(seed), (1, 8, 8, 16))
    sigmas = np.asarray(sigma_grid(steps, 3.0, "uniform"))
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        t = jnp.full((1,), sigma, jnp.float32)
        v_c, v_u = model(x, t, cond), model(x, t, null)
        x = x + (sigma_next - sigma) * (v_u + cfg_scale * (v_c - v_u))
    with torch.no_grad():
        z = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2) / vae.config.scaling_factor + vae.config.shift_factor
        expected = vae.decode(z).sample.clamp(-1, 1).permute(0, 2, 3, 1).numpy()
    assert images.shape == (1, 64, 64, 3) and max_diff(images, expected) <= 1e-4

    out = tmp_path / "edit.png"
    result = _command("danceopd_jax.sample", f"--workdir={workdir}", "--base", f"--prompt={instruction}", "--task=edit",
                      f"--source={tmp_path / 'src.png'}", "--steps=2", f"--out={out}")  # fmt: skip
    assert result.returncode == 2 and "no such image" in result.stderr  # the source is checked before the weights
    Image.fromarray(np.round((source + 1) * 127.5).astype(np.uint8)).save(tmp_path / "src.png")
    result = _command("danceopd_jax.sample", f"--workdir={workdir}", "--base", f"--prompt={instruction}", "--task=edit",
                      f"--source={tmp_path / 'src.png'}", "--steps=2", f"--out={out}")  # fmt: skip
    assert result.returncode == 0 and np.asarray(Image.open(out)).shape == (64, 64, 3), result.stderr[-3000:]


# ------------------------------------------------------------------------------------------
# Teachers in other LoRA namings, and bad input
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["diffusion_model.", "pipe.dit.", "dit."])
def test_a_teacher_in_diffsynth_naming_is_the_same_teacher(folder, tmp_path, prefix):
    stored = open_safetensors(os.path.join(folder, "teacher_lora.safetensors"))
    renamed = {prefix + k.removeprefix("transformer."): np.asarray(v) for k, v in stored.items()}
    path = str(tmp_path / "diffsynth.safetensors")
    write_safetensors(path, renamed, stored.metadata)
    assert lora.read_lora(path)[1] == lora.read_lora(os.path.join(folder, "teacher_lora.safetensors"))[1]
    theirs, ours = lora.read_lora(path)[0], lora.read_lora(os.path.join(folder, "teacher_lora.safetensors"))[0]
    assert sorted(theirs) == sorted(ours) and all(np.array_equal(theirs[k], ours[k]) for k in ours)
    validate(smoke_config(folder, **{"experts.teacher.lora_path": path}))


def test_bad_input_is_one_clear_error_before_any_weights_are_read(folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(ConfigError, match=r"config.model_dir: .*missing component text_encoder/"):
        validate(smoke_config(str(broken)))
    flux = tmp_path / "flux"
    shutil.copytree(folder, flux)
    (flux / "model_index.json").write_text(json.dumps({**json.loads((flux / "model_index.json").read_text()), "_class_name": "FluxPipeline"}))
    with pytest.raises(ConfigError, match=r"_class_name 'FluxPipeline' is not a pipeline of a known family"):
        validate(smoke_config(str(flux)))
    with pytest.raises(ModelFolderError, match="is not a pipeline of a known family"):
        backbones.for_folder(str(flux))
    with pytest.raises(ConfigError, match=r"config.student.kind: config.model_dir is a Z-Image folder, whose transformer is kind 'zimage'"):
        validate(smoke_config(folder, **{"student.kind": "mmdit"}))
    with pytest.raises(ConfigError, match=r"config.student.use_source: the model reads source images but config.condition.use_source"):
        validate(smoke_config(folder, **{"student.use_source": True}))
    with pytest.raises(ConfigError, match=r"config.student.use_source: config.condition.use_source gives edit samples their source"):
        validate(load_config("zimage_t2i_edit_smoke", model_dir=folder, **{"student.use_source": False}))
    with pytest.raises(ConfigError, match=r"config.model_dir: config.condition .*does not fit .*transformer: it needs \{'text_dim': 32, 'pooled_dim': 0\}"):
        validate(smoke_config(folder, **{"condition.text_dim": 48}))
    with pytest.raises(ConfigError, match=r"config.condition.text_len: prompt 0 '.*' is \d+ tokens over the text capacity of 8 tokens"):
        validate(smoke_config(folder, **{"condition.text_len": 8}))

    stored = open_safetensors(os.path.join(folder, "teacher_lora.safetensors"))
    alien = {k.replace("layers.0.attention.to_q", "layers.0.attention.to_qq"): np.asarray(v) for k, v in stored.items()}
    path = str(tmp_path / "alien.safetensors")
    write_safetensors(path, alien, stored.metadata)
    with pytest.raises(ConfigError, match=r"config.experts.teacher.lora_path: .*adapts 1 modules .* does not have: layers.0.attention.to_qq"):
        validate(smoke_config(folder, **{"experts.teacher.lora_path": path}))

    misshaped = tmp_path / "misshaped"
    shutil.copytree(folder, misshaped)
    weights = misshaped / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = {k: np.array(v) for k, v in open_safetensors(str(weights)).items()}
    tensors["x_pad_token"] = np.zeros((1, 5), np.float32)
    write_safetensors(str(weights), tensors)
    with pytest.raises(WeightsMismatch, match=r"x_pad_token \[1, 5\] -> x_pad_token expects"):
        train.setup_run(smoke_config(str(misshaped)), workdir=str(tmp_path / "b"))
