"""Multi-stage runs in one workdir: train experts, distil a student, evaluate capabilities.

A pipeline config has ``stages`` (name -> a full run config) and ``evaluation``. A model spec
whose ``checkpoint`` is ``@NAME`` starts from stage NAME's result (``WORKDIR/NAME``), which fixes
the order. Each stage resumes like any run; a finished stage is reused without being rebuilt.
Evaluation samples every listed model on held-out examples of every listed capability and
writes ``WORKDIR/metrics.json``, ``WORKDIR/metrics.md`` and ``WORKDIR/grids/CAPABILITY.png``; a
pipeline of field-world models (``field_mlp``) is scored exactly instead (``fieldworld.evaluate``:
``WORKDIR/grids/fields.png``).
"""

import copy
import json
import math
import os
import time

from ml_collections import ConfigDict

from danceopd_jax import build, checkpoints
from danceopd_jax.config_lib import run_sigma_schedule
from danceopd_jax.config_validation import FREE_FORM, ConfigError, check_keys, validate
from danceopd_jax.evaluation import capabilities, heldout, metrics
from danceopd_jax.fieldworld.evaluate import CAPABILITIES as FIELD_CAPABILITIES
from danceopd_jax.fieldworld.evaluate import evaluate_fields
from danceopd_jax.sampling import load_trained_model
from danceopd_jax.train import config_changes, shown_changes, train_and_evaluate

STAGE_REF = "@"
FIELD_MODEL = "field_mlp"  # the field world's model kind: its pipelines are scored by fieldworld.evaluate
# A pipeline config's keys (each stage is a run config, checked by ``validate``).
PIPELINE_TEMPLATE = {
    "stages": FREE_FORM,
    "evaluation": dict(models="", capabilities="", num_examples=1, steps=16, cfg_scale=1.0, seed=0),
}


def _model_specs(stage: ConfigDict):
    yield "student", stage.student
    for name, spec in stage.experts.items():
        yield f"experts.{name}", spec


def stage_order(config: ConfigDict) -> list[str]:
    """Stages in dependency order (a stage after every stage it references; ties by name)."""
    needs = {}
    for name, stage in config.stages.items():
        needs[name] = set()
        for key, spec in _model_specs(stage):
            if spec.init == "checkpoint" and spec.checkpoint.startswith(STAGE_REF):
                ref = spec.checkpoint[len(STAGE_REF) :]
                if ref not in config.stages:
                    raise ConfigError(f"config.stages.{name}.{key}.checkpoint: unknown stage {spec.checkpoint!r}")
                needs[name].add(ref)
    order: list[str] = []
    while len(order) < len(needs):
        ready = sorted(n for n in needs if n not in order and needs[n] <= set(order))
        if not ready:
            raise ConfigError(f"config.stages: the stages {sorted(set(needs) - set(order))} reference each other in a cycle")
        order.append(ready[0])
    return order


def resolve_stage(stage: ConfigDict, workdir: str) -> ConfigDict:
    """The stage's config with ``@NAME`` checkpoints turned into ``WORKDIR/NAME``."""
    resolved = copy.deepcopy(stage)
    for _, spec in _model_specs(resolved):
        if spec.checkpoint.startswith(STAGE_REF):
            spec.checkpoint = os.path.join(workdir, spec.checkpoint[len(STAGE_REF) :])
    return resolved


