"""Manifests of image buckets, parsed and checked in one place before anything is built (``checked``).

A bucket's ``path`` is one of three formats:

  ``*.jsonl``  one JSON object per line (blank lines skipped)
  ``*.csv``    a header row naming the columns, then one row per example (UTF-8, ``csv`` quoting)
  a folder     (``image_text`` only) every image file with a same-named ``.txt`` caption beside
               it (``cat.png`` + ``cat.txt``); hidden files are skipped, anything else is a problem

Columns (JSON keys, CSV header names) per kind, ``[optional]``:

  image_text         image, prompt                        [uid, task]
  edit_pairs         source_image, prompt, target_image   [uid, task]
  edit_instructions  source_image, prompt                 [uid, task]   (a target_image column is not read)

These are the columns of the OmniEdit-style manifests of the authors' release (``uid, task,
prompt, source_image, target_image``), read as they are; other columns (scores, sizes, ...) are
ignored. Image paths are relative to the manifest's folder. ``uid`` names an example (default:
its line; in a folder, the file name without extension) and must be unique. ``tasks`` (a bucket
key, comma-separated) keeps only the lines whose ``task`` is one of them, so that one manifest
feeds several buckets; each named task must have a line.

Checked, every problem collected (a line each; the first ``SHOWN_PROBLEMS`` and the count go into
one ``ManifestError``): a missing or empty column value, a duplicate uid, a path leaving the
manifest's folder (unless ``allow_outside_paths``), a missing, unreadable, truncated or corrupt
image or a file that is no image (every image is decoded in full, ``image_files.inspect``), an
image whose short side is below the resolution (unless ``allow_upscale``). A missing manifest, no
example, tasks selecting no line, or a size above the manifest's count is one problem at once.
The checked examples carry each file's SHA-256; the bucket's source reads them (``file_buckets``).
"""

import concurrent.futures
import csv
import dataclasses
import functools
import json
import os

from danceopd_jax.data import image_files

# kind -> {record field: the manifest column of its image}; every kind also has "prompt"
IMAGE_COLUMNS: dict[str, dict[str, str]] = {
    "image_text": {"image": "image"},
    "edit_pairs": {"source": "source_image", "image": "target_image"},
    "edit_instructions": {"source": "source_image"},
}
FORMATS = (".jsonl", ".csv")
SHOWN_PROBLEMS = 5
CHECK_THREADS = min(8, os.cpu_count() or 1)  # PIL decodes without the GIL


class ManifestError(ValueError):
    """A bucket's manifest or files that cannot be trained on; one line naming the files and lines."""


@dataclasses.dataclass(frozen=True)
class ManifestOptions:
    """What a bucket's check depends on (config keys ``data.buckets.NAME.*`` and ``image_size``)."""

    kind: str
    path: str
    image_size: int
    size: int = 0  # the first ``size`` selected examples; 0 = all
    tasks: str = ""
    allow_upscale: bool = False
    allow_outside_paths: bool = False


@dataclasses.dataclass(frozen=True)
class ImageFile:
    path: str
    sha256: str


@dataclasses.dataclass(frozen=True)
class Example:
    """One checked example: its uid, prompt (caption or instruction) and image files by record field."""

    uid: str
    prompt: str
    images: dict[str, ImageFile]


@dataclasses.dataclass(frozen=True)
class _Row:
    """A manifest line (or a folder's file) before its checks: ``where`` is how its problems name it;
    ``problem`` says why a line could not be read into column ``values`` at all."""

    where: str
    values: dict
    default_uid: str
    problem: str = ""


def _fail(path: str, problem: str):
    raise ManifestError(f"{path}: {problem}")


def _jsonl_rows(path: str) -> list[_Row]:
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
            except UnicodeDecodeError as error:
                _fail(f"{path}:{number}", f"not UTF-8 text ({error.reason} at byte {error.start} of the line)")
            if not line:
                continue
            try:
                values, problem = json.loads(line), ""
            except ValueError as error:
                values, problem = {}, f"not JSON ({error})"
            if not isinstance(values, dict):
                values, problem = {}, "not a JSON object"
            rows.append(_Row(f"{path}:{number}", values, f"line {number}", problem))
    return rows


