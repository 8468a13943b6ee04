"""Tests for danceopd_jax.data: synthetic sources, text embedder, record encoding, bucket batches."""

import json

import numpy as np
import pytest

from danceopd_jax.core.conditioning import NULL_LABEL
from danceopd_jax.data.pipeline import BucketBatches, ConditionSpec, RecordEncoder
from danceopd_jax.data.synthetic import (
    BUCKET_KINDS,
    COLOURS,
    POSITIONS,
    SHAPE_RADIUS,
    make_bucket_source,
)
from danceopd_jax.data.text import HashedTextEmbedder

IMAGE_SIZE, CHANNELS = 16, 3
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, CHANNELS)
FULL_SPEC = ConditionSpec(text_len=8, text_dim=12, num_classes=10, use_source=True)


def source(kind, size=20, seed=0):
    return make_bucket_source(kind, size, seed, IMAGE_SIZE, CHANNELS, num_classes=10)


class IndexSource:
    """Records whose label identifies them: ``offset + i``."""

    def __init__(self, size, offset=0):
        self.size, self.offset = size, offset

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return {"label": self.offset + index, "image": np.full((2, 2, 1), index, np.float32)}


def index_batches(sizes_by_bucket, *, seed=0, process_index=0, process_count=1):
    sources = {name: IndexSource(size, offset) for name, (size, offset) in sizes_by_bucket.items()}
    return BucketBatches(
        sources,
        ConditionSpec(num_classes=1000),
        (2, 2, 1),
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )


def assert_batches_equal(a, b):
    assert a.keys() == b.keys() and a["cond"].keys() == b["cond"].keys()
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["has_image"], b["has_image"])
    for key in a["cond"]:
        np.testing.assert_array_equal(a["cond"][key], b["cond"][key])


# ---------------------------------------------------------------- synthetic sources


@pytest.mark.parametrize("kind", sorted(BUCKET_KINDS))
def test_sources_are_deterministic_and_seeded(kind):
    a, b, other = source(kind, seed=3), source(kind, seed=3), source(kind, seed=4)
    assert len(a) == 20
    for i in range(len(a)):
        ra, rb = a[i], b[i]
        assert ra.keys() == BUCKET_KINDS[kind]
        for field in ra:
            np.testing.assert_array_equal(ra[field], rb[field])
        assert ra["image"].dtype == np.float32 and ra["image"].shape == IMAGE_SHAPE
        assert ra["image"].min() >= -1 and ra["image"].max() <= 1
    differs = any(
        not np.array_equal(a[i]["image"], other[i]["image"]) for i in range(len(a))
    )
    assert differs, "a different seed should give different records"


def test_t2i_image_renders_its_prompt():
    src = source("t2i", size=30)
    for i in range(len(src)):
        record = src[i]
        words = record["prompt"].split()  # "a <fg> <shape> at the <position...> on <bg>"
        foreground, background = words[1], words[-1]
        position = " ".join(words[5:-2])
        row, col = (int(f * IMAGE_SIZE) for f in POSITIONS[position])
        np.testing.assert_array_equal(record["image"][row, col], COLOURS[foreground])
        # A pixel outside every shape extent: the corner diagonally away from the shape.
        far = (IMAGE_SIZE - 1 - row, IMAGE_SIZE - 1 - col) if position != "center" else (0, 0)
        np.testing.assert_array_equal(record["image"][far], COLOURS[background])
        inside = np.all(record["image"] == np.array(COLOURS[foreground]), axis=-1).mean()
        assert 0 < inside <= (2 * SHAPE_RADIUS) ** 2 + 0.1


def test_same_prompt_same_image():
    src = source("t2i", size=300)
    by_prompt = {}
    for i in range(len(src)):
        record = src[i]
        if record["prompt"] in by_prompt:
            np.testing.assert_array_equal(by_prompt[record["prompt"]], record["image"])
        by_prompt[record["prompt"]] = record["image"]
    assert len(by_prompt) < len(src), "expected repeated prompts in 300 draws"


def test_edit_changes_the_image_and_class_is_a_fixed_scene():
    edits = source("edit")
    for i in range(len(edits)):
        record = edits[i]
        assert record["prompt"].split()[0] in ("make", "turn", "move")
        assert not np.array_equal(record["source"], record["image"])
    classes = source("class", size=60)
    images = {}
    for i in range(len(classes)):
        label, image = classes[i]["label"], classes[i]["image"]
        assert 0 <= label < 10
        if label in images:
            np.testing.assert_array_equal(images[label], image)
        images[label] = image
    other_seed = source("class", size=60, seed=9)
    for i in range(len(other_seed)):
        label = other_seed[i]["label"]
        if label in images:
            np.testing.assert_array_equal(images[label], other_seed[i]["image"])


