"""Joining a multi-process (multi-host) run: ``jax.distributed`` before any JAX computation.

Two ways in, both from ``main``'s flags:

* explicit: ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` on every process
  (``launch/local_multiprocess.sh``, ``launch/gpu_multihost.sh``);
* ``--distributed`` alone: JAX detects the cluster itself (Cloud TPU pod slices, SLURM), as
  ``launch/tpu_vm.sh`` uses it.

Neither: a single process, nothing to join. CPU processes exchange collectives over gloo. After
joining, ``jax.devices()`` lists every process's devices; each process feeds its own rows of the
global batch (``jax.make_array_from_process_local_data``) and only process 0 logs and writes
summaries and ``config.json``; orbax writes checkpoints from all processes.

Joining waits until every process has reached the coordinator. That wait runs in a helper thread,
so that Ctrl-C reaches the command while XLA's connect blocks, and it ends with ``JoinTimeout``
after ``timeout_s`` instead of XLA's fatal abort and stack dump at its own deadline. A process
that dies mid-run makes the others' next collective fail; ``runtime_failure`` is the one line
they stop with (without Python's teardown, whose shutdown barrier would wait for the dead process
until the heartbeat timeout and then abort). ``check_same_run`` stops a run whose processes were
given different configs or do not share the workdir before anything is built.
"""

import contextlib
import hashlib
import os
import threading
import time
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from danceopd_jax.commands import made_folder

# XLA's own deadline comes this much after ours, so ours always speaks first
XLA_DEADLINE_MARGIN_S = 30
# a network file system may show another host's new file only once its attribute cache expires
# (NFS: acdirmax, 60 s by default)
NETWORK_FS_DELAY_S = 60


class DistributedError(ValueError):
    """Inconsistent multi-process flags (a one-line CLI error)."""


class JoinTimeout(RuntimeError):
    """The processes did not all join within the timeout. XLA's connect is still blocked in its
    thread, so the process must end without Python's teardown (``commands.exit_at_once``)."""


def initialize(
    distributed: bool, coordinator_address: str | None, num_processes: int | None, process_id: int | None, timeout_s: int = 300
) -> bool:
    """Join the run the flags describe, waiting at most ``timeout_s`` seconds for all processes;
    returns whether this is a multi-process run."""
    if timeout_s < 1:
        raise DistributedError(f"--distributed_timeout must be >= 1 second, got {timeout_s}")
    explicit = {"--coordinator_address": coordinator_address, "--num_processes": num_processes, "--process_id": process_id}
    given = [flag for flag, value in explicit.items() if value is not None]
    if given and len(given) < len(explicit):
        missing = ", ".join(flag for flag in explicit if flag not in given)
        raise DistributedError(f"{', '.join(given)} given without {missing}: an explicit multi-process run needs all three")
    if given:
        if num_processes < 1:
            raise DistributedError(f"--num_processes must be >= 1, got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise DistributedError(f"--process_id must be in [0, {num_processes}), got {process_id}")
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise DistributedError(f"--coordinator_address must be HOST:PORT with a port in 1..65535, got {coordinator_address!r}")
        if num_processes == 1:
            return False
    elif not distributed:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    who = f"process {process_id} of {num_processes} at coordinator {coordinator_address}" if given else "this process (cluster detected by JAX)"
    print(f"joining the run: {who}, waiting up to {timeout_s} s for every process", flush=True)
    join = lambda: jax.distributed.initialize(  # noqa: E731
        coordinator_address, num_processes, process_id, initialization_timeout=timeout_s + XLA_DEADLINE_MARGIN_S
    )
    if not wait_interruptibly(join, timeout_s):
        raise JoinTimeout(f"{who}: the processes did not all join within {timeout_s} s; start every process with the same "
                          f"--coordinator_address and --num_processes (process 0 serves the coordinator) or raise --distributed_timeout")  # fmt: skip
    return True


def wait_interruptibly(call: Callable[[], None], timeout_s: float) -> bool:
    """Run ``call`` in a daemon thread while this thread waits for it in short slices, so that a
    ``KeyboardInterrupt`` (Ctrl-C) is raised here even when ``call`` blocks in native code. Returns
    False if ``call`` is still running after ``timeout_s``; an exception it raised is raised here."""
    raised: list[BaseException] = []

    def target():
        try:
            call()
        except BaseException as error:  # handed to the waiting thread
            raised.append(error)

    thread = threading.Thread(target=target, name="jax-distributed-join", daemon=True)
    deadline = time.monotonic() + timeout_s
    thread.start()
    while thread.is_alive() and time.monotonic() < deadline:
        thread.join(0.2)
    if raised:
        raise raised[0]
    return not thread.is_alive()


def runtime_failure(error: Exception) -> str:
    """The one line a process of a multi-process run stops with after an XLA runtime error: most
    often a collective that failed because another process died."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (f"process {jax.process_index()} of {jax.process_count()}: {first}; if another process died or was stopped (see its "
            "log), start every process again with the same command: the run resumes from its newest checkpoint")  # fmt: skip


def check_same_run(workdir: str, config_json: str, timeout_s: int) -> None:
    """That every process of a multi-process run was started with the same config (``config_json``)
    and sees the same ``workdir``: process 0 puts a file with a random name there and every process
    looks for it, for up to ``min(timeout_s, NETWORK_FS_DELAY_S)`` seconds. Each learns every
    process's answer, so all stop with the same one line (``DistributedError``); the workdir is left
    as it was found."""
    if jax.process_count() == 1:
        return
    mine = np.frombuffer(hashlib.sha256(config_json.encode()).digest() + os.urandom(8), np.uint32)  # digest, then a token
    reference = np.asarray(multihost_utils.broadcast_one_to_all(mine))  # process 0's
    marker = os.path.join(workdir, f".danceopd-join-{reference[8:].tobytes().hex()}")
    with contextlib.ExitStack() as written:
        if jax.process_index() == 0:
            written.enter_context(made_folder(workdir))
            open(marker, "x").close()
            written.callback(os.remove, marker)
        multihost_utils.sync_global_devices("danceopd_jax: join marker written")
        unseen = not _appears(marker, min(timeout_s, NETWORK_FS_DELAY_S))
        problems = np.array([not np.array_equal(mine[:8], reference[:8]), unseen], np.int32)
        everyone = np.asarray(multihost_utils.process_allgather(problems))  # [processes, 2]
    other_config, other_folder = (np.flatnonzero(everyone[:, k]).tolist() for k in range(2))
    found = []
    if other_config:
        found.append(f"{_processes(other_config)} started with another config than process 0 "
                     "(every process needs the same --config and overrides)")  # fmt: skip
    if other_folder:
        found.append(f"{_processes(other_folder)} cannot see the files process 0 writes in the run's --workdir "
                     "(a multi-process run needs one folder every process sees, given as the same path)")  # fmt: skip
    if found:
        raise DistributedError("; ".join(found))


def _appears(path: str, wait_s: float) -> bool:
    """Whether the file ``path`` exists within ``wait_s`` seconds (polled)."""
    deadline = time.monotonic() + wait_s
    while not os.path.isfile(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)
    return True


def _processes(indices: list[int]) -> str:
    return f"process {indices[0]}" if len(indices) == 1 else f"processes {', '.join(map(str, indices))}"
