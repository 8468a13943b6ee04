"""A diffusers pipeline folder: its components, checked before anything is loaded.

A diffusers pipeline folder (what ``save_pretrained`` writes and what users download) holds a
``model_index.json`` naming its pipeline class and each component, and one subfolder per
component with its config (``config.json``; a scheduler's ``scheduler_config.json``; tokenizers
have their own files)::

    model_index.json            {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "..."], ...}
    transformer/                config.json + diffusion_pytorch_model[-0000k-of-0000n].safetensors (+ index)
    vae/, text_encoder*/, tokenizer*/, scheduler/

Which components a family needs is its ``FolderLayout`` (``models.sd3_folder``,
``models.zimage_backbone``). A run given precomputed prompt embeddings never loads the text
encoders: their components are then not needed (``text_encoders=False``).
"""

import dataclasses
import hashlib
import json
import os

CONFIG_FILES = {"scheduler": "scheduler_config.json"}  # the components' config file, config.json otherwise


class ModelFolderError(ValueError):
    """A model folder that is not a usable pipeline; the message names the folder and what is wrong."""


@dataclasses.dataclass(frozen=True)
class FolderLayout:
    """The components of one family's pipelines: ``required`` ones must be named and present,
    ``optional`` ones may be absent (``[null, null]`` in the index); ``text_components`` (text
    encoders and tokenizers) are needed only to encode prompts; ``tokenizers`` have no config file."""

    family: str  # in messages, e.g. "SD3"
    pipeline_classes: tuple[str, ...]
    required: tuple[str, ...]
    optional: tuple[str, ...]
    text_components: tuple[str, ...]
    tokenizers: tuple[str, ...]


def read_json(path: str) -> dict:
    """A JSON object from ``path``, or a ``ModelFolderError`` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelFolderError(f"{path}: file missing") from None
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path}: expected a JSON object")
    return data


def components(layout: FolderLayout, model_dir: str, text_encoders: bool = True) -> dict[str, str]:
    """``{component: folder}`` of a pipeline folder of ``layout``'s family, checked: the index, and each
    component's folder and config; the text components only with ``text_encoders`` (else left out)."""
    if not os.path.isdir(model_dir):
        raise ModelFolderError(f"{model_dir}: no such model folder")
    index = read_json(os.path.join(model_dir, "model_index.json"))
    if index.get("_class_name") not in layout.pipeline_classes:
        raise ModelFolderError(
            f"{model_dir}/model_index.json: _class_name {index.get('_class_name')!r} is not one of the {layout.family} "
            f"pipelines ({', '.join(layout.pipeline_classes)})"
        )
    found = {}
    for name in layout.required + layout.optional:
        if not text_encoders and name in layout.text_components:
            continue
        entry = index.get(name)
        if entry is None or entry == [None, None]:
            if name in layout.required:
                raise ModelFolderError(f"{model_dir}/model_index.json: the required component {name!r} is not named")
            continue
        folder = os.path.join(model_dir, name)
        if not os.path.isdir(folder):
            raise ModelFolderError(f"{model_dir}: missing component {name}/ (model_index.json names it)")
        if name not in layout.tokenizers:
            config = os.path.join(folder, CONFIG_FILES.get(name, "config.json"))
            if not os.path.isfile(config):
                raise ModelFolderError(f"{folder}: missing {os.path.basename(config)}")
        found[name] = folder
    return found


def component_config(layout: FolderLayout, model_dir: str, name: str) -> dict:
    """The config dict of component ``name`` of a checked pipeline folder (the text components are
    checked only when ``name`` is one of them)."""
    folder = components(layout, model_dir, text_encoders=name in layout.text_components)[name]
    return read_json(os.path.join(folder, CONFIG_FILES.get(name, "config.json")))


def folder_files(model_dir: str, folders) -> list[tuple[str, str]]:
    """``(path in the model folder, full path)`` of every file under ``folders`` (component folders of
    ``model_dir``), in a fixed order."""
    files = []
    for folder in folders:
        for root, dirs, names in os.walk(folder):
            dirs.sort()
            files += [(os.path.relpath(os.path.join(root, name), model_dir), os.path.join(root, name)) for name in sorted(names)]
    return files


SAMPLED_BYTES = 1 << 20  # read from each end of a file by ``files_digest``


def _sampled(path: str) -> str:
    """sha256 of a file's first and last ``SAMPLED_BYTES`` (the whole of a smaller file): cheap on a
    multi-GB T5, and other weights of the same shapes differ there."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(SAMPLED_BYTES))
        size = os.fstat(f.fileno()).st_size
        if size > 2 * SAMPLED_BYTES:
            f.seek(size - SAMPLED_BYTES)
        digest.update(f.read())
    return digest.hexdigest()


def json_digest(value) -> str:
    """sha256 (hex) of ``value`` as JSON."""
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


def files_digest(files: list[tuple[str, str]]) -> str:
    """A digest of ``folder_files``' files (their names, sizes and ``_sampled`` contents): the same for a
    copy of the folder on another machine, different for other weights."""
    return json_digest([[rel, os.path.getsize(path), _sampled(path)] for rel, path in files])
