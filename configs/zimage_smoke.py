"""Z-Image smoke run: DanceOPD on a tiny random Z-Image diffusers folder, the Z-Image path on CPU.

    python -m danceopd_jax.models.tiny_zimage --out workdirs/tiny_zimage
    python -m danceopd_jax.main --config configs/zimage_smoke.py --config.model_dir=workdirs/tiny_zimage --workdir workdirs/zimage_smoke

Expected: the folder's prompts are encoded with its Qwen3 through Z-Image's T2I chat template (once,
into the workdir), then 6 DanceOPD steps train a rank-4 LoRA student (the authors' targets:
attention q/k/v/out and the SwiGLU w1/w2/w3) over the shared frozen transformer against two fields:
``teacher`` (the base plus the folder's ``teacher_lora.safetensors``) and ``cfg`` (the plain base
under classifier-free guidance 4.0, i.e. diffusers' ``guidance_scale`` 3.0, against the empty
prompt). Rollouts use the Z-Image pipelines' grid: ``linspace(1, 1/N, N)`` shifted by 3, then 0 (the
``uniform`` schedule with shift 3). The loss is finite; the models are random, so the figures say
nothing about quality.
"""

from ml_collections import ConfigDict, FieldReference

from danceopd_jax.config_lib import ZIMAGE_LORA_TARGETS, base_config, expert_field, zimage_spec


def get_config() -> ConfigDict:
    config = base_config()
    model_dir = FieldReference("", field_type=str)
    config.model_dir = model_dir
    config.num_train_steps = 6
    config.batch_size = 2
    config.rollout_steps = 4
    config.shift = 3.0
    config.sigma_schedule = "uniform"  # the Z-Image pipelines' grid (module docstring)
    config.image_size = 8  # latents: 64 px through the tiny folder's 8x VAE
    config.channels = 16
    config.condition.update(dict(text_len=64, text_dim=32))  # caption tokens; the tiny Qwen3's width

    config.student = zimage_spec(lora_rank=4, lora_alpha=4.0, lora_targets=ZIMAGE_LORA_TARGETS, seed=0)
    config.experts = ConfigDict({"teacher": zimage_spec(lora_path=model_dir + "/teacher_lora.safetensors"), "base": zimage_spec()})
    config.fields = ConfigDict({"teacher": expert_field("teacher"), "cfg": expert_field("base", cfg_scale=4.0)})
    config.routes = ConfigDict(
        {"teacher": dict(field="teacher", bucket="prompts", weight=1.0), "cfg": dict(field="cfg", bucket="prompts", weight=1.0)}
    )
    config.data.buckets = ConfigDict({"prompts": dict(kind="prompt_file", size=8, seed=0, path=model_dir + "/prompts.txt")})
    config.optimizer.learning_rate = 2e-4
    config.optimizer.warmup_steps = 0
    config.log_every = 2
    config.checkpoint_every = 3
    config.compilation_cache_dir = ""
    return config
