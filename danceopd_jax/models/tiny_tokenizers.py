"""Tiny tokenizer folders in the real on-disk formats of SD3's three tokenizers and of Z-Image's
Qwen3 tokenizer, written offline.

The folders load with ``transformers`` exactly like the tokenizers of a Stable Diffusion 3 or
Z-Image diffusers folder, so tests and tiny random pipelines need no download:

  * ``write_clip_tokenizer``: ``vocab.json`` + ``merges.txt`` of CLIP's byte-level BPE with the
    ``</w>`` end-of-word suffix (``tokenizer/`` and ``tokenizer_2/`` of SD3), ``model_max_length``
    77, ``<|startoftext|>`` / ``<|endoftext|>`` as the two highest ids like the real vocabulary (so
    the legacy "argmax of the ids" EOS rule of CLIP finds the EOS), and the pad token of CLIP-L
    (``<|endoftext|>``) or of SD3's CLIP-G tokenizer (``"!"``, id 0).
  * ``write_t5_tokenizer``: a SentencePiece-style Unigram ``tokenizer.json`` laid out like T5's
    (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, pieces ``"▁word"``), without sentinel ``<extra_id_*>``
    tokens (``tokenizer_3/`` of SD3).
  * ``write_qwen_tokenizer``: Qwen3's byte-level BPE ``tokenizer.json`` (the 256 byte symbols, so
    any text tokenizes) with Qwen's chat special tokens and a chat template (``tokenizer/`` of
    Z-Image).

Vocabulary words are lowercase ASCII letters; every letter of them is also a token, so any text
of those letters tokenizes (unknown characters map to the unknown token).
"""

import json
import os
import re
from collections.abc import Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_MAX_LENGTH = 77  # CLIP's context length; SD3 pads its CLIP prompts to it
CLIP_PAD_TOKENS = {"clip-l": CLIP_EOS, "clip-g": "!"}  # SD3's tokenizer/ and tokenizer_2/
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
T5_SPACE = "▁"  # SentencePiece's word-start marker
_WORD = re.compile(r"[a-z]+")


def _checked_words(vocab_words: Sequence[str]) -> list[str]:
    """The distinct words in order; each must be lowercase ASCII letters."""
    words = list(dict.fromkeys(vocab_words))
    bad = [w for w in words if not _WORD.fullmatch(w)]
    if bad or not words:
        raise ValueError(f"vocabulary words must be non-empty lowercase ASCII letters, got {bad or 'no words'}")
    return words


def _write_json(folder: str, name: str, content) -> None:
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        json.dump(content, f, ensure_ascii=False, indent=2)


