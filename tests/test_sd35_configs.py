"""The paper's SD3.5-Medium configs (``configs/sd35_realism.py``, ``configs/sd35_cfg_absorb.py``):
they validate against a folder holding SD3.5-Medium's real configs and no weights (validation reads
no weights), carry the paper's hyperparameters, and stop with one line naming the key when a
required value, a LoRA target, an expert's LoRA file or a single transformer file is wrong."""

import json
import pathlib

import numpy as np
import pytest

from danceopd_jax.config_lib import SD3_LORA_TARGETS
from danceopd_jax.config_validation import ConfigError, LoRATargetError, validate
from danceopd_jax.models import mmdit, sd3_folder
from danceopd_jax.models.lora import UnknownLoRATarget
from danceopd_jax.models.weights import write_safetensors

from conftest import load_config

CONFIGS = ("sd35_realism", "sd35_cfg_absorb")

# stabilityai/stable-diffusion-3.5-medium: transformer/config.json and scheduler/scheduler_config.json
SD35_MEDIUM_TRANSFORMER = {
    "_class_name": "SD3Transformer2DModel",
    "_diffusers_version": "0.31.0.dev0",
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "dual_attention_layers": list(range(13)),
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "sample_size": 128,
}
SD35_MEDIUM_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
# Validation reads only the two configs above and model_index.json, and checks that the other
# components' folders and configs exist; their contents here are placeholders.
COMPONENTS = {
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": ["transformers", "T5TokenizerFast"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
}


