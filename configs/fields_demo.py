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

Measured (full size, 2-core CPU shared with other jobs, so noisy): 4 min 3 s wall for the whole
command (anchor 1500 steps ~40 steps/s, teacher 600 ~23, student 300 ~17, compiles 13-22 s each).
Scores (2000 samples, mean +- standard error; NLL in nats, hits are shares):
                 t2i/nll       t2i/mode_tv    local_edit/hits  local mode_hits  global_edit/hits
  anchor         5.03 +- 0.15  0.112 +- 0.017 0.003 +- 0.001   0.023 +- 0.003   0.002 +- 0.001
  edit_teacher  23.75 +- 0.52  0.652 +- 0.174 0.095 +- 0.007   0.371 +- 0.011   0.483 +- 0.011
  student        4.98 +- 0.15  0.115 +- 0.014 0.037 +- 0.004   0.202 +- 0.009   0.174 +- 0.008
The teacher forgets T2I (its samples collapse into a few blobs), the student keeps the anchor's
T2I exactly and gains part of the teacher's editing after 300 steps (not all of it: the edit
route's loss was still falling). The ``quick`` size trains only to check that every piece runs.
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
