"""Command line: ``python -m danceopd_jax.main --config configs/NAME.py --workdir DIR [--config.KEY=VALUE]``.

Trains with the config (see ``train.train_and_evaluate``), resuming from the latest checkpoint
in ``DIR/checkpoints`` when there is one; a config with ``stages`` runs a pipeline of
trainings and an evaluation (``pipeline.run_pipeline``). A bad flag or config value stops with one line on
stderr and exit code 2, before anything is built.
"""

import os
import sys

# clu's TensorBoard writer imports TensorFlow; keep its start-up chatter off the terminal.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from danceopd_jax import pipeline, train  # noqa: E402
from danceopd_jax.config_validation import ConfigError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard summaries.")
flags.mark_flags_as_required(["config", "workdir"])


def _usage_error(message: str) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing where a bad flag or override is one line and exit code 2, not a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        _usage_error(error)
    except (AttributeError, KeyError, TypeError, ValueError) as error:  # raised by ml_collections overrides
        text = str(error).replace("\\n", " ").replace("\\'", "'")
        if len(text) > 1 and text[0] == text[-1] == "'":  # ml_collections wraps a repr in quotes
            text = text[1:-1]
        _usage_error(f"bad config override: {text}")


def main(argv):
    if len(argv) > 1:
        _usage_error(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax/absl INFO chatter; progress is printed
    config_path = config_flags.get_config_filename(flags.FLAGS["config"]).split(":")[0]
    if not os.path.isfile(config_path):
        _usage_error(f"--config: no such file {config_path!r}")
    config = _CONFIG.value
    try:
        if "stages" in config:
            pipeline.run_pipeline(config, _WORKDIR.value)
        else:
            train.train_and_evaluate(config, _WORKDIR.value)
    except ConfigError as error:
        _usage_error(error)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