def _write_json(path: pathlib.Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def sd35_folder(tmp_path_factory) -> pathlib.Path:
    """An SD3.5-Medium pipeline folder with its configs and no weights, plus a prompt file and a LoRA."""
    root = tmp_path_factory.mktemp("sd35_medium")
    _write_json(root / "model_index.json", {"_class_name": "StableDiffusion3Pipeline", **COMPONENTS})
    _write_json(root / "transformer" / "config.json", SD35_MEDIUM_TRANSFORMER)
    _write_json(root / "scheduler" / "scheduler_config.json", SD35_MEDIUM_SCHEDULER)
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        _write_json(root / name / "config.json", {"architectures": [COMPONENTS[name][1]]})
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        (root / name).mkdir()
    (root / "prompts.txt").write_text("a photo of a red cat\n# a comment\na street at night, 35mm photo\n")
    # a rank-1 realism LoRA over two real SD3.5-M modules (diffusers' save_lora_weights naming)
    lora = {}
    for module, (d_in, d_out) in {"transformer_blocks.0.attn.to_q": (1536, 1536), "transformer_blocks.12.attn2.to_out.0": (1536, 1536)}.items():
        lora[f"transformer.{module}.lora_A.weight"] = np.zeros((1, d_in), np.float32)
        lora[f"transformer.{module}.lora_B.weight"] = np.zeros((d_out, 1), np.float32)
    write_safetensors(str(root / "realism_lora.safetensors"), lora)
    return root


def paper_config(name: str, folder: pathlib.Path, **overrides):
    """The paper config ``name`` with its required values pointing into ``folder``."""
    required = {"model_dir": str(folder), "data.buckets.prompts.path": str(folder / "prompts.txt")}
    if name == "sd35_realism":
        required["experts.realism.lora_path"] = str(folder / "realism_lora.safetensors")
    return load_config(name, **{**required, **overrides})


def _error(config) -> str:
    with pytest.raises(ConfigError) as error:
        validate(config)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_the_folder_is_sd35_medium(sd35_folder):
    """The configs written above are SD3.5-Medium's (the preset this project keeps of it)."""
    config = mmdit.config_from_diffusers(sd3_folder.component_config(str(sd35_folder), "transformer"))
    assert config == mmdit.mmdit_config("sd35_medium")
    assert sd3_folder.scheduler_shift(str(sd35_folder)) == 3.0


@pytest.mark.parametrize("name", CONFIGS)
def test_paper_configs_validate_without_weights(name, sd35_folder):
    validate(paper_config(name, sd35_folder))


@pytest.mark.parametrize("name", CONFIGS)
def test_paper_hyperparameters(name, sd35_folder):
    """docs/METHOD.md "Paper setup", the authors' release, and SD3.5-M's 1024 px / 77 + 256-token shapes."""
    c = paper_config(name, sd35_folder)
    assert (c.method, c.routing, c.query_sampler, c.queries_per_rollout) == ("danceopd", "per_step", "low_t", 1)
    assert (c.rollout_steps, c.shift, c.num_train_steps, c.batch_size, c.grad_accum_steps) == (16, 3.0, 3000, 4, 4)  # 1 sample x 4
    assert c.sigma_schedule == "flow_match_euler"  # the release rolls out on the pipeline scheduler's sigmas
    assert (c.image_size, c.channels) == (1024 // 8, 16)
    assert (c.condition.text_len, c.condition.text_dim, c.condition.pooled_dim) == (77 + 256, 4096, 2048)
    o = c.optimizer
    assert (o.learning_rate, o.weight_decay, o.grad_clip, o.warmup_steps, o.decay, o.ema_decay) == (2e-4, 0.0, 1.0, 0, "constant", 0.0)
    s = c.student
    assert (s.kind, s.lora_rank, s.lora_alpha, s.dtype, s.remat) == ("mmdit", 128, 128.0, "bfloat16", "full")
    assert s.lora_targets == SD3_LORA_TARGETS
    assert set(SD3_LORA_TARGETS.split(",")) == {"to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj",
                                                 "to_add_out", "fc1", "fc2"}  # fmt: skip
    assert dict(c.data.buckets.prompts) == dict(kind="prompt_file", size=0, seed=0, path=str(sd35_folder / "prompts.txt"))
    assert [(r.field, r.bucket, r.weight) for r in c.routes.values()] == [(next(iter(c.fields)), "prompts", 1.0)]
    (field,) = c.fields.values()
    expert = c.experts[field.expert]
    if name == "sd35_realism":  # the realism teacher's ordinary field: base + its LoRA, no CFG
        assert field.cfg_scale == 1.0 and expert.lora_path.endswith("realism_lora.safetensors")
    else:  # the plain base under CFG 4.5, absorbed by a CFG-free student
        assert field.cfg_scale == 4.5 and expert.lora_path == "" and expert.lora_rank == 0


@pytest.mark.parametrize("name", CONFIGS)
def test_required_values_left_unset_are_one_line(name, sd35_folder):
    config = paper_config(name, sd35_folder)
    config.model_dir = None
    assert _error(config) == "config.model_dir: not set; required, give each as --config.KEY=VALUE"
    message = _error(load_config(name))
    assert message.startswith("config.data.buckets.prompts.path, ") and "config.model_dir: not set" in message


def test_lora_targets_and_files_are_checked_before_anything_is_built(sd35_folder, tmp_path):
    """Against the transformer's module names from its config.json alone: no weights, no prompts encoded."""
    config = paper_config("sd35_realism", sd35_folder, **{"student.lora_targets": "to_q,to_qq,fc1"})
    with pytest.raises(LoRATargetError) as error:
        validate(config)
    assert isinstance(error.value, UnknownLoRATarget) and "\n" not in str(error.value)
    assert str(error.value).startswith("config.student.lora_targets: unknown LoRA target 'to_qq': it matches no linear layer of ")
    assert "add_q_proj" in str(error.value)  # the names there are
    validate(paper_config("sd35_realism", sd35_folder, **{"student.lora_targets": r"transformer_blocks\.(0|23)\.attn\.to_(q|v)"}))
    with pytest.raises(UnknownLoRATarget, match="unknown LoRA target 'pos_embed.*: it matches no linear layer"):  # the patch conv: no LoRA
        validate(paper_config("sd35_realism", sd35_folder, **{"student.lora_targets": r"pos_embed\.proj"}))

    lora = tmp_path / "sd35_large_lora.safetensors"  # a LoRA for a deeper model: block 30 does not exist
    write_safetensors(str(lora), {"transformer_blocks.30.attn.to_q.lora_A.weight": np.zeros((1, 1536), np.float32),
                                  "transformer_blocks.30.attn.to_q.lora_B.weight": np.zeros((1536, 1), np.float32)})  # fmt: skip
    message = _error(paper_config("sd35_realism", sd35_folder, **{"experts.realism.lora_path": str(lora)}))
    assert message.startswith(f"config.experts.realism.lora_path: {lora}: adapts 1 modules ")
    assert message.endswith("/transformer does not have: transformer_blocks.30.attn.to_q")
    write_safetensors(str(lora), {"something.weight": np.zeros(2, np.float32)})
    message = _error(paper_config("sd35_realism", sd35_folder, **{"experts.realism.lora_path": str(lora)}))
    assert message.startswith("config.experts.realism.lora_path: ") and "not LoRA A/B factors" in message


def test_transformer_path_is_checked(sd35_folder, tmp_path):
    """``config.transformer_path``: a file in diffusers or Stability AI naming; the naming is read from its header."""
    original = tmp_path / "sd3.5_medium.safetensors"
    write_safetensors(str(original), {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": np.zeros((3, 1), np.float32),
                                      "first_stage_model.decoder.conv_in.bias": np.zeros(1, np.float32)})  # fmt: skip
    validate(paper_config("sd35_cfg_absorb", sd35_folder, transformer_path=str(original)))

    message = _error(paper_config("sd35_cfg_absorb", sd35_folder, transformer_path=str(tmp_path / "absent.safetensors")))
    assert message == f"config.transformer_path: no such file: {tmp_path / 'absent.safetensors'}"
    neither = tmp_path / "vae.safetensors"
    write_safetensors(str(neither), {"decoder.conv_in.bias": np.zeros(1, np.float32)})
    message = _error(paper_config("sd35_cfg_absorb", sd35_folder, transformer_path=str(neither)))
    assert message.startswith(f"config.transformer_path: {neither}: not an SD3 transformer checkpoint: neither diffusers names")
    message = _error(paper_config("sd35_cfg_absorb", sd35_folder, transformer_path=str(original), model_dir=""))
    assert message == "config.transformer_path: replaces the transformer weights of config.model_dir, which is not set"
