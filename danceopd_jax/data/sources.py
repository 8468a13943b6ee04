"""The registry of bucket kinds: toy synthetic buckets (``synthetic.py``) and the shapes world."""

from danceopd_jax.data import scene_buckets, synthetic

BUCKET_KINDS: dict[str, frozenset[str]] = {**synthetic.BUCKET_KINDS, **scene_buckets.BUCKET_KINDS}


def make_bucket_source(kind: str, size: int, seed: int, image_size: int, channels: int, num_classes: int = 0):
    """The random-access source of one bucket (fields per kind in ``BUCKET_KINDS``)."""
    if kind in scene_buckets.BUCKET_KINDS:
        return scene_buckets.SceneSource(kind, size, seed, image_size, channels)
    if kind in synthetic.BUCKET_KINDS:
        return synthetic.make_bucket_source(kind, size, seed, image_size, channels, num_classes)
    raise ValueError(f"unknown bucket kind {kind!r}; valid: {', '.join(BUCKET_KINDS)}")
