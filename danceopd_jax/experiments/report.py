"""The results report: tables (mean and spread over seeds), the paper's claims checked, plots, grids.

``write_report(output, path)`` turns ``results.json`` (see ``reproduce``) into Markdown at ``path``
with its figures in ``DIR(path)/results/``; ``python -m danceopd_jax.experiments.report
WORKDIR/results.json --report docs/RESULTS.md`` re-renders a finished run's report. Verdicts compare two rows on one metric: the
difference of means against twice its standard error, where a row's standard error is its
seed spread over sqrt(seeds), or, for a row with one run, the binomial error of a proportion
over the evaluation examples (sqrt(p (1 - p) / examples)).
"""

import argparse
import json
import math
import os
import shutil

import numpy as np

from danceopd_jax.evaluation.metrics import METRIC_DOCS
from danceopd_jax.experiments import settings

COLUMNS = {
    "composition": [
        ("t2i/overall", "T2I overall"),
        ("local_edit/success", "local edit"),
        ("local_edit/preservation", "local kept"),
        ("global_edit/success", "global edit"),
        ("global_edit/preservation", "global kept"),
        ("edit/success", "edit (mean)"),
    ],
    "local_global": [
        ("local_edit/success", "local edit"),
        ("local_edit/preservation", "local kept"),
        ("global_edit/success", "global edit"),
        ("global_edit/preservation", "global kept"),
        ("edit/success", "edit (mean)"),
    ],
    "realism": [("realism/realism", "realism"), ("realism/t2i_overall", "T2I overall"), ("realism/gap_closed", "gap closed")],
}
NOTES = [
    "- The models are small (the `mini` DiT, 0.34M parameters, 16 px images with 2 px patches) so that every row"
    " trains on a 2-core CPU; they draw soft blobs rather than crisp shapes, and local edits are weak for every model."
    " The scorers read renders exactly at this size but lose shapes on blurred images (see 'Scorer accuracy')."
    " Claims about local editing rest on small numbers.",
    "- Held out means that no model of a table trained on the example's input (the prompt; for edits the"
    " instruction with the source scene), directly or through the runs it was started, distilled or averaged from"
    " (`evaluation/heldout.py`). The scene space is small: the T2I training buckets hold every one-object prompt,"
    " so the held-out T2I prompts are two-object scenes, harder than the training mix.",
    "- Flow-OPD as the authors define it (`core/flowopd.py`) uses an advantage that depends on the state but not on"
    " the sampled transition, so its policy gradient is zero in expectation (`tests/test_flowopd.py` checks this):"
    " its updates are gradient noise, and its rows show what that noise does to a student started from the anchor.",
    "- Experts and weight averages are trained once and shared by all seeds; their spread is evaluation noise only.",
    "- Seeds change the student's noise, routes and data order, and the evaluation examples and sampling noise;"
    " ablation rows (query time, rollout steps, per-sample routing) have one run, so their verdicts use the"
    " binomial error of the evaluation (module docstring of `experiments/report.py`).",
]
ROUTING_NOTES = [
    "Not a claim of the paper (its routes are bound to data buckets): the project's issue 7. The learned router"
    " (`core/router.py`) reads the prompt embedding and the source flag of a pool that mixes both buckets without"
    " labels, after training on the given share of the pool's labels; its accuracy is measured on held-out pool"
    " samples. The adaptive row keeps the buckets and draws each step's route with weights that follow the"
    " routes' running distillation losses (`core/route_weights.py`, floor 0.2). A row beats fixed buckets when its"
    " edit success is higher by more than twice the standard error.",
]
ACCURACY_COLUMNS = [("t2i", "overall", "T2I overall"), ("local_edit", "success", "local edit"),
                    ("local_edit", "preservation", "local kept"), ("global_edit", "success", "global edit"),
                    ("global_edit", "preservation", "global kept"), ("realism", "realism", "realism")]  # fmt: skip
ACCURACY_ROWS = {  # row: {scorer: the item set of ``accuracy.measure`` it is scored on}
    "renders (realism: realistic renders)": dict(t2i="plain", local_edit="renders", global_edit="renders", realism="realistic"),
    "renders + noise 0.05": dict(t2i="noisy_0.05", local_edit="noisy_0.05", global_edit="noisy_0.05", realism="realistic_noisy_0.05"),
    "degraded (blur 0.7 px, noise 0.1)": dict(t2i="degraded", local_edit="degraded", global_edit="degraded", realism="realistic_degraded"),
    "plain renders, degraded": dict(realism="plain_degraded"),
    "realistic background, no object": dict(realism="realistic_background"),
    "swapped (chance)": dict(t2i="swapped", local_edit="swapped", global_edit="swapped"),
    "pure noise": dict(t2i="noise", local_edit="noise", global_edit="noise", realism="noise"),
    "blank": dict(t2i="blank", local_edit="blank", global_edit="blank", realism="blank"),
}  # fmt: skip


