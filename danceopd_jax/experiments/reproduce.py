"""Regenerate the capability benchmark's results: train, evaluate, write ``docs/RESULTS.md``.

    python -m danceopd_jax.experiments.reproduce --workdir workdirs/reproduce            # full run
    python -m danceopd_jax.experiments.reproduce --workdir /tmp/repro --quick            # toy size (CI)

Trains the shared experts once, then for every seed and setting (``settings.SETTINGS``) the
student rows; evaluates every row with that seed's held-out examples and sampling noise; writes
``WORKDIR/results.json`` and the report (tables with mean and spread over seeds, the paper's
claims checked, plots and sample grids). Finished trainings are reused, so an interrupted run
continues where it stopped. A quick run writes its report into the workdir, never over the
committed ``docs/RESULTS.md``.
"""

import argparse
import json
import os
import sys
import time

from danceopd_jax.commands import ArgumentParser, exit_interrupted, fail, interrupt_quietly_while_starting, started

interrupt_quietly_while_starting(__name__)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from danceopd_jax.averaging import average_weights  # noqa: E402
from danceopd_jax.checkpoints import load_run_config  # noqa: E402
from danceopd_jax.config_validation import ConfigError  # noqa: E402
from danceopd_jax.evaluation import accuracy, heldout  # noqa: E402
from danceopd_jax.evaluation.guidance import effective_guidance  # noqa: E402
from danceopd_jax.experiments import report, settings  # noqa: E402
from danceopd_jax.pipeline import check_stage_configs, evaluate_loaded, evaluate_models, train_stages, validate_stages  # noqa: E402
from danceopd_jax.sampling import encode_conditions, load_trained_model  # noqa: E402
from danceopd_jax.shapes_configs import IMAGE_SIZE, evaluation  # noqa: E402
from danceopd_jax.train import LOSS_LOG, ROUTER_REPORT, Preempted  # noqa: E402

DEFAULT_REPORT = os.path.join("docs", "RESULTS.md")
DEFAULT_SEEDS = {"full": 3, "quick": 1}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m danceopd_jax.experiments.reproduce", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="where models, evaluations and results.json go")
    parser.add_argument("--quick", action="store_true", help="toy sizes: the whole pipeline in minutes (CI)")
    parser.add_argument("--seeds", type=int, default=None, help="student seeds per row (default: 3, quick: 1)")
    parser.add_argument("--settings", default=",".join(settings.SETTINGS), help="comma-separated settings to run")
    parser.add_argument("--report", default=None, help=f"report path (default: {DEFAULT_REPORT}; quick: WORKDIR/RESULTS.md)")
    args = parser.parse_args(argv)
    size = "quick" if args.quick else "full"
    args.size = size
    args.seeds = DEFAULT_SEEDS[size] if args.seeds is None else args.seeds
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    args.setting_names = [name.strip() for name in args.settings.split(",") if name.strip()]
    unknown = [name for name in args.setting_names if name not in settings.SETTINGS]
    if unknown or not args.setting_names:
        parser.error(f"--settings: unknown {unknown or 'empty'}; valid: {', '.join(settings.SETTINGS)}")
    args.report = args.report or (os.path.join(args.workdir, "RESULTS.md") if args.quick else DEFAULT_REPORT)
    return args


def plan(args: argparse.Namespace) -> tuple[ConfigDict, dict]:
    """Every config of the run, validated before anything trains, also against the stages the workdir
    already holds (``check_stage_configs``): ``(experts, {(setting, seed): stages})``."""
    s = settings.REPRODUCE_SIZES[args.size]
    workdir = os.path.abspath(args.workdir)
    experts_dir = os.path.join(workdir, settings.EXPERTS_DIR)
    experts = ConfigDict(dict(stages=settings.expert_stages(s)))
    check_stage_configs(experts, experts_dir, validate_stages(experts))
    students = {}
    for seed in range(args.seeds):
        for name in args.setting_names:
            rows = settings.SETTINGS[name].rows(s, experts_dir, seed, seed == 0)
            students[name, seed] = ConfigDict(dict(stages=rows))
            try:
                order = validate_stages(students[name, seed])
                check_stage_configs(students[name, seed], os.path.join(workdir, name, f"seed{seed}"), order)
            except ConfigError as error:
                raise ConfigError(f"setting {name}, seed {seed}: {error}") from None
    return experts, students


