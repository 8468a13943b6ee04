"""What a run survives: SIGKILL and SIGTERM at any step, corrupt checkpoints, NaNs; and determinism.

The CLI tests run the real command in subprocesses on the smoke config and compare the per-step
loss log (``--config.loss_log=True``) and the final checkpoint bit for bit with one
uninterrupted run (the module fixture ``reference``). The subprocesses share a persistent JAX
compilation cache, so only the first one compiles (XLA output is the same either way).
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from danceopd_jax import checkpoints, train
from danceopd_jax.core.step import init_train_state, make_optimizer

from conftest import load_config, main_command

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 24  # a smoke step takes tens of ms: enough steps after the signal that it lands mid-run
OVERRIDES = {"num_train_steps": STEPS, "checkpoint_every": 5, "keep_checkpoints": 2, "log_every": 1, "loss_log": True}


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """The environment of the CLI runs: a compilation cache they share."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _command(workdir, ctrl_c: bool = False, **overrides) -> list[str]:
    flags = [f"--config.{key}={value}" for key, value in {**OVERRIDES, **overrides}.items()]
    return main_command("--config", str(ROOT / "configs" / "smoke.py"), "--workdir", str(workdir), *flags, ctrl_c=ctrl_c)


def _start(workdir, env: dict, ctrl_c: bool = False, **overrides) -> subprocess.Popen:
    return subprocess.Popen(_command(workdir, ctrl_c, **overrides), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(workdir, env: dict, **overrides) -> subprocess.CompletedProcess:
    result = subprocess.run(_command(workdir, **overrides), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _losses(workdir) -> list[dict]:
    path = pathlib.Path(workdir) / train.LOSS_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _wait_for_step(process: subprocess.Popen, workdir, step: int, checkpoint: int | None = None) -> None:
    """Poll until the loss log has reached ``step`` (and checkpoint ``checkpoint`` is complete: orbax
    renames its temporary directory to ``<step>`` once written)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        logged = _losses(workdir)
        saved = checkpoint is None or (pathlib.Path(workdir) / "checkpoints" / str(checkpoint)).is_dir()
        if logged and logged[-1]["step"] >= step and saved:
            return
        time.sleep(0.02)
    raise AssertionError(f"run ended or stalled before step {step}: {process.communicate()[1][-2000:]}")


def _restore_raw(workdir, step: int | None = None):
    """Every array of a checkpoint's train state (params, optimizer state, step, rng) as numpy; the newest by default."""
    with ocp.CheckpointManager(checkpoints.checkpoint_dir(str(workdir)), item_names=("state", "data")) as manager:
        restored = manager.restore(step or manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return jax.tree.map(np.asarray, restored.state)


def _saved_state(workdir):
    """``(step, state)`` of the newest checkpoint, read without a target (no run needs to be built)."""
    state = _restore_raw(workdir)
    return int(state["step"]), state


def _truncate_data_files(state_dir: pathlib.Path) -> None:
    """Cut every OCDBT data file of a checkpoint item in half, as a write stopped midway would."""
    data_files = [p for p in state_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files
    for path in data_files:
        os.truncate(path, path.stat().st_size // 2)


def _assert_same_run(workdir, reference) -> None:
    """Bit-identical per-step losses and routes, and a bit-identical final train state."""
    assert _losses(workdir) == reference["losses"]
    step, state = _saved_state(workdir)
    assert step == STEPS
    leaves, expected = jax.tree.leaves(state), jax.tree.leaves(reference["state"])
    assert len(leaves) == len(expected)
    for a, b in zip(leaves, expected):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cli_env):
    """One uninterrupted CLI run: its workdir, loss log and final state."""
    workdir = tmp_path_factory.mktemp("reference")
    _run(workdir, cli_env)
    losses = _losses(workdir)
    assert [entry["step"] for entry in losses] == list(range(1, STEPS + 1))
    assert {entry["route"] for entry in losses} == {"t2i", "edit"}
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [20, 24]  # keep_checkpoints=2
    return {"workdir": workdir, "losses": losses, "state": _saved_state(workdir)[1]}


def test_resuming_with_another_config_is_one_line_and_leaves_the_run_as_it_was(tmp_path, reference):
    """A workdir with checkpoints resumes with its own config: a changed model or method is refused
    before anything is built or written, naming each changed key; length, logging and mesh may change."""
    workdir = tmp_path / "run"
    shutil.copytree(reference["workdir"], workdir)
    saved = (workdir / checkpoints.CONFIG_FILE).read_bytes()
    changed = checkpoints.load_run_config(str(workdir))
    changed.student.preset, changed.rollout_steps = "mini", changed.rollout_steps + 1
    with pytest.raises(train.ConfigError) as error:
        train.train_and_evaluate(changed, str(workdir))
    message = str(error.value)
    assert message.startswith(f"{workdir} holds checkpoints of a run with another config: config.rollout_steps ")
    assert "config.student.preset 'tiny' -> 'mini'" in message and "\n" not in message
    assert (workdir / checkpoints.CONFIG_FILE).read_bytes() == saved
    allowed = checkpoints.load_run_config(str(workdir))
    allowed.num_train_steps, allowed.log_every, allowed.mesh.data, allowed.mesh.fsdp = 100, 7, 1, -1
    train._check_resume(allowed, str(workdir))  # no error


def test_sigkill_then_restart_reproduces_the_uninterrupted_run(tmp_path, cli_env, reference):
    process = _start(tmp_path, cli_env)
    _wait_for_step(process, tmp_path, step=7, checkpoint=5)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    killed_at = _losses(tmp_path)[-1]["step"]
    assert killed_at < STEPS, "the run finished before the kill: nothing was tested"
    restarted = _run(tmp_path, cli_env)
    resumed = int(restarted.stdout.split("Resuming from step ")[1].split()[0])
    assert 5 <= resumed <= killed_at
    _assert_same_run(tmp_path, reference)


@pytest.mark.parametrize("signum,code,said", [(signal.SIGTERM, 0, "preempted (SIGTERM)"), (signal.SIGINT, 130, "interrupted (SIGINT)")])
def test_sigterm_or_ctrl_c_saves_the_current_step_and_resumes_exactly(tmp_path, cli_env, reference, signum, code, said):
    """Ctrl-C before: a KeyboardInterrupt traceback, and the steps since the last periodic checkpoint lost."""
    process = _start(tmp_path, cli_env, ctrl_c=signum == signal.SIGINT)
    _wait_for_step(process, tmp_path, step=2)
    process.send_signal(signum)
    signalled = time.monotonic()
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr[-3000:]
    assert time.monotonic() - signalled < 30
    assert "Traceback" not in stderr
    lines = [line for line in stdout.splitlines() if line.startswith(said)]
    assert len(lines) == 1, stdout
    saved = int(lines[0].split("checkpoint at step ")[1].split()[0])
    assert saved < STEPS and (tmp_path / "checkpoints" / str(saved)).is_dir()
    assert _losses(tmp_path)[-1]["step"] == saved  # the step it was in was finished, logged and saved
    restarted = _run(tmp_path, cli_env)
    assert f"Resuming from step {saved} " in restarted.stdout
    _assert_same_run(tmp_path, reference)


def test_a_second_ctrl_c_stops_at_once_and_the_handlers_come_back(monkeypatch):
    """The first Ctrl-C asks the loop to save and stop; a second one raises ``KeyboardInterrupt`` (stop
    without saving); leaving the loop restores the handlers it found. A run started with SIGINT ignored
    keeps ignoring it."""
    found = {signum: signal.getsignal(signum) for signum in train._Preemption.SIGNALS}  # the test runner's
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with train._Preemption(manager=None) as ignoring:
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN and signal.SIGTERM in ignoring.previous
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
        before = {signum: signal.getsignal(signum) for signum in train._Preemption.SIGNALS}
        with train._Preemption(manager=None) as preemption:
            assert not preemption.reached(1)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs in this thread between bytecodes
            assert preemption.reached(1) and preemption.requested == "SIGINT"
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
        assert {signum: signal.getsignal(signum) for signum in train._Preemption.SIGNALS} == before
    finally:
        for signum, handler in found.items():
            signal.signal(signum, handler)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, cli_env, reference):
    workdir = tmp_path / "run"
    shutil.copytree(reference["workdir"], workdir)
    _truncate_data_files(workdir / "checkpoints" / str(STEPS) / "state")
    result = _run(workdir, cli_env)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: checkpoint step")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: checkpoint step {STEPS} is unreadable (")
    assert "Resuming from step 20 " in result.stdout
    _assert_same_run(workdir, reference)


def test_same_seed_same_losses_other_seed_other_losses(tmp_path, cli_env, reference):
    same, other = _start(tmp_path / "same", cli_env), _start(tmp_path / "other", cli_env, seed=1)
    for process in (same, other):  # two at once: each spends most of its time single-threaded
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    assert _losses(tmp_path / "same") == reference["losses"]
    other_losses = [entry["loss"] for entry in _losses(tmp_path / "other")]
    assert len(other_losses) == STEPS
    assert all(a != b["loss"] for a, b in zip(other_losses, reference["losses"]))


# ---------------------------------------------------------------- checkpoints, in-process


def _tiny_state(value: float = 1.0):
    params = {"w": jnp.full((64, 64), value, jnp.float32), "b": jnp.zeros((64,), jnp.float32)}
    return init_train_state(params, make_optimizer(lambda step: 1e-3, weight_decay=0.0, grad_clip=1.0), 0, False)


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _manager_with_steps(tmp_path, steps):
    manager = checkpoints.make_manager(str(tmp_path), keep=5)
    for step in steps:
        checkpoints.save(manager, step, _tiny_state(float(step)), {"bucket": step})
    manager.wait_until_finished()
    return manager


@pytest.mark.parametrize("damage", ["delete the manifest", "truncate the data files", "empty the metadata"])
def test_restore_latest_skips_a_damaged_checkpoint_with_one_warning(tmp_path, damage):
    manager = _manager_with_steps(tmp_path, [5, 10])
    state_dir = tmp_path / "checkpoints" / "10" / "state"
    if damage == "delete the manifest":
        (state_dir / "manifest.ocdbt").unlink()
    elif damage == "truncate the data files":
        _truncate_data_files(state_dir)
    else:
        (state_dir / "_METADATA").write_text("")
    warnings = []
    step, state, data = checkpoints.restore_latest(manager, _abstract(_tiny_state()), warnings.append)
    assert (step, data) == (5, {"bucket": 5}) and float(state.params["w"][0, 0]) == 5.0
    assert len(warnings) == 1 and warnings[0].startswith("warning: checkpoint step 10 is unreadable (")
    assert "\n" not in warnings[0] and manager.all_steps() == [5]  # the bad step is free to be saved again
    manager.close()


def test_restore_latest_skips_a_step_another_process_could_not_read(tmp_path, monkeypatch):
    """Every process resumes from the same step: one that restored here but not on another process is
    passed over like a damaged one (``on_every_process`` stands in for the other process's answer)."""
    manager = _manager_with_steps(tmp_path, [5, 10])
    answers = iter([False, True])  # step 10 failed elsewhere, step 5 restored everywhere
    monkeypatch.setattr(checkpoints, "on_every_process", lambda ok: ok and next(answers))
    warnings = []
    step, state, data = checkpoints.restore_latest(manager, _abstract(_tiny_state()), warnings.append)
    assert (step, data) == (5, {"bucket": 5}) and float(state.params["w"][0, 0]) == 5.0
    assert warnings == ["warning: checkpoint step 10 is unreadable (unreadable on another process); "
                        "deleted it and resuming from step 5"]  # fmt: skip
    manager.close()


def test_no_readable_checkpoint_is_one_clear_error(tmp_path):
    manager = _manager_with_steps(tmp_path, [5, 10])
    for step in (5, 10):
        (tmp_path / "checkpoints" / str(step) / "state" / "manifest.ocdbt").unlink()
    with pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.restore_latest(manager, _abstract(_tiny_state()), print)
    message = str(error.value)
    assert message.startswith(f"no readable checkpoint in {checkpoints.checkpoint_dir(str(tmp_path))} (step 10: ")
    assert "; step 5: " in message and "\n" not in message
    assert sorted(manager.all_steps()) == [5, 10]  # nothing deleted: the cause may be the config
    manager.close()


def test_saves_are_asynchronous_and_waited_for(tmp_path):
    """``save`` returns while orbax still writes; the next save and ``wait_until_finished`` wait for it."""
    manager = checkpoints.make_manager(str(tmp_path), keep=1)
    big = init_train_state({"w": jnp.ones((1024, 1024), jnp.float32)}, make_optimizer(lambda s: 1e-3, weight_decay=0.0,
                           grad_clip=1.0), 0, False)  # fmt: skip
    in_flight = []
    for step in (1, 2):
        checkpoints.save(manager, step, big, {})
        in_flight.append(manager.is_saving_in_progress())
    assert any(in_flight), "save blocked until the checkpoint was written"
    manager.wait_until_finished()
    assert not manager.is_saving_in_progress() and manager.all_steps() == [2]  # keep-last-1
    manager.close()


def test_a_non_finite_state_is_never_saved(tmp_path):
    manager = checkpoints.make_manager(str(tmp_path), keep=1)
    state = _tiny_state()
    state = state.replace(params={**state.params, "b": state.params["b"].at[3].set(jnp.nan)})

    class Batches:
        def get_state(self):
            return {}

    with pytest.raises(FloatingPointError, match=r"non-finite values in params after step 7; checkpoint not written"):
        train._save_checkpoint(manager, 7, state, Batches())
    manager.wait_until_finished()
    assert manager.all_steps() == []
    manager.close()


# ---------------------------------------------------------------- NaN guard and determinism, in-process

NAN_OVERRIDES = {  # lr 1e30: finite params ~1e30 after step 1, so the forward of step 2 overflows
    "num_train_steps": 4, "checkpoint_every": 1, "log_every": 1, "keep_checkpoints": 10, "loss_log": True,
    "optimizer.learning_rate": 1e30, "optimizer.warmup_steps": 0, "optimizer.decay": "constant",
}  # fmt: skip


def test_a_nan_loss_stops_the_run_before_its_state_is_saved(tmp_path):
    with pytest.raises(FloatingPointError) as error:
        train.train_and_evaluate(load_config(**NAN_OVERRIDES), str(tmp_path))
    message = str(error.value)
    assert message.startswith("non-finite loss") and "\n" not in message
    bad_step = int(message.split(" at step ")[1].split()[0])
    assert 2 <= bad_step <= 4 and (" on route 't2i'" in message or " on route 'edit'" in message)
    saved = checkpoints.latest_step(str(tmp_path))
    assert saved == bad_step - 1  # every step before it was saved; it was not
    _, state = _saved_state(str(tmp_path))
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state) if np.issubdtype(leaf.dtype, np.floating))


