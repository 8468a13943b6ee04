"""Sampling from a trained model (the API behind ``python -m danceopd_jax.sample``).

The run's ``config.json`` (written by training) says how to rebuild the model and encode the
condition; weights are the latest checkpoint's (EMA when the run kept one). ``sample_task`` is
the one-call API: a task flag (``tasks.TASKS``), prompts and edit sources -> uint8 images. An SD3
run (``config.model_dir``) is sampled by ``sd3_sampling`` (student = folder transformer + trained
LoRA, the folder's text encoders and VAE); ``sample_task`` takes its workdir the same way.
"""

import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
from flax import nnx
from ml_collections import ConfigDict
from PIL import Image

from danceopd_jax import build, parallel, sd3_sampling
from danceopd_jax.config_lib import run_sigma_schedule
from danceopd_jax.config_validation import read_run_config
from danceopd_jax.core.fields import cfg_field, inference_field, is_guided
from danceopd_jax.core.rollout import sample
from danceopd_jax.core.schedule import sigma_grid
from danceopd_jax.data.pipeline import RecordEncoder, stack_records
from danceopd_jax.models import backbones
from danceopd_jax.models.dit import LOGICAL_AXES
from danceopd_jax.tasks import TASKS, Task, check_task, get_task


def load_trained_model(workdir: str) -> tuple[ConfigDict, nnx.GraphDef, nnx.State]:
    """``(config, graphdef, weights)`` of the student of a (DiT) training run, on the local devices."""
    config = read_run_config(workdir)
    if config.get("model_dir"):
        raise ValueError(f"{workdir} is an SD3 run (config.model_dir): load it with sd3_sampling.load_student")
    spec = ConfigDict(dict(config.student.to_dict(), init="checkpoint", checkpoint=workdir))
    mesh = parallel.make_mesh({"data": -1})
    graphdef, params, _ = build.load_model(config, spec, mesh, parallel.axis_rules({}, LOGICAL_AXES))
    return config, graphdef, params


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
    return stack_records(records)


@functools.lru_cache(maxsize=32)
def _sampler(graphdef: nnx.GraphDef, image_shape: tuple, steps: int, shift: float, schedule: str, guided: bool):
    """The jitted sampler of one architecture and setting, compiled once and shared by every model
    of that architecture (evaluation samples many models of one DiT); with ``guided``, by every CFG
    scale too (the scale is an argument)."""

    @jax.jit
    def run(params, cond, key, cfg_scale):
        batch = jax.tree.leaves(cond)[0].shape[0]
        field = cfg_field(inference_field(graphdef, params), cfg_scale if guided else 1.0)
        noise = jax.random.normal(key, (batch,) + image_shape, jnp.float32)
        return jnp.clip(sample(field, noise, sigma_grid(steps, shift, schedule), cond), -1.0, 1.0)

    return run


def generate(graphdef, params, cond: dict, key: jax.Array, *, image_shape, steps: int, shift: float = 1.0,
             schedule: str = "uniform", cfg_scale: float = 1.0):  # fmt: skip
    """Euler samples ``[B, H, W, C]`` in [-1, 1] from noise under ``cond`` over ``sigma_grid(steps, shift,
    schedule)`` (CFG when ``cfg_scale != 1``)."""
    run = _sampler(graphdef, tuple(image_shape), int(steps), float(shift), schedule, is_guided(cfg_scale))
    images = run(params, cond, key, np.float32(cfg_scale))
    if not images.is_fully_addressable:  # parameters sharded over several processes: each gets every sample
        images = multihost_utils.process_allgather(images, tiled=True)
    return np.asarray(images)


