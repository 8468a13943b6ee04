"""SD3.5-Medium realism absorption (the paper's Sec. 4.1C / Fig. 4(a)): a LoRA student distils a
realism teacher's field on its own rollouts.

    python -m danceopd_jax.main --config configs/sd35_realism.py --workdir workdirs/sd35_realism \
        --config.model_dir=PATH/stable-diffusion-3.5-medium \
        --config.experts.realism.lora_path=PATH/realism_lora.safetensors \
        --config.data.buckets.prompts.path=PATH/prompts.txt

``model_dir`` is the SD3.5-Medium diffusers folder (its transformer is the shared frozen base and
the student's starting point; ``--config.transformer_path=FILE`` takes the transformer's weights
from one safetensors file instead, diffusers or Stability AI naming). The realism teacher is that
base plus a realism LoRA (a diffusers or PEFT safetensors file, or a PEFT folder): what users of
SD3.5-M realism fine-tunes usually hold. The prompts are a ``.txt`` (one per line) or
``.jsonl`` file, all of it used.

Setup as the paper's (``config_lib.sd35_medium_recipe``: rank-128 LoRA on attention q, k, v, out
and the MLP, lr 2e-4, no weight decay, 16-step rollouts on the scheduler grid with shift 3.0, bf16, clip 1.0, 3000 steps,
1024 px; 4 samples per update as 4 microbatches of one). One route, as in the authors'
``sd35_realism_absorption`` config: every step queries the realism field, without CFG on either
side (the teacher's ordinary field, not a guided one; the rollout is CFG-free).

Expected (paper, with the authors' realism teacher, a full-parameter fine-tune, not released): the
student's realism reward rises by 9.9%, closing 85.3% of the student-teacher gap; prompt content is
kept. Parameter memory (base + teacher delta + student LoRA and its AdamW state) fits one 80 GB
GPU (``docs/MODELS.md``); the activation memory of a 1024 px step has not been measured on a GPU
(``benchmarks/grad_accumulation.py`` measures it per microbatch count).
"""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from danceopd_jax.config_lib import expert_field, sd35_medium_recipe, sd3_spec


def get_config() -> ConfigDict:
    config = sd35_medium_recipe()
    config.experts = ConfigDict({"realism": sd3_spec(dtype="bfloat16", lora_path=placeholder(str))})
    config.fields = ConfigDict({"realism": expert_field("realism")})
    config.routes = ConfigDict({"realism": dict(field="realism", bucket="prompts", weight=1.0)})
    return config
