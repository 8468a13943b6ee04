"""Parse an image of the shapes world back into a scene: style, background colour and objects.

A deterministic program, no learning. The style comes first (night is undone exactly, since it
is the affine map ``x * NIGHT_SCALE + NIGHT_TINT``), then a background model (a colour with a
vertical gradient, fitted robustly to the image border), then objects:

* plain / night: connected components of pixels far from the background that are not a drop
  shadow (a darkened background). Each component's colour is the median of its core pixels; its
  coverage map comes from unmixing every pixel into object colour, background and shadow.
* sketch: connected ink outlines; the interior of each closed outline is filled to give the
  coverage map; the colour is unknown (None).

Shape, size and cell are read from the coverage map by ``shapes.fit_shape``.
"""

import dataclasses

import numpy as np
from scipy import ndimage

from danceopd_jax.data import scenes
from danceopd_jax.evaluation.shapes import fit_shape

COLOUR_TOLERANCE = 0.35  # RGB distance ([0, 1] units) beyond which an object colour is None
BACKGROUND_TOLERANCE = 0.2  # the same for the background colour
SHAPE_TOLERANCE = 0.5  # relative template error beyond which a blob has no shape (None)
MIN_OBJECT_MASS = 6.0  # coverage (pixels) below which a component is debris, not an object
FOREGROUND_DISTANCE = 0.2  # RGB distance from the background that makes a pixel foreground
SHADOW_FACTOR = 0.55  # a drop shadow multiplies the background by this (scenes.render)
_SMOOTH = 0.6  # pixels: denoising before the foreground / style decisions
_OBJECT_RGB = np.array(list(scenes.COLOURS.values()))
_BACKGROUND_RGB = np.array(list(scenes.BACKGROUNDS.values()))
_EIGHT = np.ones((3, 3), bool)


@dataclasses.dataclass(frozen=True)
class ParsedObject:
    shape: str | None
    colour: str | None
    size: str
    position: str
    alpha: np.ndarray = dataclasses.field(compare=False, repr=False)  # [S, S] coverage in [0, 1]


@dataclasses.dataclass(frozen=True)
class ParsedScene:
    style: str
    background: str | None  # None for sketches and for colours far from every background
    objects: tuple[ParsedObject, ...]
    image: np.ndarray = dataclasses.field(compare=False, repr=False)  # [S, S, 3] in [0, 1], night undone
    backdrop: np.ndarray | None = dataclasses.field(compare=False, repr=False)  # background model


def to_unit(image, image_size: int | None = None) -> np.ndarray:
    """An HWC image in [-1, 1] as float64 in [0, 1], linearly resampled to ``image_size`` if given."""
    x = (np.asarray(image, np.float64) + 1.0) / 2.0
    if x.ndim != 3 or x.shape[0] != x.shape[1] or x.shape[2] != 3:
        raise ValueError(f"expected one square RGB image [S, S, 3], got shape {x.shape}")
    if image_size is not None and image_size != x.shape[0]:
        x = ndimage.zoom(x, (image_size / x.shape[0], image_size / x.shape[1], 1), order=1)
    return x


def nearest_name(rgb: np.ndarray, table: dict, tolerance: float) -> str | None:
    """The name in ``table`` (name -> RGB) nearest to ``rgb``, or None when none is within ``tolerance``."""
    distances = np.linalg.norm(np.array(list(table.values())) - rgb, axis=1)
    best = int(np.argmin(distances))
    return tuple(table)[best] if distances[best] <= tolerance else None


def _ring(side: int) -> np.ndarray:
    ring = np.zeros((side, side), bool)
    ring[0] = ring[-1] = ring[:, 0] = ring[:, -1] = True
    return ring


def _night_distance(rgb: np.ndarray) -> float:
    """Distance from ``rgb`` to the nearest background colour as the night style renders it."""
    return float(np.linalg.norm(_BACKGROUND_RGB * scenes.NIGHT_SCALE + scenes.NIGHT_TINT - rgb, axis=1).min())


def detect_style(x: np.ndarray) -> str:
    """'night' (border nearer a night background than a plain one), 'sketch' (light grey paper with more ink than colour) or 'plain'."""
    border = np.median(x[_ring(x.shape[0])], axis=0)
    if _night_distance(border) < np.linalg.norm(_BACKGROUND_RGB - border, axis=1).min():
        return "night"
    smooth = ndimage.gaussian_filter(x, (_SMOOTH, _SMOOTH, 0))
    chromatic = np.mean(smooth.max(axis=-1) - smooth.min(axis=-1) > 0.3)
    ink = np.mean((x.mean(axis=-1) < 0.35) & (smooth.max(axis=-1) - smooth.min(axis=-1) < 0.15))
    paper = border.mean() > 0.75 and np.ptp(border) < 0.1
    return "sketch" if paper and ink > chromatic else "plain"


