"""Models initialised from another run's checkpoint (``init='checkpoint'``, student or expert) whose
architecture differs from the config's: one line naming the checkpoint and what differs, before
anything is built (``train._check_init_checkpoints``); without the run's config.json, one line from
the checkpoint's metadata before anything is read (``checkpoints.restore_model_params``)."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from danceopd_jax import checkpoints
from danceopd_jax.config_validation import ConfigError
from danceopd_jax.models.weights import WeightsMismatch
from danceopd_jax.train import setup_run, train_and_evaluate

from conftest import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run of configs/smoke.py (tiny DiT, patch 2, use_source) with one checkpoint of its initial
    state: a checkpoint as a run writes it, without compiling a train step."""
    path = str(tmp_path_factory.mktemp("run"))
    config = load_config()
    run = setup_run(config)
    checkpoints.save_run_config(config, path)
    manager = checkpoints.make_manager(path, 1)
    checkpoints.save(manager, 1, run.state, {})
    manager.wait_until_finished()
    manager.close()
    return path


def _from(run_dir, key="student", **overrides):
    return load_config(num_train_steps=1, **{f"{key}.init": "checkpoint", f"{key}.checkpoint": run_dir, **overrides})


@pytest.mark.parametrize(
    "key,overrides,message",
    [
        ("student", {"student.patch_size": 1}, "config.student.patch_size is 1, its config.json has student.patch_size 2"),
        ("student", {"student.preset": "mini"}, "config.student.preset is 'mini', its config.json has student.preset 'tiny'"),
        ("experts.t2i_expert", {}, "config.experts.t2i_expert.use_source is False, its config.json has student.use_source True"),
        ("experts.edit_expert", {"condition.text_dim": 8}, "config.condition.text_dim is 8, its config.json has condition.text_dim 16"),
    ],
)
def test_a_checkpoint_of_another_architecture_is_one_config_error_before_anything_is_built(run_dir, tmp_path, key, overrides, message):
    with pytest.raises(ConfigError) as error:
        train_and_evaluate(_from(run_dir, key, **overrides), str(tmp_path / "w"))
    text = str(error.value)
    assert text == f"config.{key}.checkpoint: {run_dir} holds a model of another architecture: {message}", text
    assert not (tmp_path / "w").exists()


def test_a_checkpoint_of_the_same_architecture_passes_the_check(run_dir):
    """What does not change the arrays (dtype, zero_init, seed, image size: the positional table is computed) is no change."""
    from danceopd_jax.train import _check_init_checkpoints

    _check_init_checkpoints(_from(run_dir, **{"student.zero_init": False, "student.seed": 7, "image_size": 16}))
    _check_init_checkpoints(_from(run_dir, "experts.edit_expert"))


def test_without_its_config_json_the_checkpoints_arrays_are_compared(run_dir, tmp_path):
    bare = str(tmp_path / "bare")
    shutil.copytree(run_dir, bare)
    os.remove(os.path.join(bare, checkpoints.CONFIG_FILE))
    with pytest.raises(WeightsMismatch) as error:
        setup_run(_from(bare, **{"student.patch_size": 1}))
    text = str(error.value)
    assert text.startswith(f"the checkpoint in {checkpoints.checkpoint_dir(bare)} (step 1) holds a model of another architecture: "), text
    assert "patch_embed.kernel [12, 32] there, [3, 32] here" in text and "\n" not in text and len(text) < 600, text


def test_the_command_says_it_in_one_line(run_dir, tmp_path):
    cmd = [sys.executable, "-m", "danceopd_jax.main", "--config", str(ROOT / "configs" / "smoke.py"), "--workdir", str(tmp_path / "w"),
           "--config.student.init=checkpoint", f"--config.student.checkpoint={run_dir}", "--config.student.patch_size=1"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"error: config.student.checkpoint: {run_dir} holds a model of another architecture: "
        "config.student.patch_size is 1, its config.json has student.patch_size 2"
    ]
    assert not (tmp_path / "w").exists()
