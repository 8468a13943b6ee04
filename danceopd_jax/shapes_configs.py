"""Config builders for the shapes world (the capability benchmark): stages of pipeline configs.

Used by ``configs/shapes_*.py`` and ``experiments/``. Every model is the same ``mini`` DiT (16 px,
2 px patches, text and source tokens), so a student can start from the anchor and any row
compares like with like. A model reference is ``@STAGE`` (a stage of the same pipeline) or a
workdir path (a model trained elsewhere, e.g. experts shared by several pipelines).
"""

import os

from ml_collections import ConfigDict

from danceopd_jax.config_lib import base_config, expert_field, model_spec

SIZES = {  # training and evaluation sizes of the demo: the full run and a toy ``quick`` run for CI
    "full": dict(
        preset="mini", anchor_steps=1200, teacher_steps=500, student_steps=250, batch=32, student_batch=32, rollout=8,
        examples=64, bucket=20000,
    ),
    "quick": dict(
        preset="tiny", anchor_steps=30, teacher_steps=20, student_steps=10, batch=8, student_batch=8, rollout=4,
        examples=8, bucket=256,
    ),
}  # fmt: skip
EDIT_KINDS = frozenset({"scenes_edit", "scenes_local_edit", "scenes_global_edit"})
STUDENT_DATA_SEED = 10  # bucket seeds of student stages; experts train on buckets seeded 0..4


IMAGE_SIZE = 16  # the shapes world's images (see shapes_world)


def shapes_world(config: ConfigDict) -> ConfigDict:
    """The shapes world's image and condition space, shared by every stage.

    16 px with 2 px patches: on a 2-core CPU a small DiT forms objects far sooner than at 32 px
    with 4 px patches, for the same number of tokens (measured in this project: 400 steps of
    memorising 4 scenes reached a nearest-image MSE of 0.004-0.16 at 16/2 against 0.08-0.24 at 32/4).
    """
    config.image_size = IMAGE_SIZE
    config.condition.update(dict(text_len=24, text_dim=32, use_source=True))
    return config


def shapes_model(preset: str = "mini", **overrides) -> ConfigDict:
    """A DiT of the shapes world: ``mini`` for real runs, ``tiny`` for toy runs (CI)."""
    return model_spec(preset, patch_size=2, use_source=True, **overrides)


def bucket(kind: str, size: int, seed: int, weight: float = 1.0) -> dict:
    """A data bucket of a shapes-world kind, with the weight of the route that draws from it."""
    return dict(kind=kind, size=size, seed=seed, weight=weight)


def _set_routes(config: ConfigDict, fields: dict, buckets: dict) -> None:
    """One route per bucket (``bucket(...)`` values): route NAME draws from bucket NAME with the
    bucket's weight and targets ``fields[NAME]`` (empty for flow matching)."""
    config.routes = ConfigDict({name: dict(field=fields[name], bucket=name, weight=b["weight"]) for name, b in buckets.items()})
    config.data.buckets = ConfigDict({name: {k: v for k, v in b.items() if k != "weight"} for name, b in buckets.items()})