def accuracy_table(accuracy: dict) -> list[str]:
    """The scorers on ground truth and controls (``accuracy.measure`` at the run's image size)."""
    lines = ["| items | " + " | ".join(title for _, _, title in ACCURACY_COLUMNS) + " |", "|---" * (len(ACCURACY_COLUMNS) + 1) + "|"]
    for row, sets in ACCURACY_ROWS.items():
        cells = [f"{accuracy[f'{scorer}/{sets[scorer]}/{metric}']:.3f}" if scorer in sets else "" for scorer, metric, _ in ACCURACY_COLUMNS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


DERIVED_DOCS = {
    "edit/success": "mean of local-edit and global-edit success (the composition's editing score, as GEditBench's average)",
    "realism/gap_closed": "(realism of the row - anchor's) / (realism teacher's - anchor's), per seed",
}


def _with_derived(per_model: dict) -> dict:
    """Per-seed metrics plus ``edit/success`` and, with a realism teacher, ``realism/gap_closed``."""
    out = {model: dict(values) for model, values in per_model.items()}
    for values in out.values():
        if "local_edit/success" in values and "global_edit/success" in values:
            values["edit/success"] = (values["local_edit/success"] + values["global_edit/success"]) / 2
    if "realism_teacher" in out and "anchor" in out:
        base, top = out["anchor"]["realism/realism"], out["realism_teacher"]["realism/realism"]
        for values in out.values():
            values["realism/gap_closed"] = (values["realism/realism"] - base) / (top - base) if top != base else math.nan
    return out


def aggregate(per_seed: dict) -> dict:
    """``{seed: {model: {metric: v}}}`` -> ``{model: {metric: (mean, std, runs)}}`` (std 0 for one run)."""
    runs: dict = {}
    for per_model in per_seed.values():
        for model, values in _with_derived(per_model).items():
            for metric, value in values.items():
                runs.setdefault(model, {}).setdefault(metric, []).append(value)
    return {
        model: {metric: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) for metric, v in metrics.items()}
        for model, metrics in runs.items()
    }


def standard_error(stat: tuple, examples: int) -> float:
    mean, std, runs = stat
    if runs > 1:
        return std / math.sqrt(runs)
    p = min(max(mean, 0.0), 1.0)
    return math.sqrt(max(p * (1 - p), 1.0 / examples) / examples)


def verdict(a: tuple, b: tuple, examples: int) -> tuple[float, str]:
    """``(mean a - mean b, 'holds' | 'reversed' | 'within noise')`` at two standard errors."""
    diff = a[0] - b[0]
    se = math.hypot(standard_error(a, examples), standard_error(b, examples))
    if diff > 2 * se:
        return diff, "holds"
    if diff < -2 * se:
        return diff, "reversed"
    return diff, "within noise"


def _cell(stat: tuple | None) -> str:
    if stat is None:
        return ""
    mean, std, runs = stat
    return f"{mean:.3f} ± {std:.3f}" if runs > 1 else f"{mean:.3f}"


