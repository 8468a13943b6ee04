"""Grain input pipelines for route buckets, and the batches one train step consumes.

Every bucket (text-to-image prompts, edit pairs, class labels, ...) becomes one grain dataset:
shuffle (reshuffled every epoch) -> repeat forever -> condition record, read by position.
``BucketBatches`` draws a fixed number of records from each named bucket and concatenates the
groups in the order given, which serves both per-step routing (one bucket per step) and
per-sample routing (one fixed-size group per bucket). All buckets emit the same keys, so one
compiled step serves every route; the state (each bucket's position in its stream) is one
JSON-serialisable dict.

Several hosts share each bucket's one global stream: when every host draws ``n`` records of a
bucket, the draw is the stream's next ``P * n`` records and host ``p`` reads (and encodes) only
its ``n``, the ``p``-th slice. The global batch is therefore the same for any number of hosts,
and a run gives the same losses on 1 process x 4 devices as on 2 processes x 2 devices.
"""

import dataclasses
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from danceopd_jax.core.conditioning import NULL_LABEL
from danceopd_jax.data.text import HashedTextEmbedder

# (prompt, template) -> (text [L, D], text_mask [L]), then pooled [P] when the spec has ``pooled_dim``
# and text_segments [S] when it has ``text_segments_len``; the template is ``edit`` for a record with a
# source image, else ``t2i`` (``data.prompt_embeddings.TEMPLATES``)
TextEmbedder = Callable[[str, str], tuple[np.ndarray, ...]]


@dataclasses.dataclass(frozen=True)
class ConditionSpec:
    """Which condition keys a run emits (the ``core.conditioning`` convention).

    ``text_len``/``text_dim`` > 0 emit ``text`` [L, D] and ``text_mask`` [L]; ``pooled_dim`` > 0
    also a pooled prompt embedding ``pooled`` [P] (SD3); ``text_segments_len`` > 0 the lengths of
    the text's segments ``text_segments`` [S] (Z-Image's edit template); ``num_classes`` > 0 emits
    ``label``; ``use_source`` emits ``source`` and ``source_mask``.
    """

    text_len: int = 0
    text_dim: int = 0
    num_classes: int = 0
    use_source: bool = False
    pooled_dim: int = 0
    text_segments_len: int = 0

    def __post_init__(self):
        if (self.text_len > 0) != (self.text_dim > 0) or min(self.text_len, self.text_dim) < 0:
            raise ValueError(f"text_len and text_dim must both be 0 or both positive: {self}")
        for extra in ("pooled_dim", "text_segments_len"):
            if getattr(self, extra) < 0 or (getattr(self, extra) and not self.text_dim):
                raise ValueError(f"{extra} must be >= 0 and needs text_dim > 0: {self}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0: {self}")

    @property
    def use_text(self) -> bool:
        return self.text_dim > 0

    @property
    def record_fields(self) -> frozenset[str]:
        """The raw record fields this spec reads (``image`` is always read)."""
        used = {"image"}
        if self.use_text:
            used.add("prompt")
        if self.num_classes:
            used.add("label")
        if self.use_source:
            used.add("source")
        return frozenset(used)


class RecordEncoder:
    """Raw record -> ``{"image", "has_image", "cond": {...}}`` with exactly the keys of the spec.

    Missing fields get their null value: the empty prompt, ``NULL_LABEL``, a zero source with
    ``source_mask`` False, a zero image with ``has_image`` False. A record field the spec does not
    read is an error rather than silently dropped (e.g. an edit bucket with ``use_source=False``).
    """

    def __init__(
        self,
        spec: ConditionSpec,
        image_shape: tuple[int, int, int],
        text_embedder: TextEmbedder | None = None,
    ):
        self.spec = spec
        self.image_shape = tuple(image_shape)
        self.embed_text = None
        if spec.use_text:
            self.embed_text = text_embedder or HashedTextEmbedder(spec.text_dim, spec.text_len)
            got = tuple(a.shape for a in self.embed_text("", "t2i"))
            extras = [(spec.pooled_dim,), (spec.text_segments_len,)]
            want = ((spec.text_len, spec.text_dim), (spec.text_len,), *(shape for shape in extras if shape[0]))
            if got != want:
                raise ValueError(f"text embedder gives shapes {got}, spec wants {want}")

    def _image(self, record: Mapping[str, Any], field: str) -> tuple[np.ndarray, np.bool_]:
        """The record's image ``field`` as float32 (zeros if absent) and whether it was present."""
        if field not in record:
            return np.zeros(self.image_shape, np.float32), np.bool_(False)
        image = np.asarray(record[field], np.float32)
        if image.shape != self.image_shape:
            raise ValueError(f"record {field!r} has shape {image.shape}, expected {self.image_shape}")
        return image, np.bool_(True)

    def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
        unused = set(record) - self.spec.record_fields
        if unused:
            raise ValueError(f"record fields {sorted(unused)} are not read by {self.spec}")
        cond = {}
        if self.spec.use_text:
            template = "edit" if "source" in record else "t2i"
            cond["text"], cond["text_mask"], *extras = self.embed_text(record.get("prompt", ""), template)
            names = [name for name, size in (("pooled", self.spec.pooled_dim), ("text_segments", self.spec.text_segments_len)) if size]
            cond.update(zip(names, extras))
        if self.spec.num_classes:
            label = int(record.get("label", NULL_LABEL))
            if label != NULL_LABEL and not 0 <= label < self.spec.num_classes:
                raise ValueError(f"label {label} outside [0, {self.spec.num_classes})")
            cond["label"] = np.int32(label)
        if self.spec.use_source:
            cond["source"], cond["source_mask"] = self._image(record, "source")
        image, has_image = self._image(record, "image")
        return {"image": image, "has_image": has_image, "cond": cond}


