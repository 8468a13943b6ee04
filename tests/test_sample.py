"""The sampling command and API on a freshly trained smoke run."""

import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from danceopd_jax import checkpoints
from danceopd_jax.sampling import encode_conditions, generate, load_trained_model
from danceopd_jax.train import train_and_evaluate

from conftest import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    train_and_evaluate(load_config(num_train_steps=2, **{"student.zero_init": False}), str(path))
    return path


def _sample(*flags):
    return subprocess.run([sys.executable, "-m", "danceopd_jax.sample", *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_run_config_is_recorded(workdir):
    assert checkpoints.load_run_config(str(workdir)).to_dict() == load_config(
        num_train_steps=2, **{"student.zero_init": False}
    ).to_dict()


def test_api_samples_are_deterministic_and_conditioned(workdir):
    config, graphdef, params = load_trained_model(str(workdir))
    source = np.zeros((8, 8, 3), np.float32)
    cond = encode_conditions(config, ["a red disc", "make it blue"], [None, source])
    assert list(cond["source_mask"]) == [False, True]
    args = dict(image_shape=(8, 8, 3), steps=3)
    a = generate(graphdef, params, cond, jax.random.key(0), **args)
    b = generate(graphdef, params, cond, jax.random.key(0), **args)
    c = generate(graphdef, params, cond, jax.random.key(0), cfg_scale=3.0, **args)
    assert a.shape == (2, 8, 8, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_command_writes_a_png(workdir, tmp_path):
    source = tmp_path / "src.png"
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(source)
    out = tmp_path / "edit.png"
    result = _sample("--workdir", str(workdir), "--prompt", "make it red", "--task", "edit", "--source", str(source),
                     "--num", "2", "--steps", "3", "--cfg_scale", "2.0", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert np.asarray(Image.open(out)).shape == (8, 16, 3)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--task", "edit"], "error: --task=edit needs --source"),
        (["--task", "paint"], "error: --task: unknown task 'paint'; valid: t2i, edit"),
        (["--task", "edit", "--source", "/nonexistent.png"], "error: no such image '/nonexistent.png'"),
        (["--source", "/nonexistent.png"], "error: --source given but --task=t2i takes no source image"),
    ],
)
def test_command_bad_input(workdir, tmp_path, flags, message):
    result = _sample("--workdir", str(workdir), "--out", str(tmp_path / "x.png"), *flags)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
    assert not (tmp_path / "x.png").exists()


def test_command_missing_workdir(tmp_path):
    result = _sample("--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2 and "config.json not found" in result.stderr.strip().splitlines()[-1]
