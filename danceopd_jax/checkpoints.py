"""Orbax checkpoints of the student side of a run: train state + data-iterator state.

Layout: ``WORKDIR/checkpoints/<step>/{state,data}``. ``state`` is the ``TrainState`` (params,
optimizer state, EMA, step, rng); ``data`` is the JSON state of the per-bucket grain iterators.
Experts are never written: a config records where they come from.

Saves are asynchronous: ``save`` returns once the arrays are copied off the devices and orbax
writes them in a background thread into a temporary directory that is renamed when complete, so
a killed run leaves no half-written ``<step>``. Orbax waits for the previous save before the next
one; the caller waits (``wait_until_finished``) before it exits. A checkpoint that is complete but
unreadable (a truncated or deleted file) is skipped on resume for the newest readable one; in a
multi-process run the processes agree on that step, since each reads only its own shards.
"""

import json
import os
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from danceopd_jax.models.weights import WeightsMismatch

CONFIG_FILE = "config.json"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def save_run_config(config: ConfigDict, workdir: str) -> None:
    """Record the run's config beside its checkpoints (what sampling and experts rebuild from)."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w", encoding="utf-8") as f:
        f.write(config.to_json(indent=2))


def load_run_config(workdir: str) -> ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        runs = sorted(name for name in _subfolders(workdir) if os.path.isfile(os.path.join(workdir, name, CONFIG_FILE)))
        if runs:  # a pipeline's workdir: one run per stage
            raise FileNotFoundError(
                f"{path} not found: {workdir!r} holds the runs of a pipeline, pass one of them: "
                + ", ".join(os.path.join(workdir, name) for name in runs)
            )
        raise FileNotFoundError(f"{path} not found: is {workdir!r} the workdir of a training run?")
    with open(path, encoding="utf-8") as f:
        return ConfigDict(json.load(f))


def _subfolders(folder: str) -> list[str]:
    return [entry.name for entry in os.scandir(folder) if entry.is_dir()] if os.path.isdir(folder) else []


class CheckpointError(RuntimeError):
    """None of a run's checkpoints can be read; the message is one line naming each step and why."""


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """The run's manager: the last ``keep`` checkpoints, saved asynchronously."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=("state", "data"))


def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict) -> None:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)))


def latest_step(workdir: str) -> int | None:
    """The step of the newest checkpoint in ``workdir``, or None when it has none."""
    if not os.path.isdir(checkpoint_dir(workdir)):
        return None
    with ocp.CheckpointManager(checkpoint_dir(workdir), item_names=("state", "data")) as manager:
        return manager.latest_step()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings: orbax restores straight into that layout."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
    """``(state, data_state)`` of checkpoint ``step``, laid out as ``abstract_state`` says."""
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    )
    return restored.state, restored.data


def _one_line(error: BaseException, limit: int = 160) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def on_every_process(ok: bool) -> bool:
    """Whether ``ok`` holds on every process; a collective, so every process must call it."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def restore_latest(manager: ocp.CheckpointManager, abstract_state, warn: Callable[[str], None]):
    """``(step, state, data_state)`` of the newest readable checkpoint, or None when there is none.

    A newer checkpoint that fails to restore is reported through ``warn`` (one line naming its step)
    and deleted once an older one restored, so that the resumed run can save that step again. When
    no checkpoint restores, ``CheckpointError`` names every step tried; nothing is deleted then (the
    cause may be the config rather than the files). A step counts as restored only when it restored
    on every process (``on_every_process``): each reads its own shards, and processes resuming from
    different steps would train apart or hang.
    """
    failures = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state, data_state = restore(manager, step, abstract_state)
            reason = None
        except Exception as error:  # noqa: BLE001 - orbax/tensorstore raise Exception, ValueError, OSError, JSON errors
            reason = _one_line(error)
        if not on_every_process(reason is None):
            if reason is None:  # read here, not on another process: let its arrays go
                jax.tree.map(lambda a: a.delete(), state)
            failures.append((step, reason or "unreadable on another process"))
            continue
        for bad, reason in failures:
            warn(f"warning: checkpoint step {bad} is unreadable ({reason}); deleted it and resuming from step {step}")
            manager.delete(bad)
        return step, state, data_state
    if failures:
        tried = "; ".join(f"step {step}: {reason}" for step, reason in failures)
        raise CheckpointError(f"no readable checkpoint in {manager.directory} ({tried})")
    return None


def _path_name(path) -> str:
    """``blocks.0.fc1.kernel`` of a pytree key path (nnx's trailing ``.value`` dropped)."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return ".".join(names[:-1] if names and names[-1] == "value" else names)


def _shape_mismatches(saved, target) -> list[str]:
    """The arrays of ``target`` (abstract) that ``saved`` (checkpoint metadata) lacks or holds in another shape."""
    stored = {_path_name(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_flatten_with_path(saved)[0] if hasattr(leaf, "shape")}
    problems = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
        name = _path_name(path)
        if name not in stored:
            problems.append(f"{name} missing")
        elif stored[name] != tuple(leaf.shape):
            problems.append(f"{name} {list(stored[name])} there, {list(leaf.shape)} here")
    return problems


def restore_model_params(workdir: str, abstract_params, shardings, use_ema: bool = True):
    """The student weights of another run's latest checkpoint (its EMA when it kept one and ``use_ema``).

    Used to load trained experts and students. Fails with one line when there is no checkpoint
    (``FileNotFoundError``) or the checkpoint's arrays do not match ``abstract_params``: one it
    lacks or holds in another shape (``WeightsMismatch``, from the checkpoint's metadata, before
    anything is read).
    """
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints under {directory}")
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(directory, item_handlers=handlers) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoints under {directory}")
        saved = manager.item_metadata(step).state.tree
        which = "ema_params" if use_ema and saved.get("ema_params") else "params"
        mismatches = _shape_mismatches(saved.get(which), abstract_params)
        if mismatches:
            shown = "; ".join(mismatches[:3]) + (f"; and {len(mismatches) - 3} more" if len(mismatches) > 3 else "")
            raise WeightsMismatch(f"the checkpoint in {directory} (step {step}) holds a model of another architecture: {shown}")
        target = {which: abstract_like(abstract_params, shardings)}
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                )
            ),
        )
    return restored.state[which]
