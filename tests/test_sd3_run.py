"""The SD3 path end to end on a tiny random diffusers folder: the folder is real-format, the smoke
config trains and resumes through ``python -m danceopd_jax.main``, the trained run samples
(``danceopd_jax.sample``) and exports for diffusers (``danceopd_jax.export``), and bad input is
one clear error."""

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

from danceopd_jax import build, export, parallel, sd3_sampling, train
from danceopd_jax.config_validation import ConfigError, validate
from danceopd_jax.data.prompt_embeddings import load_table
from danceopd_jax.sampling import sample_task, to_uint8
from danceopd_jax.models import lora, sd3, sd3_prompts
from danceopd_jax.models.tiny_sd3 import write_tiny_sd3
from danceopd_jax.models.weights import WeightsMismatch, open_safetensors, write_safetensors

from conftest import diffusers_velocity, jaxpr_equations, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "sd3_smoke.py"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return write_tiny_sd3(str(tmp_path_factory.mktemp("tiny_sd3")))


def smoke_config(model_dir: str, **overrides):
    """``configs/sd3_smoke.py`` on ``model_dir`` with dotted-key overrides."""
    return load_config("sd3_smoke", model_dir=model_dir, **overrides)


def test_the_tiny_folder_is_a_diffusers_sd3_pipeline(folder):
    """diffusers reads every component with no missing or unexpected key, and applies the teacher LoRA."""
    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    for cls, name in ((SD3Transformer2DModel, "transformer"), (AutoencoderKL, "vae")):
        _, info = cls.from_pretrained(os.path.join(folder, name), output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (name, info)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    kwargs = dict(prompt="a photo of a red cat", num_inference_steps=2, height=64, width=64, output_type="latent")
    plain = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(folder, weight_name="teacher_lora.safetensors")
    adapted = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert plain.shape == (1, 16, 8, 8) and torch.isfinite(plain).all()
    assert (adapted - plain).abs().max() > 1e-3  # the LoRA changes the field


def _run_main(model_dir: str, workdir: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "danceopd_jax.main", f"--config={SMOKE}", f"--config.model_dir={model_dir}",
               f"--workdir={workdir}", "--config.loss_log=True", *extra]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)


# A learning rate that moves the LoRA well past the parity tolerances below (the smoke config's 2e-4
# changes the student's velocity by ~5e-4 in 6 steps, too close to 1e-4 to tell base and student apart).
TRAIN_LR = "--config.optimizer.learning_rate=1e-2"


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """``(workdir, first, second)``: the smoke config trained 4 steps, then resumed to 6, through the command."""
    workdir = tmp_path_factory.mktemp("sd3_run")
    first = _run_main(folder, workdir, "--config.num_train_steps=4", TRAIN_LR)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run_main(folder, workdir, "--config.num_train_steps=6", TRAIN_LR)
    assert second.returncode == 0, second.stderr[-3000:]
    return workdir, first, second


def test_smoke_config_trains_a_lora_student_and_resumes(trained):
    workdir, first, second = trained
    assert "prompt embeddings: 9 prompts" in first.stdout and "done: step 4" in first.stdout
    assert "resum" in second.stdout.lower() and "done: step 6" in second.stdout
    losses = [json.loads(line) for line in (workdir / "losses.jsonl").read_text().splitlines()]
    assert [e["step"] for e in losses] == [1, 2, 3, 4, 5, 6]  # the resumed run appends steps 5 and 6
    assert all(np.isfinite(e["loss"]) and e["loss"] > 0 for e in losses)
    table = load_table(str(workdir / build.PROMPT_TABLE))
    assert "" in table and table.text_shape == (77 + 16, 32) and table.pooled_dim == 32