def test_unknown_kind_and_bad_num_classes():
    with pytest.raises(ValueError, match="unknown bucket kind 'video'.*'class', 'edit', 't2i'"):
        make_bucket_source("video", 4, 0, 8, 3)
    with pytest.raises(ValueError, match="num_classes"):
        make_bucket_source("class", 4, 0, 8, 3, num_classes=0)


# ---------------------------------------------------------------- text embedder


def test_embedder_is_deterministic_and_seeded():
    a, b = HashedTextEmbedder(12, 6), HashedTextEmbedder(12, 6)
    emb_a, mask_a = a("A red disc")
    emb_b, mask_b = b("a RED   disc")
    np.testing.assert_array_equal(emb_a, emb_b)
    np.testing.assert_array_equal(mask_a, mask_b)
    assert emb_a.dtype == np.float32 and emb_a.shape == (6, 12)
    assert not np.array_equal(HashedTextEmbedder(12, 6, seed=1)("a red disc")[0], emb_a)
    repeated = a("red red")[0]
    assert not np.array_equal(repeated[0], repeated[1]), "the position code must make order matter"
    assert not np.array_equal(a("a blue disc")[0][1], emb_a[1])
    np.testing.assert_array_equal(a("a blue disc")[0][2], emb_a[2])


def test_embedder_mask_truncation_and_empty_prompt():
    embed = HashedTextEmbedder(8, 4)
    emb, mask = embed("one two")
    np.testing.assert_array_equal(mask, [True, True, False, False])
    assert np.all(emb[2:] == 0) and np.all(np.abs(emb[:2]).sum(-1) > 0)
    emb, mask = embed("one two three four five six")
    assert mask.all()
    np.testing.assert_array_equal(emb, embed("one two three four")[0])
    emb, mask = embed("")
    assert not mask.any() and not emb.any()
    emb, mask = embed("   ")
    assert not mask.any() and not emb.any()


# ---------------------------------------------------------------- record encoding


def test_condition_records_per_kind():
    encode = RecordEncoder(FULL_SPEC, IMAGE_SHAPE)
    t2i, edit, cls = (encode(source(kind)[0]) for kind in ("t2i", "edit", "class"))
    for record in (t2i, edit, cls):
        assert set(record["cond"]) == {"text", "text_mask", "label", "source", "source_mask"}
        assert record["has_image"]
    assert edit["cond"]["source_mask"]
    assert not t2i["cond"]["source_mask"] and not cls["cond"]["source_mask"]
    np.testing.assert_array_equal(edit["cond"]["source"], source("edit")[0]["source"])
    assert not t2i["cond"]["source"].any()
    assert t2i["cond"]["label"] == NULL_LABEL and edit["cond"]["label"] == NULL_LABEL
    assert cls["cond"]["label"] == source("class")[0]["label"] and cls["cond"]["label"].dtype == np.int32
    assert t2i["cond"]["text_mask"].any() and edit["cond"]["text_mask"].any()
    assert not cls["cond"]["text_mask"].any() and not cls["cond"]["text"].any()


def test_spec_emits_only_its_keys_and_rejects_unread_fields():
    encode = RecordEncoder(ConditionSpec(text_len=4, text_dim=8), IMAGE_SHAPE)
    assert set(encode({"prompt": "a red disc"})["cond"]) == {"text", "text_mask"}
    prompt_only = encode({"prompt": "a red disc"})
    assert not prompt_only["has_image"] and not prompt_only["image"].any()
    assert prompt_only["image"].shape == IMAGE_SHAPE
    assert set(RecordEncoder(ConditionSpec(num_classes=3), IMAGE_SHAPE)({"label": 2})["cond"]) == {"label"}
    with pytest.raises(ValueError, match="source"):
        encode(source("edit")[0])
    with pytest.raises(ValueError, match="label 5"):
        RecordEncoder(ConditionSpec(num_classes=3), IMAGE_SHAPE)({"label": 5})
    with pytest.raises(ValueError, match="text_len and text_dim"):
        ConditionSpec(text_len=4)


# ---------------------------------------------------------------- bucket batches