def clip_bpe(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP-style BPE ``(vocab, merges)`` that spells each of ``words`` as one ``word</w>`` token.

    A word is built left to right (``c a -> ca``, ``ca t</w> -> cat</w>``); longer words' merges
    rank first, so a shorter word's merge rarely splits a longer word. Ids: ``"!"`` 0 (as in
    CLIP), the letters, the letters with ``</w>``, the merged pieces, then BOS and EOS last.
    """
    words = _checked_words(words)
    letters = sorted({c for w in words for c in w})
    tokens = ["!", *letters, "!</w>", *(c + "</w>" for c in letters)]
    merges = []
    for word in sorted(words, key=len, reverse=True):
        pieces = [*word[:-1], word[-1] + "</w>"]
        for piece in pieces[1:]:
            merge = (pieces[0], piece)
            pieces[0] = pieces[0] + piece
            if merge not in merges:
                merges.append(merge)
            if pieces[0] not in tokens:
                tokens.append(pieces[0])
    tokens += [CLIP_BOS, CLIP_EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: str, vocab_words: Sequence[str], variant: str = "clip-l") -> str:
    """Write a CLIP tokenizer folder (``CLIPTokenizer.from_pretrained(folder)`` loads it); returns ``folder``.

    ``variant`` picks the pad token: ``"clip-l"`` pads with ``<|endoftext|>`` (SD3's
    ``tokenizer/``), ``"clip-g"`` with ``"!"`` (SD3's ``tokenizer_2/``).
    """
    if variant not in CLIP_PAD_TOKENS:
        raise ValueError(f"variant must be one of {sorted(CLIP_PAD_TOKENS)}, got {variant!r}")
    vocab, merges = clip_bpe(vocab_words)
    os.makedirs(folder, exist_ok=True)
    _write_json(folder, "vocab.json", vocab)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "unk_token": CLIP_EOS, "pad_token": CLIP_PAD_TOKENS[variant]}
    _write_json(folder, "special_tokens_map.json", special)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CLIP_MAX_LENGTH,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
        **special,
    }
    _write_json(folder, "tokenizer_config.json", config)
    return folder


def t5_unigram_vocab(words: Sequence[str]) -> list[tuple[str, float]]:
    """T5-layout Unigram pieces with log-probabilities: specials, ``▁``, whole words, then letters
    (both cases).

    A whole ``▁word`` scores higher than its spelling in letters, so known words stay one token.
    """
    words = _checked_words(words)
    letters = sorted({c for w in words for c in w + w.upper()})  # T5 is case-sensitive
    return [
        (T5_PAD, 0.0),
        (T5_EOS, 0.0),
        (T5_UNK, 0.0),
        (T5_SPACE, -2.0),
        *((T5_SPACE + w, -3.0) for w in words),
        *((c, -5.0) for c in letters),
    ]


def write_t5_tokenizer(folder: str, vocab_words: Sequence[str]) -> str:
    """Write a T5 tokenizer folder (``T5TokenizerFast`` / ``AutoTokenizer`` load it); returns ``folder``.

    The ``tokenizer.json`` mirrors what transformers builds for T5 (Unigram with unknown id 2,
    whitespace split + Metaspace ``▁``, ``</s>`` appended to every sequence).
    """
    vocab = t5_unigram_vocab(vocab_words)
    tokenizer = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement=T5_SPACE, prepend_scheme="always")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement=T5_SPACE, prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", T5_EOS], pair=["$A", T5_EOS, "$B", T5_EOS], special_tokens=[(T5_EOS, 1)]
    )
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    special = {"eos_token": T5_EOS, "unk_token": T5_UNK, "pad_token": T5_PAD}
    _write_json(folder, "special_tokens_map.json", special)
    _write_json(folder, "tokenizer_config.json", {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 512, **special})
    return folder


# ------------------------------------------------------------------------------------------
# Qwen3 (Z-Image's tokenizer/)
# ------------------------------------------------------------------------------------------

QWEN_PAD = "<|endoftext|>"
QWEN_IM_START, QWEN_IM_END = "<|im_start|>", "<|im_end|>"
QWEN_VISION_START, QWEN_VISION_END = "<|vision_start|>", "<|vision_end|>"
QWEN_SPECIAL_TOKENS = (QWEN_PAD, QWEN_IM_START, QWEN_IM_END, QWEN_VISION_START, QWEN_VISION_END)  # in Qwen's id order
QWEN_MAX_LENGTH = 131072  # Qwen3's tokenizer_config.json model_max_length

# Qwen2/Qwen3's pre-tokenisation regex (transformers ``models/qwen2/tokenization_qwen2.py``).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The part of Qwen3's chat template that system, user and plain assistant messages go through
# (the real template, in Qwen3's tokenizer_config.json, also renders tools, tool calls and
# ``<think>`` reasoning of earlier assistant turns; no copy of it ships with the installed
# packages). The generation prompt is Qwen3's: ``<|im_start|>assistant\n``, followed by an empty
# ``<think>\n\n</think>\n\n`` block only when ``enable_thinking`` is false.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message.role in ['system', 'user', 'assistant'] %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def byte_symbols() -> dict[int, str]:
    """GPT-2's byte-level alphabet ``{byte: symbol}`` in its vocabulary order (Qwen's first 256 ids):
    the printable bytes stand for themselves, the others, in byte order, for the characters from
    U+0100 on (GPT-2's ``bytes_to_unicode``; the space is ``"Ġ"``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def qwen_bpe(words: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE ``(vocab, merges)`` spelling each of ``words`` as one token, bare and with its
    leading space (``Ġword``, as the pre-tokeniser splits ``" word"``).

    Built left to right like ``clip_bpe`` (longer words' merges rank first); ids: the 256 byte
    symbols, then the merged pieces.
    """
    words = _checked_words(words)
    symbols = byte_symbols()
    tokens, space = list(symbols.values()), symbols[ord(" ")]
    merges = []
    for word in sorted(words, key=len, reverse=True):
        for spelled in (space + word, word):
            pieces = list(spelled)
            for piece in pieces[1:]:
                merge = (pieces[0], piece)
                pieces[0] = pieces[0] + piece
                if merge not in merges:
                    merges.append(merge)
                if pieces[0] not in tokens:
                    tokens.append(pieces[0])
    return {t: i for i, t in enumerate(tokens)}, merges


def write_qwen_tokenizer(folder: str, vocab_words: Sequence[str]) -> str:
    """Write a Qwen3 tokenizer folder (``AutoTokenizer.from_pretrained(folder)`` loads a
    ``Qwen2Tokenizer``); returns ``folder``.

    ``tokenizer.json`` is laid out as Qwen3's: NFC normalisation, the Qwen regex split then
    byte-level mapping, a BPE over the byte symbols (``qwen_bpe``), the special tokens
    ``QWEN_SPECIAL_TOKENS`` after the vocabulary, no BOS/EOS added to sequences.
    ``tokenizer_config.json`` names ``<|endoftext|>`` the pad token and ``<|im_end|>`` the EOS, as
    Qwen3's does, and holds ``QWEN_CHAT_TEMPLATE``; padding is on the right (the default).
    """
    vocab, merges = qwen_bpe(vocab_words)
    bpe = BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    _write_json(folder, "vocab.json", vocab)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    added = {
        str(tokenizer.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                        "single_word": False, "special": True}
        for t in QWEN_SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": QWEN_IM_END,
        "pad_token": QWEN_PAD,
        "unk_token": None,
        "errors": "replace",
        "model_max_length": QWEN_MAX_LENGTH,
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": QWEN_CHAT_TEMPLATE,
    }
    _write_json(folder, "tokenizer_config.json", config)
    return folder
