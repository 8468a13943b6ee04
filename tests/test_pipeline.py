"""Pipeline configs: stage order from @references, resolution, one-line errors; the quick demo end to end."""

import json
import os

import pytest

from danceopd_jax import pipeline
from danceopd_jax.config_validation import ConfigError

from conftest import finished_stage, load_config


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


def test_a_model_starting_from_a_stage_of_another_architecture_is_refused_before_any_training():
    """Before: the refusal came only when that stage started, after the stages before it had trained."""
    config = quick_demo()
    pipeline.validate_pipeline(config)  # the demo's references fit
    config.stages.edit_teacher.student.patch_size = 4
    with pytest.raises(ConfigError) as error:
        pipeline.validate_pipeline(config)
    assert str(error.value) == (
        "config.stages.edit_teacher.student.checkpoint: stage 'anchor' trains a model of another "
        "architecture: config.stages.edit_teacher.student.patch_size is 4, stage 'anchor' has student.patch_size 2"
    )


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


def test_metrics_table_shows_a_score_without_examples_as_na_and_says_why():
    table = pipeline.metrics_table({"anchor": {"t2i/overall": 0.2, "t2i/single_object": float("nan")}, "student": {"t2i/overall": 0.25}})
    assert "| anchor | 0.200 | n/a |" in table and "| student | 0.250 |  |" in table
    assert table.rstrip().endswith("- `n/a`: none of the evaluated examples is of the metric's kind")
    assert "n/a" not in pipeline.metrics_table({"anchor": {"t2i/overall": 0.2}})


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


def _record_training(monkeypatch) -> list[str]:
    trained = []
    monkeypatch.setattr(pipeline, "train_and_evaluate", lambda stage, stage_dir: trained.append(os.path.basename(stage_dir)))
    return trained


def test_a_finished_stage_is_reused_only_with_the_config_it_trained_with(tmp_path, monkeypatch, capsys):
    """A stage trained with another config (lr, buckets, method) is one error naming the stage, its
    workdir and the changed keys, before any stage trains (before: reused as if it had these settings)."""
    config = quick_demo()
    for name in ("edit_teacher", "student"):  # the anchor is not trained yet: it would train first
        finished_stage(tmp_path, config, name)
    trained = _record_training(monkeypatch)
    pipeline.train_stages(config, str(tmp_path))
    assert trained == ["anchor"] and capsys.readouterr().out.count("finished earlier") == 2

    student_dir = os.path.join(tmp_path, "student")
    for key, value, shown in (
        ("optimizer.learning_rate", 2e-3, "config.optimizer.learning_rate 0.0003 -> 0.002"),
        ("method", "diffusionopd", "config.method 'danceopd' -> 'diffusionopd'"),
        ("data.buckets.t2i.size", 7, "config.data.buckets.t2i.size 256 -> 7"),
    ):
        changed = quick_demo()
        node = changed.stages.student
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
        trained.clear()
        with pytest.raises(ConfigError) as error:
            pipeline.train_stages(changed, str(tmp_path))
        message = str(error.value)
        assert message.startswith(f"config.stages.student: {student_dir} holds checkpoints of this stage trained with another config: ")
        assert shown in message and "\n" not in message
        assert trained == []  # nothing trained, not even the anchor that comes first
    # length, logging and layout may change: the stage is still reused
    longer_log = quick_demo()
    longer_log.stages.student.log_every = 3
    longer_log.stages.student.mesh.data = 1
    trained.clear()
    pipeline.train_stages(longer_log, str(tmp_path))
    assert trained == ["anchor"]


def test_a_stage_saved_before_keys_existed_counts_only_non_default_values(tmp_path, monkeypatch):
    """A config.json written by older code lacks the keys added since; such a key whose value now is
    its default is no change (else every old workdir would be refused), another value is."""
    from danceopd_jax.config_validation import validate, with_defaults

    config = quick_demo()
    stage = pipeline.resolve_stage(config.stages.student, str(tmp_path))
    validate(stage)
    old = json.loads(stage.to_json())
    for key in ("sigma_schedule", "router", "route_weights", "compilation_cache_dir", "dcn_mesh", "expert_sharding",
                "model_dir", "transformer_path", "prompt_embeddings", "skip_nonfinite_steps", "loss_log"):  # fmt: skip
        del old[key]
    del old["condition"]["pooled_dim"]
    for key in [k for k in old["logical_axis_rules"] if k.startswith("activation_")]:
        del old["logical_axis_rules"][key]
    for spec in (old["student"], *old["experts"].values()):
        for key in ("attention", "remat", "kind", "lora_rank", "lora_alpha", "lora_targets", "lora_path"):
            del spec[key]
    del old["data"]["buckets"]["t2i"]["path"]
    assert with_defaults(old) == with_defaults(stage)
    for name in ("anchor", "edit_teacher"):
        finished_stage(tmp_path, config, name)
    finished_stage(tmp_path, config, "student", saved=old)
    trained = _record_training(monkeypatch)
    pipeline.train_stages(config, str(tmp_path))
    assert trained == []
    config.stages.student.sigma_schedule = "flow_match_euler"  # not the value the old run had
    config.stages.student.experts.anchor.remat = "full"
    with pytest.raises(ConfigError) as error:
        pipeline.train_stages(config, str(tmp_path))
    assert "config.experts.anchor.remat 'none' -> 'full', config.sigma_schedule 'uniform' -> 'flow_match_euler'" in str(error.value)
