"""What the reproduction trains: shared experts, then per setting and seed the student rows.

Experts are trained once (seed 0) into ``WORKDIR/experts`` and shared by every setting and seed;
student rows of seed S go to ``WORKDIR/SETTING/seed{S}``. Every student row has the same
architecture (``mini`` DiT), the same init (the anchor), the same number of steps and batch.

Settings (docs/METHOD.md "Reported results"):
  composition   T2I + edit: anchor field on T2I prompts, edit teacher's on edit pairs
  local_global  local + global editing: local-heavy teacher on local edits, global-heavy on global;
                with the routing rows (learned router, adaptive route weights) beside fixed buckets
  realism       realism absorption: the realism teacher's field on T2I prompts
  cfg           CFG absorption: the anchor's CFG field at train scale alpha on T2I prompts
Ablation rows (query time, rollout steps, routing granularity) are trained for the first seed only.
"""

import dataclasses
import os
from typing import Callable

from ml_collections import ConfigDict

from danceopd_jax.shapes_configs import (
    SIZES,
    STUDENT_DATA_SEED,
    bucket,
    composition_routes,
    distillation_stage,
    flow_matching_stage,
    route,
)

EXPERTS_DIR = "experts"
CFG_TRAIN_SCALES = (2.0, 3.0)
CFG_EVAL_SCALES = (1.0, 2.0, 3.0)
ROLLOUT_ABLATION = (4, 16, 28)  # the main rows use the size's rollout (8)
# The demo's sizes, with students cut to 150 steps of 24 samples in the full run: its ~20 student
# trainings (dense DiffusionOPD and Flow-OPD cost ~3x a DanceOPD step) then fit the 60-minute
# budget on a 2-core CPU with 3 seeds.
REPRODUCE_SIZES = {  # scorer_items: ground-truth items of the scorer accuracy the report prints
    "full": {**SIZES["full"], "student_steps": 150, "student_batch": 24, "scorer_items": 300},
    "quick": {**SIZES["quick"], "scorer_items": 30},
}


def expert_stages(s: dict) -> dict:
    """The T2I anchor and, fine-tuned from it, the edit, local-heavy, global-heavy and realism teachers.

    The local-heavy teacher sees local edits 4 times as often as global ones, the global-heavy
    teacher the reverse (the two conflicting editors of the local + global setting).
    """
    n, batch, steps = s["bucket"], s["batch"], s["teacher_steps"]

    def teacher(buckets: dict) -> ConfigDict:
        return flow_matching_stage(steps, batch, buckets, init="@anchor", lr=1e-3, preset=s["preset"])

    return {
        "anchor": flow_matching_stage(s["anchor_steps"], batch, {"t2i": bucket("scenes_t2i", n, 0)}, preset=s["preset"]),
        "edit_teacher": teacher({"edit": bucket("scenes_edit", n, 1)}),
        "local_teacher": teacher(
            {"local": bucket("scenes_local_edit", n, 2, weight=0.8), "global": bucket("scenes_global_edit", n, 3, weight=0.2)}
        ),
        "global_teacher": teacher(
            {"local": bucket("scenes_local_edit", n, 2, weight=0.2), "global": bucket("scenes_global_edit", n, 3, weight=0.8)}
        ),
        "realism_teacher": teacher({"realism": bucket("scenes_realism", n, 4)}),
    }


@dataclasses.dataclass(frozen=True)
class Setting:
    """One experiment: the expert rows it reports, its weight averages, and its trained rows."""

    name: str
    title: str
    capabilities: str  # evaluated capabilities (``heldout.CAPABILITY_BUCKETS``)
    experts: tuple[str, ...]  # expert rows of its table
    averages: dict  # weight-averaging rows: name -> {expert: weight}
    rows: Callable[[dict, str, int, bool], dict]  # (sizes, experts dir, seed, with ablations) -> {row: stage}


def _student(s: dict, experts: str, seed: int, routes: dict, **kwargs) -> ConfigDict:
    return distillation_stage(
        s["student_steps"], s["student_batch"], kwargs.pop("rollout", s["rollout"]), routes,
        student=os.path.join(experts, "anchor"), seed=seed, preset=s["preset"], **kwargs,
    )  # fmt: skip


def _multitask(s: dict, experts: str, seed: int, buckets: dict) -> ConfigDict:
    """Flow matching on the ground-truth data of all of a setting's buckets, from the anchor."""
    return flow_matching_stage(
        s["student_steps"], s["student_batch"], buckets, init=os.path.join(experts, "anchor"), lr=3e-4, seed=seed,
        preset=s["preset"],
    )  # fmt: skip


