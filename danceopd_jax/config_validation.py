"""Checks a run config before anything is built or compiled; each problem is one line naming the key.

First the values a config leaves to the command line (``placeholder(str)``, e.g. the paper
configs' ``model_dir``): all unset ones in one line. Then the key tree against
``config_lib.base_config()`` (every key a run reads, with a default whose type is the expected
type): unknown keys (with the nearest valid name), missing keys and value types. Named maps
(``experts``, ``fields``, ``routes``, ``data.buckets``, a field's ``terms``) hold entries of one
known shape each; ``logical_axis_rules`` is free-form (its names are checked against the model's
logical axes by ``parallel.axis_rules``). Then values: ranges, choices, and the references
between models, fields, routes and buckets. A run's model folder (``config.model_dir``, of a
family ``models.backbones`` knows, e.g. SD3) is checked from its JSON files and file headers alone,
no weights read: its components, the condition shape, the student's LoRA
target patterns and the experts' LoRA modules against the transformer's module names, a single
transformer file's naming (``transformer_path``), and a precomputed prompt table's shape and
prompts (``prompt_embeddings``; the folder then needs no text encoders).
"""

import copy
import dataclasses
import difflib
import json
import math
import os
import numbers
from typing import Any

from ml_collections import ConfigDict

from danceopd_jax import checkpoints
from danceopd_jax.config_lib import base_config, expert_field, model_spec
from danceopd_jax.core.objectives import FLOW_MATCHING_TIMES, OBJECTIVES
from danceopd_jax.core.route_weights import SCHEDULES
from danceopd_jax.core.router import ASSIGNMENTS, labelled_count
from danceopd_jax.core.routing import ROUTING_MODES, group_sizes
from danceopd_jax.core.schedule import QUERY_SAMPLERS, SIGMA_SCHEDULES
from danceopd_jax.data.scene_buckets import BUCKET_KINDS as SCENE_KINDS
from danceopd_jax.data.prompt_embeddings import load_table, source_prompts
from danceopd_jax.data.sources import BUCKET_KINDS, make_bucket_source
from danceopd_jax.data.file_buckets import BUCKET_KINDS as IMAGE_FILE_KINDS
from danceopd_jax.data.file_buckets import manifest_options
from danceopd_jax.data.image_files import RESIZE_MODES
from danceopd_jax.data.latent_cache import bucket_pixel_size, pixel_size
from danceopd_jax.data.manifests import ManifestError, checked
from danceopd_jax.data.prompt_files import BUCKET_KINDS as PROMPT_FILE_KINDS
from danceopd_jax.data.prompt_files import PromptFileError, PromptFileSource
from danceopd_jax.fieldworld.data import BUCKET_KINDS as FIELD_BUCKET_KINDS
from danceopd_jax.fieldworld.targets import make_world
from danceopd_jax.models import backbones, folder_vae
from danceopd_jax.models.lora import UnknownLoRATarget
from danceopd_jax.models.weights import WeightsError
from danceopd_jax.models.dit import PRESETS
from danceopd_jax.models.layers import check_attention

FIELD_KINDS = ("expert", "combination")
# a DiT's inits; each backbone family's transformer (``models.backbones``) is loaded from config.model_dir
# and the field world's FieldMLP (``field_mlp``) is trained like a DiT
INIT_KINDS = {
    "dit": ("random", "checkpoint"), "field_mlp": ("random", "checkpoint"),
    **{backbones.family(name).MODEL_KIND: ("pretrained",) for name in backbones.FAMILIES},
}  # fmt: skip
FIELD_CLASSES = make_world().num_prompts  # the field world's prompt ids: T2I classes, local and global edits
LR_DECAYS = ("constant", "cosine")
DTYPES = ("float32", "bfloat16", "float16")
EXPERT_SHARDINGS = ("like_student", "replicated")
ROUTE_TEMPLATE = dict(field="", bucket="", weight=1.0)
# resize, allow_upscale, allow_outside_paths, tasks: image-file buckets only (data/file_buckets.py)
BUCKET_TEMPLATE = dict(kind="", size=1, seed=0, path="", resize="center_crop", allow_upscale=False, allow_outside_paths=False, tasks="")
IMAGE_FILE_KEYS = ("resize", "allow_upscale", "allow_outside_paths", "tasks")


class ConfigError(ValueError):
    """A bad config value; the message is ``config.KEY: problem``."""


class LoRATargetError(ConfigError, UnknownLoRATarget):
    """A student's LoRA target pattern that selects no layer of the model, found before anything is built."""


def _fail(key: str, problem: str):
    raise ConfigError(f"config.{key}: {problem}")


# ---------------------------------------------------------------- the key tree


