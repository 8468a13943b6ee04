"""A table of precomputed prompt embeddings, the text condition of a run on a real model.

Running CLIP-L, CLIP-G and T5-XXL inside every train step would cost more than the student; the
prompts of a run are known up front, so they are encoded once (``encode_table``), saved as one
safetensors file and looked up by the input pipeline. An SD3 run encodes its prompts into its
workdir; a user may instead encode them beforehand, on any machine, with
``python -m danceopd_jax.encode_prompts`` and pass the table as ``config.prompt_embeddings``: the
run then never loads the text encoders.

File layout: tensors ``text/<i>`` [L, D] (float32) for entry ``i``, and, where the family's encoder
gives them, ``pooled/<i>`` [P] (float32), ``text_mask/<i>`` [L] (bool) and ``text_segments/<i>`` [S]
(int32); the metadata keys ``prompts`` and ``templates`` holding the JSON lists of the entries'
prompts and templates (``TEMPLATES``; a table without ``templates`` holds ``t2i`` entries only).
Tensors are read lazily, one entry at a time, so a table bigger than host memory still serves a run.
"""

import json
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from danceopd_jax.models.weights import TensorSource, WeightsError, open_safetensors, write_safetensors

# How a prompt is encoded: ``t2i``, a prompt alone; ``edit``, an edit instruction beside a source image
# (a family whose text encoding depends on it, e.g. Z-Image's three-segment edit template, encodes
# it so; others encode both alike). A record with a source image is encoded as ``edit``.
TEMPLATES = ("t2i", "edit")
# ``(prompts, template="t2i") -> {"text": [B, L, D], and any of "pooled" [B, P], "text_mask" [B, L],
# "text_segments" [B, S]}`` (an encoder that only encodes ``t2i`` may take the prompts alone)
Encoder = Callable[..., Mapping[str, np.ndarray]]
EXTRAS = ("pooled", "text_segments")  # the optional embeddings after text and text_mask, in this order
KINDS = ("text", "text_mask", *EXTRAS)
DTYPES = {"text": np.float32, "text_mask": np.bool_, "pooled": np.float32, "text_segments": np.int32}


class PromptEmbeddings:
    """``(prompt, template="t2i") -> (text [L, D], text_mask [L], *extras)``: a ``data.pipeline`` text embedder.

    ``extras`` are the table's optional embeddings in ``EXTRAS`` order: ``pooled`` [P] (SD3's pooled
    CLIP projection) and ``text_segments`` [S] (Z-Image's segment lengths). A table without
    ``text_mask`` tensors has every token valid (SD3 attends over every text token).
    """

    def __init__(self, prompts: Sequence[str], templates: Sequence[str], tensors: TensorSource):
        self.prompts = list(prompts)
        self.templates = list(templates)
        self.where = tensors.where
        self._index = {(t, p): i for i, (t, p) in enumerate(zip(self.templates, self.prompts))}
        self._tensors = tensors
        self.metadata = dict(tensors.metadata)  # the file's metadata: ``prompts``, and what encoded it where recorded
        self.kinds = [kind for kind in KINDS if f"{kind}/0" in tensors]
        self.text_shape = tensors.shape("text/0")
        self.pooled_dim = tensors.shape("pooled/0")[0] if "pooled" in self.kinds else 0
        self.text_segments_len = tensors.shape("text_segments/0")[0] if "text_segments" in self.kinds else 0

    def __contains__(self, prompt: str) -> bool:
        return ("t2i", prompt) in self._index

    def missing(self, prompts: Sequence[str], template: str = "t2i") -> list[str]:
        """The distinct ``prompts`` the table has no ``template`` embedding for, in order."""
        return [p for p in dict.fromkeys(prompts) if (template, p) not in self._index]

    def __call__(self, prompt: str, template: str = "t2i") -> tuple[np.ndarray, ...]:
        if (template, prompt) not in self._index:
            what = "prompt" if template == "t2i" else f"{template} prompt"
            raise KeyError(f"{self.where}: no embedding for {what} {prompt!r}")
        i = self._index[template, prompt]
        text = np.asarray(self._tensors[f"text/{i}"], np.float32)
        mask = np.asarray(self._tensors[f"text_mask/{i}"], bool) if "text_mask" in self.kinds else np.ones(text.shape[0], bool)
        extras = (np.asarray(self._tensors[f"{kind}/{i}"], DTYPES[kind]) for kind in EXTRAS if kind in self.kinds)
        return (text, mask, *extras)


def source_prompts(sources: Sequence, template: str = "t2i") -> list[str]:
    """The distinct prompts of the records of ``sources`` (random-access record sources) that are encoded
    with ``template`` (``edit``: the records with a source image; ``t2i``: the others), sorted."""
    edit = template == "edit"
    return sorted({r["prompt"] for source in sources for r in _text_records(source) if ("source" in r) == edit})


def _text_records(source):
    """The records of ``source``, with their images left unread where it can (an image-file bucket's ``text_record``)."""
    read = getattr(source, "text_record", source.__getitem__)
    return (read(i) for i in range(len(source)))