def table(stats: dict, columns: list[tuple[str, str]], rows: list[str]) -> list[str]:
    lines = ["| row | runs | " + " | ".join(title for _, title in columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for row in rows:
        if row not in stats:
            continue
        runs = max(stat[2] for stat in stats[row].values())
        lines.append(f"| {row} | {runs} | " + " | ".join(_cell(stats[row].get(key)) for key, _ in columns) + " |")
    return lines


def runs_of(output: dict) -> list[dict]:
    """The runs that wrote ``results.json`` (several when settings were rerun with ``--settings``);
    results written before ``meta.runs`` existed name one run in ``meta.command``."""
    meta = output["meta"]
    return meta.get("runs") or [dict(command=meta["command"], settings=list(output["results"]), wall_minutes=meta["wall_minutes"])]


def _stages_of(run: dict) -> str:
    """How many trainings a run did and how many it took from earlier runs in its workdir (when recorded)."""
    if "trained" not in run:
        return ""
    return f"; {run['trained']} trainings run, {run['reused']} reused from earlier runs in the workdir"


def _row_order(setting: settings.Setting, stats: dict) -> list[str]:
    first = list(setting.experts) + list(setting.averages)
    return first + sorted(row for row in stats if row not in first)


# ---------------------------------------------------------------------------- claims


def claims(all_stats: dict, examples: int, cfg_stats: dict | None = None) -> list[str]:
    """The paper's claims (docs/METHOD.md, "Reported results") checked on these numbers, one line each.

    Realism: the share of the anchor-to-teacher realism gap the student closes (holds from half).
    CFG: the product rule holds where every student's effective guidance is within 0.8-1.25x of
    alpha x beta.
    """
    lines = []

    def check(text: str, paper: str, setting: str, a: str, b: str, metric: str) -> None:
        stats = all_stats.get(setting, {})
        if a not in stats or b not in stats or metric not in stats[a] or metric not in stats[b]:
            return
        diff, word = verdict(stats[a][metric], stats[b][metric], examples)
        lines.append(
            f"| {text} | {paper} | `{a}` {stats[a][metric][0]:.3f} vs `{b}` {stats[b][metric][0]:.3f} on `{metric}` "
            f"| {diff:+.3f} | **{word}** |"
        )

    check("Edit teacher loses T2I against the anchor", "GenEval 0.711 vs 0.832", "composition", "anchor", "edit_teacher", "t2i/overall")
    for baseline in ("diffusionopd", "flowopd", "offpolicy", "multitask", "weight_average"):
        check(f"DanceOPD edits better than {baseline} (T2I + edit)", "5.347 vs 4.947 (DiffusionOPD)", "composition", "danceopd", baseline, "edit/success")
    check("DanceOPD keeps the anchor's T2I", "0.849 vs 0.832", "composition", "danceopd", "anchor", "t2i/overall")
    check("Hard routing beats soft mixing", "5.751 vs 4.994", "composition", "danceopd", "soft_mixing", "edit/success")
    check("low_t beats mid_t", "5.751 vs 4.649", "composition", "danceopd", "danceopd_mid_t", "edit/success")
    check("low_t beats high_t", "5.751 vs 4.813", "composition", "danceopd", "danceopd_high_t", "edit/success")
    check("Per-step routing vs per-sample routing", "(authors' default: per step)", "composition", "danceopd", "danceopd_per_sample", "edit/success")
    for baseline in ("offpolicy", "flowopd", "multitask", "weight_average"):
        check(f"DanceOPD edits better than {baseline} (local + global)", "5.498 vs 4.736 (off-policy), 4.679 (Flow-OPD)", "local_global", "danceopd", baseline, "edit/success")
    check("Realism absorption raises realism over the anchor", "+9.9% realism reward", "realism", "danceopd", "anchor", "realism/realism")
    realism = all_stats.get("realism", {}).get("danceopd", {}).get("realism/gap_closed")
    if realism:
        lines.append(
            f"| Realism absorption closes most of the student-teacher gap | 85.3% | {100 * realism[0]:.1f}% ± "
            f"{100 * realism[1]:.1f}% of the gap closed | {100 * (realism[0] - 0.853):+.1f} points | "
            f"**{'holds' if realism[0] >= 0.5 else 'does not hold'}** |"
        )
    if cfg_stats:
        ratios = [v["guidance/gamma"][0] / (v["guidance/alpha"][0] * v["guidance/beta"][0])
                  for k, v in cfg_stats.items() if not k.startswith("anchor@")]  # fmt: skip
        near = all(0.8 <= r <= 1.25 for r in ratios)
        lines.append(
            f"| CFG absorption: effective guidance ~ alpha x beta | best 5.833; alpha x beta = 49 collapsed | "
            f"effective guidance / (alpha x beta) from {min(ratios):.2f} to {max(ratios):.2f} over the grid | | "
            f"**{'holds' if near else 'weaker than the product'}** |"
        )
    if not lines:
        return []
    return ["| claim | paper | here | difference | verdict |", "|---|---|---|---|---|"] + lines


# ---------------------------------------------------------------------------- routing beyond fixed buckets

ROUTING_ROWS = {
    "danceopd": "fixed buckets (the paper)",
    "router_1pct": "learned router, 1% labels",
    "router_5pct": "learned router, 5% labels",
    "router_100pct": "learned router, 100% labels",
    "router_soft_1pct": "learned router, 1% labels, soft weights",
    "adaptive": "fixed buckets, adaptive route weights",
}


def routing_table(stats: dict, examples: int) -> list[str]:
    """The routing rows of the local + global setting against fixed buckets, on edit success."""
    if "danceopd" not in stats or not any(row in stats for row in ROUTING_ROWS if row != "danceopd"):
        return []
    weights = sorted({key for row in ROUTING_ROWS if row in stats for key in stats[row] if key.startswith("route_weight/")})
    lines = [
        "| row | routing | edit (mean) | local edit | global edit | router accuracy (held out) | labels | "
        + " | ".join(f"mean weight {w.removeprefix('route_weight/')}" for w in weights) + " | vs fixed buckets (edit) |",
        "|---" * (8 + len(weights)) + "|",
    ]
    for row, what in ROUTING_ROWS.items():
        if row not in stats:
            continue
        v = stats[row]
        against = ""
        if row != "danceopd":
            diff, word = verdict(v["edit/success"], stats["danceopd"]["edit/success"], examples)
            against = f"{diff:+.3f}: **{'beats it' if word == 'holds' else 'loses' if word == 'reversed' else 'within noise'}**"
        labels = f"{v['router/labelled'][0]:.0f}" if "router/labelled" in v else ""
        lines.append(
            f"| `{row}` | {what} | {_cell(v.get('edit/success'))} | {_cell(v.get('local_edit/success'))} "
            f"| {_cell(v.get('global_edit/success'))} | {_cell(v.get('router/heldout_accuracy'))} | {labels} | "
            + " | ".join(_cell(v.get(w)) for w in weights) + f" | {against} |"
        )
    accuracies = [stats[row]["router/heldout_accuracy"] for row in ROUTING_ROWS if "router/heldout_accuracy" in stats.get(row, {})]
    if accuracies and all(mean == 1.0 for mean, _, _ in accuracies):
        lines += [
            "",
            "Every router is exact on its held-out samples, from the smallest label share on: local and global edit"
            " instructions share no wording here, so the routing problem is separable from a few hundred labels. The"
            " router rows then route exactly as the buckets would and differ from fixed buckets only in the data stream"
            " (each batch mixes both buckets, where fixed buckets give each step one bucket); with the same pool order"
            " and seed the hard-routed students train alike, and the soft row's near one-hot weights train nearly the"
            " same student, hence equal scores. The learned router pays off where labels are"
            " missing, not as a better router than the labels themselves.",
        ]
    return lines


# ---------------------------------------------------------------------------- CFG grid


def cfg_tables(stats: dict) -> list[str]:
    """T2I accuracy and effective guidance over train scale alpha x eval scale beta, beside the anchor at alpha*beta
    (``stats``: the aggregated CFG results)."""
    anchor = {stats[k]["guidance/beta"][0]: stats[k] for k in stats if k.startswith("anchor@")}
    lines = [
        "| train alpha | eval beta | alpha x beta | effective guidance | T2I overall | anchor's T2I at alpha x beta |",
        "|---|---|---|---|---|---|",
    ]
    for key in sorted(stats, key=lambda k: (stats[k]["guidance/alpha"][0], stats[k]["guidance/beta"][0])):
        alpha, beta = stats[key]["guidance/alpha"][0], stats[key]["guidance/beta"][0]
        if beta not in settings.CFG_EVAL_SCALES:
            continue
        reference = anchor.get(alpha * beta)
        lines.append(
            f"| {alpha:g}{' (anchor)' if key.startswith('anchor@') else ''} | {beta:g} | {alpha * beta:g} "
            f"| {_cell(stats[key]['guidance/gamma'])} | {_cell(stats[key]['t2i/overall'])} | {_cell(reference and reference['t2i/overall'])} |"
        )
    return lines


# ---------------------------------------------------------------------------- figures


def _plots(results: dict, all_stats: dict, cfg_stats: dict | None, assets: str) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = {}
    for name in ("composition", "local_global"):
        stats = all_stats.get(name)
        if not stats:
            continue
        metrics = [m for m in ("t2i/overall", "edit/success") if any(m in v for v in stats.values())]
        rows = [r for r in _row_order(settings.SETTINGS[name], stats) if r in stats]
        fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows)), 3.2))
        width = 0.8 / len(metrics)
        for i, metric in enumerate(metrics):
            values = [stats[r].get(metric, (np.nan, 0, 1)) for r in rows]
            ax.bar(np.arange(len(rows)) + i * width, [v[0] for v in values], width, yerr=[v[1] for v in values], label=metric, capsize=2)
        ax.set_xticks(np.arange(len(rows)) + width * (len(metrics) - 1) / 2, rows, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        ax.set_title(settings.SETTINGS[name].title + " (mean ± std over seeds)", fontsize=9)
        made[name] = _save(fig, assets, f"{name}.png")
    if "composition" in all_stats:
        stats = all_stats["composition"]
        steps = sorted(
            [(int(r.removeprefix("danceopd_n")), r) for r in stats if r.startswith("danceopd_n")]
            + [(results["meta"]["sizes"]["rollout"], "danceopd")]
        )
        if len(steps) > 1:
            fig, ax = plt.subplots(figsize=(4.5, 3))
            for metric in ("t2i/overall", "edit/success"):
                ax.plot([n for n, _ in steps], [stats[r][metric][0] for _, r in steps], marker="o", label=metric)
            ax.set_xlabel("rollout steps N")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=8)
            ax.set_title("DanceOPD: rollout steps (first seed)", fontsize=9)
            made["rollout"] = _save(fig, assets, "rollout_steps.png")
    adaptive = [t["adaptive"] for t in results.get("traces", {}).get("local_global", {}).values() if "adaptive" in t]
    if adaptive:
        fig, ax = plt.subplots(figsize=(4.5, 3))
        for seed, trace in enumerate(adaptive):
            for m, route in enumerate(trace["routes"]):
                ax.plot(trace["steps"], [w[m] for w in trace["weights"]], color=f"C{m}", lw=1, alpha=0.8,
                        label=route if seed == 0 else None)  # fmt: skip
        ax.set_xlabel("step")
        ax.set_ylabel("route weight")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        ax.set_title("Adaptive route weights (local + global; one line per seed)", fontsize=9)
        made["adaptive"] = _save(fig, assets, "adaptive_route_weights.png")
    if cfg_stats:
        fig, ax = plt.subplots(figsize=(4, 3.5))
        for key, values in cfg_stats.items():
            product = values["guidance/alpha"][0] * values["guidance/beta"][0]
            ax.errorbar(product, values["guidance/gamma"][0], yerr=values["guidance/gamma"][1], fmt="o" if key.startswith("anchor@") else "s", color="grey" if key.startswith("anchor@") else "C0")
        top = max(v["guidance/alpha"][0] * v["guidance/beta"][0] for v in cfg_stats.values())
        ax.plot([0, top], [0, top], "k--", lw=0.8, label="gamma = alpha x beta")
        ax.set_xlabel("alpha x beta")
        ax.set_ylabel("effective guidance gamma")
        ax.legend(fontsize=8)
        ax.set_title("CFG absorption (grey: anchor, blue: students)", fontsize=9)
        made["cfg"] = _save(fig, assets, "cfg_product_rule.png")
    return made