@dataclasses.dataclass(frozen=True)
class Entries:
    """A named map whose every entry fits ``template`` (a dict, or a leaf default)."""

    template: Any


FREE_FORM = object()  # a map whose keys are checked elsewhere

# Keys that may be left out (``check_keys`` fills in the default): those SD3 support and the field
# world added, so that configs, bucket entries and saved run configs written before them stay valid.
DEFAULTED_KEYS = frozenset(
    {"model_dir", "transformer_path", "prompt_embeddings", "pooled_dim", "path", "kind", "lora_rank", "lora_alpha",
     "lora_targets", "lora_path", "attention", "width", "depth", *IMAGE_FILE_KEYS}
)


def run_template() -> dict:
    """``base_config()`` as a template, with the shapes of the named maps' entries."""
    template = base_config().to_dict()
    template["experts"] = Entries(model_spec().to_dict())
    template["fields"] = Entries({**expert_field(""), "terms": Entries(1.0)})
    template["routes"] = Entries(ROUTE_TEMPLATE)
    template["data"] = {"buckets": Entries(BUCKET_TEMPLATE)}
    template["route_weights"]["end"] = Entries(1.0)
    template["logical_axis_rules"] = FREE_FORM
    return template


def _is_dict(node) -> bool:
    return isinstance(node, (dict, ConfigDict))


def _defaults(template):
    """The value a key missing from a saved config takes: the template's default (a named map: empty)."""
    if isinstance(template, Entries):
        return {}
    if isinstance(template, dict):
        return {name: _defaults(sub) for name, sub in template.items()}
    return copy.deepcopy(template)


def _fill(node, template):
    """``node`` with every key ``template`` has and ``node`` lacks added at its default (in place)."""
    if not isinstance(node, dict):
        return node
    if isinstance(template, Entries):
        for name in node:
            node[name] = _fill(node[name], template.template)
    elif isinstance(template, dict):
        for name, sub in template.items():
            node[name] = _fill(node[name], sub) if name in node else _defaults(sub)
    return node


def with_defaults(run_config) -> dict:
    """A run config (a ConfigDict, or a dict such as a workdir's saved ``config.json``) as a plain JSON
    dict with every key the current code reads and the config lacks filled in with its default.

    A config saved by an older version of the code lacks the keys added since (``attention``,
    ``remat``, ``kind``, ``sigma_schedule``, ``router``, ``dcn_mesh``, ...); a run that saved it ran
    as these defaults say. Comparing two configs completed this way (a finished pipeline stage
    against its config now, a resumed run against the run it resumes) counts a key missing from one
    as a change only where the other's value is not its default."""
    if isinstance(run_config, ConfigDict):
        tree = json.loads(run_config.to_json())
    else:
        tree = json.loads(json.dumps(run_config))
    template = run_template()
    template["logical_axis_rules"] = base_config().logical_axis_rules.to_dict()  # FREE_FORM, with default rules
    return json.loads(json.dumps(_fill(tree, template)))  # defaults' tuples as JSON lists, as saved


def read_run_config(workdir: str) -> ConfigDict:
    """A run's saved config (``checkpoints.load_run_config``) as the current code reads it: the keys
    added since it was saved take their defaults (``with_defaults``), so older workdirs still load."""
    return ConfigDict(with_defaults(checkpoints.load_run_config(workdir)))


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _type_name(default) -> str:
    if isinstance(default, bool):
        return "a bool"
    if isinstance(default, numbers.Integral):
        return "an integer"
    if isinstance(default, numbers.Real):
        return "a number"
    return "a string" if isinstance(default, str) else type(default).__name__