def test_the_student_is_a_lora_over_the_shared_base(folder, tmp_path):
    """Only the adapters are trained; the experts hold the base once, plus the teacher's delta."""
    run = train.setup_run(smoke_config(folder), workdir=str(tmp_path))
    params = run.state.params
    before = [np.array(a) for a in jax.tree.leaves(params)]  # the step donates the state
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
    assert names and all(n.endswith(("lora_a", "lora_b")) for n in names)
    base = run.experts[build.SHARED_BASE]
    base_size = sum(x.size for x in jax.tree.leaves(base))
    delta_size = sum(x.size for x in jax.tree.leaves(run.experts["realism"]))
    assert 0 < delta_size < base_size / 4 and not jax.tree.leaves(run.experts["base"])
    # the CFG null is the empty prompt's encoding, not zeros
    null = run.experts[build.NULL_CONDITION]
    text, _, pooled = load_table(str(tmp_path / build.PROMPT_TABLE))("")
    np.testing.assert_array_equal(np.asarray(null["text"]), text)
    assert np.abs(text).max() > 0
    cond = {"text": jnp.zeros((2, *text.shape)), "pooled": jnp.ones((2, pooled.shape[0])), "text_mask": jnp.ones((2, text.shape[0]), bool)}
    nulled = sd3.with_null(null)(cond)
    np.testing.assert_array_equal(np.asarray(nulled["pooled"][1]), pooled)
    # one train step moves only the LoRA, and it does move
    state, metrics = run.train_step(run.state, run.experts, run.global_batch(0)[1], jnp.int32(0))
    assert np.isfinite(float(metrics["loss"]))
    moved = [np.any(a != np.asarray(b)) for a, b in zip(before, jax.tree.leaves(state.params))]
    assert any(moved)


def test_channels_that_are_not_the_folders_latent_channels_are_one_clear_error(folder):
    """config.channels of an SD3 run is checked against the transformer's latent channels before anything
    is built (before: the first step failed to compile with a shape error)."""
    validate(smoke_config(folder))  # 16, the tiny transformer's
    with pytest.raises(ConfigError) as error:
        validate(smoke_config(folder, channels=4))
    assert str(error.value) == (
        f"config.channels: 4 latent channels, but {folder}/transformer/config.json has in_channels 16: set config.channels=16"
    )


def test_bad_input_is_one_clear_error(folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ConfigError, match=r"config.model_dir: .*missing component text_encoder_2/"):
        validate(smoke_config(str(broken)))
    with pytest.raises(ConfigError, match=r"config.experts.realism.lora_path: no such LoRA file"):
        validate(smoke_config(folder, **{"experts.realism.lora_path": str(tmp_path / "absent.safetensors")}))
    with pytest.raises(ConfigError, match=r"config.student.lora_rank: an SD3 student trains a LoRA"):
        validate(smoke_config(folder, **{"student.lora_rank": 0}))
    with pytest.raises(lora.UnknownLoRATarget, match="unknown LoRA target 'to_qq'"):
        train.setup_run(smoke_config(folder, **{"student.lora_targets": "to_q,to_qq"}), workdir=str(tmp_path / "a"))

    misshaped = tmp_path / "misshaped"
    shutil.copytree(folder, misshaped)
    weights = misshaped / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = {k: np.array(v) for k, v in open_safetensors(str(weights)).items()}
    tensors["proj_out.weight"] = np.zeros((5, 32), np.float32)
    write_safetensors(str(weights), tensors)
    with pytest.raises(WeightsMismatch, match=r"proj_out.weight \[5, 32\] -> proj_out.kernel expects"):
        train.setup_run(smoke_config(str(misshaped)), workdir=str(tmp_path / "b"))


# ------------------------------------------------------------------------------------------
# Sampling and export of the trained run
# ------------------------------------------------------------------------------------------

PROMPT = "a photo of a red cat"  # one of the tiny folder's training prompts


def _command(module: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *flags], capture_output=True, text=True, timeout=300, cwd=ROOT)


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


@pytest.fixture(scope="module")
def student(trained):
    return sd3_sampling.load_student(str(trained[0]))