def _csv_rows(path: str) -> list[_Row]:
    rows = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            for fields in reader:
                where = f"{path}:{reader.line_num}"
                if not any(field.strip() for field in fields):
                    continue
                problem = f"{len(fields)} fields, the header has {len(header)}" if len(fields) != len(header) else ""
                rows.append(_Row(where, dict(zip(header, fields)), f"line {reader.line_num}", problem))
    except UnicodeDecodeError as error:
        _fail(path, f"not UTF-8 text ({error.reason})")
    except csv.Error as error:
        _fail(f"{path}:{reader.line_num}", f"not CSV ({error})")
    return rows


def _folder_rows(path: str) -> list[_Row]:
    """One row per image file of the folder, its caption read from the same-named ``.txt``."""
    names = sorted(name for name in os.listdir(path) if not name.startswith("."))
    captions = {os.path.splitext(name)[0]: name for name in names if name.endswith(".txt")}
    images = [name for name in names if name.lower().endswith(image_files.IMAGE_EXTENSIONS)]
    stems = {os.path.splitext(name)[0] for name in images}
    rows = []
    for name in names:
        stem = os.path.splitext(name)[0]
        values, problem = {}, ""
        if name in images:
            values = {"image": name, "uid": stem}
            if stem not in captions:
                problem = f"no caption file {stem}.txt"
            else:
                try:
                    with open(os.path.join(path, captions[stem]), encoding="utf-8-sig") as f:
                        values["prompt"] = f.read().strip()
                except (OSError, UnicodeDecodeError) as error:
                    problem = f"caption {captions[stem]}: unreadable ({error})"
        elif name.endswith(".txt") and stem not in stems:
            problem = f"a caption without an image (one of {', '.join(image_files.IMAGE_EXTENSIONS)})"
        elif not name.endswith(".txt"):
            problem = "neither an image nor a .txt caption"
        else:
            continue
        rows.append(_Row(os.path.join(path, name), values, stem, problem))
    return rows


def _rows(options: ManifestOptions) -> list[_Row]:
    path = options.path
    if os.path.isdir(path):
        if options.kind != "image_text":
            _fail(path, f"a folder of captioned images is an image_text bucket; kind {options.kind!r} reads a .jsonl or .csv manifest")
        if options.tasks:
            _fail(path, "a folder of captioned images has no task column to select tasks from")
        return _folder_rows(path)
    if not os.path.isfile(path):
        _fail(path, "no such manifest file or folder")
    extension = os.path.splitext(path)[1].lower()
    if extension not in FORMATS:
        _fail(path, "manifests are .jsonl or .csv files (or, for image_text, a folder of images with .txt captions)")
    return _jsonl_rows(path) if extension == ".jsonl" else _csv_rows(path)


def _text(row: _Row, column: str) -> str:
    """The non-empty string (or, for uid, number) in ``column``; ``ValueError`` naming what is wrong."""
    value = row.values.get(column)
    if value is None or value == "":
        raise ValueError(f"no {column!r}")
    if column == "uid" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"{column!r} must be a string, got {json.dumps(value)}")
    if not value.strip():
        raise ValueError(f"{column!r} is blank")
    return value.strip() if column == "prompt" else value


def _selected(options: ManifestOptions, rows: list[_Row]) -> tuple[list[_Row], list[tuple[_Row, str]]]:
    """The rows of ``options.tasks`` (all rows when it is empty), and the problems of those without a task."""
    if not options.tasks:
        return rows, []
    wanted = [task.strip() for task in options.tasks.split(",") if task.strip()]
    selected, problems, seen = [], [], set()
    for row in rows:
        if row.problem:
            selected.append(row)  # a broken line: reported with the bucket's problems
            continue
        try:
            task = _text(row, "task")
        except ValueError as error:
            problems.append((row, f"{error} (config tasks={options.tasks!r} selects lines by it)"))
            continue
        seen.add(task)
        if task in wanted:
            selected.append(row)
    absent = [task for task in wanted if task not in seen]
    if absent and not problems:
        _fail(options.path, f"tasks {', '.join(map(repr, absent))} select no line (its tasks: {', '.join(sorted(seen)) or 'none'})")
    return selected, problems


def _check_columns(options: ManifestOptions, rows: list[_Row]) -> None:
    """A column the kind needs that no line has is one problem (a CSV header without it, a manifest without targets)."""
    lines = [row.values for row in rows if not row.problem]
    for column in ("prompt", *IMAGE_COLUMNS[options.kind].values()):
        if lines and not any(column in values for values in lines):
            hint = "; a manifest without targets is kind 'edit_instructions'" if column == "target_image" else ""
            needed = ", ".join(("prompt", *IMAGE_COLUMNS[options.kind].values()))
            _fail(options.path, f"no {column!r} column (kind {options.kind!r} reads {needed}){hint}")