def _fits(value, default) -> bool:
    """Whether ``value`` has the type of ``default`` (an integer is a number; a bool is neither)."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, numbers.Integral):
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if isinstance(default, numbers.Real):
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    return isinstance(value, type(default))


def _add_default(node, name: str, default) -> None:
    """``node[name] = default`` in a dict or a (possibly locked, as config flags leave it) ConfigDict."""
    if isinstance(node, ConfigDict):
        with node.unlocked():
            node[name] = default
    else:
        node[name] = default


def unset_keys(node, template, key: str = "") -> list[str]:
    """The dotted keys under ``key`` that hold ``None`` where ``template`` has a string: values such as
    paths that a config leaves to the command line (``ml_collections.config_dict.placeholder(str)``)."""
    if node is None:
        return [key] if isinstance(template, str) else []
    if not _is_dict(node) or template is FREE_FORM:
        return []
    if isinstance(template, Entries):
        return [k for name in node.keys() for k in unset_keys(node[name], template.template, _join(key, name))]
    if not isinstance(template, dict):
        return []
    return [k for name in node.keys() if name in template for k in unset_keys(node[name], template[name], _join(key, name))]


def check_keys(node, template, key: str = "") -> None:
    """Raise ``ConfigError`` at the first key under ``key`` (dotted, "" = the root) that ``template``
    does not know, lacks, or whose value has another type."""
    if template is FREE_FORM:
        return
    if isinstance(template, Entries):
        if not _is_dict(node):
            _fail(key, f"expected a dict of named entries, got {node!r}")
        for name in node.keys():
            check_keys(node[name], template.template, _join(key, name))
        return
    if isinstance(template, dict):
        if not _is_dict(node):
            _fail(key, f"expected a dict with keys {', '.join(template)}, got {node!r}")
        for name in node.keys():
            if name not in template:
                close = difflib.get_close_matches(name, list(template), n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(template)}"
                _fail(_join(key, name), f"unknown key; {hint}")
        for name, sub in template.items():
            if name not in node and name in DEFAULTED_KEYS and not _is_dict(sub):
                _add_default(node, name, sub)
            if name not in node:
                _fail(_join(key, name), "missing key")
            check_keys(node[name], sub, _join(key, name))
        return
    if not _fits(node, template):
        _fail(key, f"expected {_type_name(template)}, got {node!r}")


# ---------------------------------------------------------------- values


def _get(config: ConfigDict, key: str):
    """The value of a dotted key (``"optimizer.b1"``)."""
    for part in key.split("."):
        config = config[part]
    return config


def _choice(config: ConfigDict, key: str, valid) -> None:
    value = _get(config, key)
    if value not in valid:
        _fail(key, f"unknown value {value!r}; valid: {', '.join(map(str, valid))}")


def _positive_int(config: ConfigDict, key: str, minimum: int = 1) -> None:
    value = _get(config, key)
    if not isinstance(value, int) or value < minimum:
        _fail(key, f"must be an integer >= {minimum}, got {value!r}")


def _in_range(config: ConfigDict, key: str, low: float, high: float = math.inf, *, open_low=False, open_high=True) -> None:
    """The number at ``key`` lies in the interval from ``low`` to ``high`` (open or closed ends); NaN never does."""
    value = _get(config, key)
    too_low = value <= low if open_low else value < low
    too_high = value >= high if open_high else value > high
    if math.isnan(value) or too_low or too_high:
        left, right = "(" if open_low else "[", ")" if open_high else "]"
        _fail(key, f"must be in {left}{low:g}, {high:g}{right}, got {value}")


def _check_compute(key: str, model: ConfigDict) -> None:
    """How a model computes: its dtype, and an attention implementation that runs in it."""
    if model.dtype not in DTYPES:
        _fail(f"{key}.dtype", f"unknown value {model.dtype!r}; valid: {', '.join(DTYPES)}")
    try:
        check_attention("model", model.attention, model.dtype)
    except ValueError as e:
        _fail(f"{key}.attention", str(e).split(" ", 1)[1])  # drop the "model.attention" owner


def _check_folder_model(config: ConfigDict, key: str, model: ConfigDict, is_student: bool) -> None:
    """A model spec of the transformer of ``config.model_dir`` (``models.backbones``): the folder is set and
    of the spec's family, a student trains a LoRA, an expert's LoRA file exists and fits the transformer."""
    if not config.model_dir:
        _fail(f"{key}.kind", f"kind {model.kind!r} is the transformer of config.model_dir, which is not set")
    backbone = backbones.of(config)  # the folder was checked by _check_condition
    if model.kind != backbone.MODEL_KIND:
        _fail(f"{key}.kind", f"config.model_dir is a {backbone.NAME} folder, whose transformer is kind {backbone.MODEL_KIND!r}; "
                             f"got {model.kind!r}")  # fmt: skip
    if model.init != "pretrained":
        _fail(f"{key}.init", f"kind {model.kind!r} loads config.model_dir: must be 'pretrained', got {model.init!r}")
    if model.use_source and not backbone.READS_SOURCE:
        _fail(f"{key}.use_source", f"a {backbone.NAME} transformer reads no source image")
    if model.use_source and not config.condition.use_source:
        _fail(f"{key}.use_source", "the model reads source images but config.condition.use_source is False")
    if is_student and config.condition.use_source and backbone.READS_SOURCE and not model.use_source:
        _fail(f"{key}.use_source", "config.condition.use_source gives edit samples their source image, which this student "
                                   "would ignore: set use_source=True")  # fmt: skip
    _check_compute(key, model)
    if is_student:
        if model.lora_rank < 1:
            _fail(f"{key}.lora_rank", f"an {backbone.NAME} student trains a LoRA over the shared base: must be >= 1, got {model.lora_rank}")
        if not model.lora_targets.strip():
            _fail(f"{key}.lora_targets", "name the layers to adapt, e.g. 'to_q,to_k,to_v,to_out,fc1,fc2'")
        if model.lora_path:
            _fail(f"{key}.lora_path", "a student's LoRA is trained from scratch; lora_path is for experts")
        try:
            backbones.check_lora_targets(backbone, config.model_dir, model.lora_targets)
        except UnknownLoRATarget as e:
            raise LoRATargetError(f"config.{key}.lora_targets: {e}") from None
    else:
        if model.lora_rank or model.lora_targets:
            _fail(f"{key}.lora_rank", "an expert's LoRA comes from its lora_path file; leave lora_rank and lora_targets unset")
        if model.lora_path and not os.path.exists(model.lora_path):
            _fail(f"{key}.lora_path", f"no such LoRA file or folder: {model.lora_path}")
        if model.lora_path:
            try:
                backbones.check_lora_file(backbone, config.model_dir, model.lora_path)
            except ValueError as e:  # unreadable, not LoRA factors, or modules the transformer lacks
                _fail(f"{key}.lora_path", str(e))
    _in_range(config, f"{key}.lora_alpha", 0.0)


def _check_field_model(config: ConfigDict, key: str, model: ConfigDict) -> None:
    """A ``field_mlp`` reads a point, a label and an edit source: no prompt embedding."""
    _positive_int(config, f"{key}.width")
    _positive_int(config, f"{key}.depth", minimum=0)
    if config.condition.text_dim:
        _fail("condition.text_dim", f"{key} is a field_mlp, which reads labels, not prompt embeddings: must be 0, got {config.condition.text_dim}")
    if config.condition.num_classes < 1:
        _fail("condition.num_classes", f"{key} is a field_mlp, which embeds a label: must be >= 1, got {config.condition.num_classes}")


def _check_dit(config: ConfigDict, key: str, model: ConfigDict) -> None:
    if model.preset not in PRESETS:
        _fail(f"{key}.preset", f"unknown preset {model.preset!r}; valid: {', '.join(PRESETS)}")
    _check_compute(key, model)
    if model.patch_size < 1:
        _fail(f"{key}.patch_size", f"must be >= 1, got {model.patch_size}")
    if config.image_size % model.patch_size:
        _fail(f"{key}.patch_size", f"image_size {config.image_size} is not divisible by patch size {model.patch_size}")


def _check_model(config: ConfigDict, key: str, model: ConfigDict, is_student: bool = False) -> None:
    _choice(config, f"{key}.kind", INIT_KINDS)
    if model.kind not in ("dit", "field_mlp"):
        return _check_folder_model(config, key, model, is_student)
    if config.model_dir:
        _fail(f"{key}.kind", f"with config.model_dir set, every model is that folder's transformer: use kind {backbones.of(config).MODEL_KIND!r}")
    if model.lora_rank or model.lora_path or model.lora_targets:
        _fail(f"{key}.lora_rank", "LoRA is for the transformers of config.model_dir (e.g. kind 'mmdit'), not a DiT")
    if model.kind == "field_mlp":
        _check_field_model(config, key, model)
    else:
        _check_dit(config, key, model)
    if model.init not in INIT_KINDS["dit"]:
        _fail(f"{key}.init", f"unknown value {model.init!r}; valid: {', '.join(INIT_KINDS['dit'])}")
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
        if not 0 <= field.cfg_scale < math.inf:
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
        if not 0 <= route.weight < math.inf:
            _fail(f"{key}.weight", f"must be >= 0, got {route.weight}")
        weights.append(route.weight)
        if config.method == "flow_matching":
            continue
        if route.field not in config.fields:
            _fail(f"{key}.field", f"unknown field {route.field!r}; valid: {', '.join(config.fields) or '(none)'}")
        if config.fields[route.field].needs_source:
            if "source" not in BUCKET_KINDS[config.data.buckets[route.bucket].kind]:
                _fail(f"{key}.bucket", f"field {route.field!r} needs source images but bucket {route.bucket!r} has none")
    if sum(weights) <= 0:
        _fail("routes", "route weights are all zero")
    if config.routing in ("per_sample", "soft"):
        sizes = group_sizes(config.batch_size, weights)
        starved = [name for (name, route), size in zip(config.routes.items(), sizes) if route.weight > 0 and size == 0]
        if starved:
            _fail("batch_size", f"routing {config.routing!r} splits the batch of {config.batch_size} by route weight into "
                                f"{sizes}: route(s) {', '.join(starved)} get no sample; raise batch_size")  # fmt: skip


def _bucket_records(config: ConfigDict, name: str) -> int:
    """The records a (checked) bucket holds: its size, or for size 0 a whole prompt file's prompts or manifest's examples."""
    bucket = config.data.buckets[name]
    if bucket.kind in IMAGE_FILE_KINDS:
        return len(_checked_examples(config, name))
    return len(PromptFileSource(bucket.path, bucket.size)) if bucket.kind in PROMPT_FILE_KINDS else bucket.size


def _check_router(config: ConfigDict) -> None:
    """``routing == "learned"``: a distillation method, a condition the router can read, sane training."""
    if config.method == "flow_matching":
        _fail("routing", "'learned' routes samples to expert fields; method 'flow_matching' has none")
    if not (config.condition.text_dim > 0 or config.condition.use_source):
        _fail("routing", "'learned' reads the prompt embedding or the source flag; config.condition has neither")
    _choice(config, "router.assign", ASSIGNMENTS)
    _in_range(config, "router.label_fraction", 0.0, 1.0, open_low=True, open_high=False)
    for key in ("hidden", "train_steps", "heldout"):
        _positive_int(config, f"router.{key}")
    _in_range(config, "router.learning_rate", 0.0, open_low=True)
    _in_range(config, "router.weight_decay", 0.0)
    pool = sum(_bucket_records(config, route.bucket) for route in config.routes.values())
    labelled = labelled_count(pool, config.router.label_fraction, config.router.heldout)
    if labelled < 1:
        _fail("router.label_fraction", f"leaves {labelled} labelled records of a pool of {pool} ({config.router.heldout} held out)")


def _check_route_weights(config: ConfigDict) -> None:
    """Non-fixed schedules reweight per-step routes; their own parameters in range."""
    _choice(config, "route_weights.schedule", SCHEDULES)
    _in_range(config, "route_weights.floor", 0.0, 1.0, open_low=True, open_high=False)
    _in_range(config, "route_weights.temperature", 0.0, open_low=True)
    _in_range(config, "route_weights.ema_decay", 0.0, 1.0)
    w = config.route_weights
    if w.schedule == "fixed":
        return
    if config.routing != "per_step":
        _fail("route_weights.schedule", f"{w.schedule!r} reweights the route drawn each step; needs routing 'per_step', got {config.routing!r}")
    if w.schedule == "adaptive":
        return
    _positive_int(config, "route_weights.curriculum_steps")
    if set(w.end) != set(config.routes):
        _fail("route_weights.end", f"needs one weight per route ({', '.join(config.routes)}), got {', '.join(w.end) or 'none'}")
    for name, weight in w.end.items():
        _in_range(config, f"route_weights.end.{name}", 0.0)
    if sum(w.end.values()) <= 0:
        _fail("route_weights.end", "weights are all zero")


def _check_buckets(config: ConfigDict) -> None:
    """Kinds, sizes, and that the condition spec reads every field a bucket's records carry."""
    c = config.condition
    readers = {  # record field -> (the condition key that reads it, whether it does)
        "prompt": ("condition.text_dim", c.text_dim > 0),
        "source": ("condition.use_source", c.use_source),
        "label": ("condition.num_classes", c.num_classes > 0),
    }
    for name, bucket in config.data.buckets.items():
        key = f"data.buckets.{name}"
        if bucket.kind not in BUCKET_KINDS:
            _fail(f"{key}.kind", f"unknown value {bucket.kind!r}; valid: {', '.join(BUCKET_KINDS)}")
        reads_file = bucket.kind in PROMPT_FILE_KINDS or bucket.kind in IMAGE_FILE_KINDS
        if bucket.size < 1 and not (reads_file and bucket.size == 0):  # size 0: a file's every prompt or example
            minimum = "0 (the whole file)" if reads_file else "1 (an empty bucket has nothing to draw)"
            _fail(f"{key}.size", f"must be >= {minimum}, got {bucket.size}")
        _positive_int(config, f"{key}.seed", minimum=0)
        if bucket.kind in FIELD_BUCKET_KINDS:
            _check_field_bucket(config, name)
        unread = sorted(f for f in BUCKET_KINDS[bucket.kind] if f != "image" and not readers[f][1])
        if unread:
            _fail(f"{key}.kind", f"{bucket.kind!r} records carry {unread[0]!r}, which config.{readers[unread[0]][0]} turns off")
        if reads_file != bool(bucket.path):
            _fail(f"{key}.path", f"kind {bucket.kind!r} " + ("reads a file: set path" if bucket.path == "" else "reads no file"))
        _check_image_file_keys(config, name)
        if bucket.kind in PROMPT_FILE_KINDS:
            try:
                PromptFileSource(bucket.path, bucket.size)
            except PromptFileError as e:
                _fail(f"{key}.path", str(e))
        if bucket.kind in SCENE_KINDS and config.channels != 3:
            _fail("channels", f"the shapes world (bucket {name!r}) renders RGB: must be 3, got {config.channels}")


