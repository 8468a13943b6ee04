"""What the commands (``main``, ``sample``, ``export``, ``encode_prompts``) share: one-line errors
for bad flags and arguments, probes of output folders, and a quiet start."""

import argparse
import os
import sys
import tempfile

from absl import flags, logging


def fail(message: str, code: int = 2) -> None:
    """``error: MESSAGE`` (on one line) on stderr, exit code ``code`` (2: bad input)."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing where a bad flag (unknown, a bad value, a missing required one) or config
    override is one line and exit code 2 (``fail``), not absl's ``FATAL Flags parsing error`` and usage
    dump or a traceback. Pass it to ``app.run(main, flags_parser=parse_flags)``."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        fail(error)
    except (AttributeError, KeyError, TypeError, ValueError) as error:  # raised by ml_collections overrides
        text = str(error).replace("\\n", " ").replace("\\'", "'")
        if len(text) > 1 and text[0] == text[-1] == "'":  # ml_collections wraps a repr in quotes
            text = text[1:-1]
        fail(f"bad config override: {text}")


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line ``error: ...`` and exit code 2, no usage dump."""

    def error(self, message: str):
        fail(message)


def folder_problem(folder: str) -> str | None:
    """Why ``folder`` cannot be a folder this process creates and writes in (``"exists and is not a
    folder"``, ``"cannot be written (REASON)"``), or None when it can. Probed and left as it was
    found: the folders the probe creates are removed again."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        return "exists and is not a folder"
    missing, path = [], os.path.abspath(folder)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return f"cannot be written ({error.strerror})"
    finally:
        for made in filter(os.path.isdir, missing):  # innermost first: only the folders the probe made
            os.rmdir(made)
    return None


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
