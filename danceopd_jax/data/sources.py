"""The registry of bucket kinds (toy synthetic buckets of ``synthetic.py``, the shapes world, the
field world's exact points, prompt files and the user's image files), and the unlabelled pool a
learned router routes (``MixedSource``)."""

from typing import Sequence

import numpy as np
from ml_collections import ConfigDict

from danceopd_jax.core.routing import normalized_weights
from danceopd_jax.data import file_buckets, prompt_files, scene_buckets, synthetic
from danceopd_jax.fieldworld import data as field_buckets

BUCKET_KINDS: dict[str, frozenset[str]] = {
    **synthetic.BUCKET_KINDS, **scene_buckets.BUCKET_KINDS, **field_buckets.BUCKET_KINDS, **prompt_files.BUCKET_KINDS,
    **file_buckets.BUCKET_KINDS,
}  # fmt: skip


def make_bucket_source(bucket: ConfigDict, image_size: int, channels: int, num_classes: int = 0, pixel_size: int = 0):
    """The random-access source of the bucket ``data.buckets.NAME`` (record fields per kind in ``BUCKET_KINDS``);
    image files are read at ``pixel_size`` (default ``image_size``; a model folder run's VAE resolution)."""
    kind, size, seed = bucket.kind, bucket.size, bucket.seed
    if kind in file_buckets.BUCKET_KINDS:
        return file_buckets.make_source(bucket, pixel_size or image_size)
    if kind in prompt_files.BUCKET_KINDS:
        return prompt_files.PromptFileSource(bucket.path, size)
    if kind in field_buckets.BUCKET_KINDS:
        return field_buckets.make_source(kind, size, seed, image_size, channels)
    if kind in scene_buckets.BUCKET_KINDS:
        return scene_buckets.SceneSource(kind, size, seed, image_size, channels)
    if kind in synthetic.BUCKET_KINDS:
        return synthetic.make_bucket_source(kind, size, seed, image_size, channels, num_classes)
    raise ValueError(f"unknown bucket kind {kind!r}; valid: {', '.join(BUCKET_KINDS)}")


class MixedSource:
    """An unlabelled pool: the records of several sources interleaved, each position drawn from
    source ``m`` with probability ``weights[m]`` (a pure function of ``seed``).

    Position ``i`` holds record ``indices[i]`` of source ``labels[i]``; a source is cycled when the
    pool asks for more of its records than it has. ``labels`` is the ground truth a learned router
    may see a share of (``build.train_router``); the records themselves carry no label.
    """

    def __init__(self, sources: Sequence, weights: Sequence[float], seed: int):
        probabilities = normalized_weights(weights)
        if len(sources) != len(probabilities):
            raise ValueError(f"need one weight per source, got {len(sources)} sources and {len(probabilities)} weights")
        self.sources = list(sources)
        size = sum(len(source) for source in self.sources)
        self.labels = np.random.default_rng([seed, len(self.sources)]).choice(len(self.sources), size=size, p=probabilities)
        self.indices = np.zeros(size, np.int64)
        for m, source in enumerate(self.sources):
            at = self.labels == m
            self.indices[at] = np.arange(int(at.sum())) % len(source)

    def __len__(self) -> int:
        return len(self.labels)

    def record(self, position: int) -> tuple[int, int]:
        """``(source, record)`` at ``position``: the identity of a record the pool may repeat."""
        return int(self.labels[position]), int(self.indices[position])

    def __getitem__(self, index: int) -> dict:
        return self.sources[self.labels[index]][int(self.indices[index])]
