"""Checks a run config before anything is built or compiled; each problem is one line naming the key."""

from ml_collections import ConfigDict

from danceopd_jax.core.objectives import FLOW_MATCHING_TIMES, OBJECTIVES
from danceopd_jax.core.routing import ROUTING_MODES
from danceopd_jax.core.schedule import QUERY_SAMPLERS
from danceopd_jax.data.sources import BUCKET_KINDS
from danceopd_jax.models.dit import PRESETS

FIELD_KINDS = ("expert", "combination")
INIT_KINDS = ("random", "checkpoint")


class ConfigError(ValueError):
    """A bad config value; the message is ``config.KEY: problem``."""


def _fail(key: str, problem: str):
    raise ConfigError(f"config.{key}: {problem}")


def _choice(config: ConfigDict, key: str, valid) -> None:
    value = config[key]
    if value not in valid:
        _fail(key, f"unknown value {value!r}; valid: {', '.join(map(str, valid))}")


def _positive_int(config: ConfigDict, key: str, minimum: int = 1) -> None:
    value = config[key]
    if not isinstance(value, int) or value < minimum:
        _fail(key, f"must be an integer >= {minimum}, got {value!r}")


def _check_model(config: ConfigDict, key: str, model: ConfigDict) -> None:
    if model.preset not in PRESETS:
        _fail(f"{key}.preset", f"unknown preset {model.preset!r}; valid: {', '.join(PRESETS)}")
    if config.image_size % model.patch_size:
        _fail(f"{key}.patch_size", f"image_size {config.image_size} is not divisible by patch size {model.patch_size}")
    if model.init not in INIT_KINDS:
        _fail(f"{key}.init", f"unknown value {model.init!r}; valid: {', '.join(INIT_KINDS)}")
    if model.init == "checkpoint" and not model.checkpoint:
        _fail(f"{key}.checkpoint", "init='checkpoint' needs a workdir path")
    if model.use_source and not config.condition.use_source:
        _fail(f"{key}.use_source", "the model reads source images but config.condition.use_source is False")


def _check_terms(config: ConfigDict, field_name: str, seen: tuple[str, ...] = ()) -> None:
    """A combination's terms name existing fields, with no cycle through combinations."""
    if field_name in seen:
        _fail(f"fields.{field_name}", f"combination cycle through {' -> '.join(seen + (field_name,))}")
    if field_name not in config.fields:
        _fail(f"fields.{seen[-1]}.terms", f"unknown field {field_name!r}; valid: {', '.join(config.fields)}")
    field = config.fields[field_name]
    if field.kind == "combination":
        for term in field.terms:
            _check_terms(config, term, seen + (field_name,))


def _check_fields(config: ConfigDict) -> None:
    for name, field in config.fields.items():
        key = f"fields.{name}"
        if field.kind not in FIELD_KINDS:
            _fail(f"{key}.kind", f"unknown value {field.kind!r}; valid: {', '.join(FIELD_KINDS)}")
        if field.kind == "expert" and field.expert not in config.experts:
            _fail(f"{key}.expert", f"unknown expert {field.expert!r}; valid: {', '.join(config.experts) or '(none)'}")
        if field.kind == "combination" and not field.terms:
            _fail(f"{key}.terms", "a combination needs at least one term")
        if field.get("cfg_scale", 1.0) < 0:
            _fail(f"{key}.cfg_scale", f"must be >= 0, got {field.cfg_scale}")
        _check_terms(config, name)


def _check_routes(config: ConfigDict) -> None:
    if not config.routes:
        _fail("routes", "at least one route is needed")
    weights = []
    for name, route in config.routes.items():
        key = f"routes.{name}"
        if route.bucket not in config.data.buckets:
            _fail(f"{key}.bucket", f"unknown bucket {route.bucket!r}; valid: {', '.join(config.data.buckets)}")
        if route.weight < 0:
            _fail(f"{key}.weight", f"must be >= 0, got {route.weight}")
        weights.append(route.weight)
        if config.method == "flow_matching":
            continue
        if route.field not in config.fields:
            _fail(f"{key}.field", f"unknown field {route.field!r}; valid: {', '.join(config.fields) or '(none)'}")
        if config.fields[route.field].get("needs_source", False):
            if "source" not in BUCKET_KINDS[config.data.buckets[route.bucket].kind]:
                _fail(f"{key}.bucket", f"field {route.field!r} needs source images but bucket {route.bucket!r} has none")
    if sum(weights) <= 0:
        _fail("routes", "route weights are all zero")


def _check_flowopd(options: ConfigDict) -> None:
    if not options.eta > 0:
        _fail("flowopd.eta", f"must be > 0, got {options.eta}")
    if not options.advantage_clip > 0:
        _fail("flowopd.advantage_clip", f"must be > 0, got {options.advantage_clip}")
    if not 0.0 < options.ppo_clip < 1.0:
        _fail("flowopd.ppo_clip", f"must be in (0, 1), got {options.ppo_clip}")


def validate(config: ConfigDict) -> None:
    """Raise ``ConfigError`` on the first problem found."""
    _choice(config, "method", OBJECTIVES)
    _choice(config, "routing", ROUTING_MODES)
    _choice(config, "query_sampler", QUERY_SAMPLERS)
    _choice(config, "fm_time_sampler", FLOW_MATCHING_TIMES)
    _positive_int(config, "rollout_steps")
    _positive_int(config, "queries_per_rollout")
    _positive_int(config, "batch_size")
    _positive_int(config, "num_train_steps", minimum=0)
    _positive_int(config, "image_size")
    if config.shift <= 0:
        _fail("shift", f"must be > 0, got {config.shift}")
    if not 0.0 <= config.condition_dropout < 1.0:
        _fail("condition_dropout", f"must be in [0, 1), got {config.condition_dropout}")
    _check_flowopd(config.flowopd)
    for name, bucket in config.data.buckets.items():
        if bucket.kind not in BUCKET_KINDS:
            _fail(f"data.buckets.{name}.kind", f"unknown value {bucket.kind!r}; valid: {', '.join(BUCKET_KINDS)}")
        if bucket.size < 1:
            _fail(f"data.buckets.{name}.size", f"must be >= 1, got {bucket.size}")
    _check_model(config, "student", config.student)
    for name, expert in config.experts.items():
        _check_model(config, f"experts.{name}", expert)
    _check_fields(config)
    _check_routes(config)
    if config.method in ("offpolicy", "flow_matching"):
        for name, route in config.routes.items():
            if "image" not in BUCKET_KINDS[config.data.buckets[route.bucket].kind]:
                _fail(f"routes.{name}.bucket", f"method {config.method!r} needs dataset images; bucket {route.bucket!r} has none")