def check_run_task(config: ConfigDict, task: str | Task, prompts: Sequence[str], sources: Sequence | None = None) -> Task:
    """``tasks.check_task`` for the run of ``config``; a run on a model folder whose family reads no
    source image (``models.backbones``' ``READS_SOURCE``, e.g. SD3) runs prompt tasks only. Raises a
    one-line ``ValueError``."""
    task = get_task(task)
    if task.needs_source and config.get("model_dir") and not (backbone := backbones.of(config)).READS_SOURCE:
        prompt_tasks = ", ".join(name for name, t in TASKS.items() if not t.needs_source)
        raise ValueError(
            f"task {task.name!r} edits a source image, but an {backbone.NAME} run's student (config.model_dir) reads no source "
            f"image; it can only run: {prompt_tasks}"
        )
    return check_task(config, task, prompts, sources)


def task_conditions(config: ConfigDict, task: str | Task, prompts: Sequence[str], sources: Sequence[np.ndarray] | None = None) -> dict:
    """The batched condition pytree of ``task`` (``tasks.py``) on ``prompts`` and, for edit tasks, ``sources``.

    Checked by ``tasks.check_task``; encoded as training did (``encode_conditions``): edit tasks
    set ``source`` and ``source_mask``, t2i and realism leave them zero/False (or absent).
    """
    task = check_task(config, task, prompts, sources)
    return encode_conditions(config, list(prompts), list(sources) if sources is not None and task.needs_source else None)


def sample_task(
    model: str | os.PathLike | tuple | sd3_sampling.SD3Student,
    task: str | Task,
    prompts: Sequence[str],
    sources: Sequence[np.ndarray] | None = None,
    *,
    steps: int | None = None,
    cfg_scale: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """uint8 samples ``[B, H, W, C]`` of ``task`` (see ``tasks.py``) on ``prompts`` and, for edit
    tasks, one source image per prompt (float32 in [-1, 1] at the model's resolution, e.g. from
    ``read_image``).

    ``model`` is a training run's workdir (the task is checked before the weights are loaded),
    the ``(config, graphdef, params)`` of ``load_trained_model``, or an SD3 run's
    ``sd3_sampling.load_student`` (only prompt tasks: an SD3 student reads no source image).
    ``steps`` defaults to the run's rollout steps. A task that cannot run on these inputs is a
    one-line ``ValueError``.
    """
    check_sampling(steps, cfg_scale)
    if isinstance(model, (str, os.PathLike)):
        workdir = os.fspath(model)
        config = read_run_config(workdir)
        check_run_task(config, task, prompts, sources)
        model = sd3_sampling.load_student(workdir) if config.get("model_dir") else load_trained_model(workdir)
    if isinstance(model, sd3_sampling.SD3Student):
        edits = list(sources) if check_run_task(model.config, task, prompts, sources).needs_source else None
        return to_uint8(sd3_sampling.generate(model, prompts, steps=steps, cfg_scale=cfg_scale, seed=seed, sources=edits))
    config, graphdef, params = model
    cond = task_conditions(config, task, prompts, sources)
    images = generate(
        graphdef,
        params,
        cond,
        jax.random.key(seed),
        image_shape=(config.image_size, config.image_size, config.channels),
        steps=steps or config.rollout_steps,
        shift=config.shift,
        schedule=run_sigma_schedule(config),
        cfg_scale=cfg_scale,
    )
    return to_uint8(images)


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.round((np.asarray(images) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


def check_sampling(steps: int | None, cfg_scale: float) -> None:
    """``ValueError`` for Euler steps < 1 or a CFG scale that is not a finite number >= 0 (NaN sampled
    NaN images, written as black ones)."""
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 <= cfg_scale < float("inf"):
        raise ValueError(f"cfg_scale must be a finite number >= 0 (1: no guidance), got {cfg_scale}")


def read_image(path: str, image_size: int) -> np.ndarray:
    """A square RGB image file resized to the model's resolution, float32 in [-1, 1]; another shape is
    a ``ValueError`` (resizing it would distort the scene the edit must keep)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such image {path!r}")
    with Image.open(path) as image:
        if image.width != image.height:
            raise ValueError(f"{path!r} is {image.width} x {image.height} px: a source image must be square "
                             f"(it is resized to the model's {image_size} x {image_size})")  # fmt: skip
        resized = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(resized, np.float32) / 127.5 - 1.0
