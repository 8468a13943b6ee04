"""Held-out evaluation examples (danceopd_jax/evaluation/heldout.py): no evaluated model trained on them."""

import pytest
from ml_collections import ConfigDict

from danceopd_jax import checkpoints
from danceopd_jax.data.scene_buckets import scene_examples
from danceopd_jax.evaluation import heldout


def _run(buckets: dict, student_from: str = "", experts: dict | None = None, averaged: tuple = ()) -> ConfigDict:
    """A run config with only what the lineage reads: its buckets and the runs it builds on."""
    student = dict(init="checkpoint", checkpoint=student_from) if student_from else dict(init="random", checkpoint="")
    config = ConfigDict(dict(
        student=student,
        experts={name: dict(init="checkpoint", checkpoint=path) for name, path in (experts or {}).items()},
        data=dict(buckets={name: dict(kind=kind, size=size, seed=seed) for name, (kind, size, seed) in buckets.items()}),
    ))  # fmt: skip
    if averaged:
        config.weight_average = [dict(workdir=path, weight=1.0 / len(averaged)) for path in averaged]
    return config


def _saved(tmp_path, name: str, config: ConfigDict) -> str:
    path = str(tmp_path / name)
    checkpoints.save_run_config(config, path)
    return path


def test_lineage_follows_init_experts_and_averages(tmp_path):
    anchor = _saved(tmp_path, "anchor", _run({"t2i": ("scenes_t2i", 50, 0)}))
    teacher = _saved(tmp_path, "teacher", _run({"edit": ("scenes_edit", 60, 1)}, student_from=anchor))
    average = _saved(tmp_path, "average", _run({}, averaged=(anchor, teacher)))
    student = _run({"t2i": ("scenes_t2i", 70, 10), "toy": ("gaussian_blobs", 8, 3)}, student_from=anchor, experts={"edit": teacher})
    expected = {("scenes_t2i", 50, 0), ("scenes_edit", 60, 1)}
    assert heldout.trained_buckets([checkpoints.load_run_config(average)]) == expected
    assert heldout.trained_buckets([student]) == expected | {("scenes_t2i", 70, 10)}  # a toy bucket kind is no scene input


def test_a_missing_run_in_the_lineage_is_named(tmp_path):
    student = _run({}, student_from=str(tmp_path / "deleted_anchor"))
    with pytest.raises(FileNotFoundError, match=r"config.student.checkpoint names .*deleted_anchor"):
        heldout.evaluation_examples("t2i", 4, 0, [student])


@pytest.mark.parametrize("capability", ["t2i", "local_edit", "global_edit"])
def test_examples_skip_every_trained_input(capability):
    kind = heldout.CAPABILITY_BUCKETS[capability]
    trained = [_run({"a": (kind, 3000, 0)}), _run({"b": ("scenes_edit", 3000, 1)})]
    seen = {heldout.input_of(e) for e in scene_examples(kind, 3000, 0) + scene_examples("scenes_edit", 3000, 1)}
    stream = scene_examples(kind, 256, heldout.EVAL_SEED_OFFSET)
    assert any(heldout.input_of(e) in seen for e in stream)  # drawn by seed alone, evaluation would repeat training inputs
    examples = heldout.evaluation_examples(capability, 32, 0, trained)
    assert len(examples) == 32 and not any(heldout.input_of(e) in seen for e in examples)
    assert heldout.evaluation_examples(capability, 8, 0, trained) == examples[:8]  # the same stream, deterministic
    assert heldout.evaluation_examples(capability, 8, 1, trained) != examples[:8]


def test_running_out_of_unseen_inputs_is_an_error():
    trained_on_the_stream = _run({"eval": ("scenes_t2i", heldout.MAX_DRAW_FACTOR * 4, heldout.EVAL_SEED_OFFSET)})
    with pytest.raises(ValueError, match=r"t2i: only 0 of 1024 evaluation candidates"):
        heldout.evaluation_examples("t2i", 4, 0, [trained_on_the_stream])
