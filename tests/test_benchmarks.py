"""The benchmark scripts run (tiny sizes) and their rollout cross-check holds; no timing is asserted."""

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


def test_step_throughput_benchmark_runs_each_configuration(tmp_path):
    """Tiny DiT and LoRA-MMDiT steps (truncated and full rollout) run in their own processes and
    land in the Markdown table and the JSON beside it; FLOPs count the full rollout's extra steps."""
    out = tmp_path / "perf.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_throughput.py"), "--models", "DiT-tiny/2,MMDiT-tiny",
           "--resolutions", "32", "--batch-size", "2", "--rollout-steps", "4", "--dtype", "float32", "--steps", "1",
           "--peak-tflops", "1", "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.with_suffix(".json").read_text())
    assert [(r["model"], r["px"]) for r in results] == [("DiT-tiny/2", 32), ("MMDiT-tiny", 32)], results
    for r in results:
        assert "error" not in r, r
        assert r["latent"] == 4 and r["batch"] == 2
        assert 0 < r["flops"]["rollout"] <= r["flops"]["rollout_full"]  # E[max index] <= N - 1
        assert all(r[k] > 0 for k in ("step_s", "step_full_s", "rollout_s", "rollout_full_s", "teacher_s", "student_s"))
        assert r["step_peak_bytes"] > 0
    lora, full = results[1], results[0]
    assert lora["params"] < lora["frozen"]  # the LoRA student trains adapters over a frozen base
    assert full["flops"]["student"] == 3 * full["flops"]["teacher"] and lora["flops"]["student"] == 2 * lora["flops"]["teacher"]
    table = out.read_text()
    assert "| DiT-tiny/2 | 32 | 2 |" in table and "| MMDiT-tiny | 32 | 2 |" in table, table
