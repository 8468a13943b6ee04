"""A real multi-process run on this machine: 2 processes x 2 CPU devices joined by jax.distributed
(gloo, coordinator on 127.0.0.1) through ``launch/local_multiprocess.sh`` and the real CLI, on a
flat mesh and on a hybrid one (``config.dcn_mesh``: the data axis across the processes), resumed in
one process and in two."""

import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from danceopd_jax.distributed import DistributedError, initialize, wait_interruptibly
from danceopd_jax.sampling import load_trained_model

from conftest import cpu_devices_env, main_command

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = ["--config.num_train_steps=4", "--config.log_every=1"]
STEP_LINE = re.compile(r"^step (\d+)/\d+ loss ([0-9.]+) \[(\w+)=")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(stdout: str) -> list[tuple[str, str, str]]:
    return [m.groups() for m in map(STEP_LINE.match, stdout.splitlines()) if m]


def _one_process(workdir, devices: int, *flags):
    env = cpu_devices_env(devices)
    cmd = [sys.executable, "-m", "danceopd_jax.main", "--config", "configs/smoke.py", "--workdir", str(workdir), *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_two_processes_on_flat_and_hybrid_meshes_match_one_process_and_restore_on_another_mesh(tmp_path):
    script = ["bash", "launch/local_multiprocess.sh", "2", "2", "configs/smoke.py", str(tmp_path / "multi"), *STEPS]
    multi = subprocess.run(script + [f"--port={_free_port()}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:] + (tmp_path / "multi" / "logs" / "process_1.log").read_text()[-2000:]
    assert "over 4 cpu devices, 2 process(es)" in multi.stdout
    single = _one_process(tmp_path / "single", 4, *STEPS)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "over 4 cpu devices, 1 process(es)" in single.stdout
    # Same global batch, noise and routes: the same per-step losses and the same student.
    assert len(_losses(multi.stdout)) == 4 and _losses(multi.stdout) == _losses(single.stdout)
    params = [jax.tree.leaves(load_trained_model(str(tmp_path / d))[2]) for d in ("multi", "single")]
    for a, b in zip(*params, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    # A hybrid mesh: data across the two processes (the DCN factor), fsdp over each process's two devices.
    hybrid_flags = ["--config.dcn_mesh.data=2", "--config.mesh.data=1", "--config.mesh.fsdp=2", f"--port={_free_port()}"]
    hybrid = subprocess.run(script[:5] + [str(tmp_path / "hybrid"), *STEPS, *hybrid_flags], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert hybrid.returncode == 0, hybrid.stderr[-3000:]
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1} (across the DCN: {'data': 2}) over 4 cpu devices, 2 process(es)" in hybrid.stdout
    assert [step for step, _, _ in _losses(hybrid.stdout)] == [step for step, _, _ in _losses(single.stdout)]
    np.testing.assert_allclose([float(loss) for _, loss, _ in _losses(hybrid.stdout)], [float(loss) for _, loss, _ in _losses(single.stdout)], rtol=1e-5)
    # The two-process checkpoint restores in one process on an fsdp=2 mesh and goes on.
    more = ["--config.num_train_steps=6", "--config.log_every=1"]
    resumed = _one_process(tmp_path / "multi", 2, *more, "--config.mesh.data=1", "--config.mesh.fsdp=-1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from step 4" in resumed.stdout and "'fsdp': 2" in resumed.stdout
    assert [step for step, _, _ in _losses(resumed.stdout)] == ["5", "6"]
    # The hybrid run resumes in two processes: both agree on the step (checkpoints.on_every_process) and go on
    # like the one-process resumption of the flat run (both runs' states matched the single run's above).
    hybrid_flags[-1] = f"--port={_free_port()}"
    rehybrid = subprocess.run(script[:5] + [str(tmp_path / "hybrid"), *more, *hybrid_flags], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rehybrid.returncode == 0, rehybrid.stderr[-3000:]
    assert "Resuming from step 4" in rehybrid.stdout
    assert [step for step, _, _ in _losses(rehybrid.stdout)] == ["5", "6"]
    np.testing.assert_allclose([float(loss) for _, loss, _ in _losses(rehybrid.stdout)], [float(loss) for _, loss, _ in _losses(resumed.stdout)], rtol=1e-5)


def test_two_processes_train_an_sd3_run_on_one_prompt_table(tmp_path):
    """An SD3 run over 2 processes x 1 CPU device on one shared workdir: process 0 encodes and
    writes the prompt embeddings, the other reads them after a barrier (both writing the one file
    raced), and both train."""
    folder, workdir = tmp_path / "tiny_sd3", tmp_path / "sd3"
    made = subprocess.run([sys.executable, "-m", "danceopd_jax.models.tiny_sd3", "--out", str(folder)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    script = ["bash", "launch/local_multiprocess.sh", "2", "1", "configs/sd3_smoke.py", str(workdir),
              f"--config.model_dir={folder}", "--config.num_train_steps=2", "--config.log_every=1", f"--port={_free_port()}"]  # fmt: skip
    result = subprocess.run(script, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:] + (workdir / "logs" / "process_1.log").read_text()[-2000:]
    assert [step for step, _, _ in _losses(result.stdout)] == ["1", "2"], result.stdout[-2000:]
    assert (workdir / "prompt_embeddings.safetensors").is_file()
    assert not list(workdir.glob("*.tmp*"))


def test_partial_multiprocess_flags_are_one_line_errors(tmp_path):
    result = _one_process(tmp_path, 1, "--num_processes=2")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --num_processes given without --coordinator_address, --process_id: an explicit multi-process run needs all three"
    )


@pytest.mark.parametrize("address", ["127.0.0.1:abc", "127.0.0.1:0", "127.0.0.1:70000", ":1234", "localhost"])
def test_a_bad_coordinator_address_is_one_line_before_jax_joins(address):
    """A port that is not a number crashed the process inside jax.distributed (segmentation fault)."""
    with pytest.raises(DistributedError, match=r"^--coordinator_address must be HOST:PORT with a port in 1\.\.65535, got "):
        initialize(False, address, 2, 0)


def _start_process(index: int, workdir, port: int, *flags, ctrl_c: bool = False) -> subprocess.Popen:
    """Process ``index`` of a two-process smoke run with its coordinator on 127.0.0.1:``port``."""
    args = ["--config", "configs/smoke.py", "--workdir", str(workdir), *flags, f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2", f"--process_id={index}"]  # fmt: skip
    return subprocess.Popen(main_command(*args, ctrl_c=ctrl_c), cwd=ROOT, env=cpu_devices_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_a_process_whose_peers_never_join_stops_with_one_line_after_the_timeout(tmp_path):
    """Not XLA's fatal abort and stack dump at its deadline; nothing is written."""
    port = _free_port()
    process = _start_process(1, tmp_path / "w", port, "--distributed_timeout=2")  # process 0 never starts
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert stderr.strip() == (
        f"error: process 1 of 2 at coordinator 127.0.0.1:{port}: the processes did not all join within 2 s; start every process with "
        "the same --coordinator_address and --num_processes (process 0 serves the coordinator) or raise --distributed_timeout"
    )
    assert not (tmp_path / "w").exists()


def test_ctrl_c_while_waiting_for_the_other_processes_stops_at_once(tmp_path):
    """XLA's connect blocks in native code; the wait for it is in another thread, so Ctrl-C is heard."""
    process = _start_process(1, tmp_path / "w", _free_port(), ctrl_c=True)  # process 0 never starts
    assert process.stdout.readline().startswith("joining the run: process 1 of 2 at coordinator 127.0.0.1:")
    time.sleep(1)  # inside the connect
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert stderr.strip().startswith("error: interrupted (Ctrl-C)") and len(stderr.strip().splitlines()) == 1


def test_wait_interruptibly_returns_results_raises_errors_and_gives_up_at_the_timeout():
    assert wait_interruptibly(lambda: None, 5)
    assert not wait_interruptibly(lambda: time.sleep(3), 0.3)

    def broken():
        raise RuntimeError("from the helper thread")

    with pytest.raises(RuntimeError, match="from the helper thread"):
        wait_interruptibly(broken, 5)
    with pytest.raises(DistributedError, match=r"^--distributed_timeout must be >= 1 second, got 0$"):
        initialize(False, None, None, None, timeout_s=0)


def test_when_a_process_dies_mid_run_the_other_stops_with_one_line_at_once(tmp_path):
    """Its next collective fails. Before: a traceback, then Python's teardown waited in JAX's
    shutdown barrier for the dead process until the heartbeat timeout and aborted with a C++ stack dump."""
    port = _free_port()
    survivor, victim = (_start_process(index, tmp_path, port, "--config.num_train_steps=100000", "--config.log_every=1") for index in range(2))
    while not (survivor.stdout.readline() or "step 3/").startswith("step 3/"):
        pass
    victim.kill()
    victim.wait()
    killed = time.monotonic()
    _, stderr = survivor.communicate(timeout=90)
    assert survivor.returncode == 1, stderr[-3000:]
    assert time.monotonic() - killed < 30  # not the 100 s heartbeat timeout
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: process 0 of 2: "), stderr[-3000:]
    assert "the run resumes from its newest checkpoint" in errors[0]
    assert "Traceback" not in stderr and "Fatal Python error" not in stderr


def test_processes_given_other_configs_or_workdirs_stop_together_with_one_line(tmp_path):
    """Checked right after joining, before anything is built; the workdir is left as it was found."""
    port = _free_port()
    own = [str(tmp_path / "shared"), str(tmp_path / "local" / "w")]
    # process 1 looks for process 0's file for 15 s
    processes = [_start_process(index, own[index], port, f"--config.seed={index}", "--distributed_timeout=15") for index in range(2)]
    expected = (
        "error: process 1 started with another config than process 0 (every process needs the same --config and overrides); "
        "process 1 cannot see the files process 0 writes in the run's --workdir (a multi-process run needs one folder every process sees, "
        "given as the same path)"
    )
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 2 and stderr.strip() == expected, stderr[-3000:]
    assert not any(tmp_path.iterdir())
