"""Config builders of the field world: stages of pipeline configs (``configs/fields_demo.py``).

Every model is the same ``FieldMLP`` (``config_lib.field_spec``) on points of the world in D =
``channels`` dimensions, images of one pixel, labels over the world's 9 prompt ids (4 classes, 2
local and 3 global edits) and edit sources, so a student can start from the anchor. The stages
mirror the shapes world's (``shapes_configs``): a model reference is ``@STAGE`` or a workdir path.
"""

from ml_collections import ConfigDict

from danceopd_jax.config_lib import base_config, expert_field, field_spec
from danceopd_jax.fieldworld.data import BUCKET_KINDS
from danceopd_jax.fieldworld.targets import make_world
from danceopd_jax.shapes_configs import expert_name

SIZES = {  # the demo's sizes: the full run and a toy ``quick`` run for CI
    "full": dict(anchor_steps=1500, teacher_steps=600, student_steps=300, batch=128, rollout=8, examples=2000, bucket=50000),
    "quick": dict(anchor_steps=60, teacher_steps=30, student_steps=20, batch=64, rollout=4, examples=200, bucket=2048),
}
STUDENT_DATA_SEED = 10  # bucket seeds of student stages; experts train on buckets seeded 0..4


def field_world(config: ConfigDict, dim: int = 2) -> ConfigDict:
    """The field world's point and condition space (``fieldworld.data``), shared by every stage."""
    config.image_size = 1
    config.channels = dim
    config.condition.update(dict(num_classes=make_world(dim).num_prompts, use_source=True))
    return config


def _stage(steps: int, batch: int, buckets: dict, fields: dict, lr: float, seed: int, dim: int) -> ConfigDict:
    """A stage with one route per bucket (``{name: (kind, size, seed, weight)}``) targeting ``fields[name]``."""
    config = field_world(base_config(), dim)
    config.seed = seed
    config.num_train_steps = steps
    config.batch_size = batch
    config.routes = ConfigDict({name: dict(field=fields[name], bucket=name, weight=b[3]) for name, b in buckets.items()})
    config.data.buckets = ConfigDict({name: dict(kind=b[0], size=b[1], seed=b[2]) for name, b in buckets.items()})
    config.optimizer.learning_rate = lr
    config.optimizer.warmup_steps = min(100, steps // 10)
    config.log_every = max(1, min(100, steps // 5))
    config.checkpoint_every = steps
    return config


def flow_matching_stage(steps: int, batch: int, buckets: dict, init: str = "", lr: float = 3e-3, seed: int = 0, dim: int = 2) -> ConfigDict:
    """Flow matching on exact samples with 10% condition dropout (a CFG branch); lr 3e-3 as the
    MLP's fit in ``tests/test_fieldworld.py``; EMA 0.99."""
    config = _stage(steps, batch, buckets, {name: "" for name in buckets}, lr, seed, dim)
    config.method = "flow_matching"
    config.condition_dropout = 0.1
    config.student = field_spec(init="checkpoint", checkpoint=init) if init else field_spec(seed=seed)
    config.optimizer.ema_decay = 0.99
    return config


def distillation_stage(
    steps: int, batch: int, rollout: int, routes: dict, *, student: str = "@anchor", method: str = "danceopd", seed: int = 0, dim: int = 2
) -> ConfigDict:
    """A student (from ``student``) distilled from routes ``{name: (expert ref, kind, size, seed)}``,
    per-step routing, low_t queries, lr 1e-3."""
    buckets = {name: (kind, size, bucket_seed, 1.0) for name, (_, kind, size, bucket_seed) in routes.items()}
    config = _stage(steps, batch, buckets, {name: name for name in routes}, 1e-3, seed, dim)
    config.method = method
    config.rollout_steps = rollout
    config.student = field_spec(init="checkpoint", checkpoint=student)
    refs = {expert_name(ref): ref for ref, *_ in routes.values()}
    config.experts = ConfigDict({name: field_spec(init="checkpoint", checkpoint=ref) for name, ref in refs.items()})
    config.fields = ConfigDict(
        {name: expert_field(expert_name(ref), needs_source="source" in BUCKET_KINDS[kind]) for name, (ref, kind, *_) in routes.items()}
    )
    return config


def expert_stages(s: dict, dim: int = 2) -> dict:
    """The T2I anchor and the edit teacher fine-tuned from it on edits only (local and global)."""
    return {
        "anchor": flow_matching_stage(s["anchor_steps"], s["batch"], {"t2i": ("fields_t2i", s["bucket"], 0, 1.0)}, dim=dim),
        "edit_teacher": flow_matching_stage(
            s["teacher_steps"], s["batch"], {"edit": ("fields_edit", s["bucket"], 1, 1.0)}, init="@anchor", lr=1e-3, dim=dim
        ),
    }


def composition_routes(size: int, anchor: str = "@anchor", edit_teacher: str = "@edit_teacher") -> dict:
    """T2I prompts to the anchor's field, edits (local and global) to the edit teacher's."""
    return {
        "t2i": (anchor, "fields_t2i", size, STUDENT_DATA_SEED),
        "edit": (edit_teacher, "fields_edit", size, STUDENT_DATA_SEED + 1),
    }


def evaluation(models: list[str], s: dict, capabilities: str = "t2i,local_edit,global_edit", seed: int = 0) -> ConfigDict:
    return ConfigDict(dict(models=",".join(models), capabilities=capabilities, num_examples=s["examples"], steps=16, cfg_scale=1.0, seed=seed))


def sizes(size: str) -> dict:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid: {', '.join(SIZES)}")
    return SIZES[size]
