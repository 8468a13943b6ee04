"""The reproduction: its report logic on known numbers, weight averaging, the effective-guidance
measure, CLI errors, and the whole ``--quick`` pipeline through the real command."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from danceopd_jax import build, parallel, sampling
from danceopd_jax.averaging import average_weights
from danceopd_jax.core.compute_dtype import compute_dtypes
from danceopd_jax.evaluation.guidance import effective_guidance
from danceopd_jax.experiments import report
from danceopd_jax.train import train_and_evaluate

from conftest import finished_stage, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _reproduce(*args, timeout=900):
    cmd = [sys.executable, "-m", "danceopd_jax.experiments.reproduce", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))


def test_aggregate_mean_spread_and_derived_metrics():
    per_seed = {
        "0": {"anchor": {"realism/realism": 0.1}, "realism_teacher": {"realism/realism": 0.5}, "s": {"realism/realism": 0.4}},
        "1": {"anchor": {"realism/realism": 0.1}, "realism_teacher": {"realism/realism": 0.5}, "s": {"realism/realism": 0.2}},
    }
    stats = report.aggregate(per_seed)
    mean, std, runs = stats["s"]["realism/realism"]
    assert (mean, runs) == (pytest.approx(0.3), 2) and std == pytest.approx(np.std([0.4, 0.2], ddof=1))
    assert stats["s"]["realism/gap_closed"][0] == pytest.approx((0.75 + 0.25) / 2)  # (0.4-0.1)/0.4, (0.2-0.1)/0.4
    edits = report.aggregate({"0": {"m": {"local_edit/success": 0.2, "global_edit/success": 0.6}}})
    assert edits["m"]["edit/success"] == (pytest.approx(0.4), 0.0, 1)


def test_verdicts_compare_against_twice_the_standard_error():
    three = lambda mean, std: (mean, std, 3)  # noqa: E731
    assert report.verdict(three(0.6, 0.01), three(0.5, 0.01), 64)[1] == "holds"
    assert report.verdict(three(0.5, 0.01), three(0.6, 0.01), 64)[1] == "reversed"
    assert report.verdict(three(0.6, 0.2), three(0.5, 0.2), 64)[1] == "within noise"
    # One run each: the binomial error of a proportion over 64 examples (~0.06 at p=0.5) decides.
    assert report.verdict((0.55, 0.0, 1), (0.5, 0.0, 1), 64)[1] == "within noise"
    assert report.verdict((0.9, 0.0, 1), (0.5, 0.0, 1), 64)[1] == "holds"


def _train(workdir, seed):
    config = load_config(**{"num_train_steps": 2, "seed": seed, "student.seed": seed, "student.zero_init": False})
    train_and_evaluate(config, str(workdir))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two short smoke runs (seeds 0 and 1) of one architecture: their workdirs."""
    root = tmp_path_factory.mktemp("runs")
    _train(root / "a", 0)
    _train(root / "b", 1)
    return root / "a", root / "b"


def test_weight_average_is_the_weighted_mean_of_the_params(two_runs, tmp_path):
    run_a, run_b = two_runs
    average_weights({str(run_a): 1.0, str(run_b): 3.0}, str(tmp_path / "avg"))
    (_, _, a), (_, _, b), (config, _, avg) = (sampling.load_trained_model(str(d)) for d in (run_a, run_b, tmp_path / "avg"))
    for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(avg), strict=True):
        np.testing.assert_allclose(np.asarray(z), 0.25 * np.asarray(x) + 0.75 * np.asarray(y), rtol=1e-6, atol=1e-7)
    assert [w["weight"] for w in config.weight_average] == [0.25, 0.75]


def test_weight_average_rejects_different_architectures(two_runs, tmp_path):
    config = load_config(**{"num_train_steps": 2, "student.preset": "mini"})
    train_and_evaluate(config, str(tmp_path / "b"))
    with pytest.raises(ValueError, match="config.student differ"):
        average_weights({str(two_runs[0]): 1.0, str(tmp_path / "b"): 1.0}, str(tmp_path / "avg"))
    assert not (tmp_path / "avg").exists()


