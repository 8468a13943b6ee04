"""Image buckets of a run on a model folder as VAE latents: every image encoded once, cached by content.

A run on a diffusers folder (``config.model_dir``) trains in its VAE's latent space:
``config.image_size`` and ``channels`` are the latent size and channels. Its image-file buckets
(``file_buckets``) are read at the VAE's resolution, ``pixel_size`` = latent size x the VAE's
downsampling, and each distinct image (by content) is encoded once, before training, into a table
in the workdir (``cached_latents``); the records then carry latents [h, w, C] for ``image`` and
``source`` instead of pixels (``LatentBucketSource``), so the input pipeline is the one pixel runs
use, at the latent shape.

A latent is the mode (mean) of the VAE posterior, shifted and scaled as the diffusion model sees
it, ``(mean - shift_factor) * scaling_factor`` (``vae.latents_from_images`` without noise): what
diffusers' Z-Image omni pipeline does for condition images (``latent_dist.mode()``), and a fixed
data endpoint for the off-policy and flow-matching objectives (a posterior sample would add a
second noise, drawn once and frozen in the cache).

The table, ``WORKDIR/image_latents.safetensors`` (read lazily, entry by entry):

  tensors   ``<SHA-256 of the file>/<resize>`` -> float32 [h, w, C]
  metadata  ``encoded_by``: JSON {"vae": digest of the VAE's files (``folder_vae.vae_digest``),
            "pixel_size": P, "latent": "mode"}

An entry is keyed by the file's content (a renamed file is found, a file changed in place is not)
and the bucket's resize mode; the table by what else made the latents: a table encoded by another
VAE or at another resolution is not reused at all. Entries present are reused; the missing ones
are encoded (in jitted batches, ``ENCODE_BATCH``) and the table rewritten atomically with exactly
the run's entries. A resumed run, or a second run on the same files, encodes nothing.
"""

import concurrent.futures
import functools
import json
import os
import time
from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from danceopd_jax.data import file_buckets
from danceopd_jax.data.file_buckets import FileBucketSource
from danceopd_jax.data.manifests import ImageFile
from danceopd_jax.models import folder_vae, vae
from danceopd_jax.models.weights import TensorSource, WeightsError, open_safetensors, write_safetensors

LATENT_TABLE = "image_latents.safetensors"  # a model folder run's image latents, in its workdir
ENCODED_BY = "encoded_by"  # the table's metadata key: ``identity`` of what encoded it
ENCODE_BATCH = 8  # images per jitted VAE call (the last batch is padded to it: one compile)
READ_THREADS = min(8, os.cpu_count() or 1)  # PIL decodes and resizes without the GIL
PROGRESS_SECONDS = 10.0  # at most one progress line per this many seconds (and the last)


def pixel_size(config: ConfigDict) -> int:
    """The side image files are read at: ``image_size``, times the VAE's downsampling for a run on a
    model folder (whose ``image_size`` is the latent size)."""
    if not config.model_dir:
        return config.image_size
    return config.image_size * folder_vae.downsampling(folder_vae.vae_config(config.model_dir))


def bucket_pixel_size(config: ConfigDict) -> int:
    """``pixel_size`` for a run with image-file buckets, else 0 (``make_bucket_source``'s default,
    ``image_size``): a model folder run without them never reads its VAE's config."""
    return pixel_size(config) if any(b.kind in file_buckets.BUCKET_KINDS for b in config.data.buckets.values()) else 0


def identity(model_dir: str, size: int) -> str:
    """What a latent depends on besides its file and resize mode, as one JSON string (module docstring)."""
    return json.dumps(dict(vae=folder_vae.vae_digest(model_dir), pixel_size=size, latent="mode"), sort_keys=True)


def entry_key(file: ImageFile, resize: str) -> str:
    """The table's name of a file's latent: its content digest and the resize mode that made its pixels."""
    return f"{file.sha256}/{resize}"


class LatentTable:
    """``key -> latent [h, w, C]`` (float32) of a table file, read on access."""

    def __init__(self, tensors: TensorSource):
        self._tensors = tensors
        self.where = tensors.where
        self.identity = tensors.metadata.get(ENCODED_BY, "")

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def __call__(self, key: str) -> np.ndarray:
        return np.asarray(self._tensors[key], np.float32)


