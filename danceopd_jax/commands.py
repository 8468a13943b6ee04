"""What the workdir commands (``sample``, ``export``) share: one-line errors and a quiet start."""

import sys

from absl import flags, logging


def fail(message: str) -> None:
    """``error: MESSAGE`` (on one line) on stderr, exit code 2."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def start(argv, **required) -> None:
    """Refuse stray arguments and missing ``--FLAG`` values (``required``: flag name -> value);
    silence orbax's INFO chatter on restore unless ``--verbosity`` was given."""
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    missing = [f"--{name}" for name, value in required.items() if not value]
    if missing:
        fail(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