def bucket_dataset(source: Sequence, encode: Callable[[Mapping[str, Any]], dict[str, Any]], *, seed: int) -> grain.MapDataset:
    """The endless stream of encoded records of one bucket, by position (random access).

    grain's shuffle folds the epoch number into ``seed``, so every epoch has a fresh order;
    records are read and encoded only when a position is asked for.
    """
    return grain.MapDataset.source(source).shuffle(seed=seed).repeat().map(encode)


def stack_records(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of equally-structured records along a new leading batch axis."""
    return jax.tree.map(lambda *leaves: np.stack(leaves), *records)


class BucketBatches:
    """Batches drawn from named buckets, with a checkpointable (JSON) state.

    ``next({"t2i": 4, "edit": 2})`` draws 4 records from ``t2i`` then 2 from ``edit`` and returns
    ``{"image": f32[6, H, W, C], "has_image": bool[6], "cond": {key: [6, ...]}}``; the groups
    appear in the order of the dict. The sizes are this host's; every host calls ``next`` with
    the same sizes and gets its slice of the global draw (module docstring). Bucket seeds are
    derived from ``seed`` and the bucket name, so adding a bucket does not change the order of
    the others.
    """

    def __init__(
        self,
        sources: Mapping[str, Sequence],
        spec: ConditionSpec,
        image_shape: tuple[int, int, int],
        *,
        seed: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        text_embedder: TextEmbedder | None = None,
    ):
        self._process_index = jax.process_index() if process_index is None else process_index
        self._process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= self._process_index < self._process_count:
            raise ValueError(f"process_index {self._process_index} not in [0, {self._process_count})")
        if not sources:
            raise ValueError("no buckets given")
        encode = RecordEncoder(spec, image_shape, text_embedder)
        self._datasets = {}
        for name, source in sources.items():
            if len(source) == 0:
                raise ValueError(f"bucket {name!r} is empty")
            self._datasets[name] = bucket_dataset(source, encode, seed=zlib.crc32(name.encode("utf-8"), seed % 2**32))
        self._positions = dict.fromkeys(self._datasets, 0)

    def _check_names(self, names, what: str) -> None:
        unknown = set(names) - set(self._datasets)
        if unknown:
            raise ValueError(
                f"unknown bucket(s) {sorted(unknown)} in {what}; buckets: {list(self._datasets)}"
            )

    def next(self, sizes: Mapping[str, int]) -> dict[str, Any]:
        """One batch: ``sizes[name]`` records from each bucket, groups concatenated in dict order."""
        self._check_names(sizes, "sizes")
        if any(size < 0 for size in sizes.values()) or sum(sizes.values()) == 0:
            raise ValueError(f"sizes must be >= 0 and draw at least one record, got {dict(sizes)}")
        records = []
        for name, size in sizes.items():
            start = self._positions[name] + self._process_index * size
            records += [self._datasets[name][start + offset] for offset in range(size)]
            self._positions[name] += self._process_count * size
        return stack_records(records)

    def get_state(self) -> dict[str, Any]:
        """``{bucket_name: {"next_index": position in the global stream}}``, JSON-serialisable."""
        return {name: {"next_index": position} for name, position in self._positions.items()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore a state from ``get_state`` (e.g. after a JSON round trip); needs every bucket."""
        self._check_names(state, "state")
        missing = set(self._datasets) - set(state)
        if missing:
            raise ValueError(f"state lacks bucket(s) {sorted(missing)}")
        self._positions = {name: int(state[name]["next_index"]) for name in self._datasets}
