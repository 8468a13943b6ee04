"""Bad input stops before anything is built: unknown keys with the nearest valid name, missing keys,
wrong value types, and data problems a run would only meet mid-training. One line, naming the key."""

import pytest
from ml_collections import ConfigDict

from danceopd_jax.config_validation import ConfigError, validate
from danceopd_jax.pipeline import validate_pipeline

from conftest import load_config


def _error(config) -> str:
    with pytest.raises(ConfigError) as error:
        validate(config)
    message = str(error.value)
    assert "\n" not in message
    return message


def _with(change):
    config = load_config()
    change(config)
    return config


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: setattr(c.optimizer, "learnig_rate", 0.1),
         "config.optimizer.learnig_rate: unknown key; did you mean 'learning_rate'?"),
        (lambda c: setattr(c, "optimiser", ConfigDict()), "config.optimiser: unknown key; did you mean 'optimizer'?"),
        (lambda c: setattr(c.mesh, "fdsp", 2), "config.mesh.fdsp: unknown key; did you mean 'fsdp'?"),
        (lambda c: setattr(c.condition, "use_sorce", True), "config.condition.use_sorce: unknown key; did you mean 'use_source'?"),
        (lambda c: setattr(c.flowopd, "etta", 0.5), "config.flowopd.etta: unknown key; did you mean 'eta'?"),
        (lambda c: setattr(c.experts.t2i_expert, "pach_size", 4),
         "config.experts.t2i_expert.pach_size: unknown key; did you mean 'patch_size'?"),
        (lambda c: setattr(c.routes.edit, "wieght", 2.0), "config.routes.edit.wieght: unknown key; did you mean 'weight'?"),
        (lambda c: setattr(c.fields.t2i, "cfg_scal", 2.0), "config.fields.t2i.cfg_scal: unknown key; did you mean 'cfg_scale'?"),
        (lambda c: setattr(c.data.buckets.t2i, "sise", 4), "config.data.buckets.t2i.sise: unknown key; did you mean 'size'?"),
        (lambda c: setattr(c.data, "bucket", ConfigDict()), "config.data.bucket: unknown key; did you mean 'buckets'?"),
        (lambda c: setattr(c, "zzz", 1), "config.zzz: unknown key; valid: batch_size, channels,"),
    ],
)  # fmt: skip
def test_unknown_keys_name_the_full_key_and_the_nearest_valid_one(change, message):
    assert _error(_with(change)).startswith(message)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c.routes.t2i.__delitem__("weight"), "config.routes.t2i.weight: missing key"),
        (lambda c: c.__delitem__("optimizer"), "config.optimizer: missing key"),
        (lambda c: setattr(c.data, "buckets", ConfigDict({"t2i": dict(kind="t2i", size=4.0, seed=0)})),
         "config.data.buckets.t2i.size: expected an integer, got 4.0"),
        (lambda c: setattr(c, "routes", ConfigDict({"t2i": dict(field="t2i", bucket="t2i", weight="1")})),
         "config.routes.t2i.weight: expected a number, got '1'"),
        (lambda c: setattr(c, "experts", ConfigDict({"t2i_expert": dict(c.student.to_dict(), zero_init="no")})),
         "config.experts.t2i_expert.zero_init: expected a bool, got 'no'"),
        (lambda c: setattr(c.fields.t2i, "terms", {"edit": None}), "config.fields.t2i.terms.edit: expected a number, got None"),
        (lambda c: setattr(c, "routes", ConfigDict({"t2i": "t2i"})), "config.routes.t2i: expected a dict with keys field, bucket"),
    ],
)  # fmt: skip
def test_missing_keys_and_wrong_types_are_named(change, message):
    assert _error(_with(change)).startswith(message)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"data.buckets.t2i.size": 0}, "config.data.buckets.t2i.size: must be >= 1 (an empty bucket has nothing to draw)"),
        ({"condition.use_source": False, "student.use_source": False, "experts.edit_expert.use_source": False},
         "config.data.buckets.edit.kind: 'edit' records carry 'source', which config.condition.use_source turns off"),
        ({"condition.text_dim": 0, "condition.text_len": 0},
         "config.data.buckets.edit.kind: 'edit' records carry 'prompt', which config.condition.text_dim turns off"),
        ({"condition.text_dim": 0}, "config.condition.text_len: text_len and text_dim must both be 0 or both > 0"),
        ({"student.dtype": "int8"}, "config.student.dtype: unknown value 'int8'"),
        ({"student.attention": "flash"}, "config.student.attention: must be one of xla, cudnn, got 'flash'"),
        ({"experts.edit_expert.attention": "cudnn"}, "config.experts.edit_expert.attention: 'cudnn' needs dtype bfloat16 or float16"),
        ({"student.patch_size": 0}, "config.student.patch_size: must be >= 1"),
        ({"optimizer.decay": "linear"}, "config.optimizer.decay: unknown value 'linear'"),
        ({"log_every": 0}, "config.log_every: must be an integer >= 1"),
        ({"optimizer.learning_rate": float("nan")}, "config.optimizer.learning_rate: must be in [0, inf)"),
        ({"expert_sharding": "sharded"}, "config.expert_sharding: unknown value 'sharded'; valid: like_student, replicated"),
        ({"sigma_schedule": "karras"}, "config.sigma_schedule: unknown value 'karras'; valid: uniform, flow_match_euler"),
    ],
)  # fmt: skip
def test_value_and_data_problems_are_found_before_training(overrides, message):
    assert _error(load_config(**overrides)).startswith(message)


def test_the_shapes_world_needs_rgb():
    config = load_config()
    config.data.buckets.t2i.kind = "scenes_t2i"
    config.channels = 1
    assert _error(config).startswith("config.channels: the shapes world (bucket 't2i') renders RGB: must be 3, got 1")


def test_pipeline_keys_are_checked_per_stage_and_in_the_evaluation():
    config = load_config("shapes_demo", "quick")
    assert validate_pipeline(config) == ["anchor", "edit_teacher", "student"]
    config.stages.student.optimizer.warmup_step = 1
    with pytest.raises(ConfigError, match=r"^config\.stages\.student\.optimizer\.warmup_step: unknown key; did you mean 'warmup_steps'\?$"):
        validate_pipeline(config)
    config = load_config("shapes_demo", "quick")
    config.evaluation.num_exampels = 4
    with pytest.raises(ConfigError, match=r"^config\.evaluation\.num_exampels: unknown key; did you mean 'num_examples'\?$"):
        validate_pipeline(config)


@pytest.mark.parametrize("name,arg", [("smoke", None), ("shapes_demo", "quick"), ("shapes_composition", "quick")])
def test_shipped_configs_pass(name, arg):
    config = load_config(name, arg)
    validate_pipeline(config) if "stages" in config else validate(config)
