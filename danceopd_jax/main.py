"""Command line: ``python -m danceopd_jax.main --config configs/NAME.py --workdir DIR [--config.KEY=VALUE]``.

Trains with the config (see ``train.train_and_evaluate``), resuming from the latest checkpoint
in ``DIR/checkpoints`` when there is one; a config with ``stages`` runs a pipeline of
trainings and an evaluation (``pipeline.run_pipeline``). ``--distributed`` or
``--coordinator_address/--num_processes/--process_id`` join a multi-process run (``distributed``),
waiting ``--distributed_timeout`` seconds for every process (then one line and exit code 1), and
check that every process has the same config and sees the same workdir (``distributed.check_same_run``).
A bad flag or config value stops with one line on stderr and exit code 2, before anything is built.
SIGTERM saves a checkpoint and exits 0, Ctrl-C saves one and exits 130 (the same command resumes;
a second Ctrl-C stops at once, without saving; one while starting exits 130 at once, with one line);
a non-finite loss, a set of checkpoints none of which can be read, or in a multi-process run an XLA
runtime error (another process died) is one line on stderr and exit code 1.
"""

import os
import sys

from danceopd_jax.commands import exit_at_once, exit_interrupted, fail, folder_problem, interrupt_quietly_while_starting, parse_flags

interrupt_quietly_while_starting(__name__)
# clu's TensorBoard writer imports TensorFlow; keep its start-up chatter off the terminal.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import ConfigDict, config_flags  # noqa: E402

from danceopd_jax import checkpoints, distributed, pipeline, train  # noqa: E402
from danceopd_jax.config_validation import ConfigError  # noqa: E402
from danceopd_jax.models.lora import UnknownLoRATarget  # noqa: E402
from danceopd_jax.models.pipeline_folder import ModelFolderError  # noqa: E402
from danceopd_jax.models.weights import WeightsError, WeightsMismatch  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard summaries.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Join a multi-process run that JAX detects itself (TPU pod, SLURM).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Explicit multi-process run: HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Explicit multi-process run: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Explicit multi-process run: this process's index.")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 300, "Multi-process run: seconds to wait for every process to join before giving up (exit code 1)."
)
flags.mark_flags_as_required(["config", "workdir"])


def _check_workdir(workdir: str) -> None:
    """A one-line usage error unless ``workdir`` is a folder this process can create and write in
    (probed, and left as it was found: nothing is written before the config is checked)."""
    problem = folder_problem(workdir)
    if problem:
        fail(f"--workdir: {workdir!r} {problem}")


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax/absl INFO chatter; progress is printed
    config_path = config_flags.get_config_filename(flags.FLAGS["config"]).split(":")[0]
    if not os.path.isfile(config_path):
        fail(f"--config: no such file {config_path!r}")
    config = _CONFIG.value
    if not isinstance(config, ConfigDict):
        fail(f"--config {config_path}: get_config() returned {type(config).__name__}, not a ConfigDict")
    workdir = _WORKDIR.value
    _check_workdir(workdir)
    try:
        if distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED_TIMEOUT.value):
            distributed.check_same_run(workdir, config.to_json(sort_keys=True), _DISTRIBUTED_TIMEOUT.value)
        if "stages" in config:
            pipeline.run_pipeline(config, workdir)
        else:
            train.train_and_evaluate(config, workdir)
    except (distributed.DistributedError, ConfigError, ModelFolderError, WeightsError, WeightsMismatch, UnknownLoRATarget) as error:
        fail(error)
    except train.Preempted as error:
        if error.exit_code:  # the loop printed where it saved; SIGTERM exits 0, Ctrl-C 130
            sys.exit(error.exit_code)
    except distributed.JoinTimeout as error:
        exit_at_once(error, 1)
    except jax.errors.JaxRuntimeError as error:
        if jax.process_count() == 1:
            raise
        exit_at_once(distributed.runtime_failure(error), 1)
    except KeyboardInterrupt:  # Ctrl-C before the loop (waiting for the other processes, compiling), or a second one in it
        exit_interrupted()
    except (FloatingPointError, checkpoints.CheckpointError) as error:
        fail(error, code=1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
