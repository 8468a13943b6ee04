"""Z-Image T2I + edit smoke run: DanceOPD with a T2I route on prompts and an edit route on source images.

    python -m danceopd_jax.models.tiny_zimage --out workdirs/tiny_zimage
    python -m danceopd_jax.main --config configs/zimage_t2i_edit_smoke.py --config.model_dir=workdirs/tiny_zimage --workdir workdirs/zimage_t2i_edit_smoke

Expected: the folder's prompts are encoded through Z-Image's T2I chat template and the edit
instructions of ``edits/edits.jsonl`` through its three-segment edit template (once, into the
workdir); the 7 source images of the manifest (64 px: 8 x 8 latents through the tiny 8x VAE) are
VAE-encoded once into ``WORKDIR/image_latents.safetensors`` (``(7 encoded)``; run again, ``(0
encoded)``). Then 6 DanceOPD steps train a rank-4 LoRA student that reads sources, routed per
step between ``t2i`` (the base plus the folder's ``teacher_lora.safetensors``, on ``prompts.txt``)
and ``edit`` (the plain base reading the source latent in its sequence, a stand-in edit teacher,
on the manifest's source images and instructions; no targets are read). The loss is finite; the
models are random, so the figures say nothing about quality.
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
    config.sigma_schedule = "uniform"  # the Z-Image pipelines' grid (configs/zimage_smoke.py)
    config.image_size = 8  # latents: 64 px through the tiny folder's 8x VAE
    config.channels = 16
    config.condition.update(dict(text_len=64, text_dim=32, use_source=True))

    config.student = zimage_spec(lora_rank=4, lora_alpha=4.0, lora_targets=ZIMAGE_LORA_TARGETS, use_source=True, seed=0)
    config.experts = ConfigDict(
        {"t2i": zimage_spec(lora_path=model_dir + "/teacher_lora.safetensors"), "edit": zimage_spec(use_source=True)}
    )
    config.fields = ConfigDict({"t2i": expert_field("t2i"), "edit": expert_field("edit", needs_source=True)})
    config.routes = ConfigDict(
        {"t2i": dict(field="t2i", bucket="prompts", weight=1.0), "edit": dict(field="edit", bucket="edits", weight=1.0)}
    )
    config.data.buckets = ConfigDict(
        {
            "prompts": dict(kind="prompt_file", size=8, seed=0, path=model_dir + "/prompts.txt"),
            "edits": dict(kind="edit_instructions", size=0, seed=1, path=model_dir + "/edits/edits.jsonl"),
        }
    )
    config.optimizer.learning_rate = 2e-4
    config.optimizer.warmup_steps = 0
    config.log_every = 2
    config.checkpoint_every = 3
    config.compilation_cache_dir = ""
    return config