def test_effective_guidance_of_the_reference_itself_is_its_scale(two_runs):
    """The anchor sampled at beta shows gamma = beta exactly; a different model shows something else."""
    config, graph, params = sampling.load_trained_model(str(two_runs[0]))
    _, other_graph, other_params = sampling.load_trained_model(str(two_runs[1]))
    cond = sampling.encode_conditions(config, [f"prompt number {i}" for i in range(8)])
    shape = (config.image_size, config.image_size, config.channels)
    key = jax.random.key(0)
    for beta in (1.0, 2.5):
        gamma = effective_guidance((graph, params), (graph, params), cond, key, image_shape=shape, scale=beta, steps=4)
        assert gamma == pytest.approx(beta, rel=1e-4)
    other = effective_guidance((other_graph, other_params), (graph, params), cond, key, image_shape=shape, scale=2.5, steps=4)
    assert math.isfinite(other) and other != pytest.approx(2.5, rel=1e-2)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--settings", "composition,colour"], "error: --settings: unknown ['colour']; valid: composition, local_global"),
        (["--seeds", "0"], "error: --seeds must be >= 1, got 0"),
        (["--seeds", "two"], "error: argument --seeds: invalid int value: 'two'"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, message):
    result = _reproduce("--workdir", str(tmp_path), "--quick", *args, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith(message)
    assert not any(tmp_path.iterdir())


def test_quick_reproduction_end_to_end(tmp_path):
    """Every setting at toy size through the real command: results, report, plots and grids."""
    result = _reproduce("--workdir", str(tmp_path), "--quick")
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads((tmp_path / "results.json").read_text())
    results = output["results"]
    assert set(results) == {"composition", "local_global", "realism", "cfg"}
    composition = results["composition"]["0"]
    for row in ("anchor", "edit_teacher", "weight_average", "multitask", "offpolicy", "diffusionopd", "flowopd",
                "soft_mixing", "danceopd", "danceopd_mid_t", "danceopd_high_t", "danceopd_per_sample",
                "danceopd_n4", "danceopd_n16", "danceopd_n28"):  # fmt: skip
        assert {"t2i/overall", "local_edit/success", "global_edit/success"} <= set(composition[row]), row
    local_global = results["local_global"]["0"]
    assert set(local_global) >= {"local_teacher", "global_teacher", "danceopd", "offpolicy", "flowopd", "adaptive"}
    for row in ("router_1pct", "router_5pct", "router_100pct", "router_soft_1pct"):
        assert 0.0 <= local_global[row]["router/heldout_accuracy"] <= 1.0 and local_global[row]["router/labelled"] >= 1, row
    assert local_global["router_1pct"]["router/labelled"] < local_global["router_100pct"]["router/labelled"]
    weights = [local_global["adaptive"][f"route_weight/{route}"] for route in ("local", "global")]
    assert sum(weights) == pytest.approx(1.0) and min(weights) >= 0.2 * 0.5
    assert len(output["traces"]["local_global"]["0"]["adaptive"]["steps"]) == 10  # every step's weights
    assert "realism/realism" in results["realism"]["0"]["danceopd"]
    cfg = results["cfg"]["0"]
    for beta in (1, 2, 3, 4, 6, 9):  # the anchor at every alpha x beta; its own effective guidance is beta
        assert cfg[f"anchor@{beta}"]["guidance/gamma"] == pytest.approx(beta, rel=1e-3)
    assert {"danceopd_cfg2@3", "danceopd_cfg3@1"} <= set(cfg)
    text = (tmp_path / "RESULTS.md").read_text()
    for heading in ("## The paper's claims", "## T2I + edit composition", "## Local + global edit composition",
                    "## Realism absorption", "## CFG absorption", "### Routing beyond fixed buckets", "## Metrics",
                    "## Scorer accuracy at 16 px"):  # fmt: skip
        assert heading in text, heading
    assert "--quick" in text and "wall time" in text
    for image in ("composition.png", "local_global.png", "rollout_steps.png", "cfg_product_rule.png", "composition_t2i.png",
                  "adaptive_route_weights.png"):  # fmt: skip
        assert (tmp_path / "results" / image).stat().st_size > 1000, image
        assert f"results/{image}" in text
    again = _reproduce("--workdir", str(tmp_path), "--quick", "--settings", "realism")
    assert again.returncode == 0 and "finished earlier" in again.stdout  # trainings are reused, not redone
    merged = json.loads((tmp_path / "results.json").read_text())
    assert set(merged["results"]) == set(results) and merged["results"]["composition"] == results["composition"]
    assert [sorted(run["settings"]) for run in merged["meta"]["runs"]] == [sorted(results), ["realism"]]


def test_a_stage_the_workdir_trained_with_another_config_is_refused_in_the_plan(tmp_path):
    """Before any expert trains, not when reproduce reaches the stage (``pipeline.check_stage_configs``)."""
    from danceopd_jax.config_validation import ConfigError
    from danceopd_jax.experiments import reproduce

    args = reproduce.parse_args(["--workdir", str(tmp_path), "--quick", "--settings", "realism"])
    experts, students = reproduce.plan(args)
    finished_stage(tmp_path / "experts", experts, "anchor")
    changed = ConfigDict(students["realism", 0].to_dict())
    changed.stages.danceopd.rollout_steps = 3
    finished_stage(tmp_path / "realism" / "seed0", changed, "danceopd")
    with pytest.raises(ConfigError, match=r"setting realism, seed 0: config.stages.danceopd: .* config.rollout_steps 3 -> 4"):
        reproduce.plan(args)


def test_reproduce_exits_cleanly_when_a_training_is_preempted(monkeypatch, tmp_path):
    """SIGTERM inside one of reproduce's trainings (``train.Preempted``) ends the command with exit
    code 0, as ``danceopd_jax.main`` does: the loop has saved, and the same command continues."""
    from danceopd_jax.experiments import reproduce
    from danceopd_jax.train import Preempted

    def preempted(args, command):
        raise Preempted(3, str(tmp_path))

    monkeypatch.setattr(reproduce, "run", preempted)
    reproduce.main(["--workdir", str(tmp_path), "--quick"])  # returns: no SystemExit, no traceback


def test_an_expert_checkpoint_is_restored_straight_into_its_compute_dtype(two_runs):
    """``build.load_model(frozen=True)``, as a run loads its experts: a float32-trained checkpoint
    read by a bf16 expert spec lands in bfloat16 for every layer-cast parameter, equal to the float32
    restore cast (``core.compute_dtype``)."""
    config = load_config()
    spec = ConfigDict({**config.student.to_dict(), "init": "checkpoint", "checkpoint": str(two_runs[0]), "dtype": "bfloat16"})
    mesh = parallel.make_mesh({"data": -1}, jax.devices()[:1])
    rules = build.axis_rules(config)
    graphdef, stored, _ = build.load_model(config, spec, mesh, rules, frozen=True)
    _, full, _ = build.load_model(config, spec, mesh, rules)
    casts = compute_dtypes(nnx.merge(graphdef, full))
    assert casts and {leaf.dtype for leaf in jax.tree.leaves(full)} == {np.dtype(np.float32)}
    full = dict(nnx.to_flat_state(full))
    for path, leaf in nnx.to_flat_state(stored):
        assert leaf.dtype == casts.get(path, np.float32), path
        np.testing.assert_array_equal(np.asarray(leaf[...]), np.asarray(full[path][...].astype(leaf.dtype)), err_msg=str(path))