def test_samples_are_the_students_euler_samples_decoded(folder, trained, student):
    """``generate`` against the sampler written out: the prompts and the empty prompt (CFG null) by
    the folder's encoders, Euler with CFG 2 on the sigmas of the folder's scheduler (diffusers'
    ``FlowMatchEulerDiscreteScheduler``, as the run's ``sigma_schedule``), the loaded student's
    field, latents decoded by diffusers' AutoencoderKL; float32, 1e-4."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    prompts, steps, cfg_scale, seed = [PROMPT, "a dog under the sky"], 2, 2.0, 3
    images = sd3_sampling.generate(student, prompts, steps=steps, cfg_scale=cfg_scale, seed=seed)

    out = sd3_prompts.encode_prompts(sd3_prompts.load_sd3_text_encoders(folder), [*prompts, ""], max_sequence_length=16)
    cond = {k: v[:2] for k, v in out.items()}
    null = {k: jnp.broadcast_to(v[2:], v[:2].shape) for k, v in out.items()}
    text, _, pooled = load_table(str(trained[0] / build.PROMPT_TABLE))(PROMPT)  # as training encoded it
    assert max_diff(cond["text"][0], text) <= 1e-5 and max_diff(cond["pooled"][0], pooled) <= 1e-5
    model = jax.jit(lambda x, t, cond: student.model()(x, t, cond))
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(folder, "scheduler"))
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.numpy()
    x = jax.random.normal(jax.random.key(seed), (2, 8, 8, 16))
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        t = jnp.full((2,), sigma, jnp.float32)
        v_cond, v_null = model(x, t, cond), model(x, t, null)
        x = x + (sigma_next - sigma) * (v_null + cfg_scale * (v_cond - v_null))
    vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae")).eval()
    with torch.no_grad():
        z = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2) / vae.config.scaling_factor + vae.config.shift_factor
        expected = vae.decode(z).sample.clamp(-1, 1).permute(0, 2, 3, 1).numpy()
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.float32
    assert max_diff(images, expected) <= 1e-4


def test_the_sampler_folds_the_lora_before_its_euler_loop(trained, student):
    """Each Euler step of the trained student runs the matrix products of the plain transformer:
    its adapters are folded into their kernels once, before the loop (``lora.fold_adapters``)."""
    base = sd3_sampling.load_student(str(trained[0]), trained=False)
    x, _, cond = velocity_inputs()
    null = {key: value[0] for key, value in cond.items()}
    in_loop = []
    for s in (student, base):
        run = sd3_sampling._sampler(s.graphdef, sd3.with_null, x.shape[1:], 2, float(s.config.shift), "flow_match_euler", 2.0)
        jaxpr = jax.make_jaxpr(run)(s.adapters, s.base, cond, null, jax.random.key(0)).jaxpr
        in_loop.append(sum(eqn.primitive.name == "dot_general" for eqn, looped in jaxpr_equations(jaxpr) if looped))
    assert len(jax.tree.leaves(student.adapters)) == 2 * 25 and in_loop[0] == in_loop[1] > 0, in_loop


def test_sample_command_writes_the_samples_side_by_side(trained, student, tmp_path):
    out = tmp_path / "sd3.png"
    result = _command("danceopd_jax.sample", f"--workdir={trained[0]}", f"--prompt={PROMPT}", "--num=2", "--steps=2",
                      "--cfg_scale=2.0", "--seed=3", f"--out={out}")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(2 sample(s), task t2i, 2 steps, cfg 2.0)" in result.stdout
    png = np.asarray(Image.open(out))
    assert png.shape == (64, 2 * 64, 3)  # 8 x 8 latents through the tiny folder's 8x VAE, side by side
    expected = to_uint8(sd3_sampling.generate(student, [PROMPT] * 2, steps=2, cfg_scale=2.0, seed=3))
    assert np.abs(png.astype(int) - np.concatenate(list(expected), axis=1)).max() <= 1  # uint8 rounding


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "student"
    result = _command("danceopd_jax.export", f"--workdir={trained[0]}", f"--out={out}", "--merged")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def velocity_inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 16)).astype(np.float32)
    cond = {"text": rng.standard_normal((2, 77 + 16, 32)).astype(np.float32), "pooled": rng.standard_normal((2, 32)).astype(np.float32)}
    return x, np.array([0.3, 0.9], np.float32), cond



def test_exported_lora_loads_in_diffusers_and_reproduces_the_student(folder, trained, student, exported):
    """diffusers' transformer + the exported LoRA gives our student's velocity, and without it our
    untrained base's (``--base``), 1e-4; the trained LoRA moves the velocity by more than 1e-2."""
    from diffusers import SD3Transformer2DModel

    out, stdout = exported
    assert "(25 adapted layers, checkpoint step 6, params)" in stdout
    assert sorted(os.listdir(out)) == [export.LORA_FILE, "transformer"]
    assert os.listdir(out.parent) == [out.name]  # no staging folder left behind
    reference = SD3Transformer2DModel.from_pretrained(os.path.join(folder, "transformer")).eval()
    x, t, cond = velocity_inputs()
    base = sd3_sampling.load_student(str(trained[0]), trained=False)
    assert not jax.tree.leaves(base.adapters) and base.step is None
    assert max_diff(diffusers_velocity(reference, x, t, cond), base.model()(x, t, cond)) <= 1e-4
    reference.load_lora_adapter(str(out), weight_name=export.LORA_FILE)
    assert len([n for n, m in reference.named_modules() if hasattr(m, "lora_A")]) == 25
    ours = student.model()(x, t, cond)
    assert max_diff(ours, base.model()(x, t, cond)) > 1e-2  # the trained LoRA matters
    assert max_diff(diffusers_velocity(reference, x, t, cond), ours) <= 1e-4