def _check_field_bucket(config: ConfigDict, name: str) -> None:
    """A field-world bucket holds points (images of one pixel, ``channels`` = D >= 2) labelled by
    the world's prompt ids (``fieldworld.data``)."""
    kind = config.data.buckets[name].kind
    if config.image_size != 1:
        _fail("image_size", f"the field world's points (bucket {name!r}, kind {kind!r}) are images of size 1, got {config.image_size}")
    if config.channels < 2:
        _fail("channels", f"the field world (bucket {name!r}) has points of D >= 2 numbers, got {config.channels}")
    if config.condition.num_classes != FIELD_CLASSES:
        _fail("condition.num_classes", f"the field world (bucket {name!r}) has {FIELD_CLASSES} prompt ids, got {config.condition.num_classes}")


def _check_image_file_keys(config: ConfigDict, name: str) -> None:
    """The keys of image-file buckets: set only on them; pixels of 3 channels for a DiT, latents of the
    folder's VAE for a run on a model folder (``_check_vae``)."""
    bucket, key = config.data.buckets[name], f"data.buckets.{name}"
    if bucket.kind not in IMAGE_FILE_KINDS:
        for option in IMAGE_FILE_KEYS:
            if bucket[option] != BUCKET_TEMPLATE[option]:
                _fail(f"{key}.{option}", f"kind {bucket.kind!r} reads no image files; {option} is for kinds {', '.join(IMAGE_FILE_KINDS)}")
        return
    _choice(config, f"{key}.resize", RESIZE_MODES)
    if config.model_dir:
        _check_vae(config, name)
    elif config.channels != 3:
        _fail("channels", f"image files (bucket {name!r}) are read as RGB: must be 3, got {config.channels}")


