"""The built-in demo: train a T2I anchor and an edit teacher, distil both into one student.

    python -m danceopd_jax.main --config configs/shapes_demo.py --workdir workdirs/demo
    python -m danceopd_jax.main --config configs/shapes_demo.py:quick --workdir /tmp/demo   # toy size, ~2 min

Stages (each resumes, so a finished stage is reused):
  anchor        flow matching on prompt -> plain render (prompt dropout 10%: a CFG branch)
  edit_teacher  the anchor fine-tuned on edit pairs only (local and global edits)
  student       DanceOPD from the anchor: per-step routing between the anchor's field on
                T2I prompts and the edit teacher's field on edit pairs; low_t queries
Then every model is sampled on held-out T2I, local-edit and global-edit examples; grids go to
WORKDIR/grids/*.png and the scores to WORKDIR/metrics.md.

Expected (the paper, docs/METHOD.md): the edit teacher edits but loses T2I accuracy against the
anchor; the student keeps the anchor's T2I accuracy and gains the teacher's editing. Measured
(README, "What the demo shows"): the student does; the teacher's T2I loss is within noise on the
held-out two-object prompts.
"""

from ml_collections import ConfigDict

from danceopd_jax.shapes_configs import composition_routes, distillation_stage, evaluation, expert_stages, sizes


def get_config(size: str = "full") -> ConfigDict:
    s = sizes(size)
    config = ConfigDict()
    student = distillation_stage(
        s["student_steps"], s["student_batch"], s["rollout"], composition_routes(s["bucket"]), preset=s["preset"]
    )
    config.stages = ConfigDict({**expert_stages(s), "student": student})
    config.evaluation = evaluation(["anchor", "edit_teacher", "student"], s)
    return config
