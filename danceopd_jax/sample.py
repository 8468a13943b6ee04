"""Command: sample a trained model to a PNG.

    python -m danceopd_jax.sample --workdir W --prompt "a small red circle at the top left on a gray background" \\
        [--task t2i|realism|edit|local_edit|global_edit] [--source in.png] [--cfg_scale 1.0] [--steps 16] \\
        [--num 4] [--seed 0] [--base] --out out.png

The task flag (``danceopd_jax/tasks.py``) sets the conditioning the student was trained with for
that capability; edit tasks need ``--source``. Bad input (a missing workdir or image, an unknown
task, an edit task without a source, a source for t2i, an edit task on a model trained without
sources) is one line ``error: ...`` on stderr and exit code 2, the same message as the Python API's
(``sampling.sample_task``).

An SD3 run (``config.model_dir``) is sampled the same way (``sd3_sampling``): its student is the
folder's transformer plus the trained LoRA, prompts go through the folder's text encoders, the
latents through its VAE (a 64 x 64 latent is a 512 x 512 image); it runs the prompt tasks only.
``--base`` samples the folder's untrained transformer instead, for comparison.
"""

import os

import numpy as np
from absl import app, flags
from PIL import Image

from danceopd_jax import checkpoints, sd3_sampling
from danceopd_jax.commands import fail, start
from danceopd_jax.models.sd3_folder import ModelFolderError
from danceopd_jax.models.weights import WeightsError, WeightsMismatch
from danceopd_jax.sampling import check_run_task, read_image, sample_task
from danceopd_jax.tasks import TASKS, get_task

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
_BASE = flags.DEFINE_bool("base", False, "SD3 runs: sample the folder's untrained transformer (no LoRA), for comparison.")


def main(argv) -> None:
    start(argv, workdir=_WORKDIR.value, out=_OUT.value)
    if _NUM.value < 1 or (_STEPS.value is not None and _STEPS.value < 1):
        fail("--num and --steps must be >= 1")
    prompts = [_PROMPT.value] * _NUM.value
    try:
        task = get_task(_TASK.value)  # the task is checked before any image or weights are read
        config = checkpoints.load_run_config(_WORKDIR.value)
        check_run_task(config, task, prompts, [_SOURCE.value] * _NUM.value if _SOURCE.value else None)
        if _BASE.value and not config.get("model_dir"):
            raise ValueError(f"--base samples the untrained transformer of an SD3 run; {_WORKDIR.value} is a DiT run")
        sources = [read_image(_SOURCE.value, config.image_size)] * _NUM.value if _SOURCE.value else None
    except (ValueError, OSError) as error:
        fail(error)
    try:
        model = sd3_sampling.load_student(_WORKDIR.value, trained=False) if _BASE.value else _WORKDIR.value
        images = sample_task(model, task, prompts, sources, steps=_STEPS.value, cfg_scale=_CFG.value, seed=_SEED.value)
    except (OSError, ModelFolderError, WeightsError, WeightsMismatch) as error:  # no checkpoint, a moved or broken model folder
        fail(error)
    row = np.concatenate(list(images), axis=1)
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    Image.fromarray(row).save(_OUT.value)
    print(
        f"wrote {_OUT.value} ({_NUM.value} sample(s), task {task.name}, "
        f"{_STEPS.value or config.rollout_steps} steps, cfg {_CFG.value}{', untrained base' if _BASE.value else ''})"
    )


if __name__ == "__main__":
    app.run(main)