def _resolve(options: ManifestOptions, relative: str) -> str:
    """The path of an image named in the manifest (relative to its folder); ``ValueError`` if it leaves the folder."""
    root = os.path.abspath(options.path if os.path.isdir(options.path) else os.path.dirname(options.path))
    full = os.path.normpath(os.path.join(root, relative))
    if not options.allow_outside_paths and os.path.commonpath([root, full]) != root:
        raise ValueError(f"{relative!r} is outside the manifest's folder {root} (set allow_outside_paths=True to allow it)")
    return full


def _inspect_file(path: str) -> image_files.ImageFacts | str:
    """The file's facts, or why it is no usable image."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return "no such file"
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    try:
        return image_files.inspect(data)
    except image_files.ImageFileError as error:
        return str(error)


def _parsed(options: ManifestOptions, rows: list[_Row]) -> tuple[list[tuple], list[tuple[_Row, str]]]:
    """``(row, uid, prompt, {field: image path})`` of every row whose columns are right, and the others' problems."""
    parsed, problems, owners = [], [], {}  # owners: uid -> where it was first seen
    for row in rows:
        try:
            if row.problem:
                raise ValueError(row.problem)
            uid = _text(row, "uid") if row.values.get("uid") not in (None, "") else row.default_uid
            prompt = _text(row, "prompt")
            paths = {field: _resolve(options, _text(row, column)) for field, column in IMAGE_COLUMNS[options.kind].items()}
            if uid in owners:
                raise ValueError(f"uid {uid!r} is also at {owners[uid]}")
        except ValueError as error:
            problems.append((row, str(error)))
            continue
        owners[uid] = row.where
        parsed.append((row, uid, prompt, paths))
    return parsed, problems


def _check(options: ManifestOptions) -> list[Example]:
    rows = _rows(options)
    order = {id(row): position for position, row in enumerate(rows)}
    _check_columns(options, rows)
    rows, problems = _selected(options, rows)
    if not rows and not problems:
        _fail(options.path, "no examples (an empty bucket has nothing to draw)")
    if options.size > len(rows) and not problems:
        _fail(options.path, f"bucket size {options.size} but the manifest has {len(rows)} examples{' of those tasks' if options.tasks else ''}")
    parsed, bad_rows = _parsed(options, rows[: options.size or None])
    problems += bad_rows
    unique = sorted({path for *_, paths in parsed for path in paths.values()})
    with concurrent.futures.ThreadPoolExecutor(CHECK_THREADS) as pool:
        facts = dict(zip(unique, pool.map(_inspect_file, unique)))
    examples, columns = [], IMAGE_COLUMNS[options.kind]
    for row, uid, prompt, paths in parsed:
        bad = [(row, f"{columns[field]} {row.values[columns[field]]!r}: {why}")
               for field, path in paths.items() if (why := _image_problem(options, facts[path]))]  # fmt: skip
        problems += bad
        if not bad:
            examples.append(Example(uid, prompt, {field: ImageFile(path, facts[path].sha256) for field, path in paths.items()}))
    if problems:
        problems.sort(key=lambda problem: order[id(problem[0])])  # in manifest order
        shown = "; ".join(f"{row.where}: {problem}" for row, problem in problems[:SHOWN_PROBLEMS])
        count = f"{len(problems)} problems, the first {min(len(problems), SHOWN_PROBLEMS)}: "
        raise ManifestError(shown if len(problems) == 1 else count + shown)
    return examples


def _image_problem(options: ManifestOptions, facts: image_files.ImageFacts | str) -> str:
    """Why a decoded file cannot serve this bucket ("" if it can)."""
    if isinstance(facts, str):
        return facts
    if min(facts.width, facts.height) < options.image_size and not options.allow_upscale:
        return f"{facts.width}x{facts.height} is smaller than image_size {options.image_size} (set allow_upscale=True to upscale it)"
    return ""


@functools.lru_cache(maxsize=32)
def _checked(options: ManifestOptions, signature: tuple) -> tuple[Example, ...]:
    return tuple(_check(options))


def checked(options: ManifestOptions) -> tuple[Example, ...]:
    """The bucket's checked examples in manifest order (``ManifestError`` naming every problem, module docstring).

    Checked once per process for a manifest as it is (its modification time and size, a folder's
    listing time): the config check and the bucket's source share the result."""
    try:
        stat = os.stat(options.path)
        signature = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        signature = ()
    return _checked(options, signature)
