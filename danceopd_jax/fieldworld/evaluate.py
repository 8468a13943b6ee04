"""Exact evaluation of trained field-world models (a pipeline's ``evaluation`` for field runs).

Every listed model draws ``num_examples`` samples per capability by Euler over ``steps`` steps of
its run's sigma grid (CFG at ``cfg_scale``, the null of ``core.conditioning.unconditional``), from
the same noise and conditions for every model; the conditions are fresh draws (``seed``), not the
records any model trained on. Scores (``scores``), each a mean with its standard error:

  t2i          labels cycling over the classes: ``nll``, ``energy`` (against as many exact samples),
               ``mode_tv`` / ``stray`` (per class, averaged; the standard error over the classes)
  realism      the same labels under the realism target: ``nll``, ``energy``
  local_edit   sources from the unconditional T2I mixture, the two local edits alternating:
               ``hits`` (``scores.edit_hits``), ``mode_hits``, ``nll``
  global_edit  the same sources, the global edits cycling: ``hits``, ``nll``

Writes ``OUT_DIR/metrics.json`` (``{model: {"CAPABILITY/SCORE": [mean, stderr]}}``),
``OUT_DIR/metrics.md`` and ``OUT_DIR/grids/fields.png`` (``plots.scatter_grid``: a row per
capability, the exact target then each model).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from danceopd_jax.config_lib import run_sigma_schedule
from danceopd_jax.core.fields import cfg_field, model_field
from danceopd_jax.core.rollout import sample
from danceopd_jax.core.schedule import sigma_grid
from danceopd_jax.fieldworld import plots, scores
from danceopd_jax.fieldworld.targets import FieldWorld, make_world, sample_targets

CAPABILITIES = ("t2i", "realism", "local_edit", "global_edit")
TITLES = {"t2i": "T2I", "realism": "realism", "local_edit": "local edit", "global_edit": "global edit"}
SCORE_DOCS = {
    "nll": "mean negative log-likelihood (nats) under the exact target density; lower is better (exact samples: the target's entropy)",
    "energy": "energy distance to exact samples of the same conditions; 0 iff the laws agree",
    "mode_tv": "total variation between the class's mode shares and its mode weights, averaged over classes",
    "stray": "share of samples outside the 99.9% ellipse of their mode (exact samples: 0.001)",
    "hits": "share of edits inside the 99% ball of their exact target",
    "mode_hits": "share of local edits that land in the intended neighbouring mode",
}


def conditions(world: FieldWorld, capability: str, n: int, key: jax.Array) -> dict:
    """``n`` conditions of ``capability`` (module docstring); edit sources drawn from ``key``."""
    if capability in ("t2i", "realism"):
        return {"label": jnp.asarray(np.arange(n) % world.num_classes, jnp.int32)}
    labels = world.local_edit_labels if capability == "local_edit" else world.global_edit_labels
    classes = jnp.asarray(np.arange(n) % world.num_classes, jnp.int32)
    sources = sample_targets(world, key, {"label": classes}).reshape(n, 1, 1, world.dim)
    return {"label": jnp.asarray(np.resize(labels, n), jnp.int32), "source": sources, "source_mask": jnp.ones((n,), bool)}


def capability_scores(world: FieldWorld, capability: str, samples, cond: dict, target) -> dict[str, scores.Estimate]:
    """The scores of ``capability`` (module docstring) of ``samples`` against exact ``target`` samples."""
    realism = capability == "realism"
    result = {"nll": scores.nll(world, samples, cond, realism), "energy": scores.energy_distance(samples, target)}
    if capability == "t2i":
        labels = np.asarray(cond["label"])
        shares = [scores.mode_shares(world, samples[labels == c], c) for c in range(world.num_classes)]
        result["mode_tv"] = scores.mean_estimate([s.total_variation for s in shares])
        result["stray"] = scores.mean_estimate([s.stray for s in shares])
    if capability in ("local_edit", "global_edit"):
        result["hits"] = scores.mean_estimate(scores.edit_hits(world, samples, cond))
    if capability == "local_edit":
        result["mode_hits"] = scores.mean_estimate(scores.local_edit_mode_hits(world, samples, cond))
    return result


def evaluate_fields(loaded: dict, evaluation: ConfigDict, capabilities: list[str], out_dir: str) -> dict[str, dict[str, scores.Estimate]]:
    """Sample and score loaded field models (``{name: sampling.load_trained_model(...)}``) on
    ``capabilities``; writes the module docstring's files and returns ``{model: {"CAPABILITY/SCORE": estimate}}``."""
    run_config = next(iter(loaded.values()))[0]
    world = make_world(run_config.channels)
    n = evaluation.num_examples
    results: dict[str, dict[str, scores.Estimate]] = {name: {} for name in loaded}
    panels = []
    for index, capability in enumerate(capabilities):
        source_key, target_key, noise_key = jax.random.split(jax.random.fold_in(jax.random.key(evaluation.seed), index), 3)
        cond = conditions(world, capability, n, source_key)
        target = sample_targets(world, target_key, cond, realism=capability == "realism").reshape(n, 1, 1, world.dim)
        noise = jax.random.normal(noise_key, (n, 1, 1, world.dim))
        drawn = {}
        for name, (config, graphdef, params) in loaded.items():
            sigmas = sigma_grid(evaluation.steps, config.shift, run_sigma_schedule(config))
            field = cfg_field(model_field(graphdef, params), evaluation.cfg_scale)
            drawn[name] = jax.jit(lambda noise, cond: sample(field, noise, sigmas, cond))(noise, cond)
            for score, estimate in capability_scores(world, capability, drawn[name], cond, target).items():
                results[name][f"{capability}/{score}"] = estimate
        sources = cond.get("source")
        panels.append(plots.Panel(TITLES[capability], np.asarray(target), {k: np.asarray(v) for k, v in drawn.items()}, sources))
    os.makedirs(os.path.join(out_dir, "grids"), exist_ok=True)
    plots.scatter_grid(world, panels, os.path.join(out_dir, "grids", "fields.png"))
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump({name: {k: list(v) for k, v in values.items()} for name, values in results.items()}, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, "metrics.md"), "w", encoding="utf-8") as f:
        f.write(metrics_table(results, n))
    return results


def metrics_table(results: dict[str, dict[str, scores.Estimate]], n: int) -> str:
    """A Markdown table (models x scores, ``mean +- stderr``), then one line per score saying what it measures."""
    columns = list(next(iter(results.values())))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for model, values in results.items():
        lines.append(f"| {model} | " + " | ".join(f"{values[c].mean:.3f} ± {values[c].stderr:.3f}" for c in columns) + " |")
    lines.append("")
    lines.append(f"Exact scores of {n} samples per capability (field world, `danceopd_jax/fieldworld/evaluate.py`):")
    lines += [f"- `*/{score}`: {doc}" for score, doc in SCORE_DOCS.items() if any(c.endswith(f"/{score}") for c in columns)]
    return "\n".join(lines) + "\n"
