"""Command: sample a trained model to a PNG.

    python -m danceopd_jax.sample --workdir W --prompt "a small red circle at the top left on a gray background" \\
        [--task t2i|edit] [--source in.png] [--cfg_scale 1.0] [--steps 16] [--num 4] --out out.png

Bad input (a missing workdir or image, an edit task without a source) is one line and exit code 2.
"""

import os
import sys

import jax
import numpy as np
from absl import app, flags
from PIL import Image

from danceopd_jax import checkpoints
from danceopd_jax.sampling import encode_conditions, generate, load_trained_model, read_image, to_uint8

TASKS = {"t2i": False, "edit": True}  # task -> needs a source image

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a training run (config.json + checkpoints).")
_PROMPT = flags.DEFINE_string("prompt", "", "Prompt, or edit instruction for an edit task.")
_TASK = flags.DEFINE_string("task", "t2i", f"One of {', '.join(TASKS)}; edit tasks need --source.")
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
    if _TASK.value not in TASKS:
        _fail(f"--task: unknown task {_TASK.value!r}; valid: {', '.join(TASKS)}")
    if TASKS[_TASK.value] and not _SOURCE.value:
        _fail(f"--task={_TASK.value} needs --source (the image to edit)")
    if not TASKS[_TASK.value] and _SOURCE.value:
        _fail("--source given but --task=t2i takes no source image (use --task=edit)")
    if _NUM.value < 1 or (_STEPS.value is not None and _STEPS.value < 1):
        _fail("--num and --steps must be >= 1")
    try:
        config = checkpoints.load_run_config(_WORKDIR.value)
        source = read_image(_SOURCE.value, config.image_size) if _SOURCE.value else None
    except (FileNotFoundError, OSError) as error:
        _fail(str(error))
    if source is not None and not config.condition.use_source:
        _fail(f"the model in {_WORKDIR.value!r} was not trained with source images; it cannot edit")
    try:
        config, graphdef, params = load_trained_model(_WORKDIR.value)
    except FileNotFoundError as error:
        _fail(str(error))
    cond = encode_conditions(config, [_PROMPT.value] * _NUM.value, [source] * _NUM.value)
    images = generate(
        graphdef,
        params,
        cond,
        jax.random.key(_SEED.value),
        image_shape=(config.image_size, config.image_size, config.channels),
        steps=_STEPS.value or config.rollout_steps,
        shift=config.shift,
        cfg_scale=_CFG.value,
    )
    row = np.concatenate(list(to_uint8(images)), axis=1)
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    Image.fromarray(row).save(_OUT.value)
    print(f"wrote {_OUT.value} ({_NUM.value} sample(s), {_STEPS.value or config.rollout_steps} steps, cfg {_CFG.value})")


if __name__ == "__main__":
    app.run(main)