def table_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts a table of ``prompts`` holds: the empty prompt (the CFG null), then the distinct others in order."""
    return list(dict.fromkeys(["", *prompts]))


def load_table(path: str) -> PromptEmbeddings:
    """The table saved at ``path`` (``save_table``), checked from its header alone: a text tensor per
    entry and the same optional kinds for every entry, each kind of one shape."""
    tensors = open_safetensors(path)
    try:
        prompts = json.loads(tensors.metadata["prompts"])
        templates = json.loads(tensors.metadata.get("templates", "null")) or ["t2i"] * len(prompts)
    except (KeyError, ValueError):
        raise WeightsError(f"{path}: not a prompt-embedding table (no 'prompts' metadata)") from None
    if len(templates) != len(prompts) or not set(templates) <= set(TEMPLATES):
        raise WeightsError(f"{path}: 'templates' metadata must give one of {', '.join(TEMPLATES)} for each of the {len(prompts)} prompts")
    kinds = [kind for kind in KINDS if f"{kind}/0" in tensors]
    expected = {f"{kind}/{i}" for i in range(len(prompts)) for kind in kinds}
    if not prompts or "text" not in kinds or set(tensors) != expected:
        raise WeightsError(f"{path}: a table of {len(prompts)} prompts needs exactly text/i (and the same optional "
                           f"{', '.join(KINDS[1:])}) for each")  # fmt: skip
    ranks = {"text": 2, "text_mask": 1, "pooled": 1, "text_segments": 1}
    for kind in kinds:
        shapes = {tensors.shape(f"{kind}/{i}") for i in range(len(prompts))}
        if len(shapes) != 1 or len(next(iter(shapes))) != ranks[kind]:
            raise WeightsError(f"{path}: {kind} embeddings must all have one shape of rank {ranks[kind]}, got {sorted(shapes)}")
    return PromptEmbeddings(prompts, templates, tensors)


def _table_tensors(prompts: Sequence[str], templates: Sequence[str] | None, arrays: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a table of N entries ``(template, prompt)`` (``templates`` default: all
    ``t2i``) with embeddings ``arrays``: ``text`` [N, L, D] and any of ``pooled`` [N, P], ``text_mask``
    [N, L], ``text_segments`` [N, S] (None values are left out)."""
    templates = list(templates or ["t2i"] * len(prompts))
    arrays = {kind: a for kind, a in arrays.items() if a is not None}
    entries = list(zip(templates, prompts))
    if len(set(entries)) != len(entries) or any(len(a) != len(prompts) for a in [templates, *arrays.values()]):
        raise ValueError("a prompt table needs N distinct (template, prompt) entries and N of each embedding")
    tensors = {f"{kind}/{i}": np.asarray(a[i], DTYPES[kind]) for kind, a in arrays.items() for i in range(len(prompts))}
    return tensors, {"prompts": json.dumps(list(prompts)), "templates": json.dumps(templates)}


def in_memory_table(prompts: Sequence[str], arrays: Mapping[str, np.ndarray], templates: Sequence[str] | None = None) -> PromptEmbeddings:
    """A table of ``prompts`` held in memory (e.g. a sampling command's few prompts), as ``load_table``
    would read it from ``save_table``'s file."""
    tensors, metadata = _table_tensors(prompts, templates, arrays)
    source = TensorSource.from_dict(tensors, "<prompts encoded in memory>")
    return PromptEmbeddings(prompts, json.loads(metadata["templates"]), source)


def save_table(
    path: str,
    prompts: Sequence[str],
    text: np.ndarray,
    pooled: np.ndarray | None = None,
    metadata: Mapping[str, str] | None = None,
    *,
    templates: Sequence[str] | None = None,
    text_mask: np.ndarray | None = None,
    text_segments: np.ndarray | None = None,
) -> None:
    """Write embeddings ``text`` [N, L, D] and optionally ``pooled`` [N, P], ``text_mask`` [N, L],
    ``text_segments`` [N, S] of N distinct entries ``(template, prompt)`` (``templates`` default: all
    ``t2i``), with string ``metadata`` beside the ``prompts`` and ``templates`` lists (e.g. what encoded them)."""
    arrays = dict(text=text, pooled=pooled, text_mask=text_mask, text_segments=text_segments)
    tensors, entries = _table_tensors(prompts, templates, arrays)
    write_safetensors(path, tensors, {**(metadata or {}), **entries})


def encode_table(
    path: str,
    prompts: Sequence[str],
    encode: Encoder,
    batch_size: int = 16,
    metadata: Mapping[str, str] | None = None,
    *,
    edit_prompts: Sequence[str] = (),
) -> PromptEmbeddings:
    """Encode the ``table_prompts`` of ``prompts`` (``encode(batch)``) and, when there are any, of
    ``edit_prompts`` (``encode(batch, "edit")``: the empty instruction is the edit's CFG null) in batches,
    and save them at ``path`` (atomically, with ``metadata``, ``save_table``)."""
    entries = [("t2i", p) for p in table_prompts(prompts)] + ([("edit", p) for p in table_prompts(edit_prompts)] if edit_prompts else [])
    outs = []
    for template in dict.fromkeys(t for t, _ in entries):
        distinct = [p for t, p in entries if t == template]
        for start in range(0, len(distinct), batch_size):
            batch = distinct[start : start + batch_size]
            outs.append(encode(batch) if template == "t2i" else encode(batch, template))
    arrays = {kind: np.concatenate([np.asarray(out[kind]) for out in outs]) for kind in KINDS if kind in outs[0]}
    templates, names = zip(*entries)
    save_table(path, names, arrays.pop("text"), arrays.pop("pooled", None), metadata, templates=templates, **arrays)
    return load_table(path)