def _save(fig, assets: str, name: str) -> str:
    fig.tight_layout()
    fig.savefig(os.path.join(assets, name), dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return name


def _copy_grids(workdir: str, assets: str) -> dict[str, list[str]]:
    """The first seed's sample grids, per setting, copied beside the report."""
    copied: dict[str, list[str]] = {}
    for name in settings.SETTINGS:
        grid_dirs = [os.path.join(workdir, name, "seed0", "grids")]
        grid_dirs += [os.path.join(workdir, name, "seed0", f"cfg{b:g}", "grids") for b in settings.CFG_EVAL_SCALES]
        for grid_dir in grid_dirs:
            if not os.path.isdir(grid_dir):
                continue
            for file in sorted(os.listdir(grid_dir)):
                tag = os.path.basename(os.path.dirname(grid_dir))
                target = f"{name}_{file}" if tag == "seed0" else f"{name}_{tag}_{file}"
                shutil.copyfile(os.path.join(grid_dir, file), os.path.join(assets, target))
                copied.setdefault(name, []).append(target)
    return copied


# ---------------------------------------------------------------------------- the report


def write_report(output: dict, path: str) -> None:
    meta, results = output["meta"], output["results"]
    examples = meta["sizes"]["examples"]
    assets = os.path.join(os.path.dirname(os.path.abspath(path)), "results")
    os.makedirs(assets, exist_ok=True)
    all_stats = {name: aggregate(per_seed) for name, per_seed in results.items() if name != "cfg"}
    cfg_stats = aggregate(results["cfg"]) if "cfg" in results else None
    plots = _plots(output, all_stats, cfg_stats, assets)
    grids = _copy_grids(meta["workdir"], assets)
    lines = [
        "# Results: the capability benchmark (shapes world)",
        "",
        "Generated by `danceopd_jax/experiments/reproduce.py`; do not edit by hand.",
        "",
        *[f"- Command: `{run['command']}` ({', '.join(run['settings'])}): wall time {run['wall_minutes']} min{_stages_of(run)}"
          for run in runs_of(output)],  # fmt: skip
        f"- Device: {meta['device']}, {meta['cpus']} CPU cores, jax {meta['jax']}",
        f"- Sizes ({meta['size']}): {', '.join(f'{k} {v}' for k, v in sorted(meta['sizes'].items()))}",
        f"- Seeds: {meta['seeds']} per student row (ablation rows: the first seed only). Experts and weight averages"
        " are trained once; their spread is evaluation noise only (each seed draws its own held-out examples and noise).",
        f"- Cells: mean ± sample std over runs; one number when there was one run. {examples} held-out examples per"
        " capability and run.",
        "",
        "## The paper's claims",
        "",
        "A claim holds when the difference exceeds twice its standard error (module docstring of"
        " `experiments/report.py`), is reversed below minus twice, and is otherwise within noise.",
        "",
        *claims(all_stats, examples, cfg_stats),
        "",
    ]
    for name, stats in all_stats.items():
        setting = settings.SETTINGS[name]
        lines += [f"## {setting.title}", "", *table(stats, COLUMNS[name], _row_order(setting, stats)), ""]
        if name in plots:
            lines += [f"![{setting.title}](results/{plots[name]})", ""]
        if name == "local_global" and routing_table(stats, examples):
            lines += ["### Routing beyond fixed buckets", "", *ROUTING_NOTES, "", *routing_table(stats, examples), ""]
            if "adaptive" in plots:
                lines += [f"![adaptive route weights](results/{plots['adaptive']})", ""]
        if name == "composition" and "rollout" in plots:
            lines += [f"![rollout steps](results/{plots['rollout']})", ""]
        lines += [f"![{name} {grid}](results/{grid})" for grid in grids.get(name, [])] + [""]
    if "cfg" in results:
        lines += [
            "## CFG absorption",
            "",
            "Students distilled from the anchor's CFG field at train scale alpha, sampled at CFG scale beta.",
            "Effective guidance: `evaluation/guidance.py` (least-squares scale of the anchor's CFG direction in the"
            " model's guided velocity; the anchor at beta shows exactly beta). The product rule predicts alpha x beta.",
            "",
            *cfg_tables(cfg_stats),
            "",
        ]
        if "cfg" in plots:
            lines += [f"![CFG product rule](results/{plots['cfg']})", ""]
        lines += [f"![cfg {grid}](results/{grid})" for grid in grids.get("cfg", [])] + [""]
    if "scorer_accuracy" in meta:
        scored = meta["scorer_accuracy"]
        lines += [
            f"## Scorer accuracy at {scored['image_size']} px",
            "",
            f"The scorers on {scored['items']} ground-truth renders and edits and on controls, at the size the models"
            " sample (`python -m danceopd_jax.evaluation.accuracy " + str(scored["image_size"]) + "`, seed 0). A perfect"
            " model scores the first row; the degraded row is a proxy for soft samples; the swapped row is the chance"
            " level of an image read perfectly but scored against another item.",
            "",
            *accuracy_table(scored["figures"]),
            "",
        ]
    lines += ["## What to keep in mind", "", *NOTES, "", "## Metrics", ""]
    used = sorted({key for cols in COLUMNS.values() for key, _ in cols})
    for key in used:
        doc = DERIVED_DOCS.get(key) or METRIC_DOCS.get(key.split("/", 1)[1].removeprefix("t2i_"), "")
        lines.append(f"- `{key}`: {doc}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="Re-render the report of a finished reproduction run.")
    parser.add_argument("results", help="WORKDIR/results.json of a run of danceopd_jax.experiments.reproduce")
    parser.add_argument("--report", required=True, help="where to write the Markdown (figures go beside it)")
    args = parser.parse_args()
    if not os.path.isfile(args.results):
        parser.error(f"no such file {args.results!r}")
    with open(args.results, encoding="utf-8") as f:
        write_report(json.load(f), args.report)


if __name__ == "__main__":
    main()
