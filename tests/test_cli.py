"""The command line from a user's seat: train, resume, and one-line errors for bad input."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from conftest import load_benchmark, module_command

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _main(workdir, *flags, timeout=600, env=None):
    cmd = [sys.executable, "-m", "danceopd_jax.main", "--config", str(ROOT / "configs" / "smoke.py")]
    cmd += ["--workdir", str(workdir), *flags]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env or dict(os.environ))


def test_smoke_trains_then_resumes(tmp_path):
    first = _main(tmp_path, "--config.num_train_steps=10")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "step 10/10" in first.stdout and "Resuming" not in first.stdout
    second = _main(tmp_path, "--config.num_train_steps=20")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resuming from step 10" in second.stdout
    assert "step 20/20" in second.stdout and "step 5/20" not in second.stdout
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "20"]
    assert list(tmp_path.glob("events.out.tfevents.*")), "no TensorBoard summaries written"


def test_a_second_run_loads_its_compiled_programs_from_the_cache(tmp_path):
    """``compilation_cache_dir``: the first run fills WORKDIR/xla_cache; a second run (another workdir,
    the same cache by absolute path) loads the train step from it (JAX logs hits and misses with
    JAX_LOG_COMPILES and JAX_EXPLAIN_CACHE_MISSES) and adds no entry."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the tests' cache would win
    first = _main(tmp_path / "a", "--config.num_train_steps=2", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    cache = tmp_path / "a" / "xla_cache"
    entries = sorted(p.name for p in cache.iterdir())
    assert any(name.startswith("jit_step-") for name in entries), entries  # the train step
    env.update(JAX_LOG_COMPILES="1", JAX_EXPLAIN_CACHE_MISSES="1")
    second = _main(tmp_path / "b", "--config.num_train_steps=2", f"--config.compilation_cache_dir={cache}", env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Persistent compilation cache hit for 'jit_step'" in second.stderr
    assert "PERSISTENT COMPILATION CACHE MISS for 'jit_step'" not in second.stderr
    assert sorted(p.name for p in cache.iterdir()) == entries
    assert not (tmp_path / "b" / "xla_cache").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--config.method=distill"], "error: config.method: unknown value 'distill'"),
        (["--config.rollout_steps=0"], "error: config.rollout_steps: must be an integer >= 1"),
        (["--config.metod=danceopd"], "error: --config.metod=danceopd: config has no key 'metod' (did you mean 'method'?)"),
        (["--config.rollout_steps=many"], "error: flag --config.rollout_steps=many"),
        (["--config.routes.edit.bucket=t2i"], "error: config.routes.edit.bucket: field 'edit' needs source images"),
        (["--config.optimizer.learnig_rate=0.1"],
         "error: --config.optimizer.learnig_rate=0.1: config.optimizer has no key 'learnig_rate' (did you mean 'learning_rate'?)"),
        (["--config.routes.nowhere.field=t2i"], "error: --config.routes.nowhere.field=t2i: config.routes has no key 'nowhere' (its keys: edit, t2i)"),
        (["--config.method.name=x"], "error: --config.method.name=x: config.method is a str, not a config, so it has no key 'name'"),
        (["--config.data.buckets.t2i.size=0"], "error: config.data.buckets.t2i.size: must be >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, flags, message):
    result = _main(tmp_path / "w", *flags, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(message), lines[-1]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_workdir_that_cannot_be_one_is_one_line_before_anything_runs(tmp_path):
    (tmp_path / "file").write_text("")
    result = _main(tmp_path / "file", timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == f"error: --workdir: '{tmp_path / 'file'}' exists and is not a folder"
    result = _main(tmp_path / "file" / "w", timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(f"error: --workdir: '{tmp_path / 'file' / 'w'}' cannot be written (")
    bad = _main(tmp_path / "new" / "w", "--config.rollout_steps=0", timeout=120)  # the probe leaves no folder behind
    assert bad.returncode == 2 and not (tmp_path / "new").exists()


def test_missing_config_file(tmp_path):
    cmd = [sys.executable, "-m", "danceopd_jax.main", "--config", "configs/nope.py", "--workdir", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: --config: no such file 'configs/nope.py'"


@pytest.mark.parametrize(
    "source,suffix,message",
    [
        ("x = (\n", "", "line 1: SyntaxError: '(' was never closed"),
        ("def get_config():\n    return {}['missing']\n", "", "line 2: KeyError: 'missing'"),
        ("def get_config():\n    return int('x')\n", "", "line 2: ValueError: invalid literal for int() with base 10: 'x'"),
        ("def get_config():\n    return 3\n", "", "get_config() returned int, not a ConfigDict"),
        ("y = 1\n", "", "defines no get_config()"),
        ("from ml_collections import ConfigDict\ndef get_config():\n    return ConfigDict()\n", ":quick",
         "TypeError: get_config() takes 0 positional arguments but 1 was given"),
    ],
)  # fmt: skip
def test_a_config_file_that_fails_to_run_is_one_line_naming_it(tmp_path, source, suffix, message):
    """Before: a Python traceback (or, for an exception in get_config, one line with the traceback folded in)."""
    path = tmp_path / "config.py"
    path.write_text(source)
    cmd = [sys.executable, "-m", "danceopd_jax.main", "--config", f"{path}{suffix}", "--workdir", str(tmp_path / "w")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr == f"error: --config {path}: {message}\n", result.stderr[-2000:]


def test_single_host_launcher_dry_run_prints_the_command(tmp_path):
    script = ROOT / "launch" / "single_host.sh"
    result = subprocess.run(
        ["bash", str(script), "configs/smoke.py", str(tmp_path), "--config.num_train_steps=3", "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "python", "-m", "danceopd_jax.main", "--config", "configs/smoke.py", "--workdir", str(tmp_path),
        "--config.num_train_steps=3",
    ]
    bad = subprocess.run(["bash", str(script), "configs/smoke.py", str(tmp_path), "extra"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "error: 2 positional arguments expected, got 3:" in bad.stderr and "extra" in bad.stderr


def test_bad_mesh_is_one_line(tmp_path):
    result = _main(tmp_path / "w", "--config.mesh.tensor=3", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == "error: config.mesh: 1 devices do not divide by the fixed axes' product 3"


@pytest.mark.parametrize(
    "module,flags,message",
    [
        ("danceopd_jax.sample", ["--bogus"], "error: Unknown command line flag 'bogus'"),
        ("danceopd_jax.sample", ["--workdir=w", "--out=x.png", "--num=abc"], "error: flag --num=abc: invalid literal for int() with base 10: 'abc'"),
        ("danceopd_jax.export", ["--workdir=w", "--out=o", "--merged=maybe"], "error: flag --merged=maybe: ('Non-boolean argument to boolean flag', 'maybe')"),
        ("danceopd_jax.export", ["--out=o"], "error: --workdir is required"),
        ("danceopd_jax.encode_prompts", ["--workdir=w"], "error: Unknown command line flag 'workdir'"),
        ("danceopd_jax.encode_prompts", ["--text_len=x"], "error: flag --text_len=x: invalid literal for int() with base 10: 'x'"),
    ],
)
def test_the_commands_flag_errors_are_one_line_and_exit_code_2(module, flags, message):
    """Before: absl's ``FATAL Flags parsing error: ...`` and a usage hint (``commands.parse_flags`` now)."""
    result = subprocess.run([sys.executable, "-m", module, *flags], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), result.stderr[-2000:]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--rank", "0"], "error: --rank must be >= 1, got 0"),
        (["--rank", "-4"], "error: --rank must be >= 1, got -4"),
        (["--rank", "many"], "error: argument --rank: invalid int value: 'many'"),
        (["--ranks", "4"], "error: unrecognized arguments: --ranks 4"),
        (["--out", "TMP"], "error: --out 'TMP' is a folder; give the document's file name"),
        (["--out", ""], "error: --out is empty; give the document's file name"),
        (["--out", "TMP/file/MODELS.md"], "error: --out 'TMP/file/MODELS.md': its folder 'TMP/file' exists and is not a folder"),
    ],
)
def test_model_memory_bad_arguments_are_one_line_before_any_tracing(tmp_path, capsys, argv, message):
    """Before: a rank < 1 was a traceback from add_lora after tracing SD3.5-M, a bad --out one after
    tracing every model; argparse's errors came with a usage dump."""
    (tmp_path / "file").write_text("")
    argv = [arg.replace("TMP", str(tmp_path)) for arg in argv]
    with pytest.raises(SystemExit) as exit_:
        load_benchmark("model_memory").main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.strip().splitlines() == [message.replace("TMP", str(tmp_path))], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_model_memory_writes_its_document_whole(tmp_path):
    path = tmp_path / "docs" / "MODELS.md"
    load_benchmark("model_memory").write_document("# doc\n", str(path))
    assert path.read_text() == "# doc\n" and os.listdir(path.parent) == ["MODELS.md"]


def test_the_commands_start_without_tensorflow():
    """clu's TensorBoard writer imports TensorFlow (2.5 s on the 2-core CPU); it is imported when a
    training loop starts, so a bad flag or config is reported without waiting for it."""
    modules = ["danceopd_jax.main", "danceopd_jax.sample", "danceopd_jax.export", "danceopd_jax.encode_prompts",
               "danceopd_jax.experiments.reproduce"]  # fmt: skip
    code = f"import importlib, sys; [importlib.import_module(m) for m in {modules}]; print('tensorflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr[-3000:]


def _wait_until_mapped(process: subprocess.Popen, library: str, timeout: float = 120) -> None:
    """Until ``process`` has mapped a shared library whose path contains ``library`` (mid-import)."""
    maps, deadline = pathlib.Path(f"/proc/{process.pid}/maps"), time.monotonic() + timeout
    while library not in maps.read_text():
        assert process.poll() is None and time.monotonic() < deadline, f"{library} never loaded"
        time.sleep(0.005)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc/PID/maps")
@pytest.mark.parametrize("module", ["danceopd_jax.main", "danceopd_jax.experiments.reproduce"])
def test_ctrl_c_while_importing_is_one_line_and_exit_code_130(tmp_path, module):
    """Ctrl-C while the command imports JAX (before: a traceback of the interrupted import)."""
    args = ["--config", str(ROOT / "configs" / "smoke.py")] if module.endswith("main") else ["--quick"]
    process = subprocess.Popen(module_command(module, *args, "--workdir", str(tmp_path / "w"), ctrl_c=True), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_until_mapped(process, "jaxlib")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines() == ["error: interrupted (Ctrl-C) while starting, before anything ran"], stderr[-3000:]
    assert not (tmp_path / "w").exists()


def test_importing_a_command_leaves_ctrl_c_alone():
    """The quiet start-up handler is the command's: importing its module for its functions installs none."""
    modules = "danceopd_jax.main, danceopd_jax.sample, danceopd_jax.export, danceopd_jax.encode_prompts, danceopd_jax.experiments.reproduce"
    code = (f"import signal; signal.signal(signal.SIGINT, signal.default_int_handler); import {modules}; "
            "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