def test_skip_nonfinite_steps_keeps_the_old_state_and_counts_them(tmp_path, capsys):
    train.train_and_evaluate(load_config(skip_nonfinite_steps=True, **NAN_OVERRIDES), str(tmp_path))
    losses = _losses(tmp_path)
    assert [entry["step"] for entry in losses] == [1, 2, 3, 4]
    skipped = [entry["step"] for entry in losses if entry["loss"] is None]
    assert skipped == [2, 3, 4]  # once the params are ~1e30, every later step overflows and is skipped
    assert "skipped 1 non-finite steps" in capsys.readouterr().out
    # A skipped step changes nothing but the step counter: params and optimizer state stay those of step 1.
    first, last = _restore_raw(tmp_path, 1), _restore_raw(tmp_path, 4)
    assert (int(first["step"]), int(last["step"])) == (1, 4)
    for a, b in zip(jax.tree.leaves((first["params"], first["opt_state"])), jax.tree.leaves((last["params"], last["opt_state"]))):
        np.testing.assert_array_equal(a, b)


def test_a_resumed_run_frees_its_fresh_state_before_reading_the_checkpoint(tmp_path):
    """Resuming never holds two train states: the freshly initialised one is deleted on the devices
    before the checkpoint is read, and ``run.state`` is the restored state."""
    config = load_config(num_train_steps=2, checkpoint_every=2)
    train.train_and_evaluate(config, str(tmp_path))
    run = train.setup_run(config, workdir=str(tmp_path))
    fresh = run.state
    manager = checkpoints.make_manager(str(tmp_path), config.keep_checkpoints)
    try:
        start, state = train._resume(run, manager, str(tmp_path))
    finally:
        manager.close()
    assert start == 2 and run.state is state
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(fresh))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))


