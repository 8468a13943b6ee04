"""Command: sample a trained model to a PNG.

    python -m danceopd_jax.sample --workdir W --prompt "a small red circle at the top left on a gray background" \\
        [--task t2i|realism|edit|local_edit|global_edit] [--source in.png] [--cfg_scale 1.0] [--steps 16] \\
        [--num 4] --out out.png

The task flag (``danceopd_jax/tasks.py``) sets the conditioning the student was trained with for
that capability; edit tasks need ``--source``. Bad input (a missing workdir or image, an unknown
task, an edit task without a source, a source for t2i, an edit task on a model trained without
sources) is one line ``error: ...`` on stderr and exit code 2, the same message as the Python API's
(``sampling.sample_task``).
"""

import os
import sys

import numpy as np
from absl import app, flags
from PIL import Image

from danceopd_jax import checkpoints
from danceopd_jax.sampling import read_image, sample_task
from danceopd_jax.tasks import TASKS, check_task, get_task

_TASK_HELP = "; ".join(f"{name}: {task.description}" for name, task in TASKS.items())

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run (config.json + checkpoints).")
_PROMPT = flags.DEFINE_string("prompt", "", "Prompt, or edit instruction for an edit task.")
_TASK = flags.DEFINE_string("task", "t2i", f"One of {', '.join(TASKS)} ({_TASK_HELP}); edit tasks need --source.")
_SOURCE = flags.DEFINE_string("source", None, "Source image of an edit (any size; resized).")
_CFG = flags.DEFINE_float("cfg_scale", 1.0, "Classifier-free guidance scale at sampling (1 = none).")
_STEPS = flags.DEFINE_integer("steps", None, "Euler steps (default: the run's rollout_steps).")
_NUM = flags.DEFINE_integer("num", 1, "Number of samples, written side by side.")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
_OUT = flags.DEFINE_string("out", None, "Output PNG path.")


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value or not _OUT.value:
        _fail("--workdir and --out are required")
    if _NUM.value < 1 or (_STEPS.value is not None and _STEPS.value < 1):
        _fail("--num and --steps must be >= 1")
    prompts = [_PROMPT.value] * _NUM.value
    try:
        task = get_task(_TASK.value)  # the task is checked before any image or weights are read
        config = checkpoints.load_run_config(_WORKDIR.value)
        check_task(config, task, prompts, [_SOURCE.value] * _NUM.value if _SOURCE.value else None)
        sources = [read_image(_SOURCE.value, config.image_size)] * _NUM.value if _SOURCE.value else None
    except (ValueError, OSError) as error:
        _fail(str(error))
    try:
        images = sample_task(_WORKDIR.value, task, prompts, sources, steps=_STEPS.value, cfg_scale=_CFG.value, seed=_SEED.value)
    except FileNotFoundError as error:
        _fail(str(error))
    row = np.concatenate(list(images), axis=1)
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    Image.fromarray(row).save(_OUT.value)
    print(
        f"wrote {_OUT.value} ({_NUM.value} sample(s), task {task.name}, "
        f"{_STEPS.value or config.rollout_steps} steps, cfg {_CFG.value})"
    )


if __name__ == "__main__":
    app.run(main)
