"""Random-access record sources of the field world, one bucket kind per capability.

A point of the world is the project's image with one pixel: ``[1, 1, D]`` (H = W = 1, C = D),
so records pass through ``data.pipeline.RecordEncoder`` / ``BucketBatches`` unchanged with
``image_shape = (1, 1, D)`` and ``condition_spec(world)`` (labels over the world's prompt ids,
edit sources). The prompt's text is ``world.prompts[label]``; records carry the label only.

  fields_t2i          class label -> exact sample of the class mixture        (T2I)
  fields_realism      class label -> exact sample of the sharper mixture      (realism)
  fields_local_edit   instruction + source -> sample of the local-edit target (local editing)
  fields_global_edit  instruction + source -> sample of the global-edit target (global editing)
  fields_edit         local and global edits, half each                       (a generic edit teacher)

Every record is drawn once, at construction, from ``(kind, size, seed)`` (``targets.sample_targets``
over the whole bucket); classes and instructions are uniform within the kind's set, and edit
sources are exact samples of the unconditional T2I mixture.
"""

import jax
import jax.numpy as jnp
import numpy as np

from danceopd_jax.data.pipeline import ConditionSpec
from danceopd_jax.fieldworld.targets import FieldWorld, make_world, sample_targets

BUCKET_KINDS: dict[str, frozenset[str]] = {
    "fields_t2i": frozenset({"label", "image"}),
    "fields_realism": frozenset({"label", "image"}),
    "fields_local_edit": frozenset({"label", "source", "image"}),
    "fields_global_edit": frozenset({"label", "source", "image"}),
    "fields_edit": frozenset({"label", "source", "image"}),
}


def point_shape(world: FieldWorld) -> tuple[int, int, int]:
    """The image shape of a point: ``(1, 1, D)``."""
    return (1, 1, world.dim)


def condition_spec(world: FieldWorld) -> ConditionSpec:
    """The condition keys of a field-world run: ``label`` over every prompt id, ``source``."""
    return ConditionSpec(num_classes=world.num_prompts, use_source=True)


def _labels(world: FieldWorld, kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    if kind in ("fields_t2i", "fields_realism"):
        return rng.integers(world.num_classes, size=size)
    local, global_ = world.local_edit_labels, world.global_edit_labels
    if kind == "fields_local_edit":
        return rng.choice(local, size=size)
    if kind == "fields_global_edit":
        return rng.choice(global_, size=size)
    return np.where(rng.random(size) < 0.5, rng.choice(local, size=size), rng.choice(global_, size=size))


class FieldSource:
    """Records ``{"label": int, "image": f32[1, 1, D]}``, plus ``"source"`` for the edit kinds.

    ``labels``, ``images`` and ``sources`` (None for T2I kinds) hold the whole bucket, [size] and
    [size, 1, 1, D], for evaluation.
    """

    def __init__(self, world: FieldWorld, kind: str, size: int, seed: int):
        if kind not in BUCKET_KINDS:
            raise ValueError(f"unknown field-world bucket kind {kind!r}; valid: {', '.join(BUCKET_KINDS)}")
        if size < 1:
            raise ValueError(f"a field-world bucket needs size >= 1, got {size}")
        index = list(BUCKET_KINDS).index(kind)
        rng = np.random.default_rng([seed, index])
        self.labels = _labels(world, kind, rng, size).astype(np.int32)
        source_key, target_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), index))
        cond = {"label": jnp.asarray(self.labels)}
        self.sources = None
        if "source" in BUCKET_KINDS[kind]:
            classes = jnp.asarray(rng.integers(world.num_classes, size=size), jnp.int32)
            self.sources = np.asarray(sample_targets(world, source_key, {"label": classes})).reshape((size,) + point_shape(world))
            cond |= {"source": jnp.asarray(self.sources), "source_mask": jnp.ones((size,), bool)}
        targets = sample_targets(world, target_key, cond, realism=kind == "fields_realism")
        self.images = np.asarray(targets).reshape((size,) + point_shape(world))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        record = {"label": int(self.labels[index]), "image": self.images[index]}
        if self.sources is not None:
            record["source"] = self.sources[index]
        return record


def make_source(kind: str, size: int, seed: int, image_size: int, channels: int) -> FieldSource:
    """The source of a run's ``fields_*`` bucket: points of ``make_world(channels)`` as 1 x 1 images."""
    if image_size != 1:
        raise ValueError(f"field-world bucket kind {kind!r} holds points, images of size 1; got image_size {image_size}")
    return FieldSource(make_world(channels), kind, size, seed)