def test_exported_merged_transformer_loads_strictly_and_matches(folder, student, exported):
    from diffusers import SD3Transformer2DModel

    out, _ = exported
    merged, info = SD3Transformer2DModel.from_pretrained(str(out / "transformer"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    x, t, cond = velocity_inputs()
    assert max_diff(diffusers_velocity(merged.eval(), x, t, cond), student.model()(x, t, cond)) <= 1e-4


def _workdir_with_config(trained, path: pathlib.Path, **changes) -> pathlib.Path:
    """A workdir holding only the trained run's config.json, with top-level ``changes``."""
    run = {**json.loads((trained[0] / "config.json").read_text()), **changes}
    path.mkdir()
    (path / "config.json").write_text(json.dumps(run))
    return path


def test_sample_and_export_bad_input_is_one_clear_line(trained, tmp_path):
    workdir = trained[0]
    dit = _workdir_with_config(trained, tmp_path / "dit", model_dir="")
    source = tmp_path / "src.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(source)
    commands = [
        (("danceopd_jax.sample", f"--workdir={workdir}", "--task=edit", f"--source={source}"),
         "error: task 'edit' edits a source image, but an SD3 run's student (config.model_dir) reads no source image; "
         "it can only run: t2i, realism"),
        (("danceopd_jax.sample", f"--workdir={dit}", "--base"), "error: --base samples the untrained transformer of an SD3 run"),
        (("danceopd_jax.export", f"--workdir={dit}"), f"error: {dit} is not an SD3 run"),
    ]  # fmt: skip
    for (module, *flags), message in commands:
        result = _command(module, *flags, f"--out={tmp_path / 'out'}")
        assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
        assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="^task 'local_edit' edits a source image, but an SD3 run"):
        sample_task(str(workdir), "local_edit", ["make it blue"], [np.zeros((64, 64, 3), np.float32)])

    untrained = _workdir_with_config(trained, tmp_path / "untrained")
    with pytest.raises(FileNotFoundError, match="no checkpoints under .*untrained/checkpoints: nothing trained to export"):
        export.check_export(str(untrained), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        export.check_export(str(tmp_path / "absent"), str(tmp_path / "out"))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="occupied exists and is not an empty folder"):
        export.export_run(str(workdir), str(occupied))
    assert os.listdir(occupied) == ["keep.txt"]
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ValueError, match="out: its folder .*a_file exists and is not a folder"):
        export.check_export(str(workdir), str(tmp_path / "a_file" / "out"))  # before: failed after reading the weights
    (tmp_path / "empty").mkdir()
    export.check_export(str(workdir), str(tmp_path / "empty"))  # an empty --out folder is fine


def test_a_bf16_run_reads_its_frozen_base_straight_into_the_compute_dtype(folder):
    """``build.load_folder_models`` reads the bf16 layers' weights as bfloat16 (no float32 copy on the
    device), equal to the float32 read cast, and leaves the float32 layers (adaLN, embedders) alone."""

    def base_of(dtype: str):
        config = smoke_config(folder, **{"student.dtype": dtype})
        mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
        rules = build.axis_rules(config)
        return dict(nnx.to_flat_state(build.load_folder_models(config, mesh, rules, rules)[2][build.SHARED_BASE]))

    stored, full = base_of("bfloat16"), base_of("float32")
    assert stored.keys() == full.keys()
    dtypes = {path: leaf.dtype for path, leaf in stored.items()}
    assert dtypes[("transformer_blocks", 0, "attn", "to_q", "kernel")] == jnp.bfloat16
    assert dtypes[("transformer_blocks", 0, "norm1", "linear", "kernel")] == jnp.float32
    for path, leaf in stored.items():
        np.testing.assert_array_equal(np.asarray(leaf[...]), np.asarray(full[path][...].astype(leaf.dtype)), err_msg=str(path))
