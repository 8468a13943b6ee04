"""Pipeline configs: stage order from @references, resolution, one-line errors; the quick demo end to end."""

import json
import os

import pytest

from danceopd_jax import pipeline
from danceopd_jax.config_validation import ConfigError

from conftest import load_config


def quick_demo():
    return load_config("shapes_demo", "quick")


def test_stage_order_follows_references():
    config = quick_demo()
    assert pipeline.stage_order(config) == ["anchor", "edit_teacher", "student"]
    config.stages.anchor.student.init = "checkpoint"
    config.stages.anchor.student.checkpoint = "@student"
    with pytest.raises(ConfigError, match="cycle"):
        pipeline.stage_order(config)


def test_unknown_stage_reference_names_the_key():
    config = quick_demo()
    config.stages.student.experts.anchor.checkpoint = "@anker"
    with pytest.raises(ConfigError) as error:
        pipeline.validate_pipeline(config)
    assert str(error.value) == "config.stages.student.experts.anchor.checkpoint: unknown stage '@anker'"


def test_stage_errors_carry_the_stage_key():
    config = quick_demo()
    config.stages.student.rollout_steps = 0
    with pytest.raises(ConfigError, match=r"^config\.stages\.student\.rollout_steps: must be an integer >= 1"):
        pipeline.validate_pipeline(config)
    config = quick_demo()
    config.evaluation.capabilities = "t2i,painting"
    with pytest.raises(ConfigError, match="config.evaluation.capabilities: unknown capability 'painting'"):
        pipeline.validate_pipeline(config)
    for key, value, problem in (("steps", 0, "must be >= 1, got 0"), ("models", "", "name the stages to evaluate"),
                                ("cfg_scale", float("nan"), "must be a finite number >= 0")):  # fmt: skip
        config = quick_demo()
        config.evaluation[key] = value
        with pytest.raises(ConfigError, match=f"^config.evaluation.{key}: {problem}"):  # before any stage trains
            pipeline.validate_pipeline(config)


def test_resolve_points_references_into_the_workdir():
    stage = pipeline.resolve_stage(quick_demo().stages.student, "/w")
    assert stage.student.checkpoint == os.path.join("/w", "anchor")
    assert stage.experts.edit_teacher.checkpoint == os.path.join("/w", "edit_teacher")


def test_quick_demo_end_to_end(tmp_path, capsys):
    results = pipeline.run_pipeline(quick_demo(), str(tmp_path))
    assert set(results) == {"anchor", "edit_teacher", "student"}
    for values in results.values():
        for key in ("t2i/overall", "local_edit/success", "global_edit/success"):
            assert 0.0 <= values[key] <= 1.0
    assert json.loads((tmp_path / "metrics.json").read_text()) == results
    assert "| student |" in (tmp_path / "metrics.md").read_text()
    for capability in ("t2i", "local_edit", "global_edit"):
        assert (tmp_path / "grids" / f"{capability}.png").stat().st_size > 1000
    # A second run reuses every stage (no retraining) and evaluates again.
    capsys.readouterr()
    again = pipeline.run_pipeline(quick_demo(), str(tmp_path))
    assert again == results
    out = capsys.readouterr().out
    assert out.count("finished earlier") == 3 and "compiled and ran" not in out


def test_composition_config_is_valid_and_compares_like_with_like():
    config = load_config("shapes_composition", "quick")
    order = pipeline.validate_pipeline(config)
    assert order[:2] == ["anchor", "edit_teacher"]
    rows = [name for name in order if name not in ("anchor", "edit_teacher")]
    assert {config.stages[name].method for name in rows} == {"flow_matching", "offpolicy", "diffusionopd", "danceopd"}
    for name in rows:  # same steps, batch and init for every row
        stage = config.stages[name]
        assert stage.num_train_steps == config.stages.danceopd_low_t.num_train_steps
        assert stage.batch_size == config.stages.danceopd_low_t.batch_size
        assert stage.student.checkpoint == "@anchor"
    assert config.stages.danceopd_mid_t.query_sampler == "mid_t"
    assert config.stages.soft_mixing.routing == "soft"
