"""The inference tasks of a distilled student: the paper's explicit task flags at inference.

One student serves every capability it was distilled from. At inference the task flag says
which capability is asked for, and so which conditioning to build: the conditioning the student
saw for that capability during training. Text-to-image and realism condition on the prompt only
(no source: ``source_mask`` False, or no source key at all on a model built without sources);
the edit tasks condition on the instruction plus the clean source image (``source_mask`` True).

The flag fixes the *kind* of condition, not a separate embedding: the student was trained on
``scenes_t2i`` and ``scenes_realism`` with the same prompt-only condition, and on
``scenes_local_edit`` / ``scenes_global_edit`` (and ``scenes_edit``) with the same
instruction + source condition (``data/scene_buckets.py``). Within a family the prompt or
instruction selects the capability ("make the circle blue" vs "make it night"), so ``t2i`` and
``realism``, and ``edit``, ``local_edit`` and ``global_edit``, encode identically. What the flag
adds is the check: an edit task without a source for every prompt, a prompt-only task given a
source, or an edit task on a model trained without source images is one clear ``ValueError``,
the same for the Python API (``sampling.sample_task``) and the command (``python -m
danceopd_jax.sample --task ...``).
"""

import dataclasses
from typing import Sequence

from ml_collections import ConfigDict


@dataclasses.dataclass(frozen=True)
class Task:
    """One inference task: its flag, whether it edits a source image, and what it does."""

    name: str
    needs_source: bool
    description: str


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("t2i", False, "prompt -> image"),
        Task("realism", False, "prompt -> realistic image (same conditioning as t2i)"),
        Task("edit", True, "instruction + source image -> edited image"),
        Task("local_edit", True, "instruction + source image -> one object changed"),
        Task("global_edit", True, "instruction + source image -> whole image transformed"),
    )
}

EDIT_TASKS = tuple(name for name, task in TASKS.items() if task.needs_source)


def get_task(task: str | Task) -> Task:
    """The registered task of a flag (a ``Task`` passes through); unknown flags are a one-line error."""
    if isinstance(task, Task):
        task = task.name
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    return TASKS[task]


def check_task(config: ConfigDict, task: str | Task, prompts: Sequence[str], sources: Sequence | None = None) -> Task:
    """Check that ``task`` can run on the model of run config ``config`` with these inputs.

    Raises a one-line ``ValueError`` saying what is wrong; returns the ``Task``.
    """
    task = get_task(task)
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError(f"task {task.name!r} needs a non-empty list of prompts, got {prompts!r}")
    given = [] if sources is None else [source for source in sources if source is not None]
    if task.needs_source:
        if not config.condition.use_source:
            raise ValueError(
                f"task {task.name!r} edits a source image, but this model was trained without source "
                "images (condition.use_source=False); it can only run: "
                + ", ".join(name for name, t in TASKS.items() if not t.needs_source)
            )
        if sources is None or len(sources) != len(prompts) or len(given) != len(prompts):
            raise ValueError(
                f"task {task.name!r} needs a source image (the image to edit) for every prompt: "
                f"got {len(given)} source(s) for {len(prompts)} prompt(s)"
            )
    elif given:
        raise ValueError(
            f"task {task.name!r} takes no source image (the edit tasks are {', '.join(EDIT_TASKS)})"
        )
    return task