def _elapsed(started: float) -> str:
    return f"{(time.perf_counter() - started) / 60:.1f} min"


def route_weight_trace(model_dir: str) -> dict | None:
    """``{"routes", "steps", "weights"}`` of a row whose loss log has per-step route weights, else None."""
    path = os.path.join(model_dir, LOSS_LOG)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        entries = [json.loads(line) for line in f if '"weights"' in line]
    if not entries:
        return None
    routes = list(load_run_config(model_dir).routes)
    return dict(routes=routes, steps=[e["step"] for e in entries], weights=[e["weights"] for e in entries])


def routing_metrics(model_dir: str, trace: dict | None) -> dict[str, float]:
    """A row's routing figures: its learned router's held-out accuracy and labels (``router.json``),
    and the mean weight of each route over training in its ``route_weight_trace``."""
    values = {}
    router_path = os.path.join(model_dir, ROUTER_REPORT)
    if os.path.isfile(router_path):
        with open(router_path, encoding="utf-8") as f:
            router = json.load(f)
        values["router/heldout_accuracy"] = router["heldout_accuracy"]
        values["router/labelled"] = router["labelled"]
    if trace:
        means = np.mean(trace["weights"], axis=0)
        values.update({f"route_weight/{name}": float(w) for name, w in zip(trace["routes"], means)})
    return values


def evaluate_setting(setting: settings.Setting, model_dirs: dict, traces: dict, s: dict, seed: int, out_dir: str) -> dict:
    """``{model: {metric: value}}`` of one setting and seed (with routing figures where a row has
    them, ``traces``: its route weight traces); the CFG setting adds its scale grid."""
    if setting.name != "cfg":
        results = evaluate_models(model_dirs, evaluation(list(model_dirs), s, setting.capabilities, seed), out_dir)
        for name, path in model_dirs.items():
            results[name].update(routing_metrics(path, traces.get(name)))
        return results
    results = {}
    alphas = {"anchor": 1.0, **{settings.cfg_row(a): a for a in settings.CFG_TRAIN_SCALES}}
    anchor_scales = sorted({a * b for a in alphas.values() for b in settings.CFG_EVAL_SCALES})
    loaded = {name: load_trained_model(path) for name, path in model_dirs.items()}
    anchor = loaded["anchor"]
    examples = heldout.evaluation_examples("t2i", s["examples"], seed, [config for config, _, _ in loaded.values()])
    cond = encode_conditions(anchor[0], [e.prompt for e in examples])
    image_shape = (anchor[0].image_size, anchor[0].image_size, anchor[0].channels)
    for beta in anchor_scales:
        models = {name: model for name, model in loaded.items() if name == "anchor" or beta in settings.CFG_EVAL_SCALES}
        config = evaluation(list(models), s, "t2i", seed)
        config.cfg_scale = beta
        scores = evaluate_loaded(models, config, os.path.join(out_dir, f"cfg{beta:g}"))
        for name, values in scores.items():
            gamma = effective_guidance(loaded[name][1:], anchor[1:], cond, jax.random.key(seed), image_shape=image_shape, scale=beta)
            results[f"{name}@{beta:g}"] = {**values, "guidance/gamma": gamma, "guidance/alpha": alphas[name], "guidance/beta": beta}
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    return results


