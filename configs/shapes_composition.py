"""T2I + edit composition in the shapes world: DanceOPD against the baselines, one seed.

    python -m danceopd_jax.main --config configs/shapes_composition.py --workdir workdirs/composition
    python -m danceopd_jax.main --config configs/shapes_composition.py:quick --workdir /tmp/comp   # toy size

Rows (same student architecture, init from the anchor, and the same number of steps):
  anchor, edit_teacher       the two experts (as in configs/shapes_demo.py)
  multitask                  flow matching on the ground-truth data of both buckets
  offpolicy                  distillation on forward-noised dataset states
  diffusionopd               all rollout states, dt^2/2 weights, both buckets every update
  soft_mixing                every sample's target is the average of the two fields
  danceopd_{low,mid,high}_t  hard per-step routing, one query state from Beta(5,2) / (5,5) / (2,5)
Expected (docs/METHOD.md, in direction): DanceOPD low_t keeps the anchor's T2I and gains the
teacher's editing better than the baselines, and better than mid_t / high_t.
"""

from ml_collections import ConfigDict

from danceopd_jax.shapes_configs import (
    STUDENT_DATA_SEED,
    bucket,
    composition_routes,
    distillation_stage,
    evaluation,
    expert_stages,
    flow_matching_stage,
    sizes,
)


def get_config(size: str = "full") -> ConfigDict:
    s = sizes(size)
    steps, batch, rollout, size, preset = s["student_steps"], s["student_batch"], s["rollout"], s["bucket"], s["preset"]
    routes = composition_routes(size)
    multitask_data = {
        "t2i": bucket("scenes_t2i", size, STUDENT_DATA_SEED),
        "edit": bucket("scenes_edit", size, STUDENT_DATA_SEED + 1),
    }
    rows = {
        "multitask": flow_matching_stage(steps, batch, multitask_data, init="@anchor", lr=3e-4, preset=preset),
        "offpolicy": distillation_stage(steps, batch, rollout, routes, method="offpolicy", preset=preset),
        "diffusionopd": distillation_stage(steps, batch, rollout, routes, method="diffusionopd", routing="per_sample", preset=preset),
        "soft_mixing": distillation_stage(steps, batch, rollout, routes, routing="soft", preset=preset),
    }
    for sampler in ("low_t", "mid_t", "high_t"):
        rows[f"danceopd_{sampler}"] = distillation_stage(steps, batch, rollout, routes, sampler=sampler, preset=preset)
    config = ConfigDict()
    config.stages = ConfigDict({**expert_stages(s), **rows})
    models = ["anchor", "edit_teacher", "multitask", "offpolicy", "diffusionopd", "soft_mixing"]
    config.evaluation = evaluation(models + [f"danceopd_{x}" for x in ("low_t", "mid_t", "high_t")], s)
    return config
