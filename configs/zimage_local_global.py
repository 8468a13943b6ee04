"""The paper's local + global editing composition on Z-Image: a local-edit and a global-edit teacher
distilled into one LoRA student with DanceOPD, both routes drawing from one OmniEdit-style manifest
split by its task column.

    python -m danceopd_jax.main --config configs/zimage_local_global.py --workdir workdirs/zimage_local_global \\
        --config.model_dir=PATH/Z-Image \\
        --config.experts.local.lora_path=PATH/local_edit_lora.safetensors \\
        --config.experts.global.lora_path=PATH/global_edit_lora.safetensors \\
        --config.data.buckets.local.path=PATH/edits.csv --config.data.buckets.local.tasks=add,remove,replace \\
        --config.data.buckets.global.path=PATH/edits.csv --config.data.buckets.global.tasks=style,background

The task names are the manifest's own (its ``task`` column); each bucket keeps the lines whose task
it lists, and a task that selects no line is an error. Sources are resized to 1024 px as the
authors resize them and VAE-encoded clean, once. Settings: the paper's (``config_lib.zimage_recipe``).

Expected (the paper, GEditBench): the student beats the best baseline, off-policy (5.498 vs 4.736),
and Flow-OPD (4.679). Not yet run here: no accelerator with the memory has been lent to this project.
"""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from danceopd_jax.config_lib import expert_field, zimage_recipe, zimage_teacher


def get_config() -> ConfigDict:
    config = zimage_recipe()
    config.experts = ConfigDict({"local": zimage_teacher(placeholder(str)), "global": zimage_teacher(placeholder(str))})
    config.fields = ConfigDict(
        {"local": expert_field("local", needs_source=True), "global": expert_field("global", needs_source=True)}
    )
    config.routes = ConfigDict(
        {"local": dict(field="local", bucket="local", weight=1.0), "global": dict(field="global", bucket="global", weight=1.0)}
    )
    edits = dict(kind="edit_instructions", size=0, path=placeholder(str), resize="stretch", tasks=placeholder(str))
    config.data.buckets = ConfigDict({"local": dict(edits, seed=1), "global": dict(edits, seed=2)})
    return config