def _check_vae(config: ConfigDict, name: str) -> None:
    """A model folder run's image bucket ``name`` is encoded by the folder's VAE (``data.latent_cache``):
    its config is one we run, it reads RGB and gives the run's latent channels."""
    try:
        c = folder_vae.vae_config(config.model_dir)
    except ValueError as e:
        _fail("model_dir", f"{config.model_dir}/vae (it encodes image bucket {name!r}): {e}")
    if c.in_channels != 3:
        _fail("model_dir", f"{config.model_dir}/vae/config.json has in_channels {c.in_channels}; image files (bucket {name!r}) are RGB")
    if c.latent_channels != config.channels:
        _fail("channels", f"{config.channels} latent channels, but {config.model_dir}/vae/config.json encodes image bucket "
                          f"{name!r} into latent_channels {c.latent_channels}")  # fmt: skip


def _checked_examples(config: ConfigDict, name: str):
    """The checked examples of the image-file bucket ``name`` (``data.manifests``: every file decoded once per
    process), at the size the run reads them (``latent_cache.pixel_size``)."""
    size = pixel_size(config)
    try:
        return checked(manifest_options(config.data.buckets[name], size))
    except ManifestError as e:
        read_as = f" (a run on config.model_dir reads images at image_size {config.image_size} x the VAE's {size // config.image_size} = {size} px)"
        _fail(f"data.buckets.{name}.path", str(e) + (read_as if config.model_dir else ""))


