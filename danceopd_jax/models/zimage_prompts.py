"""Z-Image's prompt encoding from a local diffusers folder, in JAX, in fixed shapes.

What diffusers 0.42.1 computes in ``pipelines/z_image/`` (Z-Image Team, "Z-Image: An Efficient
Image Generation Foundation Model with Single-Stream Diffusion Transformer", 2025): each prompt is
wrapped in a template, tokenized by Qwen3's tokenizer (``tokenizer/``), read by Qwen3
(``text_encoder/``, ``qwen3.Qwen3TextEncoder``), and its ``hidden_states[-2]`` kept on the valid
tokens. Three templates (``KINDS``):

  * ``"t2i"``: ``ZImagePipeline._encode_prompt``, the default: the tokenizer's chat template of
    one user message, ``apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
    enable_thinking=True)`` (Qwen3's: ``<|im_start|>user\\n{p}<|im_end|>\\n<|im_start|>assistant\\n``);
  * ``"t2i_omni"``: ``ZImageOmniPipeline._encode_prompt`` without condition images: the literal
    string ``T2I_OMNI_TEMPLATE``, the same text as Qwen3's chat template gives, but not taken
    from the tokenizer's template;
  * ``"edit"``: ``ZImageOmniPipeline._encode_prompt`` with one condition image: three segments
    ``EDIT_TEMPLATE`` around the instruction, each tokenized and encoded as its own sequence
    (the image tokens go between them in the transformer).

Output, for a batch of B prompts and a text capacity of L tokens (the Z-Image transformer's
condition: ``cond["text"]``, ``cond["text_mask"]``, ``cond["text_segments"]``)::

    text           float32 [B, L, D]  the valid tokens first (zeros after them)
    text_mask      bool    [B, L]     True on the valid tokens
    text_segments  int32   [B, 3]     token counts of the segments, laid one after another in the
                                      valid prefix ([n, 0, 0] for T2I prompts)

The segments of an edit prompt share one row of the encoder, each attending only within itself
and with RoPE positions from 0 (``Qwen3TextEncoder``'s ``segment_ids``): the same as diffusers'
separate sequences, in one forward of L tokens per prompt.

Truncation, a decision: diffusers tokenizes with ``truncation=True`` at ``max_sequence_length``
(512), so a longer prompt loses its end without a word. Here nothing is truncated: a prompt whose
tokens (all segments) exceed the capacity L is an error. ``tokens_over`` reports, per prompt, how
many tokens are over, so that a caller can refuse with one ``error:`` line naming the prompt
before loading anything (``check_lengths`` raises that line's ``ValueError``); ``encode_prompts``
checks too. With L <= 512 every accepted prompt is encoded as diffusers encodes it; with L > 512,
a segment longer than 512 tokens is encoded whole, where diffusers would cut it.

Classifier-free guidance: the pipelines' default negative prompt is ``""`` through the same
template: for T2I the empty prompt's encoding, for edit the edit template with an empty
instruction (the null keeps the source image and drops the instruction). ``encode_null`` gives it.
"""

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from danceopd_jax.models import qwen3

KINDS = ("t2i", "t2i_omni", "edit")
NUM_SEGMENTS = 3  # text_segments' width: the edit template's segments
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # the Z-Image pipelines' max_sequence_length
T2I_OMNI_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
EDIT_TEMPLATE = (
    "<|im_start|>user\n<|vision_start|>",
    "<|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n<|vision_start|>",
    "<|vision_end|><|im_end|>",
)


@dataclasses.dataclass(frozen=True)
class ZImageTextEncoder:
    """Z-Image's text encoder (``text_encoder/``) and its tokenizer (``tokenizer/``)."""

    model: qwen3.Qwen3TextEncoder
    tokenizer: Any


