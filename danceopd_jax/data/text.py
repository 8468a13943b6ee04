"""A deterministic stand-in for a frozen text encoder (real CLIP / T5 encoders come later).

Words are lower-cased and split on whitespace; each word maps to a fixed pseudo-random vector
seeded from a stable hash of the word, and a sinusoidal position code (Vaswani et al. 2017,
sec. 3.5) is added so that word order matters. Same words, same seed -> same embedding, in any
process, on any host.
"""

import functools
import zlib

import numpy as np


@functools.lru_cache(maxsize=65536)
def _word_vector(word: str, dim: int, seed: int) -> np.ndarray:
    """A unit-variance float32 vector fixed by ``(word, seed)``; read-only because it is cached."""
    rng = np.random.default_rng([zlib.crc32(word.encode("utf-8")), seed])
    vector = rng.standard_normal(dim, dtype=np.float32)
    vector.flags.writeable = False
    return vector


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
    """float32 [length, dim]: ``sin(p / 10000^(2i/dim))`` in even and ``cos`` in odd channels."""
    positions = np.arange(length, dtype=np.float64)[:, None]
    frequencies = 10000.0 ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = positions * frequencies
    table = np.zeros((length, dim), dtype=np.float64)
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles[:, : dim // 2])
    return table.astype(np.float32)


class HashedTextEmbedder:
    """``(prompt, template) -> (emb float32[max_len, dim], mask bool[max_len])``, zero where masked.

    Prompts longer than ``max_len`` words are truncated; the empty prompt gives zeros and an
    all-False mask (the CFG null prompt of ``core.conditioning``).
    """

    def __init__(self, dim: int, max_len: int, seed: int = 0):
        if dim <= 0 or max_len <= 0:
            raise ValueError(f"dim and max_len must be positive, got dim={dim}, max_len={max_len}")
        self.dim = dim
        self.max_len = max_len
        self.seed = seed
        self._positions = sinusoidal_positions(max_len, dim)

    def __call__(self, prompt: str, template: str = "t2i") -> tuple[np.ndarray, np.ndarray]:
        """The words' embeddings; a bag of words has no template: ``t2i`` and ``edit`` embed alike."""
        words = prompt.lower().split()[: self.max_len]
        emb = np.zeros((self.max_len, self.dim), dtype=np.float32)
        mask = np.zeros(self.max_len, dtype=bool)
        for position, word in enumerate(words):
            emb[position] = _word_vector(word, self.dim, self.seed) + self._positions[position]
        mask[: len(words)] = True
        return emb, mask