def test_batch_layout_and_group_order():
    batches = index_batches({"a": (10, 0), "b": (10, 100), "c": (10, 200)})
    batch = batches.next({"b": 2, "a": 3, "c": 1})
    labels = batch["cond"]["label"]
    assert labels.shape == (6,) and batch["image"].shape == (6, 2, 2, 1)
    assert np.all((labels[:2] >= 100) & (labels[:2] < 110))
    assert np.all(labels[2:5] < 10)
    assert 200 <= labels[5] < 210
    # Per-step routing: one bucket per step; the other buckets do not advance.
    batches.next({"c": 4})
    assert batches.get_state() == {
        "a": {"next_index": 3},
        "b": {"next_index": 2},
        "c": {"next_index": 5},
    }


def test_synthetic_batch_condition_keys():
    sources = {kind: source(kind) for kind in ("t2i", "edit", "class")}
    batches = BucketBatches(
        sources, FULL_SPEC, IMAGE_SHAPE, seed=0, process_index=0, process_count=1
    )
    batch = batches.next({"t2i": 2, "edit": 3, "class": 1})
    cond = batch["cond"]
    assert cond["text"].shape == (6, 8, 12) and cond["text_mask"].shape == (6, 8)
    assert cond["source"].shape == (6, *IMAGE_SHAPE) and batch["image"].dtype == np.float32
    np.testing.assert_array_equal(cond["source_mask"], [False, False, True, True, True, False])
    assert np.all(cond["label"][:5] == NULL_LABEL) and 0 <= cond["label"][5] < 10
    np.testing.assert_array_equal(batch["has_image"], [True] * 6)


@pytest.mark.parametrize("json_round_trip", [False, True])
def test_state_restores_the_same_batches(json_round_trip):
    sources = {kind: source(kind, size=7) for kind in ("t2i", "edit", "class")}

    def make():
        return BucketBatches(
            sources, FULL_SPEC, IMAGE_SHAPE, seed=5, process_index=0, process_count=1
        )

    schedule = [{"t2i": 3}, {"edit": 2, "class": 2}, {"t2i": 5, "edit": 4}, {"class": 6}]
    batches = make()
    batches.next({"t2i": 4, "class": 1})  # start mid-epoch
    state = batches.get_state()
    if json_round_trip:
        state = json.loads(json.dumps(state))
    first = [batches.next(sizes) for sizes in schedule]
    assert batches.get_state() != state
    batches.set_state(state)
    again = [batches.next(sizes) for sizes in schedule]
    resumed = make()  # a fresh run restored from the checkpointed state
    resumed.set_state(state)
    later = [resumed.next(sizes) for sizes in schedule]
    for a, b, c in zip(first, again, later):
        assert_batches_equal(a, b)
        assert_batches_equal(a, c)


def test_hosts_split_the_global_draw():
    """Two hosts drawing 3 each get the two halves of what one host drawing 6 gets, every step."""
    one = index_batches({"a": (11, 0)})
    hosts = [index_batches({"a": (11, 0)}, process_index=p, process_count=2) for p in (0, 1)]
    for _ in range(5):  # past the end of the first epoch
        whole = one.next({"a": 6})["cond"]["label"].tolist()
        halves = [host.next({"a": 3})["cond"]["label"].tolist() for host in hosts]
        assert halves[0] + halves[1] == whole
    assert hosts[0].get_state() == hosts[1].get_state() == one.get_state() == {"a": {"next_index": 30}}


def test_reshuffles_every_epoch_and_seed_matters():
    batches = index_batches({"a": (16, 0)}, seed=1)
    epochs = [batches.next({"a": 16})["cond"]["label"].tolist() for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(16))
    assert epochs[0] != list(range(16))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    other_seed = index_batches({"a": (16, 0)}, seed=2).next({"a": 16})["cond"]["label"].tolist()
    assert other_seed != epochs[0]


def test_bucket_errors():
    batches = index_batches({"a": (4, 0)})
    with pytest.raises(ValueError, match="unknown bucket.*'nope'"):
        batches.next({"nope": 1})
    with pytest.raises(ValueError, match="unknown bucket.*'nope'"):
        batches.set_state({"a": {"next_index": 0}, "nope": {"next_index": 0}})
    with pytest.raises(ValueError, match="lacks bucket.*'a'"):
        batches.set_state({})
    with pytest.raises(ValueError, match="at least one"):
        batches.next({"a": 0})
    with pytest.raises(ValueError, match="bucket 'b' is empty"):
        index_batches({"a": (4, 0), "b": (0, 0)})
