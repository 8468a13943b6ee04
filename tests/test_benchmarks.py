"""The benchmark scripts run (tiny sizes) and their rollout cross-check holds; no timing is asserted."""

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