def _check_image_files(config: ConfigDict) -> None:
    """Every image-file bucket's manifest and images; last, as it decodes every image (first where the
    prompts of a model folder run are checked: ``_prompt_sources``)."""
    for name, bucket in config.data.buckets.items():
        if bucket.kind in IMAGE_FILE_KINDS:
            _checked_examples(config, name)


def _check_condition(config: ConfigDict) -> None:
    c = config.condition
    for key in ("text_len", "text_dim", "num_classes", "pooled_dim"):
        _positive_int(config, f"condition.{key}", minimum=0)
    if (c.text_len > 0) != (c.text_dim > 0):
        _fail("condition.text_len", f"text_len and text_dim must both be 0 or both > 0, got {c.text_len} and {c.text_dim}")
    if c.pooled_dim and not c.text_dim:
        _fail("condition.pooled_dim", "a pooled prompt embedding needs text (text_dim > 0)")
    if config.model_dir:
        try:
            backbone = backbones.of(config)
            backbone.pipeline_components(config.model_dir, text_encoders=False)
            backbone.check_condition(config.model_dir, c.text_len, c.text_dim, c.pooled_dim)
            channels = backbone.latent_channels(config.model_dir)
        except ValueError as e:
            _fail("model_dir", str(e))
        _check_latent_channels(config, *channels)
        if not config.prompt_embeddings:  # the run encodes its prompts with the folder's text encoders
            try:
                backbone.pipeline_components(config.model_dir)
            except ValueError as e:
                _fail("model_dir", f"{e}; or give prompts encoded beforehand as config.prompt_embeddings")


