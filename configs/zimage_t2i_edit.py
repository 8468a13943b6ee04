"""The paper's T2I + editing composition on Z-Image: the anchor's T2I field and an edit teacher
distilled into one LoRA student with DanceOPD (in-context editing: the source latent stays clean).

    python -m danceopd_jax.main --config configs/zimage_t2i_edit.py --workdir workdirs/zimage_t2i_edit \\
        --config.model_dir=PATH/Z-Image \\
        --config.experts.edit.lora_path=PATH/edit_teacher_lora.safetensors \\
        --config.data.buckets.prompts.path=PATH/t2i_prompts.txt \\
        --config.data.buckets.edits.path=PATH/edits.csv

``edits.csv`` is an OmniEdit-style manifest (``uid, task, prompt, source_image, target_image``; the
target is not needed: DanceOPD's edit route asks the teacher, not a target). Sources are resized to
1024 px as the authors resize them (``resize="stretch"``) and VAE-encoded clean, once. The settings
are the paper's (``config_lib.zimage_recipe``: rank-128 LoRA on attention q/k/v/out and the SwiGLU
w1/w2/w3, lr 2e-4, 16-step rollouts, shift 3, bf16 with full remat, clip 1.0, 4 samples per update
as 4 microbatches, 3000 steps, 1024 px); the memory it needs is in docs/MODELS.md.

Fields: ``t2i`` is the plain base (the anchor) on prompts; the paper does not state a CFG scale
for it, so it is 1 here (set ``--config.fields.t2i.cfg_scale=S`` to distil a guided anchor: the
project's ``u + s (c - u)``, which is diffusers' ``guidance_scale`` s - 1). ``edit`` is the base
plus the edit teacher's LoRA on edit instructions, its CFG null keeping the source.

Expected (the paper, GEditBench / GenEval): the student keeps the anchor's T2I (GenEval 0.849 vs
0.832) while taking the teacher's editing (5.347 vs DiffusionOPD's 4.947). Not yet run here: no
accelerator with the memory has been lent to this project.
"""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from danceopd_jax.config_lib import expert_field, zimage_recipe, zimage_teacher


def get_config() -> ConfigDict:
    config = zimage_recipe()
    config.experts = ConfigDict({"anchor": zimage_teacher(""), "edit": zimage_teacher(placeholder(str))})
    config.fields = ConfigDict({"t2i": expert_field("anchor"), "edit": expert_field("edit", needs_source=True)})
    config.routes = ConfigDict(
        {"t2i": dict(field="t2i", bucket="prompts", weight=1.0), "edit": dict(field="edit", bucket="edits", weight=1.0)}
    )
    config.data.buckets = ConfigDict(
        {
            "prompts": dict(kind="prompt_file", size=0, seed=0, path=placeholder(str)),
            "edits": dict(kind="edit_instructions", size=0, seed=1, path=placeholder(str), resize="stretch"),
        }
    )
    return config
