"""SD3 off-policy smoke run: your captioned images, VAE-encoded once, as the data endpoints of a tiny SD3 folder.

    python -m danceopd_jax.models.tiny_sd3 --out workdirs/tiny_sd3
    python -m danceopd_jax.data.example_files --out workdirs/example_files_64 --size 64
    python -m danceopd_jax.main --config configs/sd3_offpolicy_smoke.py --config.model_dir=workdirs/tiny_sd3 --workdir workdirs/sd3_offpolicy_smoke

Expected: the 16 captioned PNG and JPEG images of ``example_files_64/t2i`` are checked at 64 px (the
latent size 8 x the tiny VAE's 8), their captions encoded by the folder's text encoders, and every
image encoded once by the folder's VAE into ``WORKDIR/image_latents.safetensors`` (``image
latents: 16 images in ... (16 encoded)``; run again, ``(0 encoded)``). Then 6 off-policy steps
train a rank-4 LoRA student on forward-noised latents of those images, ``(1 - sigma) x0 + sigma
eps``, against the ``realism`` teacher (the base plus the folder's ``teacher_lora.safetensors``).
The loss is finite; the models are random, so the figures say nothing about quality.
``configs/sd3_offpolicy_smoke.py:DIR`` reads the images from DIR/t2i.
"""

import os

from ml_collections import ConfigDict, FieldReference

from danceopd_jax.config_lib import base_config, expert_field, sd3_spec

LORA_TARGETS = "to_q,to_k,to_v,to_out,add_q_proj,add_k_proj,add_v_proj,to_add_out,fc1,fc2"


def get_config(data_dir: str = "workdirs/example_files_64") -> ConfigDict:
    config = base_config()
    model_dir = FieldReference("", field_type=str)
    config.model_dir = model_dir
    config.method = "offpolicy"
    config.num_train_steps = 6
    config.batch_size = 2
    config.rollout_steps = 4  # the grid the query times are drawn from
    config.shift = 3.0
    config.sigma_schedule = "flow_match_euler"
    config.image_size = 8  # latents: 64 px through the tiny folder's 8x VAE
    config.channels = 16
    config.condition.update(dict(text_len=77 + 16, text_dim=32, pooled_dim=32))  # the tiny transformer's widths

    config.student = sd3_spec(lora_rank=4, lora_alpha=4.0, lora_targets=LORA_TARGETS, seed=0)
    config.experts = ConfigDict({"realism": sd3_spec(lora_path=model_dir + "/teacher_lora.safetensors")})
    config.fields = ConfigDict({"realism": expert_field("realism")})
    config.routes = ConfigDict({"realism": dict(field="realism", bucket="images", weight=1.0)})
    config.data.buckets = ConfigDict({"images": dict(kind="image_text", size=0, seed=0, path=os.path.join(data_dir, "t2i"))})
    config.logical_axis_rules.update(dict(text_embed=None, pooled=None))
    config.optimizer.learning_rate = 2e-4
    config.optimizer.warmup_steps = 0
    config.log_every = 2
    config.checkpoint_every = 3
    config.compilation_cache_dir = ""
    return config