def _check_latent_channels(config: ConfigDict, channels_in: int, channels_out: int) -> None:
    """A model folder run's ``channels`` are its latent channels: the folder transformer's in and out
    channels, else the first step fails to compile with a shape error."""
    for name, value in (("in_channels", channels_in), ("out_channels", channels_out)):
        if value != config.channels:
            _fail("channels", f"{config.channels} latent channels, but {config.model_dir}/transformer/config.json has "
                              f"{name} {value}: set config.channels={value}")  # fmt: skip


def _check_transformer_path(config: ConfigDict) -> None:
    """A single transformer file: with a folder to take the rest from, present, in a naming we read."""
    path = config.transformer_path
    if not path:
        return
    if not config.model_dir:
        _fail("transformer_path", "replaces the transformer weights of config.model_dir, which is not set")
    if not os.path.isfile(path):
        _fail("transformer_path", f"no such file: {path}")
    try:
        backbones.of(config).check_transformer_file(path)
    except ValueError as e:
        _fail("transformer_path", str(e))


def _check_prompt_embeddings(config: ConfigDict) -> None:
    """A precomputed table: a model folder run's, readable, at the condition's shape, with every prompt of the
    buckets (``data.prompt_embeddings.source_prompts``) and the empty prompt (the CFG null)."""
    path = config.prompt_embeddings
    if not path:
        return
    if not config.model_dir:
        _fail("prompt_embeddings", "precomputed prompt embeddings are the text condition of a run on a model folder; config.model_dir is not set")
    if not os.path.isfile(path):
        _fail("prompt_embeddings", f"no such file: {path}")
    try:
        table = load_table(path)
    except WeightsError as e:
        _fail("prompt_embeddings", str(e))
    c = config.condition
    segments = backbones.of(config).TEXT_SEGMENTS_LEN
    show_segments = segments or table.text_segments_len  # a family whose text has segments (Z-Image's edit template)
    got = f"text {list(table.text_shape)}, pooled [{table.pooled_dim}]" + (f", text_segments [{table.text_segments_len}]" if show_segments else "")
    want = f"text [{c.text_len}, {c.text_dim}], pooled [{c.pooled_dim}]" + (f", text_segments [{segments}]" if show_segments else "")
    if got != want:
        _fail("prompt_embeddings", f"{path} holds {got} embeddings; config.condition needs {want} (and the model folder's encoding)")
    _check_table_encoders(config, table)
    sources = _prompt_sources(config)
    for template, what in (("t2i", "prompts"), ("edit", "edit instructions")):
        prompts = source_prompts(sources, template)
        missing = table.missing(["", *prompts], template) if template == "t2i" or prompts else []
        if missing:
            first = "the empty prompt (the CFG null)" if missing[0] == "" else repr(missing[0])
            _fail(
                "prompt_embeddings",
                f"{path} lacks {len(missing)} of the run's {what}, first {first}; "
                "encode them with python -m danceopd_jax.encode_prompts",
            )


def _prompt_sources(config: ConfigDict) -> list:
    """The sources of the buckets whose records carry prompts (records read here: a prompt file's lines;
    image files are checked first, ``_check_image_files``)."""
    _check_image_files(config)
    c, size = config.condition, bucket_pixel_size(config)
    return [make_bucket_source(b, config.image_size, config.channels, c.num_classes, size) for b in config.data.buckets.values() if "prompt" in BUCKET_KINDS[b.kind]]


def _check_prompt_lengths(config: ConfigDict) -> None:
    """A run that encodes its prompts with the folder's text encoders: every prompt and edit instruction
    fits ``condition.text_len`` as the family encodes it (the backbone's ``check_prompts``, e.g. Z-Image's
    tokenizer only; a prompt too long is refused, not cut)."""
    if not config.model_dir or config.prompt_embeddings:
        return
    sources = _prompt_sources(config)
    prompts, edit_prompts = (source_prompts(sources, template) for template in ("t2i", "edit"))
    try:
        backbones.of(config).check_prompts(config.model_dir, prompts, config.condition.text_len, edit_prompts)
    except ValueError as e:
        _fail("condition.text_len", str(e))