def flow_matching_stage(
    steps: int, batch: int, buckets: dict, init: str = "", lr: float = 3e-3, seed: int = 0, preset: str = "mini"
) -> ConfigDict:
    """Flow matching from data; one route per bucket, drawn with the bucket's weight each step.

    lr 3e-3: memorising 4 scenes in 400 steps reached a nearest-image MSE of 0.004-0.031 against
    0.004-0.156 at 1e-3 (this project's measurement, mini DiT).
    """
    config = shapes_world(base_config())
    config.seed = seed
    config.method = "flow_matching"
    config.condition_dropout = 0.1
    config.num_train_steps = steps
    config.batch_size = batch
    config.student = shapes_model(preset, init="checkpoint", checkpoint=init) if init else shapes_model(preset)
    _set_routes(config, {name: "" for name in buckets}, buckets)
    config.optimizer.learning_rate = lr
    config.optimizer.warmup_steps = min(100, steps // 10)
    config.optimizer.ema_decay = 0.99
    config.log_every = max(1, min(50, steps // 5))
    config.checkpoint_every = steps
    return config


def expert_name(ref: str) -> str:
    """The expert's name in a student config: the stage name of ``@STAGE``, else the workdir's name."""
    return os.path.basename(os.path.normpath(ref.removeprefix("@")))


def route(expert: str, kind: str, size: int, seed: int = STUDENT_DATA_SEED, cfg_scale: float = 1.0) -> dict:
    """A distillation route: the field of ``expert`` (a model reference, CFG at ``cfg_scale``) on a bucket."""
    return dict(expert=expert, cfg_scale=cfg_scale, bucket=bucket(kind, size, seed))


def distillation_stage(
    steps: int,
    batch: int,
    rollout: int,
    routes: dict,
    *,
    student: str = "@anchor",
    method: str = "danceopd",
    routing: str = "per_step",
    sampler: str = "low_t",
    seed: int = 0,
    preset: str = "mini",
    router: dict | None = None,
    route_weights: dict | None = None,
) -> ConfigDict:
    """A student (from ``student``) distilled from the routes' fields (``route(...)`` values).

    ``router`` / ``route_weights`` override keys of ``config.router`` (``routing="learned"``) and
    ``config.route_weights`` (``config_lib.base_config``).
    """
    config = shapes_world(base_config())
    config.seed = seed
    config.method = method
    config.routing = routing
    config.router.update(router or {})
    config.route_weights.update(route_weights or {})
    config.query_sampler = sampler
    config.rollout_steps = rollout
    config.num_train_steps = steps
    config.batch_size = batch
    config.student = shapes_model(preset, init="checkpoint", checkpoint=student)
    refs = {expert_name(r["expert"]): r["expert"] for r in routes.values()}
    config.experts = ConfigDict({name: shapes_model(preset, init="checkpoint", checkpoint=ref) for name, ref in refs.items()})
    config.fields = ConfigDict(
        {
            name: expert_field(expert_name(r["expert"]), r["cfg_scale"], needs_source=r["bucket"]["kind"] in EDIT_KINDS)
            for name, r in routes.items()
        }
    )
    _set_routes(config, {name: name for name in routes}, {name: r["bucket"] for name, r in routes.items()})
    config.optimizer.learning_rate = 3e-4
    config.optimizer.warmup_steps = min(20, steps // 10)
    config.optimizer.ema_decay = 0.0
    config.log_every = max(1, min(20, steps // 5))
    config.checkpoint_every = steps
    return config


def composition_routes(size: int, anchor: str = "@anchor", edit_teacher: str = "@edit_teacher") -> dict:
    """T2I prompts to the anchor's field, edit pairs (local and global) to the edit teacher's."""
    return {"t2i": route(anchor, "scenes_t2i", size), "edit": route(edit_teacher, "scenes_edit", size, STUDENT_DATA_SEED + 1)}


def expert_stages(s: dict) -> dict:
    """The T2I anchor and the edit teacher fine-tuned from it on edit pairs only."""
    return {
        "anchor": flow_matching_stage(
            s["anchor_steps"], s["batch"], {"t2i": bucket("scenes_t2i", s["bucket"], 0)}, preset=s["preset"]
        ),
        "edit_teacher": flow_matching_stage(
            s["teacher_steps"], s["batch"], {"edit": bucket("scenes_edit", s["bucket"], 1)}, init="@anchor", lr=1e-3,
            preset=s["preset"],
        ),
    }  # fmt: skip


def evaluation(models: list[str], s: dict, capabilities: str = "t2i,local_edit,global_edit", seed: int = 0) -> ConfigDict:
    return ConfigDict(
        dict(models=",".join(models), capabilities=capabilities, num_examples=s["examples"], steps=16, cfg_scale=1.0, seed=seed)
    )


def sizes(size: str) -> dict:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid: {', '.join(SIZES)}")
    return SIZES[size]
