"""A run's prompt embeddings, encoded once by a model folder's text encoders and cached (any family).

A family (``models.backbones``) gives its folder layout (which components are its text encoders
and tokenizers) and its ``prompt_encoder``; this module keeps the table of a run's prompts in the
workdir, reused only while the folder's text encoders are the ones that encoded it
(``encoder_identity``), and identifies a folder's text encoders across machines
(``text_encoders_digest``) for tables made ahead of a run (``python -m danceopd_jax.encode_prompts``).
"""

import json
import os
from collections.abc import Callable, Sequence

from danceopd_jax.data.prompt_embeddings import Encoder, PromptEmbeddings, encode_table, load_table
from danceopd_jax.models import pipeline_folder
from danceopd_jax.models.pipeline_folder import FolderLayout

ENCODED_BY = "encoded_by"  # a cached prompt table's metadata key: ``encoder_identity`` of what encoded it


def _text_files(layout: FolderLayout, model_dir: str) -> list[tuple[str, str]]:
    """``(path in the folder, full path)`` of every file of the folder's text encoders and tokenizers,
    in a fixed order."""
    components = pipeline_folder.components(layout, model_dir)
    return pipeline_folder.folder_files(model_dir, [components[name] for name in layout.text_components if name in components])


def encoder_identity(layout: FolderLayout, model_dir: str, text_len: int, dtype: str = "float32") -> str:
    """What a prompt's embeddings depend on besides the prompt, as one JSON string: the folder (its real
    path), a digest of the path, size and modification time of every file of its text encoders and
    tokenizers (weights replaced in place change it), ``text_len`` and the compute dtype."""
    stats = [(rel, os.stat(path)) for rel, path in _text_files(layout, model_dir)]
    files = pipeline_folder.json_digest([[rel, stat.st_size, stat.st_mtime_ns] for rel, stat in stats])
    return json.dumps(dict(model_dir=os.path.realpath(model_dir), text_files=files, text_len=text_len, dtype=dtype), sort_keys=True)


def text_encoders_digest(layout: FolderLayout, model_dir: str) -> str:
    """A digest of the folder's text-encoder and tokenizer files (``pipeline_folder.files_digest``: the
    same for a copy of the folder on another machine, different for other encoders; ``TEXT_ENCODERS``
    in a table ``encode_prompts`` writes; checked against a run's folder by config validation)."""
    return pipeline_folder.files_digest(_text_files(layout, model_dir))


TEXT_ENCODERS = "text_encoders"  # a prompt table's metadata key: ``text_encoders_digest`` of the folder that encoded it


def cached_table(
    layout: FolderLayout,
    prompt_encoder: Callable[[str, int, str], Encoder],
    model_dir: str,
    prompts: Sequence[str],
    path: str,
    text_len: int,
    dtype: str = "float32",
    edit_prompts: Sequence[str] = (),
) -> PromptEmbeddings:
    """The embeddings of ``prompts`` and ``edit_prompts`` (and their CFG nulls, the empty prompt) at
    ``path``: read if it has them all and was encoded by this folder's text encoders as they are now,
    at this ``text_len`` and dtype (``encoder_identity``, recorded in the table), else encoded
    (``prompt_encoder(model_dir, text_len, dtype)``, the family's) and written there. A table another
    folder (or an older version of this code, which recorded nothing) encoded is encoded again, never
    reused."""
    identity = encoder_identity(layout, model_dir, text_len, dtype)
    if os.path.isfile(path):
        table = load_table(path)
        has_all = not table.missing(["", *prompts]) and not (edit_prompts and table.missing(["", *edit_prompts], "edit"))
        if table.metadata.get(ENCODED_BY) == identity and has_all and table.text_shape[0] == text_len:
            return table
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    encode = prompt_encoder(model_dir, text_len, dtype)
    return encode_table(path, prompts, encode, metadata={ENCODED_BY: identity}, edit_prompts=edit_prompts)


