"""Config builders for the shapes world (the capability benchmark): stages of pipeline configs.

Used by ``configs/shapes_*.py``. Every model is the same ``mini`` DiT (16 px, 2 px patches, text
and source tokens), so a student can start from the anchor and any row compares like with like.
"""

from ml_collections import ConfigDict

from danceopd_jax.config_lib import base_config, expert_field, model_spec

SIZES = {  # training and evaluation sizes: the full run and a toy ``quick`` run for CI
    "full": dict(anchor_steps=1200, teacher_steps=500, student_steps=250, batch=32, rollout=8, examples=64, bucket=20000),
    "quick": dict(anchor_steps=30, teacher_steps=20, student_steps=10, batch=8, rollout=4, examples=8, bucket=256),
}


def shapes_world(config: ConfigDict) -> ConfigDict:
    """The shapes world's image and condition space, shared by every stage.

    16 px with 2 px patches: on a 2-core CPU a small DiT forms objects far sooner than at 32 px
    with 4 px patches, for the same number of tokens (measured in this project: 400 steps of
    memorising 4 scenes reached a nearest-image MSE of 0.004-0.16 at 16/2 against 0.08-0.24 at 32/4).
    """
    config.image_size = 16
    config.condition = ConfigDict(dict(text_len=24, text_dim=32, num_classes=0, use_source=True))
    return config


def shapes_model(**overrides) -> ConfigDict:
    return model_spec("mini", patch_size=2, use_source=True, **overrides)


def flow_matching_stage(steps: int, batch: int, buckets: dict, init: str = "", lr: float = 3e-3) -> ConfigDict:
    """Flow matching from data. lr 3e-3: memorising 4 scenes in 400 steps reached a nearest-image
    MSE of 0.004-0.031 against 0.004-0.156 at 1e-3 (this project's measurement, mini DiT)."""
    config = shapes_world(base_config())
    config.method = "flow_matching"
    config.condition_dropout = 0.1
    config.num_train_steps = steps
    config.batch_size = batch
    config.student = shapes_model(init="checkpoint", checkpoint=init) if init else shapes_model()
    config.routes = ConfigDict({name: dict(field="", bucket=name, weight=1.0) for name in buckets})
    config.data.buckets = ConfigDict(buckets)
    config.optimizer.learning_rate = lr
    config.optimizer.warmup_steps = min(100, steps // 10)
    config.optimizer.ema_decay = 0.99
    config.log_every = max(1, min(50, steps // 5))
    config.checkpoint_every = steps
    return config


def distillation_stage(
    steps: int,
    batch: int,
    rollout: int,
    bucket_size: int,
    method: str = "danceopd",
    routing: str = "per_step",
    sampler: str = "low_t",
) -> ConfigDict:
    """A student from the anchor distilled from the anchor (T2I route) and the edit teacher (edit route)."""
    config = shapes_world(base_config())
    config.method = method
    config.routing = routing
    config.query_sampler = sampler
    config.rollout_steps = rollout
    config.num_train_steps = steps
    config.batch_size = batch
    config.student = shapes_model(init="checkpoint", checkpoint="@anchor")
    config.experts = ConfigDict(
        {
            "anchor": shapes_model(init="checkpoint", checkpoint="@anchor"),
            "edit_teacher": shapes_model(init="checkpoint", checkpoint="@edit_teacher"),
        }
    )
    config.fields = ConfigDict({"t2i": expert_field("anchor"), "edit": expert_field("edit_teacher", needs_source=True)})
    config.routes = ConfigDict(
        {"t2i": dict(field="t2i", bucket="t2i", weight=1.0), "edit": dict(field="edit", bucket="edit", weight=1.0)}
    )
    config.data.buckets = ConfigDict(
        {"t2i": dict(kind="scenes_t2i", size=bucket_size, seed=10), "edit": dict(kind="scenes_edit", size=bucket_size, seed=11)}
    )
    config.optimizer.learning_rate = 3e-4
    config.optimizer.warmup_steps = min(20, steps // 10)
    config.optimizer.ema_decay = 0.0
    config.log_every = max(1, min(20, steps // 5))
    config.checkpoint_every = steps
    return config




def t2i_bucket(size: int, seed: int = 0) -> dict:
    return {"t2i": dict(kind="scenes_t2i", size=size, seed=seed)}


def edit_bucket(size: int, seed: int = 1) -> dict:
    return {"edit": dict(kind="scenes_edit", size=size, seed=seed)}


def expert_stages(s: dict) -> dict:
    """The T2I anchor and the edit teacher fine-tuned from it on edit pairs only."""
    return {
        "anchor": flow_matching_stage(s["anchor_steps"], s["batch"], t2i_bucket(s["bucket"])),
        "edit_teacher": flow_matching_stage(
            s["teacher_steps"], s["batch"], edit_bucket(s["bucket"]), init="@anchor", lr=1e-3
        ),
    }


def evaluation(models: list[str], s: dict, capabilities: str = "t2i,local_edit,global_edit") -> ConfigDict:
    return ConfigDict(
        dict(models=",".join(models), capabilities=capabilities, num_examples=s["examples"], steps=16, cfg_scale=1.0, seed=0)
    )


def sizes(size: str) -> dict:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid: {', '.join(SIZES)}")
    return SIZES[size]
