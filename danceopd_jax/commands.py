"""What the commands (``main``, ``sample``, ``export``, ``encode_prompts``, ``experiments.reproduce``)
share: one-line errors for bad flags and arguments, probes of output folders, and a quiet start."""

import argparse
import contextlib
import difflib
import os
import re
import signal
import sys
import tempfile
import traceback

from absl import flags, logging


def fail(message: str, code: int = 2) -> None:
    """``error: MESSAGE`` (on one line) on stderr, exit code ``code`` (2: bad input)."""
    _print_error(message)
    sys.exit(code)


def _print_error(message) -> None:
    """``error: MESSAGE`` on stderr, its whitespace (newlines included) folded into one line."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def interrupt_quietly_while_starting(module_name: str) -> None:
    """Until ``started`` (which ``parse_flags`` calls once the flags are parsed), Ctrl-C while the command
    imports JAX, flax and its models (seconds) is one line and exit code 130, not a traceback of the
    import it broke into. Call it with the command module's ``__name__`` before those imports: it acts
    only when the module runs as the command (``__main__``), not when it is imported for its functions.
    A SIGINT the parent ignores (a background job) stays ignored."""
    if module_name == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_while_starting)


def _interrupted_while_starting(signum, frame) -> None:
    exit_at_once("interrupted (Ctrl-C) while starting, before anything ran", 130)


def started() -> None:
    """Ctrl-C is the command's own from here on: undoes ``interrupt_quietly_while_starting``."""
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing where a bad flag (unknown, a bad value, a missing required one), a config file
    that fails to run (``config_file_problem``) or a bad config override is one line and exit code 2
    (``fail``), not absl's ``FATAL Flags parsing error`` and usage dump or a traceback. Pass it to
    ``app.run(main, flags_parser=parse_flags)``."""
    try:
        return flags.FLAGS(argv)
    except Exception as error:  # a config file's code can raise anything
        path = config_file_flag(argv)
        problem = config_file_problem(error, path) if path else None
        if problem:
            fail(problem)
        problem = override_path_problem(argv)
        if problem:
            fail(problem)
        if isinstance(error, flags.Error):
            fail(error)
        if not isinstance(error, (AttributeError, KeyError, TypeError, ValueError)):  # raised by ml_collections overrides
            raise
        text = str(error).replace("\\n", " ").replace("\\'", "'")
        if len(text) > 1 and text[0] == text[-1] == "'":  # ml_collections wraps a repr in quotes
            text = text[1:-1]
        fail(f"bad config override: {text}")
    finally:
        started()


def override_path_problem(argv: list[str]) -> str | None:
    """``--config.PATH=VALUE: config.PARENT has no key 'KEY' (...)`` for the first override in ``argv``
    whose path is not in the ``--config`` file's config (a missing key, with the closest key or the keys
    there; or a key under a value that is not a config), or None: no config flag, or every path exists.
    The config is loaded again: ml_collections raises before it stores the flag's value."""
    argument = config_flag_argument(argv)
    if argument is None or "config" not in flags.FLAGS:
        return None
    try:
        config = flags.FLAGS["config"].parser.parse(argument)
    except Exception:  # the file's own errors are config_file_problem's
        return None
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        node, where = config, "config"
        for key in arg.removeprefix("--config.").split("=", 1)[0].split("."):
            if not hasattr(node, "keys"):
                return f"{arg}: {where} is a {type(node).__name__}, not a config, so it has no key {key!r}"
            if key not in node:
                keys = sorted(node.keys())
                close = difflib.get_close_matches(key, keys, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"its keys: {', '.join(keys)}"
                return f"{arg}: {where} has no key {key!r} ({hint})"
            node, where = node[key], f"{where}.{key}"
    return None


def config_flag_argument(argv: list[str]) -> str | None:
    """The argument ``FILE[:ARG]`` of ``--config FILE[:ARG]`` (or ``--config=...``) in ``argv``, or None."""
    for index, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and index + 1 < len(argv):
            return argv[index + 1]
    return None


def config_file_flag(argv: list[str]) -> str | None:
    """The file named by ``--config FILE[:ARG]`` (or ``--config=...``) in ``argv``, or None."""
    argument = config_flag_argument(argv)
    return None if argument is None else argument.split(":")[0]


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def config_file_problem(error: BaseException, path: str) -> str | None:
    """``--config PATH: [line N: ]TYPE: MESSAGE`` when ``error`` was raised while running the config
    file ``path`` (a syntax error, an exception in its code or its ``get_config``, a ``get_config`` it
    lacks or that takes other arguments than the ``:ARG`` given); None for any other error. ml_collections
    passes a TypeError or ValueError of ``get_config`` on as a flag error with the traceback as text."""
    here = os.path.realpath(path)
    if isinstance(error, SyntaxError) and error.filename and os.path.realpath(error.filename) == here:
        return f"--config {path}: line {error.lineno}: SyntaxError: {error.msg}"
    if isinstance(error, AttributeError) and "get_config" in str(error):
        return f"--config {path}: defines no get_config()"
    passed_on = isinstance(error, flags.Error) and "Error whilst parsing config file" in str(error)
    if passed_on:
        frames = [(file, int(line)) for file, line in _FRAME.findall(str(error))]
        cause = str(error).strip().splitlines()[-1]
    else:
        frames = [(frame.filename, frame.lineno) for frame in traceback.extract_tb(error.__traceback__)]
        cause = f"{type(error).__name__}: {error}"
    lines = [line for file, line in frames if os.path.realpath(file) == here]
    if not (lines or passed_on):
        return None  # not the file's error (e.g. a bad override)
    return f"--config {path}: " + (f"line {lines[-1]}: " if lines else "") + cause


def exit_interrupted() -> None:
    """After a ``KeyboardInterrupt`` that ended a command (Ctrl-C before the training loop, or a second
    one in it): one line and exit code 130 at once. The ``finally`` blocks it passed have already
    flushed the summaries and finished any checkpoint save; Python's teardown while XLA's threads
    are busy (a compile in flight) can crash, so it is skipped."""
    exit_at_once("interrupted (Ctrl-C) before a checkpoint could be saved; the same command resumes from the newest one", 130)


def exit_at_once(message: str, code: int) -> None:
    """``error: MESSAGE`` on stderr and exit code ``code`` without Python's teardown: for an exit while
    native threads are busy (a compile in flight, a blocked ``jax.distributed`` connect)."""
    _print_error(message)
    sys.stdout.flush()
    os._exit(code)


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
    try:
        with made_folder(folder), tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        return f"cannot be written ({error.strerror})"
    return None


@contextlib.contextmanager
def made_folder(folder: str):
    """``folder`` exists inside the block; the folders made for it (it and missing parents) are
    removed again on exit, innermost first."""
    missing, path = [], os.path.abspath(folder)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        yield
    finally:
        for made in filter(os.path.isdir, missing):
            os.rmdir(made)


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
