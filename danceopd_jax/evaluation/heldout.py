"""Held-out evaluation examples of the shapes world: inputs that none of the evaluated models trained on.

The shapes world's scene space is small: 20000 draws of a T2I bucket repeat prompts, so examples
drawn merely with another seed share about half their inputs with the training buckets. Here an
evaluation example is held out when its *input* (the prompt for T2I and realism; the instruction
with the source scene for edits) occurs in no scene bucket that any evaluated model learned from,
directly or through the runs it builds on: the checkpoint its student started from, its experts'
checkpoints, and the runs a weight average averaged (``lineage``). Examples come from the
evaluation seed's own stream (``EVAL_SEED_OFFSET + seed``) with the seen inputs skipped, so the
draw is a pure function of the capability, the number, the seed and the models' training buckets.

Held-out inputs lean towards the scene space's rarer corners (more objects, rarer combinations),
since the common ones are the ones training draws cover.
"""

import functools
import os
from collections.abc import Iterable, Sequence

from ml_collections import ConfigDict

from danceopd_jax import checkpoints
from danceopd_jax.data.scene_buckets import BUCKET_KINDS, SceneExample, scene_examples

EVAL_SEED_OFFSET = 1_000_003  # the evaluation stream never shares a seed with a training bucket
MAX_DRAW_FACTOR = 256  # give up when this many candidates per wanted example are all seen

CAPABILITY_BUCKETS = {
    "t2i": "scenes_t2i",
    "local_edit": "scenes_local_edit",
    "global_edit": "scenes_global_edit",
    "realism": "scenes_t2i",  # prompts; scored for realism cues and for T2I faithfulness
}


def input_of(example: SceneExample) -> tuple:
    """What a model is given for an example: the prompt, and the source scene of an edit."""
    return example.prompt, example.source


def _runs_built_on(config: ConfigDict) -> list[tuple[str, str]]:
    """``(where, workdir)`` of every run ``config`` starts from, distils from or averages."""
    specs = {"student": config.get("student")} | {f"experts.{name}": spec for name, spec in config.get("experts", {}).items()}
    runs = [(f"config.{where}.checkpoint", spec.checkpoint) for where, spec in specs.items()
            if spec is not None and spec.get("init") == "checkpoint" and spec.get("checkpoint")]  # fmt: skip
    runs += [("config.weight_average", entry["workdir"]) for entry in config.get("weight_average", [])]
    return runs


def lineage(configs: Iterable[ConfigDict]) -> list[ConfigDict]:
    """The run configs ``configs`` and, recursively, those of every run they build on (each once).

    Raises ``FileNotFoundError`` naming the missing run when a referenced workdir has no config:
    what it trained on cannot be known, so no example could be called held out.
    """
    found, visited = [], set()
    pending = list(configs)
    while pending:
        config = pending.pop()
        found.append(config)
        for where, workdir in _runs_built_on(config):
            path = os.path.abspath(workdir)
            if path in visited:
                continue
            visited.add(path)
            if not os.path.isfile(os.path.join(path, checkpoints.CONFIG_FILE)):
                raise FileNotFoundError(f"{where} names {path}, which holds no run config: cannot tell which "
                                        "examples the evaluated models trained on")  # fmt: skip
            pending.append(checkpoints.load_run_config(path))
    return found


def trained_buckets(configs: Iterable[ConfigDict]) -> set[tuple[str, int, int]]:
    """``(kind, size, seed)`` of every shapes-world bucket in the ``lineage`` of ``configs``."""
    buckets = set()
    for config in lineage(configs):
        for spec in config.get("data", {}).get("buckets", {}).values():
            if spec.get("kind") in BUCKET_KINDS:
                buckets.add((spec.kind, int(spec.size), int(spec.seed)))
    return buckets


@functools.lru_cache(maxsize=64)
def _bucket_inputs(kind: str, size: int, seed: int) -> frozenset:
    return frozenset(map(input_of, scene_examples(kind, size, seed)))


def seen_inputs(configs: Iterable[ConfigDict]) -> frozenset:
    """The inputs of every shapes-world bucket the models of ``configs`` learned from (``lineage``)."""
    return frozenset().union(*(_bucket_inputs(*bucket) for bucket in sorted(trained_buckets(configs))))


def evaluation_examples(capability: str, num: int, seed: int, models: Sequence[ConfigDict]) -> list[SceneExample]:
    """``num`` examples of ``capability`` whose inputs none of ``models`` (run configs) trained on."""
    if capability not in CAPABILITY_BUCKETS:
        raise ValueError(f"unknown capability {capability!r}; valid: {', '.join(CAPABILITY_BUCKETS)}")
    seen = seen_inputs(models)
    draw = 2 * num
    while True:  # a longer draw of the same stream extends the shorter one (scene_examples)
        candidates = scene_examples(CAPABILITY_BUCKETS[capability], draw, EVAL_SEED_OFFSET + seed)
        held_out = [example for example in candidates if input_of(example) not in seen]
        if len(held_out) >= num:
            return held_out[:num]
        if draw >= MAX_DRAW_FACTOR * num:
            raise ValueError(f"{capability}: only {len(held_out)} of {draw} evaluation candidates are inputs the models "
                             f"never trained on; {num} wanted")  # fmt: skip
        draw *= 2