def _names(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def _check_stage_architectures(config: ConfigDict, name: str) -> None:
    """``ConfigError`` for a model of stage ``name`` that starts from a stage (``@REF``) whose student
    has another architecture (``build.architecture_changes``): caught before any stage trains, not
    when the restore into it fails after the stages before it have trained."""
    stage = config.stages[name]
    for key, spec in _model_specs(stage):
        if spec.init == "checkpoint" and spec.checkpoint.startswith(STAGE_REF):
            ref = spec.checkpoint[len(STAGE_REF) :]
            changes = build.architecture_changes(stage, spec, config.stages[ref].to_dict())
            if changes:
                shown = build.shown_architecture_changes(changes, f"config.stages.{name}", key, f"stage {ref!r}")
                raise ConfigError(f"config.stages.{name}.{key}.checkpoint: stage {ref!r} trains a model of another architecture: {shown}")


def validate_stages(config: ConfigDict) -> list[str]:
    """Check every stage's config, and that each model starting from a stage fits its architecture;
    returns the stage order."""
    order = stage_order(config)
    for name in order:
        try:
            validate(resolve_stage(config.stages[name], "/pipeline-workdir"))
        except ConfigError as error:
            raise ConfigError(str(error).replace("config.", f"config.stages.{name}.", 1)) from None
        _check_stage_architectures(config, name)
    return order


def validate_pipeline(config: ConfigDict) -> list[str]:
    """Check every stage and the evaluation section before any training; returns the stage order."""
    check_keys(config, PIPELINE_TEMPLATE)
    order = validate_stages(config)
    evaluation = config.evaluation
    for model in _names(evaluation.models):
        if model not in config.stages:
            raise ConfigError(f"config.evaluation.models: unknown stage {model!r}; valid: {', '.join(order)}")
    fields = _field_models(config)
    for capability in _names(evaluation.capabilities):
        if capability not in (FIELD_CAPABILITIES if fields else heldout.CAPABILITY_BUCKETS):
            valid = ", ".join(FIELD_CAPABILITIES if fields else heldout.CAPABILITY_BUCKETS)
            raise ConfigError(f"config.evaluation.capabilities: unknown capability {capability!r}; valid: {valid}")
    if _names(evaluation.capabilities) and not _names(evaluation.models):
        raise ConfigError(f"config.evaluation.models: name the stages to evaluate on the capabilities; valid: {', '.join(order)}")
    for key, minimum in (("num_examples", 1), ("steps", 1)):
        if evaluation[key] < minimum:
            raise ConfigError(f"config.evaluation.{key}: must be >= {minimum}, got {evaluation[key]}")
    if not 0 <= evaluation.cfg_scale < float("inf"):
        raise ConfigError(f"config.evaluation.cfg_scale: must be a finite number >= 0, got {evaluation.cfg_scale}")
    return order


def evaluate_models(model_dirs: dict[str, str], evaluation: ConfigDict, out_dir: str) -> dict[str, dict[str, float]]:
    """Sample and score trained models (``{name: workdir}``) on every listed capability (``evaluate_loaded``)."""
    return evaluate_loaded({name: load_trained_model(path) for name, path in model_dirs.items()}, evaluation, out_dir)


def evaluate_loaded(loaded: dict, evaluation: ConfigDict, out_dir: str) -> dict[str, dict[str, float]]:
    """Sample and score loaded models (``{name: load_trained_model(...)}``) on every listed capability,
    on examples none of them trained on (``heldout.evaluation_examples``).

    Writes ``OUT_DIR/metrics.json``, ``OUT_DIR/metrics.md`` and ``OUT_DIR/grids/CAPABILITY.png``;
    returns ``{model: {metric: value}}``.
    """
    results: dict[str, dict[str, float]] = {name: {} for name in loaded}
    run_configs = [run_config for run_config, _, _ in loaded.values()]
    os.makedirs(os.path.join(out_dir, "grids"), exist_ok=True)
    for capability in _names(evaluation.capabilities):
        examples = heldout.evaluation_examples(capability, evaluation.num_examples, evaluation.seed, run_configs)
        outputs = {}
        for name, (run_config, graphdef, params) in loaded.items():
            started = time.perf_counter()
            sampling = capabilities.Sampling(
                steps=evaluation.steps,
                shift=run_config.shift,
                sigma_schedule=run_sigma_schedule(run_config),
                cfg_scale=evaluation.cfg_scale,
                seed=evaluation.seed,
            )
            outputs[name] = capabilities.sample_examples(run_config, graphdef, params, examples, sampling)
            results[name].update(capabilities.score(capability, outputs[name], examples))
            print(f"evaluated {name} on {capability}: {len(examples)} samples in {time.perf_counter() - started:.1f}s", flush=True)
        image_size = next(iter(loaded.values()))[0].image_size
        capabilities.comparison_grid(capability, examples, outputs, image_size).save(
            os.path.join(out_dir, "grids", f"{capability}.png")
        )
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, "metrics.md"), "w", encoding="utf-8") as f:
        f.write(metrics_table(results))
    return results


