"""The sampling command and API on a freshly trained smoke run."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from danceopd_jax import checkpoints, sampling
from danceopd_jax.config_validation import validate
from danceopd_jax.sampling import encode_conditions, generate, load_trained_model, sample_task, task_conditions, to_uint8
from danceopd_jax.tasks import TASKS
from danceopd_jax.train import train_and_evaluate

from conftest import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
VALID = "valid: t2i, realism, edit, local_edit, global_edit"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    train_and_evaluate(load_config(num_train_steps=2, **{"student.zero_init": False}), str(path))
    return path


def _sample(*flags):
    return subprocess.run([sys.executable, "-m", "danceopd_jax.sample", *flags], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_run_config_is_recorded(workdir):
    """The saved run config is the validated one (defaults of keys the config left out filled in), as JSON."""
    expected = load_config(num_train_steps=2, **{"student.zero_init": False})
    validate(expected)
    assert checkpoints.load_run_config(str(workdir)).to_dict() == json.loads(json.dumps(expected.to_dict()))


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


def test_a_cfg_sweep_samples_every_scale_with_one_program(workdir):
    """The scale is an argument of the guided sampler (a scale of 1 is the unguided one)."""
    config, graphdef, params = load_trained_model(str(workdir))
    cond = encode_conditions(config, ["a red disc", "a blue square"])
    args = dict(image_shape=(8, 8, 3), steps=3)
    images = [generate(graphdef, params, cond, jax.random.key(0), cfg_scale=scale, **args) for scale in (1.0, 2.0, 3.5, 6.0)]
    assert all(not np.array_equal(a, b) for i, a in enumerate(images) for b in images[i + 1 :])
    guided = sampling._sampler(graphdef, (8, 8, 3), 3, 1.0, "uniform", True)
    assert guided._cache_size() == 1


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
        (["--task", "edit"], "error: task 'edit' needs a source image"),
        (["--task", "local_edit"], "error: task 'local_edit' needs a source image"),
        (["--task", "global_edit"], "error: task 'global_edit' needs a source image"),
        (["--task", "paint"], f"error: unknown task 'paint'; {VALID}"),
        (["--task", "edit", "--source", "/nonexistent.png"], "error: no such image '/nonexistent.png'"),
        (["--source", "/nonexistent.png"], "error: task 't2i' takes no source image"),
        (["--source", "SRC"], "error: task 't2i' takes no source image"),
        (["--task", "realism", "--source", "SRC"], "error: task 'realism' takes no source image"),
        (["--task", "edit", "--source", "WIDE"], "error: 'WIDE' is 40 x 20 px: a source image must be square"),
        (["--task", "edit", "--source", "NOT_IMAGE"], "error: cannot identify image file 'NOT_IMAGE'"),
        (["--cfg_scale", "nan"], "error: cfg_scale must be a finite number >= 0 (1: no guidance), got nan"),
        (["--cfg_scale", "-2"], "error: cfg_scale must be a finite number >= 0 (1: no guidance), got -2.0"),
        (["--num", "0"], "error: --num must be >= 1, got 0"),
        (["--steps", "0"], "error: steps must be >= 1, got 0"),
    ],
)
def test_command_bad_input(workdir, tmp_path, flags, message):
    """Before: a NaN or negative --cfg_scale wrote an image (black for NaN), and a non-square source
    was squashed to the model's square."""
    files = {"SRC": tmp_path / "src.png", "WIDE": tmp_path / "wide.png", "NOT_IMAGE": tmp_path / "not_image.png"}
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(files["SRC"])
    Image.fromarray(np.full((20, 40, 3), 200, np.uint8)).save(files["WIDE"])
    files["NOT_IMAGE"].write_text("not an image")
    flags = [str(files[flag]) if flag in files else flag for flag in flags]
    message = message.replace("WIDE", str(files["WIDE"])).replace("NOT_IMAGE", str(files["NOT_IMAGE"]))
    result = _sample("--workdir", str(workdir), "--out", str(tmp_path / "x.png"), *flags)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "out,message",
    [
        ("x.unknownext", "error: --out 'OUT': unknown extension '.unknownext'; valid extensions: .png, .jpg, .jpeg"),
        ("x", "error: --out 'OUT': no extension; valid extensions: .png"),
        ("file/x.png", "error: --out 'OUT': its folder 'TMP/file' exists and is not a folder"),
        ("folder.png", "error: --out 'OUT' is a folder; give the image's file name"),
    ],
)
def test_command_checks_out_before_sampling(workdir, tmp_path, out, message):
    """A bad ``--out`` is one line before the weights are read (before: a traceback after sampling)."""
    (tmp_path / "file").write_text("")
    (tmp_path / "folder.png").mkdir()
    result = _sample("--workdir", str(workdir), "--out", str(tmp_path / out))
    message = message.replace("OUT", str(tmp_path / out)).replace("TMP", str(tmp_path))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]], result.stderr
    assert result.stderr.strip().startswith(message), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder.png"]


