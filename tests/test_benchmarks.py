"""The benchmark scripts run (tiny sizes) and their rollout cross-check holds; no timing is asserted."""

import importlib.util
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_step_benchmark_runs_and_scan_matches_python_loop():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step.py"), "--presets", "tiny", "--steps", "1"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if line.strip().startswith("tiny")]
    assert len(rows) == 1, result.stdout
    assert "yes" in rows[0], rows[0]  # lax.scan and Python-loop rollouts give the same states


def load_script(name: str, monkeypatch):
    """A benchmark script as a module (``benchmarks/`` is not a package; its scripts import ``measure`` beside them)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_throughput_benchmark_runs_and_counts_flops(tmp_path, monkeypatch):
    """The LoRA-MMDiT step (truncated and full rollout) and its passes run in their own process and
    land in the Markdown table and the JSON beside it, the frozen base stored in bf16 as a run stores it; FLOPs count the full rollout's extra steps,
    3 forwards for a fully trained student's forward + backward and 2 for a LoRA student's."""
    out = tmp_path / "perf.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_throughput.py"), "--models", "MMDiT-tiny",
           "--resolutions", "32", "--batch-size", "2", "--rollout-steps", "4", "--dtype", "bfloat16", "--steps", "1",
           "--peak-tflops", "1", "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [r] = json.loads(out.with_suffix(".json").read_text())
    assert (r["model"], r["px"], r["latent"], r["batch"]) == ("MMDiT-tiny", 32, 4, 2) and "error" not in r, r
    assert 0 < r["flops"]["rollout"] <= r["flops"]["rollout_full"]  # E[max index] <= N - 1
    assert all(r[k] > 0 for k in ("step_s", "step_full_s", "rollout_s", "rollout_full_s", "teacher_s", "student_s"))
    assert r["step_peak_bytes"] > 0
    assert r["params"] < r["frozen"]  # the LoRA student trains adapters over a frozen base
    assert r["cast"] == "once" and r["frozen_bytes"] < 4 * r["frozen"]  # frozen bf16 layers stored in bf16 (the float32 positional table dominates here)
    assert r["flops"]["student"] == 2 * r["flops"]["teacher"]
    assert "| MMDiT-tiny | 32 | 2 |" in out.read_text()

    bench = load_script("step_throughput", monkeypatch)
    args = bench.parse_args(["--rollout-steps", "4"])
    choice = bench.MODELS["DiT-XL/2"]
    flops = bench.step_flops(choice, bench.model_config(choice, 32, args), 1, args, lora_student=False)
    assert flops["student"] == 3 * flops["teacher"] and flops["rollout_full"] == 3 * flops["teacher"]
    assert abs(flops["teacher"] / 2 - 118.6e9) < 0.01 * 118.6e9  # DiT-XL/2 at 256 px: 118.6 GMACs (Peebles & Xie, Table 4)
