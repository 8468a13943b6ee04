"""The shapes world: deterministic renders, well-formed edits, buckets that feed the pipeline."""

import dataclasses

import numpy as np
import pytest

from danceopd_jax.data import scenes
from danceopd_jax.data.pipeline import BucketBatches, ConditionSpec
from danceopd_jax.data.scene_buckets import BUCKET_KINDS, SceneSource, scene_examples


def _scenes(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return [scenes.sample_scene(rng) for _ in range(n)]


def test_renders_are_deterministic_and_in_range():
    for scene in _scenes(20):
        for realistic in (False, True):
            a, b = scenes.render(scene, 32, realistic), scenes.render(scene, 32, realistic)
            assert a.dtype == np.float32 and a.shape == (32, 32, 3)
            np.testing.assert_array_equal(a, b)
            assert a.min() >= -1.0 and a.max() <= 1.0
    assert [e.prompt for e in scene_examples("scenes_edit", 50, 3)] == [e.prompt for e in scene_examples("scenes_edit", 50, 3)]
    assert [e.prompt for e in scene_examples("scenes_edit", 50, 3)] != [e.prompt for e in scene_examples("scenes_edit", 50, 4)]


def test_scenes_are_well_formed():
    for scene in _scenes():
        assert 1 <= len(scene.objects) <= 2
        assert len({o.colour for o in scene.objects}) == len(scene.objects)
        if len(scene.objects) == 2:
            assert scene.objects[1].position in scenes.free_positions(dataclasses.replace(scene, objects=scene.objects[:1]))
        for obj in scene.objects:
            assert obj.describe() in scene.prompt()
        assert scene.prompt().endswith(f"on a {scene.background} background")


def test_objects_are_drawn_where_and_how_large_the_scene_says():
    scene = scenes.Scene("gray", (scenes.SceneObject("square", "red", "large", "top left"),))
    image = (scenes.render(scene, 32) + 1) / 2
    red = np.all(np.abs(image - np.array(scenes.COLOURS["red"])) < 0.05, axis=-1)
    rows, cols = np.nonzero(red)
    side = 2 * scenes.SIZES["large"] * 32
    assert abs(rows.mean() / 32 - scenes.POSITIONS["top left"][0]) < 0.03
    assert abs((rows.max() - rows.min() + 1) - side) <= 2 and abs((cols.max() - cols.min() + 1) - side) <= 2


@pytest.mark.parametrize("kind", scenes.LOCAL_EDITS)
def test_local_edits_change_one_object(kind):
    rng = np.random.default_rng(1)
    for scene in _scenes(100):
        if not scenes.local_edit_possible(scene, kind):
            continue
        instruction, edited = scenes.local_edit(scene, rng, kind)
        assert edited.background == scene.background and edited.style == scene.style
        before, after = set(scene.objects), set(edited.objects)
        if kind == "add":
            assert len(after - before) == 1 and before <= after and instruction.startswith("add ")
        elif kind == "remove":
            assert len(before - after) == 1 and after <= before
        else:
            (old,), (new,) = before - after, after - before
            changed = [f.name for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name)]
            assert changed == (["colour"] if kind == "recolour" else ["shape"])
            assert old.name() in instruction


@pytest.mark.parametrize("kind", scenes.GLOBAL_EDITS)
def test_global_edits_keep_the_layout(kind):
    rng = np.random.default_rng(2)
    for scene in _scenes(50):
        _, edited = scenes.global_edit(scene, rng, kind)
        assert edited.objects == scene.objects
        assert (edited.style != scene.style) == (kind in ("night", "sketch"))
        assert (edited.background != scene.background) == (kind == "background")
        assert not np.array_equal(scenes.render(edited), scenes.render(scene))


def test_realistic_render_keeps_the_layout_but_not_the_pixels():
    for scene in _scenes(20):
        plain, real = scenes.render(scene), scenes.render(scene, realistic=True)
        assert np.abs(plain - real).mean() > 0.02
        assert np.abs(plain - real).mean() < 0.5  # same layout: mostly the same colours


def test_unknown_edit_kinds():
    scene = _scenes(1)[0]
    with pytest.raises(ValueError, match="unknown local edit"):
        scenes.local_edit(scene, np.random.default_rng(0), "blur")
    with pytest.raises(ValueError, match="unknown global edit"):
        scenes.global_edit(scene, np.random.default_rng(0), "blur")


@pytest.mark.parametrize("kind", sorted(BUCKET_KINDS))
def test_scene_buckets_feed_the_pipeline(kind):
    source = SceneSource(kind, 16, 0, 16)
    record = source[3]
    assert set(record) == set(BUCKET_KINDS[kind])
    assert record["image"].shape == (16, 16, 3)
    spec = ConditionSpec(text_len=24, text_dim=8, use_source=True)
    batch = BucketBatches({kind: source}, spec, (16, 16, 3), seed=0, process_index=0, process_count=1).next({kind: 4})
    assert batch["image"].shape == (4, 16, 16, 3)
    assert bool(np.all(batch["cond"]["source_mask"])) == ("source" in BUCKET_KINDS[kind])
    assert np.all(batch["cond"]["text_mask"].sum(axis=1) >= 3)  # "make it night" is the shortest


def test_scene_source_needs_rgb():
    with pytest.raises(ValueError, match="channels must be 3"):
        SceneSource("scenes_t2i", 4, 0, 16, channels=1)