def test_command_writes_the_format_of_the_extension(workdir, tmp_path):
    out = tmp_path / "new" / "x.JPG"
    result = _sample("--workdir", str(workdir), "--steps", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert Image.open(out).format == "JPEG" and os.listdir(out.parent) == ["x.JPG"]  # no staging file left


def test_command_missing_workdir(tmp_path):
    result = _sample("--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2 and "config.json not found" in result.stderr.strip().splitlines()[-1]


def test_a_pipeline_workdir_names_its_runs(tmp_path):
    for name in ("student", "anchor", "grids"):
        (tmp_path / name).mkdir()
    for name in ("student", "anchor"):
        (tmp_path / name / checkpoints.CONFIG_FILE).write_text("{}")
    runs = f"{tmp_path / 'anchor'}, {tmp_path / 'student'}"
    with pytest.raises(FileNotFoundError, match=re.escape(f"'{tmp_path}' holds the runs of a pipeline, pass one of them: {runs}") + "$"):
        checkpoints.load_run_config(str(tmp_path))


# --- task flags ------------------------------------------------------------------------------


def test_registry_lists_the_tasks():
    assert list(TASKS) == ["t2i", "realism", "edit", "local_edit", "global_edit"]
    assert [name for name, task in TASKS.items() if task.needs_source] == ["edit", "local_edit", "global_edit"]
    assert all(task.name == name and task.description for name, task in TASKS.items())


def test_api_unknown_task_lists_every_valid_task(workdir):
    config = checkpoints.load_run_config(str(workdir))
    with pytest.raises(ValueError) as error:
        task_conditions(config, "paint", ["a red disc"])
    assert str(error.value) == f"unknown task 'paint'; {VALID}"
    with pytest.raises(ValueError, match=f"^unknown task 'paint'; {VALID}$"):
        sample_task(str(workdir), "paint", ["a red disc"])


@pytest.mark.parametrize("task", ["edit", "local_edit", "global_edit"])
def test_api_edit_tasks_need_a_source_for_every_prompt(workdir, task):
    config = checkpoints.load_run_config(str(workdir))
    source = np.zeros((8, 8, 3), np.float32)
    for sources in (None, [source], [source, None]):
        with pytest.raises(ValueError, match=f"^task '{task}' needs a source image") as error:
            task_conditions(config, task, ["make it blue", "make it night"], sources)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("task", ["t2i", "realism"])
def test_api_prompt_tasks_take_no_source(workdir, task):
    config = checkpoints.load_run_config(str(workdir))
    with pytest.raises(ValueError, match=f"^task '{task}' takes no source image"):
        task_conditions(config, task, ["a red disc"], [np.zeros((8, 8, 3), np.float32)])


def _sourceless_workdir(workdir, tmp_path):
    """A copy of the run's config.json with ``condition.use_source=False`` (the task is refused
    before any weights are read, so no checkpoint is needed)."""
    run = json.loads((workdir / "config.json").read_text())
    run["condition"]["use_source"] = False
    path = tmp_path / "sourceless"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(run))
    return path


def test_a_model_trained_without_sources_refuses_edit_tasks(workdir, tmp_path):
    path = _sourceless_workdir(workdir, tmp_path)
    config = checkpoints.load_run_config(str(path))
    source = np.zeros((8, 8, 3), np.float32)
    for task in ("edit", "local_edit", "global_edit"):
        with pytest.raises(ValueError, match=f"^task '{task}' edits a source image, but this model was trained without"):
            task_conditions(config, task, ["make it blue"], [source])
        with pytest.raises(ValueError, match="condition.use_source=False"):
            sample_task(str(path), task, ["make it blue"], [source])
    cond = task_conditions(config, "t2i", ["a red disc"])
    assert "source" not in cond and "source_mask" not in cond
    src = tmp_path / "src.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(src)
    result = _sample("--workdir", str(path), "--out", str(tmp_path / "x.png"), "--task", "local_edit", "--source", str(src))
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and last.startswith("error: task 'local_edit' edits a source image"), result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x.png").exists()


def test_tasks_of_one_family_give_identical_conditioning(workdir):
    config = checkpoints.load_run_config(str(workdir))
    rng = np.random.default_rng(0)
    sources = [rng.uniform(-1, 1, (8, 8, 3)).astype(np.float32) for _ in range(2)]
    prompts = ["make the circle blue", "make it night"]
    edit = task_conditions(config, "edit", prompts, sources)
    assert list(edit["source_mask"]) == [True, True] and np.array_equal(edit["source"], np.stack(sources))
    for task in ("local_edit", "global_edit"):
        other = task_conditions(config, task, prompts, sources)
        assert jax.tree.all(jax.tree.map(np.array_equal, edit, other))
    prompts = ["a red disc", "a blue square"]
    t2i = task_conditions(config, "t2i", prompts)
    realism = task_conditions(config, "realism", prompts, [None, None])
    assert list(t2i["source_mask"]) == [False, False] and not t2i["source"].any()
    assert jax.tree.all(jax.tree.map(np.array_equal, t2i, realism))
    assert jax.tree.all(jax.tree.map(np.array_equal, t2i, encode_conditions(config, prompts)))


def test_sample_task_matches_generate(workdir):
    loaded = load_trained_model(str(workdir))
    config, graphdef, params = loaded
    source = np.zeros((8, 8, 3), np.float32)
    images = sample_task(loaded, "local_edit", ["make it blue"] * 2, [source] * 2, steps=3, cfg_scale=2.0, seed=1)
    cond = encode_conditions(config, ["make it blue"] * 2, [source] * 2)
    expected = to_uint8(generate(graphdef, params, cond, jax.random.key(1), image_shape=(8, 8, 3), steps=3,
                                 shift=config.shift, cfg_scale=2.0))
    assert images.dtype == np.uint8 and images.shape == (2, 8, 8, 3) and np.array_equal(images, expected)
    assert np.array_equal(sample_task(str(workdir), "edit", ["make it blue"] * 2, [source] * 2, steps=3, cfg_scale=2.0, seed=1), images)
    assert sample_task(loaded, "realism", ["a red disc"]).shape == (1, 8, 8, 3)


def test_command_local_edit_writes_a_png(workdir, tmp_path):
    source = tmp_path / "x.png"
    Image.fromarray(np.full((20, 20, 3), 30, np.uint8)).save(source)
    out = tmp_path / "local.png"
    result = _sample("--workdir", str(workdir), "--prompt", "make the circle blue", "--task", "local_edit",
                     "--source", str(source), "--steps", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "task local_edit" in result.stdout
    assert np.asarray(Image.open(out)).shape == (8, 8, 3)


def test_command_help_lists_the_tasks():
    result = _sample("--help")
    flag = " ".join(result.stdout.split("--task:")[1].split("(default: 't2i')")[0].split())
    assert all(f"{name}: {task.description}" in flag for name, task in TASKS.items()), result.stdout[-2000:]


def test_a_run_saved_before_newer_config_keys_still_loads(workdir, tmp_path):
    """A workdir whose config.json predates keys added since (``condition.pooled_dim``, ``sigma_schedule``,
    the student's ``attention``/``remat``/``kind``, ``router``...) loads with their defaults
    (``config_validation.read_run_config``); before, sampling it failed on the first missing key."""
    import shutil

    old = tmp_path / "old_run"
    shutil.copytree(workdir, old)
    saved = json.loads((old / checkpoints.CONFIG_FILE).read_text())
    for section, key in (("condition", "pooled_dim"), ("student", "attention"), ("student", "remat"), ("student", "kind")):
        del saved[section][key]
    for key in ("sigma_schedule", "router", "route_weights", "compilation_cache_dir"):
        saved.pop(key)
    (old / checkpoints.CONFIG_FILE).write_text(json.dumps(saved))
    config, _, params = load_trained_model(str(old))
    assert config.condition.pooled_dim == 0 and config.student.attention == "xla"
    expected = load_trained_model(str(workdir))[2]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)))