def run(args: argparse.Namespace, command: str) -> dict:
    started = time.perf_counter()
    s = settings.REPRODUCE_SIZES[args.size]
    workdir = os.path.abspath(args.workdir)
    experts_dir = os.path.join(workdir, settings.EXPERTS_DIR)
    experts, students = plan(args)
    # Rows of later seeds compile the same programs as the first seed's: cache them on disk.
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "compilation_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    print(f"== experts ({', '.join(experts.stages)}) ==", flush=True)
    trained = len(train_stages(experts, experts_dir))
    stages = len(experts.stages)
    print(f"experts ready after {_elapsed(started)}", flush=True)
    results: dict = {name: {} for name in args.setting_names}
    traces: dict = {name: {} for name in args.setting_names}
    for seed in range(args.seeds):
        for name in args.setting_names:
            setting = settings.SETTINGS[name]
            setting_dir = os.path.join(workdir, name)
            print(f"== {name}, seed {seed} ({_elapsed(started)} so far) ==", flush=True)
            model_dirs = {expert: os.path.join(experts_dir, expert) for expert in setting.experts}
            for average, weights in setting.averages.items():
                model_dirs[average] = os.path.join(setting_dir, average)
                if not os.path.isfile(os.path.join(model_dirs[average], "config.json")):
                    average_weights({os.path.join(experts_dir, e): w for e, w in weights.items()}, model_dirs[average])
            seed_dir = os.path.join(setting_dir, f"seed{seed}")
            trained += len(train_stages(students[name, seed], seed_dir))
            stages += len(students[name, seed].stages)
            model_dirs.update({row: os.path.join(seed_dir, row) for row in students[name, seed].stages})
            row_traces = {row: route_weight_trace(path) for row, path in model_dirs.items()}
            traces[name][str(seed)] = {row: trace for row, trace in row_traces.items() if trace}
            results[name][str(seed)] = evaluate_setting(setting, model_dirs, traces[name][str(seed)], s, seed, seed_dir)
    this_run = dict(command=command, settings=args.setting_names, wall_minutes=round((time.perf_counter() - started) / 60, 1),
                    trained=trained, reused=stages - trained)  # fmt: skip
    meta = dict(
        device=f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})",
        cpus=os.cpu_count(),
        jax=jax.__version__,
        runs=[this_run],
        size=args.size,
        sizes=s,
        seeds=args.seeds,
        workdir=workdir,
        scorer_accuracy=dict(
            image_size=IMAGE_SIZE, items=s["scorer_items"], figures=accuracy.measure(s["scorer_items"], seed=0, image_size=IMAGE_SIZE)
        ),
    )
    output = merge_previous(dict(meta=meta, results=results, traces=traces), os.path.join(workdir, "results.json"))
    with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(output, f, indent=2, sort_keys=True)
    report.write_report(output, args.report)
    print(f"done in {_elapsed(started)}; report: {args.report}", flush=True)
    return output


def merge_previous(output: dict, path: str) -> dict:
    """Keep the settings an earlier run at the same size and seeds wrote to ``path`` and this run did not
    redo (``--settings`` picks a subset). The earlier runs are listed before this one in ``meta.runs``:
    their settings stay, or their trainings, reused, fed this run."""
    if not os.path.isfile(path):
        return output
    with open(path, encoding="utf-8") as f:
        previous = json.load(f)
    old_meta = previous["meta"]
    if (old_meta["size"], old_meta["seeds"]) != (output["meta"]["size"], output["meta"]["seeds"]):
        return output
    output["meta"]["runs"] = report.runs_of(previous) + output["meta"]["runs"]
    kept = {name: per_seed for name, per_seed in previous["results"].items() if name not in output["results"]}
    if not kept:
        return output
    merged = {**kept, **output["results"]}
    output["results"] = {name: merged[name] for name in settings.SETTINGS if name in merged}
    output["traces"] = {**{name: t for name, t in previous.get("traces", {}).items() if name in kept}, **output["traces"]}
    return output


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started()
    logging.set_verbosity(logging.WARNING)
    try:
        run(args, "python -m danceopd_jax.experiments.reproduce " + " ".join(argv))
    except ConfigError as error:
        fail(error)
    except Preempted as error:
        if error.exit_code:  # the training loop printed where it saved; the same command continues (SIGTERM: exit 0)
            sys.exit(error.exit_code)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop, or a second one in it
        exit_interrupted()


if __name__ == "__main__":
    main()