def _subfolder(pipeline_dir: str, name: str, needed_for: str) -> str:
    path = os.path.join(pipeline_dir, name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{pipeline_dir}: missing subfolder {name}/ ({needed_for})")
    return path


def load_tokenizer(pipeline_dir: str):
    """The ``tokenizer/`` of a Z-Image diffusers folder, offline (no model weights are read).

    Its padding side must be the right, as Qwen3's: diffusers' positions of left-padded tokens
    would start after the padding, which ``encode_prompts`` does not reproduce.
    """
    from transformers import AutoTokenizer  # host-side tokenisation only

    folder = _subfolder(pipeline_dir, "tokenizer", "Qwen3 tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.padding_side != "right":
        raise ValueError(f"{folder}: padding_side is {tokenizer.padding_side!r}; Z-Image's prompts are padded on the right")
    return tokenizer


def load_zimage_text_encoder(pipeline_dir: str, dtype: str = "float32") -> ZImageTextEncoder:
    """Qwen3 (compute ``dtype``) and its tokenizer from a Z-Image diffusers folder, offline.

    A missing subfolder raises ``FileNotFoundError`` naming it; weights that do not fit raise
    ``WeightsMismatch``.
    """
    model = qwen3.load_text_encoder(_subfolder(pipeline_dir, "text_encoder", "Qwen3 text encoder"), dtype)
    return ZImageTextEncoder(model, load_tokenizer(pipeline_dir))


def prompt_segments(tokenizer, prompt: str, kind: str = "t2i") -> list[str]:
    """The texts the pipeline tokenizes for ``prompt``: one for T2I, three for edit (module docstring)."""
    if kind == "t2i":
        messages = [{"role": "user", "content": prompt}]
        return [tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)]
    if kind == "t2i_omni":
        return [T2I_OMNI_TEMPLATE.format(prompt)]
    if kind == "edit":
        return [part.format(prompt) for part in EDIT_TEMPLATE]
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def segment_token_ids(tokenizer, prompts: Sequence[str], kind: str = "t2i") -> list[list[list[int]]]:
    """Per prompt, the token ids of each segment, untruncated (the pipeline's valid tokens)."""
    segments = [prompt_segments(tokenizer, p, kind) for p in prompts]
    flat = tokenizer([s for parts in segments for s in parts]).input_ids
    ids, start = [], 0
    for parts in segments:
        ids.append(flat[start : start + len(parts)])
        start += len(parts)
    return ids


def _tokens_over(ids: list[list[list[int]]], capacity: int) -> list[int]:
    return [max(0, sum(map(len, parts)) - capacity) for parts in ids]


def tokens_over(tokenizer, prompts: Sequence[str], capacity: int, kind: str = "t2i") -> list[int]:
    """Per prompt, how many of its tokens (all segments) exceed ``capacity``: 0 when it fits."""
    return _tokens_over(segment_token_ids(tokenizer, prompts, kind), capacity)


def _refuse_over(prompts: Sequence[str], overs: list[int], capacity: int, kind: str) -> None:
    for i, over in enumerate(overs):
        if over:
            shown = prompts[i] if len(prompts[i]) <= 60 else prompts[i][:57] + "..."
            raise ValueError(
                f"prompt {i} {shown!r} is {over} tokens over the text capacity of {capacity} tokens "
                f"(Z-Image {kind} template); shorten it or raise the capacity"
            )


def check_lengths(tokenizer, prompts: Sequence[str], capacity: int, kind: str = "t2i") -> None:
    """Raise ``ValueError`` naming the first prompt that ``tokens_over`` finds too long (index, the
    prompt's start, the count over): the text of one ``error:`` line."""
    _refuse_over(prompts, tokens_over(tokenizer, prompts, capacity, kind), capacity, kind)


def pack_segments(ids: list[list[list[int]]], capacity: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lay each prompt's segments (at most ``capacity`` tokens in all) one after another,
    right-padded with ``pad_id`` to ``capacity``.

    Returns int32 ``input_ids`` [B, capacity], ``segment_ids`` [B, capacity] (segment k is k + 1,
    padding 0) and ``text_segments`` [B, NUM_SEGMENTS] (token counts, zeros for absent segments).
    """
    b = len(ids)
    input_ids = np.full((b, capacity), pad_id, np.int32)
    segment_ids = np.zeros((b, capacity), np.int32)
    lengths = np.zeros((b, NUM_SEGMENTS), np.int32)
    for row, parts in enumerate(ids):
        counts = list(map(len, parts))
        n = sum(counts)
        input_ids[row, :n] = [t for part in parts for t in part]
        segment_ids[row, :n] = np.repeat(np.arange(1, len(parts) + 1), counts)
        lengths[row, : len(parts)] = counts
    return input_ids, segment_ids, lengths


@nnx.jit
def _encode(model: qwen3.Qwen3TextEncoder, input_ids: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """float32 [B, L, D]: Qwen3's hidden_states[-2] on the valid tokens, zeros on the padding."""
    return jnp.where((segment_ids > 0)[..., None], model(input_ids, segment_ids), 0.0)


def encode_prompts(
    encoder: ZImageTextEncoder,
    prompts: Sequence[str],
    capacity: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    kind: str = "t2i",
) -> dict[str, jax.Array]:
    """``{"text", "text_mask", "text_segments"}`` (module docstring) of ``prompts`` (T2I prompts, or
    edit instructions for ``kind="edit"``) in ``capacity`` tokens; over-long prompts raise
    ``check_lengths``' ``ValueError``."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = segment_token_ids(encoder.tokenizer, prompts, kind)
    _refuse_over(prompts, _tokens_over(ids, capacity), capacity, kind)
    input_ids, segment_ids, lengths = pack_segments(ids, capacity, encoder.tokenizer.pad_token_id)
    return {
        "text": _encode(encoder.model, jnp.asarray(input_ids), jnp.asarray(segment_ids)),
        "text_mask": jnp.asarray(segment_ids > 0),
        "text_segments": jnp.asarray(lengths),
    }


def encode_null(
    encoder: ZImageTextEncoder, capacity: int = DEFAULT_MAX_SEQUENCE_LENGTH, kind: str = "t2i"
) -> dict[str, jax.Array]:
    """The classifier-free-guidance null of ``kind`` for a batch of 1: the empty prompt through the
    T2I template, or the edit template with an empty instruction (source kept, instruction dropped)."""
    return encode_prompts(encoder, [""], capacity, kind)