def load_latents(path: str) -> LatentTable:
    return LatentTable(open_safetensors(path))


class LatentBucketSource:
    """A file bucket's records with latents [h, w, C] for its images (looked up in ``table``), not pixels."""

    def __init__(self, files: FileBucketSource, table: LatentTable):
        self.files = files
        self.table = table

    def __len__(self) -> int:
        return len(self.files)

    def digests(self, index: int) -> dict[str, str]:
        return self.files.digests(index)

    def text_record(self, index: int) -> dict:
        return self.files.text_record(index)

    def __getitem__(self, index: int) -> dict:
        example = self.files.examples[index]
        latents = {field: self.table(entry_key(file, self.files.resize)) for field, file in example.images.items()}
        return {"prompt": example.prompt, **latents}


def images_of(sources: Mapping[str, object]) -> dict[str, tuple[FileBucketSource, ImageFile]]:
    """``{entry_key: (source, file)}`` of every distinct image of the file buckets among ``sources``."""
    images = {}
    for source in sources.values():
        if isinstance(source, FileBucketSource):
            for example in source.examples:
                images.update({entry_key(file, source.resize): (source, file) for file in example.images.values()})
    return images


def with_latents(sources: Mapping[str, object], table: LatentTable) -> dict:
    """``sources`` with each file bucket's records carrying latents from ``table`` (``LatentBucketSource``)."""
    return {name: LatentBucketSource(s, table) if isinstance(s, FileBucketSource) else s for name, s in sources.items()}


def encode_images(model_dir: str, images: list[tuple[FileBucketSource, ImageFile]], log: Callable[[str], None] = print) -> np.ndarray:
    """Latents [N, h, w, C] (module docstring) of ``images`` (each read by its bucket's source: pixels at
    its size and resize mode, the file's digest checked), by the folder's VAE in jitted batches of
    ``ENCODE_BATCH``, files decoded in ``READ_THREADS`` threads; a progress line ``encoded n/N images``.
    The VAE lives only inside this call."""
    graphdef, state = nnx.split(folder_vae.load_vae(model_dir))
    encode = jax.jit(lambda state, pixels: vae.latents_from_images(nnx.merge(graphdef, state), pixels))
    started = shown = time.perf_counter()
    latents = []
    with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
        for start in range(0, len(images), ENCODE_BATCH):
            batch = list(pool.map(lambda image: image[0].pixels(image[1]), images[start : start + ENCODE_BATCH]))
            padded = np.stack(batch + [np.zeros_like(batch[0])] * (ENCODE_BATCH - len(batch)))
            latents.append(np.asarray(encode(state, padded))[: len(batch)])
            done, now = start + len(batch), time.perf_counter()
            if done == len(images) or now - shown >= PROGRESS_SECONDS:
                log(f"encoded {done}/{len(images)} images ({now - started:.1f}s)")
                shown = now
    return np.concatenate(latents)


def _reusable(path: str, ident: str) -> TensorSource | None:
    """The table at ``path`` if it exists, is readable and was encoded by ``ident``; else None."""
    if not os.path.isfile(path):
        return None
    try:
        tensors = open_safetensors(path)
    except WeightsError:
        return None
    return tensors if tensors.metadata.get(ENCODED_BY) == ident else None


def cached_latents(
    model_dir: str, sources: Mapping[str, object], path: str, size: int, log: Callable[[str], None] = print
) -> tuple[LatentTable, int]:
    """``(table, number encoded)``: the latents of every image of the file buckets of ``sources`` at
    ``path``, reused where present and encoded where missing (module docstring)."""
    ident = identity(model_dir, size)
    images = images_of(sources)
    old = _reusable(path, ident) or TensorSource.from_dict({})
    kept = [key for key in images if key in old]
    missing = [key for key in images if key not in old]
    if not missing:
        return LatentTable(old), 0
    encoded = encode_images(model_dir, [images[key] for key in missing], log)
    readers = {key: functools.partial(old.__getitem__, key) for key in kept}  # copied from the old file one at a time
    readers.update({key: functools.partial(np.asarray, latent) for key, latent in zip(missing, encoded)})
    shapes = {key: old.shape(key) for key in kept} | {key: latent.shape for key, latent in zip(missing, encoded)}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_safetensors(path, TensorSource(readers, shapes, path), {ENCODED_BY: ident})
    return load_latents(path), len(missing)
