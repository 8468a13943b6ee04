"""Buckets read from the user's image files: captioned images and edit pairs (formats: ``manifests.py``).

  image_text         {"image", "prompt"}            an image and its caption (T2I, flow matching)
  edit_pairs         {"source", "prompt", "image"}  a source image, an instruction and its target image
  edit_instructions  {"source", "prompt"}           a source image and an instruction, no target
                                                     (DanceOPD's edit routes query the teacher, not a target)

Images become the model's pixels by ``image_files.pixels`` (EXIF, RGB on white, ``resize``,
Lanczos); a pair's source and target follow the same rule, so a pair of one size stays aligned.
Each read re-hashes the file and refuses one that changed since the check: every record is the
file whose SHA-256 the check recorded (``digests``), the key a run on a model folder looks its
latent up by (``latent_cache``).
"""

import hashlib

import numpy as np
from ml_collections import ConfigDict

from danceopd_jax.data import image_files, manifests

BUCKET_KINDS: dict[str, frozenset[str]] = {
    kind: frozenset({"prompt", *fields}) for kind, fields in manifests.IMAGE_COLUMNS.items()
}


def manifest_options(bucket: ConfigDict, image_size: int) -> manifests.ManifestOptions:
    """What the check of the bucket ``data.buckets.NAME`` (a file kind) depends on."""
    return manifests.ManifestOptions(
        kind=bucket.kind, path=bucket.path, image_size=image_size, size=bucket.size, tasks=bucket.tasks,
        allow_upscale=bucket.allow_upscale, allow_outside_paths=bucket.allow_outside_paths,
    )  # fmt: skip


class FileBucketSource:
    """Random-access records of a file bucket: ``{"prompt"}`` plus float32 [S, S, 3] images by field."""

    def __init__(self, examples: tuple[manifests.Example, ...], image_size: int, resize: str):
        self.examples = examples
        self.image_size = image_size
        self.resize = resize

    def __len__(self) -> int:
        return len(self.examples)

    def digests(self, index: int) -> dict[str, str]:
        """``{field: SHA-256 hex}`` of the image files of record ``index``."""
        return {field: file.sha256 for field, file in self.examples[index].images.items()}

    def pixels(self, file: manifests.ImageFile) -> np.ndarray:
        """The model's pixels of a checked file (``ImageFileError`` if it changed since the check)."""
        with open(file.path, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != file.sha256:
            raise image_files.ImageFileError(f"{file.path}: changed since the bucket was checked; restart the run to check it again")
        return image_files.pixels(data, self.image_size, self.resize)

    def text_record(self, index: int) -> dict:
        """Record ``index`` with its image fields naming their files, not read (its prompt and which images it has)."""
        example = self.examples[index]
        return {"prompt": example.prompt, **{field: file.path for field, file in example.images.items()}}

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        return {"prompt": example.prompt, **{field: self.pixels(file) for field, file in example.images.items()}}


def make_source(bucket: ConfigDict, image_size: int) -> FileBucketSource:
    """The source of a file bucket, from its checked manifest (``manifests.checked``: checked once per process)."""
    return FileBucketSource(manifests.checked(manifest_options(bucket, image_size)), image_size, bucket.resize)