def _check_training_samples(config: ConfigDict) -> None:
    """``sample_every`` >= 0 and ``samples_per_route`` >= 1; samples are images of a DiT run in RGB or
    grey pixels (a model folder run's are latents: sample it with ``python -m danceopd_jax.sample``)."""
    _positive_int(config, "sample_every", minimum=0)
    _positive_int(config, "samples_per_route")
    if config.sample_every and config.model_dir:
        _fail("sample_every", "training samples are drawn for DiT runs; a run on config.model_dir makes latents: "
                              "sample its checkpoints with python -m danceopd_jax.sample")  # fmt: skip
    if config.sample_every and config.channels not in (1, 3):
        _fail("sample_every", f"training samples are shown as images, which need 1 or 3 channels; config.channels is {config.channels}")


def _check_table_encoders(config: ConfigDict, table) -> None:
    """A table ``encode_prompts`` wrote records which text encoders encoded it (the backbone's
    ``TEXT_ENCODERS``); where the run's folder has text encoders too, they must be those (its
    ``text_encoders_digest``: e.g. file names, sizes and sampled contents).
    A folder without them, or a table that records nothing, cannot be checked."""
    backbone = backbones.of(config)
    recorded = table.metadata.get(backbone.TEXT_ENCODERS)
    if not recorded:
        return
    try:
        here = backbone.text_encoders_digest(config.model_dir)
    except ValueError:  # the folder lacks its text encoders: nothing to compare with
        return
    if here != recorded:
        _fail("prompt_embeddings", f"{config.prompt_embeddings} was encoded by other text encoders than {config.model_dir}'s "
                                   "(their files differ); encode the prompts with this folder")  # fmt: skip


def _check_optimizer(config: ConfigDict) -> None:
    _choice(config, "optimizer.decay", LR_DECAYS)
    _in_range(config, "optimizer.learning_rate", 0.0)
    _positive_int(config, "optimizer.warmup_steps", minimum=0)
    _in_range(config, "optimizer.weight_decay", 0.0)
    _in_range(config, "optimizer.grad_clip", 0.0, open_low=True)
    for key in ("b1", "b2", "ema_decay"):
        _in_range(config, f"optimizer.{key}", 0.0, 1.0)


def _check_flowopd(config: ConfigDict) -> None:
    _in_range(config, "flowopd.eta", 0.0, open_low=True)
    _in_range(config, "flowopd.advantage_clip", 0.0, open_low=True)
    _in_range(config, "flowopd.ppo_clip", 0.0, 1.0, open_low=True)


def validate(config: ConfigDict) -> None:
    """Raise ``ConfigError`` on the first problem found."""
    template = run_template()
    unset = unset_keys(config, template)
    if unset:
        keys = ", ".join(f"config.{k}" for k in unset)
        raise ConfigError(f"{keys}: not set; required, give each as --config.KEY=VALUE")
    check_keys(config, template)
    for key, valid in (("method", OBJECTIVES), ("routing", ROUTING_MODES), ("query_sampler", QUERY_SAMPLERS),
                       ("sigma_schedule", SIGMA_SCHEDULES), ("fm_time_sampler", FLOW_MATCHING_TIMES),
                       ("expert_sharding", EXPERT_SHARDINGS)):  # fmt: skip
        _choice(config, key, valid)
    for key in ("rollout_steps", "queries_per_rollout", "batch_size", "grad_accum_steps", "image_size", "channels",
                "log_every", "checkpoint_every", "keep_checkpoints"):  # fmt: skip
        _positive_int(config, key)
    if config.batch_size % config.grad_accum_steps:
        _fail("grad_accum_steps", f"{config.grad_accum_steps} microbatches do not divide batch_size {config.batch_size}")
    _positive_int(config, "num_train_steps", minimum=0)
    _positive_int(config, "seed", minimum=0)
    _check_training_samples(config)
    _in_range(config, "shift", 0.0, open_low=True)
    _in_range(config, "condition_dropout", 0.0, 1.0)
    _check_condition(config)
    _check_transformer_path(config)
    _check_optimizer(config)
    _check_flowopd(config)
    _check_buckets(config)
    _check_prompt_embeddings(config)
    _check_prompt_lengths(config)
    _check_model(config, "student", config.student, is_student=True)
    for name, expert in config.experts.items():
        _check_model(config, f"experts.{name}", expert)
    _check_fields(config)
    _check_routes(config)
    if config.routing == "learned":
        _check_router(config)
    _check_route_weights(config)
    if config.method in ("offpolicy", "flow_matching"):
        for name, route in config.routes.items():
            if "image" not in BUCKET_KINDS[config.data.buckets[route.bucket].kind]:
                _fail(f"routes.{name}.bucket", f"method {config.method!r} needs dataset images; bucket {route.bucket!r} has none")
    _check_image_files(config)