def fit_backdrop(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Background model (per channel, linear in the row) fitted robustly to the border; noise std."""
    side = x.shape[0]
    ring = _ring(side)
    rows = np.broadcast_to(((np.arange(side) + 0.5) / side - 0.5)[:, None], (side, side))
    design = np.stack([np.ones(ring.sum()), rows[ring]], axis=1)
    values = x[ring]
    residual = np.linalg.norm(values - np.median(values, axis=0), axis=1)  # start: a flat median colour
    for _ in range(3):  # then drop outliers (objects, shadows reaching the border) and refit
        keep = residual <= np.clip(3.0 * 1.4826 * np.median(residual), 0.05, 0.25)
        coef = np.linalg.lstsq(design[keep], values[keep], rcond=None)[0]
        residual = np.linalg.norm(values - design @ coef, axis=1)
    noise = float(np.mean(1.4826 * np.median(np.abs(values[keep] - design[keep] @ coef), axis=0)))
    return coef[0] + rows[..., None] * coef[1], noise


def unmix(x: np.ndarray, backdrop: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """Per-pixel coverage of colour ``rgb`` over the backdrop, allowing a drop shadow (non-negative LS)."""
    d, u, w = x - backdrop, rgb - backdrop, -(1.0 - SHADOW_FACTOR) * backdrop
    uu, ww, uw = (u * u).sum(-1), (w * w).sum(-1), (u * w).sum(-1)
    ud, wd = (u * d).sum(-1), (w * d).sum(-1)
    det = uu * ww - uw**2
    ok = det > 1e-4 * np.maximum(uu * ww, 1e-12)
    a = np.where(ok, (ww * ud - uw * wd) / np.where(ok, det, 1.0), ud / np.maximum(uu, 1e-6))
    s = np.where(ok, (uu * wd - uw * ud) / np.where(ok, det, 1.0), 0.0)
    a = np.where(s < 0, ud / np.maximum(uu, 1e-6), a)  # no shadow term when it would be negative
    return np.clip(a, 0.0, 1.0)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    labels, count = ndimage.label(mask, _EIGHT)
    return [labels == k for k in range(1, count + 1)]


def _window(component: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Where a component's coverage is read: the component grown by 2 pixels, minus other components."""
    return ndimage.binary_dilation(component, _EIGHT, iterations=2) & ~(others & ~component)


def _object(alpha: np.ndarray, colour: str | None) -> ParsedObject | None:
    if alpha.sum() < MIN_OBJECT_MASS:
        return None
    fit = fit_shape(alpha)
    shape = fit.shape if fit.error <= SHAPE_TOLERANCE else None
    return ParsedObject(shape, colour, fit.size, fit.position, alpha)


def _colour_objects(x: np.ndarray, backdrop: np.ndarray, noise: float) -> list[ParsedObject]:
    smooth = ndimage.gaussian_filter(x, (_SMOOTH, _SMOOTH, 0))
    distance = np.linalg.norm(smooth - backdrop, axis=-1)
    scale = (smooth * backdrop).sum(-1) / np.maximum((backdrop * backdrop).sum(-1), 1e-6)
    shadow = (scale < 0.9) & (np.linalg.norm(smooth - scale[..., None] * backdrop, axis=-1) < 0.12)
    # a pixel is foreground when its distance is well above the (smoothed) noise of the background
    threshold = max(FOREGROUND_DISTANCE, 3.0 * np.sqrt(3.0) * noise / (2.0 * np.sqrt(np.pi) * _SMOOTH))
    foreground = (distance > threshold) & ~shadow
    components = _components(foreground)
    objects = []
    for component in components:
        raw = np.linalg.norm(x - backdrop, axis=-1)
        core = component & (raw >= 0.7 * np.percentile(raw[component], 90))
        rgb = np.median(x[core], axis=0)
        alpha = np.where(_window(component, foreground), unmix(x, backdrop, rgb), 0.0)
        parsed = _object(alpha, nearest_name(rgb, scenes.COLOURS, COLOUR_TOLERANCE))
        if parsed is not None:
            objects.append(parsed)
    return objects


def _sketch_objects(x: np.ndarray) -> list[ParsedObject]:
    lum = x.mean(axis=-1)
    paper = float(np.median(lum[_ring(x.shape[0])]))
    ink = np.clip((paper - lum) / max(paper - scenes.SKETCH_INK, 1e-3), 0.0, 1.0)
    lines = ink > 0.5
    objects = []
    for component in _components(lines):
        inside = ndimage.binary_fill_holes(component) & ~component
        alpha = np.where(inside, 1.0, np.where(_window(component | inside, lines), ink, 0.0))
        parsed = _object(alpha, None)
        if parsed is not None:
            objects.append(parsed)
    return objects


def parse_scene(image, image_size: int | None = None) -> ParsedScene:
    """The style, background colour and objects of one image (HWC in [-1, 1])."""
    x = to_unit(image, image_size)
    style = detect_style(x)
    if style == "sketch":
        return ParsedScene(style, None, tuple(_sketch_objects(x)), x, None)
    if style == "night":
        x = (x - scenes.NIGHT_TINT) / scenes.NIGHT_SCALE
    backdrop, noise = fit_backdrop(x)
    background = nearest_name(backdrop[x.shape[0] // 2, 0], scenes.BACKGROUNDS, BACKGROUND_TOLERANCE)
    return ParsedScene(style, background, tuple(_colour_objects(x, backdrop, noise)), x, backdrop)
