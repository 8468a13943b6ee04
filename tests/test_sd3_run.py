"""The SD3 path end to end on a tiny random diffusers folder: the folder is real-format, the smoke
config trains and resumes through ``python -m danceopd_jax.main``, and bad input is one clear error."""

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

from danceopd_jax import build, train
from danceopd_jax.config_validation import ConfigError, validate
from danceopd_jax.data.prompt_embeddings import load_table
from danceopd_jax.models import lora, sd3
from danceopd_jax.models.tiny_sd3 import write_tiny_sd3
from danceopd_jax.models.weights import WeightsMismatch, open_safetensors, write_safetensors

from conftest import load_config

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


def test_smoke_config_trains_a_lora_student_and_resumes(folder, tmp_path):
    first = _run_main(folder, tmp_path, "--config.num_train_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "prompt embeddings: 9 prompts" in first.stdout and "done: step 4" in first.stdout
    losses = [json.loads(line) for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert [e["step"] for e in losses] == [1, 2, 3, 4]
    assert all(np.isfinite(e["loss"]) and e["loss"] > 0 for e in losses)
    table = load_table(str(tmp_path / build.PROMPT_TABLE))
    assert "" in table and table.text_shape == (77 + 16, 32) and table.pooled_dim == 32

    second = _run_main(folder, tmp_path, "--config.num_train_steps=6")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resum" in second.stdout.lower() and "done: step 6" in second.stdout
    losses = [json.loads(line) for line in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert [e["step"] for e in losses] == [1, 2, 3, 4, 5, 6]


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
