"""Sampling from a trained model: a Python API and a command that writes a PNG.

    python -m danceopd_jax.sample --workdir W --prompt "a small red circle at the top left on a gray background" \\
        [--task t2i|edit] [--source in.png] [--cfg_scale 1.0] [--steps 16] [--num 4] --out out.png

The run's ``config.json`` (written by training) says how to rebuild the model and encode the
condition; weights are the latest checkpoint's (EMA when the run kept one).
"""

import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import ConfigDict
from PIL import Image

from danceopd_jax import build, checkpoints, parallel
from danceopd_jax.core.fields import cfg_field, model_field
from danceopd_jax.core.rollout import sample
from danceopd_jax.core.schedule import sigma_grid
from danceopd_jax.data.pipeline import RecordEncoder
from danceopd_jax.models.dit import LOGICAL_AXES

TASKS = {"t2i": False, "edit": True}  # task -> needs a source image


def load_trained_model(workdir: str) -> tuple[ConfigDict, nnx.GraphDef, nnx.State]:
    """``(config, graphdef, weights)`` of the student of a training run, on the local devices."""
    config = checkpoints.load_run_config(workdir)
    mesh = parallel.make_mesh({"data": -1})
    rules = parallel.axis_rules({}, LOGICAL_AXES)
    graphdef, abstract, shardings = parallel.abstract_model_state(
        build.model_factory(config, config.student), mesh, rules
    )
    return config, graphdef, checkpoints.restore_model_params(workdir, abstract, shardings)


def encode_conditions(config: ConfigDict, prompts: Sequence[str], sources: Sequence[np.ndarray] | None = None) -> dict:
    """Batch the condition pytree of prompts (and edit sources) as the run's data pipeline does."""
    image_shape = (config.image_size, config.image_size, config.channels)
    encode = RecordEncoder(build.condition_spec(config), image_shape)
    records = []
    for index, prompt in enumerate(prompts):
        record = {"prompt": prompt}
        if sources is not None and sources[index] is not None:
            record["source"] = sources[index]
        records.append(encode(record)["cond"])
    return jax.tree.map(lambda *leaves: np.stack(leaves), *records)


def generate(graphdef, params, cond: dict, key: jax.Array, *, image_shape, steps: int, shift: float = 1.0, cfg_scale: float = 1.0):
    """Euler samples ``[B, H, W, C]`` in [-1, 1] from noise under ``cond`` (CFG when ``cfg_scale != 1``)."""
    batch = jax.tree.leaves(cond)[0].shape[0]

    @jax.jit
    def run(params, cond, key):
        field = cfg_field(model_field(graphdef, params), cfg_scale)
        noise = jax.random.normal(key, (batch,) + tuple(image_shape), jnp.float32)
        return jnp.clip(sample(field, noise, sigma_grid(steps, shift), cond), -1.0, 1.0)

    return np.asarray(run(params, cond, key))


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.round((np.asarray(images) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


def read_image(path: str, image_size: int) -> np.ndarray:
    """An RGB image file resized to the model's resolution, float32 in [-1, 1]."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such image {path!r}")
    with Image.open(path) as image:
        resized = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(resized, np.float32) / 127.5 - 1.0


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