def composition_rows(s: dict, experts: str, seed: int, ablations: bool) -> dict:
    routes = composition_routes(s["bucket"], os.path.join(experts, "anchor"), os.path.join(experts, "edit_teacher"))
    data = {
        "t2i": bucket("scenes_t2i", s["bucket"], STUDENT_DATA_SEED),
        "edit": bucket("scenes_edit", s["bucket"], STUDENT_DATA_SEED + 1),
    }
    rows = {
        "multitask": _multitask(s, experts, seed, data),
        "offpolicy": _student(s, experts, seed, routes, method="offpolicy"),
        "diffusionopd": _student(s, experts, seed, routes, method="diffusionopd", routing="per_sample"),
        "flowopd": _student(s, experts, seed, routes, method="flowopd"),
        "soft_mixing": _student(s, experts, seed, routes, routing="soft"),
        "danceopd": _student(s, experts, seed, routes),
    }
    if ablations:
        rows["danceopd_mid_t"] = _student(s, experts, seed, routes, sampler="mid_t")
        rows["danceopd_high_t"] = _student(s, experts, seed, routes, sampler="high_t")
        rows["danceopd_per_sample"] = _student(s, experts, seed, routes, routing="per_sample")
        for steps in ROLLOUT_ABLATION:
            rows[f"danceopd_n{steps}"] = _student(s, experts, seed, routes, rollout=steps)
    return rows


def local_global_rows(s: dict, experts: str, seed: int, ablations: bool) -> dict:
    n = s["bucket"]
    routes = {
        "local": route(os.path.join(experts, "local_teacher"), "scenes_local_edit", n, STUDENT_DATA_SEED + 2),
        "global": route(os.path.join(experts, "global_teacher"), "scenes_global_edit", n, STUDENT_DATA_SEED + 3),
    }
    data = {
        "local": bucket("scenes_local_edit", n, STUDENT_DATA_SEED + 2),
        "global": bucket("scenes_global_edit", n, STUDENT_DATA_SEED + 3),
    }
    return {
        "multitask": _multitask(s, experts, seed, data),
        "offpolicy": _student(s, experts, seed, routes, method="offpolicy"),
        "flowopd": _student(s, experts, seed, routes, method="flowopd"),
        "danceopd": _student(s, experts, seed, routes),
        **routing_rows(s, experts, seed, routes),
    }


def routing_rows(s: dict, experts: str, seed: int, routes: dict) -> dict:
    """Routing beyond fixed buckets (issue 7), beside ``danceopd`` (fixed buckets, the paper).

    ``router_{1,5,100}pct``: the two buckets pooled without labels, a learned router trained on
    that share of the pool's labels picks each sample's teacher (argmax); ``router_soft_1pct``
    uses its probabilities as soft weights instead. ``adaptive``: fixed buckets whose route
    weights follow each route's running distillation loss (floor 0.2), logged per step.
    """
    heldout = min(512, s["bucket"] // 2)

    def learned(fraction: float, assign: str = "argmax") -> ConfigDict:
        router = dict(label_fraction=fraction, assign=assign, heldout=heldout)
        return _student(s, experts, seed, routes, routing="learned", router=router)

    adaptive = _student(s, experts, seed, routes, route_weights=dict(schedule="adaptive"))
    adaptive.loss_log = True  # the weights of every step, for the report's plot
    return {
        "router_1pct": learned(0.01),
        "router_5pct": learned(0.05),
        "router_100pct": learned(1.0),
        "router_soft_1pct": learned(0.01, "soft"),
        "adaptive": adaptive,
    }


def realism_rows(s: dict, experts: str, seed: int, ablations: bool) -> dict:
    routes = {"realism": route(os.path.join(experts, "realism_teacher"), "scenes_t2i", s["bucket"])}
    return {"danceopd": _student(s, experts, seed, routes)}


def cfg_rows(s: dict, experts: str, seed: int, ablations: bool) -> dict:
    anchor = os.path.join(experts, "anchor")
    return {
        cfg_row(alpha): _student(s, experts, seed, {"t2i": route(anchor, "scenes_t2i", s["bucket"], cfg_scale=alpha)})
        for alpha in CFG_TRAIN_SCALES
    }


def cfg_row(alpha: float) -> str:
    return f"danceopd_cfg{alpha:g}"


SETTINGS = {
    setting.name: setting
    for setting in (
        Setting(
            "composition",
            "T2I + edit composition",
            "t2i,local_edit,global_edit",
            ("anchor", "edit_teacher"),
            {"weight_average": {"anchor": 0.5, "edit_teacher": 0.5}},
            composition_rows,
        ),
        Setting(
            "local_global",
            "Local + global edit composition",
            "local_edit,global_edit",
            ("local_teacher", "global_teacher"),
            {"weight_average": {"local_teacher": 0.5, "global_teacher": 0.5}},
            local_global_rows,
        ),
        Setting("realism", "Realism absorption", "realism", ("anchor", "realism_teacher"), {}, realism_rows),
        Setting("cfg", "CFG absorption", "t2i", ("anchor",), {}, cfg_rows),
    )
}