def test_steps_per_second_leave_out_the_compiled_first_step(monkeypatch):
    """The first step (compile) is timed apart: the window's rate counts only the steps after it,
    and a window of the first step alone has none (before: 1410 steps/s after a 181 s first step)."""
    clock = iter([0.0, 100.0, 102.0, 200.0, 200.0])  # created, clock restarted, flushed; then a first-step-only window
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(clock))
    metrics = {"loss": np.float32(1.0), "grad_norm": np.float32(1.0), "lr": np.float32(1e-3),
               "group_loss": np.ones(1, np.float32), "skipped_steps": np.int32(0)}  # fmt: skip
    window = train._MetricWindow(["t2i"], True, False, False)
    window.add(1, 0, metrics, np.ones(1))
    window.restart_clock()
    window.add(2, 0, metrics, np.ones(1))
    window.add(3, 0, metrics, np.ones(1))
    assert window.flush().rate == 1.0  # 2 steps in 2 s
    window.add(4, 0, metrics, np.ones(1))
    window.restart_clock()
    first_only = window.flush()
    assert np.isnan(first_only.rate) and first_only.mean_rate == 1.0  # no timed step: the mean stays
    config = load_config(num_train_steps=10)
    assert train._progress_line(config, 4, first_only).endswith("first step (compile)")


