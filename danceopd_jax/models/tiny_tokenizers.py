"""Tiny tokenizer folders in the real on-disk formats of SD3's three tokenizers, written offline.

The folders load with ``transformers`` exactly like the tokenizers of a Stable Diffusion 3
diffusers folder, so tests and tiny random pipelines need no download:

  * ``write_clip_tokenizer``: ``vocab.json`` + ``merges.txt`` of CLIP's byte-level BPE with the
    ``</w>`` end-of-word suffix (``tokenizer/`` and ``tokenizer_2/`` of SD3), ``model_max_length``
    77, ``<|startoftext|>`` / ``<|endoftext|>`` as the two highest ids like the real vocabulary (so
    the legacy "argmax of the ids" EOS rule of CLIP finds the EOS), and the pad token of CLIP-L
    (``<|endoftext|>``) or of SD3's CLIP-G tokenizer (``"!"``, id 0).
  * ``write_t5_tokenizer``: a SentencePiece-style Unigram ``tokenizer.json`` laid out like T5's
    (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, pieces ``"▁word"``), without sentinel ``<extra_id_*>``
    tokens (``tokenizer_3/`` of SD3).

Vocabulary words are lowercase ASCII letters; every letter of them is also a token, so any text
of those letters tokenizes (unknown characters map to the unknown token).
"""

import json
import os
import re
from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import Unigram

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
