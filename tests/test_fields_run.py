"""Field-world runs through the pipeline (issue 27): the quick demo through the command, the
config checks of field buckets and FieldMLP models, field buckets through ``BucketBatches``, and a
field run on a data-parallel mesh."""

import json
import subprocess
import sys

import numpy as np
import pytest

from danceopd_jax import build, pipeline
from danceopd_jax.config_validation import ConfigError, validate
from danceopd_jax.fieldworld import data as field_data
from danceopd_jax.fieldworld.targets import make_world
from tests.conftest import ROOT, cpu_devices_env, load_config, main_command


def quick_stage(name: str):
    return pipeline.resolve_stage(load_config("fields_demo", "quick").stages[name], "/w")


def test_quick_demo_through_the_command(tmp_path):
    """The quick demo trains its three stages and writes exact scores and the scatter grid."""
    workdir = tmp_path / "demo"
    run = subprocess.run(
        main_command("--config", "configs/fields_demo.py:quick", "--workdir", str(workdir)), cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((workdir / "metrics.json").read_text())
    assert set(results) == {"anchor", "edit_teacher", "student"}
    for values in results.values():
        assert {"t2i/nll", "t2i/energy", "t2i/mode_tv", "local_edit/hits", "local_edit/mode_hits", "global_edit/hits"} <= set(values)
        assert all(np.isfinite(mean) and stderr >= 0 for mean, stderr in values.values())
    table = (workdir / "metrics.md").read_text()
    assert "| student |" in table and "±" in table and "| student |" in run.stdout
    assert (workdir / "grids" / "fields.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "stage, overrides, message",
    [
        ("anchor", {"image_size": 2}, "config.image_size: the field world's points (bucket 't2i', kind 'fields_t2i') are images of size 1, got 2"),
        ("anchor", {"channels": 1}, "config.channels: the field world (bucket 't2i') has points of D >= 2 numbers, got 1"),
        ("anchor", {"condition.num_classes": 4}, "config.condition.num_classes: the field world (bucket 't2i') has 9 prompt ids, got 4"),
        ("edit_teacher", {"condition.use_source": False}, "config.data.buckets.edit.kind: 'fields_edit' records carry 'source', which config.condition.use_source turns off"),
        ("anchor", {"condition.text_len": 8, "condition.text_dim": 16}, "config.condition.text_dim: student is a field_mlp, which reads labels, not prompt embeddings: must be 0, got 16"),
        ("anchor", {"student.width": 0}, "config.student.width: must be an integer >= 1, got 0"),
    ],
)  # fmt: skip
def test_config_errors(stage, overrides, message):
    config = quick_stage(stage)
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[last] = value
    with pytest.raises(ConfigError) as error:
        validate(config)
    assert str(error.value) == message


def test_a_student_of_another_width_than_its_anchor_is_refused_before_training():
    config = load_config("fields_demo", "quick")
    config.stages.student.student.width = 64
    with pytest.raises(ConfigError, match=r"config.stages.student.student.width is 64, stage 'anchor' has student.width 128"):
        pipeline.validate_pipeline(config)


def test_field_buckets_through_bucket_batches():
    """Every field kind of a run config batches as points [B, 1, 1, 2] with the world's condition
    spec: labels in the kind's set, sources (and their mask) on edit kinds only."""
    config = quick_stage("edit_teacher")
    world = make_world(2)
    assert build.condition_spec(config) == field_data.condition_spec(world)
    with config.unlocked():
        config.data.buckets = {kind: dict(kind=kind, size=64, seed=3) for kind in field_data.BUCKET_KINDS}
    batches = build.make_batches(config, build.make_sources(config))
    valid = {
        "fields_t2i": range(4), "fields_realism": range(4), "fields_local_edit": world.local_edit_labels,
        "fields_global_edit": world.global_edit_labels, "fields_edit": np.concatenate([world.local_edit_labels, world.global_edit_labels]),
    }  # fmt: skip
    for kind in field_data.BUCKET_KINDS:
        batch = batches.next({kind: 8})
        assert batch["image"].shape == (8, 1, 1, 2) and np.isfinite(batch["image"]).all()
        assert np.isin(batch["cond"]["label"], valid[kind]).all()
        assert batch["cond"]["source_mask"].all() == ("source" in field_data.BUCKET_KINDS[kind])
        assert batch["cond"]["source"].shape == (8, 1, 1, 2)


DATA_PARALLEL = """
import jax, numpy as np
from danceopd_jax import pipeline, train
from tests.conftest import load_config
config = pipeline.resolve_stage(load_config("fields_demo", "quick").stages.anchor, "/w")
config.num_train_steps, config.batch_size, config.log_every = 3, 16, 1
state = train.train_and_evaluate(config, {workdir!r})
np.save({workdir!r} + ".npy", np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(state.params)]))
"""


def test_a_field_run_on_a_data_parallel_mesh_matches_one_device(tmp_path):
    """The FieldMLP's parameters (no logical axes) are replicated: 3 steps on 2 forced CPU devices
    (batch over data) give the parameters of 3 steps on one."""
    values = []
    for devices in (1, 2):
        script = DATA_PARALLEL.format(workdir=str(tmp_path / f"data{devices}"))
        run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=cpu_devices_env(devices), capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"mesh {{'data': {devices}, 'fsdp': 1, 'tensor': 1}} over {devices} cpu devices" in run.stdout
        values.append(np.load(tmp_path / f"data{devices}.npy"))
    np.testing.assert_allclose(values[0], values[1], atol=1e-5)
