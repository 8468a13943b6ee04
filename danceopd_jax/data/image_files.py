"""Image files -> the model's pixels: float32 HWC RGB in [-1, 1] at ``size x size`` (the shapes world's range).

The rule, in this order (``pixels``):

  1. EXIF orientation applied (``PIL.ImageOps.exif_transpose``): a phone photo stored sideways
     with Orientation 6 is read upright.
  2. RGB: greyscale, 1-bit, palette, CMYK and YCbCr images are converted; an image with
     transparency (an alpha channel, or a palette or colour key marked transparent) is composited
     on white. 16-bit and float images (modes ``I``, ``I;16``, ``F``) are refused by the check
     rather than clipped to 8 bits.
  3. Square: ``center_crop`` cuts the largest centred square (odd leftovers go to the right and
     bottom), then resizes; ``stretch`` resizes the whole image to the square (the aspect ratio is
     not kept). Non-square outputs are not supported.
  4. Resampling: Lanczos (``PIL.Image.Resampling.LANCZOS``) on the 8-bit RGB image.

An image smaller than ``size`` on its short side is upscaled only where the bucket allows it
(``allow_upscale``); ``inspect`` reports the side so the check can refuse it. ``inspect`` is the
check's full decode of a file, with its SHA-256 (the key the latent cache, ``latent_cache``, keys a file by).
"""

import dataclasses
import hashlib
import io

import numpy as np
from PIL import Image, ImageOps

RESIZE_MODES = ("center_crop", "stretch")
RESAMPLING = Image.Resampling.LANCZOS
READ_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"})  # the 8-bit modes ``to_rgb`` converts
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageFileError(ValueError):
    """A file that cannot serve as an image; the message says why (the caller names the file)."""


@dataclasses.dataclass(frozen=True)
class ImageFacts:
    """What the check learns from decoding a file: its SHA-256 (hex) and its upright width and height."""

    sha256: str
    width: int
    height: int


def _open(data: bytes) -> Image.Image:
    """The fully decoded, upright image of a file's bytes (``ImageFileError`` if it is none)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decodes every pixel: a truncated or corrupt file fails here, not mid-training
    except Image.UnidentifiedImageError:
        raise ImageFileError("not an image (no format PIL reads)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ImageFileError(f"truncated or corrupt ({error})") from None
    if image.mode not in READ_MODES:
        raise ImageFileError(f"pixel mode {image.mode!r} is not read (8-bit {', '.join(sorted(READ_MODES))}); convert it to 8-bit RGB")
    return ImageOps.exif_transpose(image)


def inspect(data: bytes) -> ImageFacts:
    """Decode a file's bytes fully and return its digest and upright size (``ImageFileError`` if it is no image)."""
    image = _open(data)
    return ImageFacts(hashlib.sha256(data).hexdigest(), *image.size)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; transparency composited on white."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def square(image: Image.Image, size: int, resize: str) -> Image.Image:
    """``image`` at ``size x size``: centre-cropped to a square first (``center_crop``) or not (``stretch``)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize {resize!r}; valid: {', '.join(RESIZE_MODES)}")
    if resize == "center_crop":
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    return image.resize((size, size), RESAMPLING)


def pixels(data: bytes, size: int, resize: str) -> np.ndarray:
    """float32 [size, size, 3] in [-1, 1] of an image file's bytes (the rule in the module docstring)."""
    rgb = square(to_rgb(_open(data)), size, resize)
    return np.asarray(rgb, np.float32) / 127.5 - 1.0
