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
"""

import jax


class DistributedError(ValueError):
    """Inconsistent multi-process flags (a one-line CLI error)."""


def initialize(distributed: bool, coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> bool:
    """Join the run the flags describe; returns whether this is a multi-process run."""
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
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