def _field_models(config: ConfigDict) -> bool:
    """Whether the evaluated stages train field-world models (``FIELD_MODEL``)."""
    return any(config.stages[name].student.get("kind") == FIELD_MODEL for name in _names(config.evaluation.models))


def evaluate(config: ConfigDict, workdir: str) -> dict[str, dict]:
    """Evaluate the pipeline's listed stages (``config.evaluation``); outputs go to ``workdir``.
    Field-world models get exact scores with standard errors (``fieldworld.evaluate``)."""
    names = _names(config.evaluation.models)
    model_dirs = {name: os.path.join(workdir, name) for name in names}
    if _field_models(config):
        loaded = {name: load_trained_model(path) for name, path in model_dirs.items()}
        return evaluate_fields(loaded, config.evaluation, _names(config.evaluation.capabilities), workdir)
    return evaluate_models(model_dirs, config.evaluation, workdir)


def metrics_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table (models x metrics) followed by one line per metric saying what it measures.
    A NaN score (no evaluated example of the metric's kind) shows as ``n/a``, explained below it."""
    columns = sorted({key for values in results.values() for key in values})
    scores = [values.get(c) for values in results.values() for c in columns]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for model, values in results.items():
        lines.append(f"| {model} | " + " | ".join(_score_cell(values.get(c)) for c in columns) + " |")
    lines.append("")
    for column in columns:
        capability, name = column.split("/", 1)
        doc = metrics.METRIC_DOCS.get(name.removeprefix("t2i_"), "")
        lines.append(f"- `{column}`: {doc}")
    if any(score is not None and math.isnan(score) for score in scores):
        lines.append("- `n/a`: none of the evaluated examples is of the metric's kind")
    return "\n".join(lines) + "\n"


def _score_cell(score: float | None) -> str:
    return "" if score is None else "n/a" if math.isnan(score) else f"{score:.3f}"


def check_stage_configs(config: ConfigDict, workdir: str, order: list[str] | None = None) -> None:
    """``ConfigError`` for the first stage (in ``order``, default dependency order) whose
    ``WORKDIR/STAGE`` holds checkpoints trained with another config (``train.config_changes``, as a
    resumed run is checked): reusing or resuming it would give a model of the old settings under the
    new ones. Reads only config files and checkpoint step numbers, so it runs before any stage trains."""
    for name in order if order is not None else stage_order(config):
        stage_dir = os.path.join(workdir, name)
        changes = config_changes(resolve_stage(config.stages[name], workdir), stage_dir)
        if changes:
            raise ConfigError(
                f"config.stages.{name}: {stage_dir} holds checkpoints of this stage trained with another config: "
                f"{shown_changes(changes)}; restore those values, or train it anew in another workdir "
                f"(or after removing {stage_dir})"
            )


def train_stages(config: ConfigDict, workdir: str) -> list[str]:
    """Train every stage in dependency order into ``WORKDIR/STAGE``, reusing finished ones; first checks
    that no stage already in ``WORKDIR`` was trained with another config (``check_stage_configs``).
    Returns the stages it trained (the others were reused)."""
    order = validate_stages(config)
    check_stage_configs(config, workdir, order)
    trained = []
    for index, name in enumerate(order, 1):
        stage = resolve_stage(config.stages[name], workdir)
        stage_dir = os.path.join(workdir, name)
        done = checkpoints.latest_step(stage_dir)
        if done is not None and done >= stage.num_train_steps:
            print(f"== stage {index}/{len(order)}: {name} finished earlier (step {done}), reused ==", flush=True)
            continue
        print(f"== stage {index}/{len(order)}: {name} ({stage.method}, {stage.num_train_steps} steps) ==", flush=True)
        train_and_evaluate(stage, stage_dir)
        trained.append(name)
    return trained


def run_pipeline(config: ConfigDict, workdir: str) -> dict[str, dict]:
    """Train the stages, evaluate (``evaluate``: its results) and print ``WORKDIR/metrics.md``."""
    validate_pipeline(config)
    train_stages(config, workdir)
    print("== evaluation ==", flush=True)
    results = evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.md"), encoding="utf-8") as f:
        print(f.read(), flush=True)
    print(f"metrics: {os.path.join(workdir, 'metrics.md')}; grids: {os.path.join(workdir, 'grids')}", flush=True)
    return results
