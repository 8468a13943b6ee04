"""The field-world demo: train a T2I anchor and an edit teacher, distil both into one student,
scored exactly (issue 27).

    python -m danceopd_jax.main --config configs/fields_demo.py --workdir workdirs/fields_demo
    python -m danceopd_jax.main --config configs/fields_demo.py:quick --workdir /tmp/fields   # CI size

Points of the field world (``danceopd_jax/fieldworld``: Gaussian-mixture targets in the plane,
D = 2), every model a FieldMLP (width 128, depth 3). Stages (each resumes):
  anchor        flow matching on class -> exact sample (condition dropout 10%: a CFG branch)
  edit_teacher  the anchor fine-tuned on edits only (local and global, half each)
  student       DanceOPD from the anchor: per-step routing between the anchor's field on T2I
                labels and the edit teacher's on edits; low_t queries
Then every model draws 2000 samples per capability (16 Euler steps); exact scores with standard
errors go to WORKDIR/metrics.md and the scatter grid (target, anchor, teacher, student) to
WORKDIR/grids/fields.png (``fieldworld/evaluate.py``).

Expected (the paper): the edit teacher edits but loses T2I against the anchor; the student keeps
the anchor's T2I and gains the teacher's editing.
Measured: see MEASURED below.
"""

from ml_collections import ConfigDict

from danceopd_jax.fieldworld.configs import composition_routes, distillation_stage, evaluation, expert_stages, sizes


def get_config(size: str = "full") -> ConfigDict:
    s = sizes(size)
    config = ConfigDict()
    student = distillation_stage(s["student_steps"], s["batch"], s["rollout"], composition_routes(s["bucket"]))
    config.stages = ConfigDict({**expert_stages(s), "student": student})
    config.evaluation = evaluation(["anchor", "edit_teacher", "student"], s)
    return config
