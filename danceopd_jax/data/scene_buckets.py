"""Grain sources of the shapes world (``scenes.py``), one bucket kind per capability.

Every example is drawn once from the bucket's seed (scene specs only); images are rendered on
read. The same examples, with their scene specs, serve evaluation (``scene_examples``).

  scenes_t2i          prompt -> plain render                          (T2I)
  scenes_realism      prompt -> realistic render of the same layout   (realism)
  scenes_local_edit   instruction + source -> one object edited       (local editing)
  scenes_global_edit  instruction + source -> whole image transformed (global editing)
  scenes_edit         local and global edits, half each               (a generic edit teacher)
"""

import dataclasses

import numpy as np

from danceopd_jax.data import scenes

BUCKET_KINDS: dict[str, frozenset[str]] = {
    "scenes_t2i": frozenset({"prompt", "image"}),
    "scenes_realism": frozenset({"prompt", "image"}),
    "scenes_local_edit": frozenset({"prompt", "source", "image"}),
    "scenes_global_edit": frozenset({"prompt", "source", "image"}),
    "scenes_edit": frozenset({"prompt", "source", "image"}),
}


@dataclasses.dataclass(frozen=True)
class SceneExample:
    """One example: the prompt (or edit instruction), the source scene of an edit, the target scene."""

    prompt: str
    target: scenes.Scene
    source: scenes.Scene | None = None
    edit: str = ""  # the edit kind (recolour, night, ...), empty for T2I


def _example(kind: str, rng: np.random.Generator) -> SceneExample:
    scene = scenes.sample_scene(rng)
    if kind in ("scenes_t2i", "scenes_realism"):
        return SceneExample(scene.prompt(), scene)
    if kind == "scenes_edit":
        kind = "scenes_local_edit" if rng.random() < 0.5 else "scenes_global_edit"
    edit_kinds = scenes.LOCAL_EDITS if kind == "scenes_local_edit" else scenes.GLOBAL_EDITS
    possible = [k for k in edit_kinds if kind == "scenes_global_edit" or scenes.local_edit_possible(scene, k)]
    edit = possible[rng.integers(len(possible))]
    apply = scenes.local_edit if kind == "scenes_local_edit" else scenes.global_edit
    instruction, target = apply(scene, rng, edit)
    return SceneExample(instruction, target, scene, edit)


def scene_examples(kind: str, size: int, seed: int) -> list[SceneExample]:
    """``size`` examples of a bucket kind, a pure function of ``(kind, size, seed)``."""
    if kind not in BUCKET_KINDS:
        raise ValueError(f"unknown scene bucket kind {kind!r}; valid: {', '.join(BUCKET_KINDS)}")
    rng = np.random.default_rng([seed, list(BUCKET_KINDS).index(kind)])
    return [_example(kind, rng) for _ in range(size)]


class SceneSource:
    """Random-access source of one bucket: records ``{"prompt", "image"[, "source"]}``."""

    def __init__(self, kind: str, size: int, seed: int, image_size: int, channels: int = 3):
        if channels != 3:
            raise ValueError(f"the shapes world renders RGB: channels must be 3, got {channels}")
        self.kind = kind
        self.image_size = image_size
        self.examples = scene_examples(kind, size, seed)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        realistic = self.kind == "scenes_realism"
        record = {"prompt": example.prompt, "image": scenes.render(example.target, self.image_size, realistic)}
        if example.source is not None:
            record["source"] = scenes.render(example.source, self.image_size)
        return record