def test_the_eta_follows_the_mean_rate_not_the_last_window(monkeypatch):
    """A window with a checkpoint save is slower than the next: the ETA uses every timed step so far
    (before: the last window's rate alone, so the ETA jumped between 0:16 and 2:07 on one run)."""
    clock = iter([0.0, 0.0, 10.0, 11.0])  # created, clock restarted, a slow window (10 s), a fast one (1 s)
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(clock))
    metrics = {"loss": np.float32(1.0), "grad_norm": np.float32(1.0), "lr": np.float32(1e-3),
               "group_loss": np.ones(1, np.float32), "skipped_steps": np.int32(0)}  # fmt: skip
    window = train._MetricWindow(["t2i"], True, False, False)
    window.restart_clock()
    for step in range(1, 11):
        window.add(step, 0, metrics, np.ones(1))
    assert window.flush().rate == 1.0
    for step in range(11, 21):
        window.add(step, 0, metrics, np.ones(1))
    fast = window.flush()
    assert fast.rate == 10.0 and fast.mean_rate == 20 / 11
    line = train._progress_line(load_config(num_train_steps=20 + 2000), 20, fast)
    assert line.endswith("10.00 steps/s (mean 1.82) ETA 0:18:20"), line  # 2000 steps at 20/11 steps/s: 1100 s


def test_a_checkpoint_init_without_checkpoints_is_one_line_before_anything_is_built(tmp_path):
    config = load_config(**{"student.init": "checkpoint", "student.checkpoint": str(tmp_path / "absent")})
    with pytest.raises(train.ConfigError, match=r"^config\.student\.checkpoint: no checkpoints under .*absent/checkpoints$"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # nothing written
