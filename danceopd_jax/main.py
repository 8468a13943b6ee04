"""Command line: ``python -m danceopd_jax.main --config configs/NAME.py --workdir DIR [--config.KEY=VALUE]``.

Trains with the config (see ``train.train_and_evaluate``), resuming from the latest checkpoint
in ``DIR/checkpoints`` when there is one. A bad config stops with one line and exit code 2.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # clu's TensorBoard writer imports TensorFlow

from absl import app, flags, logging
from ml_collections import config_flags

from danceopd_jax import train
from danceopd_jax.config_validation import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard summaries.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax/absl INFO chatter; progress is printed
    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
