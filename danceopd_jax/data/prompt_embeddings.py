"""A table of precomputed prompt embeddings, the text condition of a run on a real model.

Running CLIP-L, CLIP-G and T5-XXL inside every train step would cost more than the student; the
prompts of a run are known up front, so they are encoded once (``encode_table``), saved as one
safetensors file and looked up by the input pipeline. An SD3 run encodes its prompts into its
workdir; a user may instead encode them beforehand, on any machine, with
``python -m danceopd_jax.encode_prompts`` and pass the table as ``config.prompt_embeddings``: the
run then never loads the text encoders.

File layout: tensors ``text/<i>`` [L, D] and ``pooled/<i>`` [P] for prompt ``i`` (float32), and
the metadata key ``prompts`` holding the JSON list of prompts. Tensors are read lazily, one
prompt at a time, so a table bigger than host memory still serves a run.
"""

import json
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from danceopd_jax.models.weights import TensorSource, WeightsError, open_safetensors, write_safetensors

Encoder = Callable[[list[str]], Mapping[str, np.ndarray]]  # prompts -> {"text": [B, L, D], "pooled": [B, P]}


class PromptEmbeddings:
    """``prompt -> (text [L, D], text_mask [L], pooled [P])``: a ``data.pipeline`` text embedder.

    SD3 attends over every text token (no mask), so the mask is all True.
    """

    def __init__(self, prompts: Sequence[str], tensors: TensorSource):
        self.prompts = list(prompts)
        self.where = tensors.where
        self._index = {p: i for i, p in enumerate(self.prompts)}
        self._tensors = tensors
        self.metadata = dict(tensors.metadata)  # the file's metadata: ``prompts``, and what encoded it where recorded
        self.text_shape = tensors.shape("text/0")
        self.pooled_dim = tensors.shape("pooled/0")[0]

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._index

    def missing(self, prompts: Sequence[str]) -> list[str]:
        """The distinct ``prompts`` the table has no embedding for, in order."""
        return [p for p in dict.fromkeys(prompts) if p not in self._index]

    def __call__(self, prompt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if prompt not in self._index:
            raise KeyError(f"{self.where}: no embedding for prompt {prompt!r}")
        i = self._index[prompt]
        text = np.asarray(self._tensors[f"text/{i}"], np.float32)
        return text, np.ones(text.shape[0], bool), np.asarray(self._tensors[f"pooled/{i}"], np.float32)


def source_prompts(sources: Sequence) -> list[str]:
    """The distinct prompts of the records of ``sources`` (random-access record sources), sorted."""
    return sorted({source[i]["prompt"] for source in sources for i in range(len(source))})


def table_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts a table of ``prompts`` holds: the empty prompt (the CFG null), then the distinct others in order."""
    return list(dict.fromkeys(["", *prompts]))


def load_table(path: str) -> PromptEmbeddings:
    """The table saved at ``path`` (``save_table``), checked from its header alone: one text and one
    pooled tensor per prompt, each of one shape."""
    tensors = open_safetensors(path)
    try:
        prompts = json.loads(tensors.metadata["prompts"])
    except (KeyError, ValueError):
        raise WeightsError(f"{path}: not a prompt-embedding table (no 'prompts' metadata)") from None
    expected = {f"{kind}/{i}" for i in range(len(prompts)) for kind in ("text", "pooled")}
    if not prompts or set(tensors) != expected:
        raise WeightsError(f"{path}: a table of {len(prompts)} prompts needs exactly text/i and pooled/i for each")
    for kind, rank in (("text", 2), ("pooled", 1)):
        shapes = {tensors.shape(f"{kind}/{i}") for i in range(len(prompts))}
        if len(shapes) != 1 or len(next(iter(shapes))) != rank:
            raise WeightsError(f"{path}: {kind} embeddings must all have one shape of rank {rank}, got {sorted(shapes)}")
    return PromptEmbeddings(prompts, tensors)


def save_table(
    path: str, prompts: Sequence[str], text: np.ndarray, pooled: np.ndarray, metadata: Mapping[str, str] | None = None
) -> None:
    """Write embeddings ``text`` [N, L, D] and ``pooled`` [N, P] of ``prompts`` (N distinct prompts),
    with string ``metadata`` beside the ``prompts`` list (e.g. what encoded them)."""
    if len(set(prompts)) != len(prompts) or not (len(prompts) == len(text) == len(pooled)):
        raise ValueError("save_table needs N distinct prompts and N text and pooled embeddings")
    tensors = {f"text/{i}": np.asarray(t, np.float32) for i, t in enumerate(text)}
    tensors.update({f"pooled/{i}": np.asarray(p, np.float32) for i, p in enumerate(pooled)})
    write_safetensors(path, tensors, {**(metadata or {}), "prompts": json.dumps(list(prompts))})


def encode_table(
    path: str, prompts: Sequence[str], encode: Encoder, batch_size: int = 16, metadata: Mapping[str, str] | None = None
) -> PromptEmbeddings:
    """Encode the ``table_prompts`` of ``prompts`` in batches and save them at ``path`` (atomically,
    with ``metadata``, ``save_table``)."""
    distinct = table_prompts(prompts)
    texts, pooled = [], []
    for start in range(0, len(distinct), batch_size):
        out = encode(distinct[start : start + batch_size])
        texts.append(np.asarray(out["text"], np.float32))
        pooled.append(np.asarray(out["pooled"], np.float32))
    save_table(path, distinct, np.concatenate(texts), np.concatenate(pooled), metadata)
    return load_table(path)
