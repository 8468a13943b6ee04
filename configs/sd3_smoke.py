"""SD3 smoke run: DanceOPD on a tiny random SD3-family diffusers folder, the whole SD3 path on CPU.

    python -m danceopd_jax.models.tiny_sd3 --out workdirs/tiny_sd3
    python -m danceopd_jax.main --config configs/sd3_smoke.py --config.model_dir=workdirs/tiny_sd3 --workdir workdirs/sd3_smoke

Expected: the folder's prompts are encoded with its CLIP-L, CLIP-G and T5 (once, into the
workdir), then 6 DanceOPD steps train a rank-4 LoRA student over the shared frozen transformer
against two fields: ``realism`` (the base plus the folder's ``teacher_lora.safetensors``) and
``cfg`` (the plain base under classifier-free guidance 4.0 against the empty prompt). The loss is
finite; the models are random, so the figures say nothing about quality.
"""

from ml_collections import ConfigDict, FieldReference

from danceopd_jax.config_lib import base_config, expert_field, sd3_spec

LORA_TARGETS = "to_q,to_k,to_v,to_out,add_q_proj,add_k_proj,add_v_proj,to_add_out,fc1,fc2"


def get_config() -> ConfigDict:
    config = base_config()
    model_dir = FieldReference("", field_type=str)
    config.model_dir = model_dir
    config.num_train_steps = 6
    config.batch_size = 2
    config.rollout_steps = 4
    config.shift = 3.0
    config.sigma_schedule = "flow_match_euler"  # the folder's scheduler grid, as SD3 runs use
    config.image_size = 8  # latents: 64 px through the tiny folder's 8x VAE
    config.channels = 16
    config.condition.update(dict(text_len=77 + 16, text_dim=32, pooled_dim=32))  # the tiny transformer's widths

    config.student = sd3_spec(lora_rank=4, lora_alpha=4.0, lora_targets=LORA_TARGETS, seed=0)
    config.experts = ConfigDict({"realism": sd3_spec(lora_path=model_dir + "/teacher_lora.safetensors"), "base": sd3_spec()})
    config.fields = ConfigDict({"realism": expert_field("realism"), "cfg": expert_field("base", cfg_scale=4.0)})
    config.routes = ConfigDict(
        {"realism": dict(field="realism", bucket="prompts", weight=1.0), "cfg": dict(field="cfg", bucket="prompts", weight=1.0)}
    )
    config.data.buckets = ConfigDict({"prompts": dict(kind="prompt_file", size=8, seed=0, path=model_dir + "/prompts.txt")})
    config.logical_axis_rules.update(dict(text_embed=None, pooled=None))
    config.optimizer.learning_rate = 2e-4
    config.optimizer.warmup_steps = 0
    config.log_every = 2
    config.checkpoint_every = 3
    config.compilation_cache_dir = ""
    return config
