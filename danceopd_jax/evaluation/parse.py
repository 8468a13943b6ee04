"""Parse an image of the shapes world back into a scene: style, background colour and objects.

A deterministic program, no learning. The style comes first (night is undone exactly, since it
is the affine map ``x * NIGHT_SCALE + NIGHT_TINT``), then a background model (a colour with a
vertical gradient, fitted robustly to the image border), then objects:

* plain / night: connected components of pixels far from the background that are not a drop
  shadow (a darkened background). Each component's colour is the median of its core pixels; its
  coverage map comes from unmixing every pixel into object colour, background and shadow.
* sketch: connected ink strokes; the ink map is the coverage map of the outline (matched against
  outline templates, so blurred or thicker strokes need no hole filling); the colour is unknown
  (None) and so is the background.

Shape, size and cell are read from the coverage map by ``shapes.fit_shape``. Coverage maps are
least-squares estimates, not clipped to [0, 1], so that background noise averages out.
"""

import dataclasses

import numpy as np
from scipy import ndimage

from danceopd_jax.data import scenes
from danceopd_jax.evaluation.shapes import fit_shape

# Colours and distances are RGB in [0, 1] units.
COLOUR_TOLERANCE = 0.25  # residual beyond which an object's colour is None
BACKGROUND_TOLERANCE = 0.2  # distance beyond which the background colour is None
MAX_BACKGROUND_NOISE = 0.1  # noise std beyond which the background is no flat colour (None)
SHAPE_TOLERANCE = 0.5  # relative template error beyond which a blob has no shape (None)
MIN_OBJECT_AREA = 0.01  # coverage (fraction of the image) below which a component is debris
FOREGROUND_DISTANCE = 0.2  # least distance from the background that makes a pixel foreground
BORDER_TRIM = 0.7  # fraction of border pixels (the most background-like) the background is fitted to
SHADOW_FACTOR = 0.55  # a drop shadow multiplies the background by this (scenes.render)
INK_LEVEL = 0.35  # ink coverage that makes a pixel part of a sketch stroke
_SMOOTH = 0.6  # pixels: denoising before the foreground and style decisions
_OBJECT_RGB = np.array(list(scenes.COLOURS.values()))
_BACKGROUND_RGB = np.array(list(scenes.BACKGROUNDS.values()))
_EIGHT = np.ones((3, 3), bool)


@dataclasses.dataclass(frozen=True)
class ParsedObject:
    """An object as read from an image; attributes named as in ``scenes.SceneObject``."""

    shape: str | None  # None: the blob matches no shape template
    colour: str | None  # None: no palette colour (always for sketches)
    size: str
    position: str
    alpha: np.ndarray = dataclasses.field(compare=False, repr=False)  # [S, S] coverage (sketches: ink)


@dataclasses.dataclass(frozen=True)
class ParsedScene:
    """A scene as read from an image. Equality compares style, background and objects only."""

    style: str
    background: str | None  # None for sketches, noisy backgrounds and colours far from the palette
    objects: tuple[ParsedObject, ...]
    image: np.ndarray = dataclasses.field(compare=False, repr=False)  # [S, S, 3] in [0, 1], night undone
    backdrop: np.ndarray | None = dataclasses.field(compare=False, repr=False)  # background model (not sketches)
    noise: float = dataclasses.field(default=0.0, compare=False)  # background noise std (not sketches)


def to_unit(image, image_size: int | None = None) -> np.ndarray:
    """An HWC image in [-1, 1] as float64 in [0, 1], linearly resampled to ``image_size`` if given."""
    x = (np.asarray(image, np.float64) + 1.0) / 2.0
    if x.ndim != 3 or x.shape[0] != x.shape[1] or x.shape[2] != 3:
        raise ValueError(f"expected one square RGB image [S, S, 3], got shape {x.shape}")
    if image_size is not None and image_size != x.shape[0]:
        x = ndimage.zoom(x, (image_size / x.shape[0], image_size / x.shape[1], 1), order=1)
    return x


def background_colour(rgb: np.ndarray) -> str | None:
    """The background colour nearest to ``rgb``, or None when none is within BACKGROUND_TOLERANCE."""
    distances = np.linalg.norm(_BACKGROUND_RGB - rgb, axis=1)
    best = int(np.argmin(distances))
    return tuple(scenes.BACKGROUNDS)[best] if distances[best] <= BACKGROUND_TOLERANCE else None


def object_colour(rgb: np.ndarray, background: np.ndarray) -> str | None:
    """The palette colour that best explains ``rgb`` as a blend ``background + k (colour - background)``.

    ``k`` in [0.4, 1.3] covers objects blurred into the background and shading; None when the
    best residual exceeds COLOUR_TOLERANCE.
    """
    direction = _OBJECT_RGB - background
    k = np.clip((direction @ (rgb - background)) / (direction**2).sum(axis=1), 0.4, 1.3)
    residuals = np.linalg.norm(rgb - background - k[:, None] * direction, axis=1)
    best = int(np.argmin(residuals))
    return tuple(scenes.COLOURS)[best] if residuals[best] <= COLOUR_TOLERANCE else None


def _ring(side: int) -> np.ndarray:
    ring = np.zeros((side, side), bool)
    ring[0] = ring[-1] = ring[:, 0] = ring[:, -1] = True
    return ring


def _night_distance(rgb: np.ndarray) -> float:
    """Distance from ``rgb`` to the nearest background colour as the night style renders it."""
    return float(np.linalg.norm(_BACKGROUND_RGB * scenes.NIGHT_SCALE + scenes.NIGHT_TINT - rgb, axis=1).min())


def detect_style(x: np.ndarray) -> str:
    """'night' (border nearer a night background than a plain one), 'sketch' (light grey paper
    with more ink than colour) or 'plain'."""
    border = np.median(x[_ring(x.shape[0])], axis=0)
    if _night_distance(border) < np.linalg.norm(_BACKGROUND_RGB - border, axis=1).min():
        return "night"
    smooth = ndimage.gaussian_filter(x, (_SMOOTH, _SMOOTH, 0))
    chroma, lum = np.ptp(smooth, axis=-1), smooth.mean(axis=-1)
    chromatic = np.mean(chroma > 0.2)
    ink = np.mean((lum < border.mean() - 0.25) & (chroma < 0.15))  # dark grey strokes
    paper = border.mean() > 0.75 and np.ptp(border) < 0.1
    return "sketch" if paper and ink > chromatic else "plain"


def fit_backdrop(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Background model (per channel, linear in the row) fitted robustly to the border; noise std.

    The noise std (of the noisiest channel) comes from differences of neighbouring border pixels,
    which object edges barely touch.
    """
    side = x.shape[0]
    ring = _ring(side)
    rows = np.broadcast_to(((np.arange(side) + 0.5) / side - 0.5)[:, None], (side, side))
    design = np.stack([np.ones(ring.sum()), rows[ring]], axis=1)
    values = x[ring]
    steps = np.concatenate([np.diff(edge, axis=0) for edge in (x[0], x[-1], x[:, 0], x[:, -1])])
    mad = np.median(np.abs(steps - np.median(steps, axis=0)), axis=0)
    noise = float(np.max(1.4826 * mad) / np.sqrt(2.0))
    residual = np.linalg.norm(values - np.median(values, axis=0), axis=1)  # start: a flat median colour
    for _ in range(4):  # trimmed least squares: objects and shadows reach at most ~20% of the border
        keep = residual <= np.quantile(residual, BORDER_TRIM)
        coef = np.linalg.lstsq(design[keep], values[keep], rcond=None)[0]
        residual = np.linalg.norm(values - design @ coef, axis=1)
    return coef[0] + rows[..., None] * coef[1], noise


def unmix(x: np.ndarray, backdrop: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """Per-pixel coverage of colour ``rgb`` over the backdrop, by least squares.

    ``x - backdrop`` is explained by the object direction ``rgb - backdrop`` plus, where it helps,
    a drop shadow (the backdrop darkened): only with a positive shadow weight and only when the
    two directions are not nearly opposite (there the joint fit turns noise into a biased
    coverage, and a shadow cannot pass for the object anyway). Not clipped to [0, 1], so that
    background noise averages out instead of adding coverage.
    """
    d, u, w = x - backdrop, rgb - backdrop, -(1.0 - SHADOW_FACTOR) * backdrop
    uu, ww, uw = (u * u).sum(-1), (w * w).sum(-1), (u * w).sum(-1)
    ud, wd = (u * d).sum(-1), (w * d).sum(-1)
    cosine = uw / np.sqrt(np.maximum(uu * ww, 1e-12))
    det = np.maximum(uu * ww - uw**2, 1e-12)
    joint, shadow = (ww * ud - uw * wd) / det, (uu * wd - uw * ud) / det
    use_joint = (cosine > -0.5) & (cosine < 0.97) & (shadow > 0) & (ww > 1e-4)
    return np.clip(np.where(use_joint, joint, ud / np.maximum(uu, 1e-6)), -1.0, 2.0)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    labels, count = ndimage.label(mask, _EIGHT)
    return [labels == k for k in range(1, count + 1)]


def _window(component: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Where a component's coverage is read: its bounding box grown by 2 pixels, minus other components.

    A box rather than the (noise-shaped) component itself, so that noise does not bias the coverage.
    """
    rows, cols = np.nonzero(component)
    box = np.zeros_like(component)
    box[max(rows.min() - 2, 0) : rows.max() + 3, max(cols.min() - 2, 0) : cols.max() + 3] = True
    return box & ~ndimage.binary_dilation(others & ~component, _EIGHT)


def _object(alpha: np.ndarray, colour: str | None, outline: bool = False) -> ParsedObject | None:
    if alpha.sum() < MIN_OBJECT_AREA * alpha.size:
        return None
    fit = fit_shape(alpha, outline)
    if fit is None:
        return None
    shape = fit.shape if fit.error <= SHAPE_TOLERANCE else None
    return ParsedObject(shape, colour, fit.size, fit.position, alpha)


def _colour_objects(x: np.ndarray, backdrop: np.ndarray, noise: float) -> list[ParsedObject]:
    smooth = ndimage.gaussian_filter(x, (_SMOOTH, _SMOOTH, 0))
    distance = np.linalg.norm(smooth - backdrop, axis=-1)
    scale = (smooth * backdrop).sum(-1) / np.maximum((backdrop * backdrop).sum(-1), 1e-6)
    shadow = (scale < 0.9) & (np.linalg.norm(smooth - scale[..., None] * backdrop, axis=-1) < 0.12)
    # foreground: well above the background noise left after smoothing (3 std in each of 3 channels)
    smoothed_noise = noise / (2.0 * np.sqrt(np.pi) * _SMOOTH)
    threshold = max(FOREGROUND_DISTANCE, 3.0 * np.sqrt(3.0) * smoothed_noise)
    foreground = (distance > threshold) & ~shadow
    raw = np.linalg.norm(x - backdrop, axis=-1)
    objects = []
    for component in _components(foreground):
        core = component & (raw >= 0.7 * np.percentile(raw[component], 90))
        rgb = np.median(x[core], axis=0)
        alpha = np.where(_window(component, foreground), unmix(x, backdrop, rgb), 0.0)
        row = int(np.nonzero(component)[0].mean())
        parsed = _object(alpha, object_colour(rgb, backdrop[row, 0]))
        if parsed is not None:
            objects.append(parsed)
    return objects


def _sketch_objects(x: np.ndarray) -> list[ParsedObject]:
    lum = x.mean(axis=-1)
    paper = float(np.median(lum[_ring(x.shape[0])]))
    ink = np.clip((paper - lum) / max(paper - scenes.SKETCH_INK, 1e-3), -1.0, 2.0)
    strokes = ink > INK_LEVEL
    objects = []
    for component in _components(strokes):
        parsed = _object(np.where(_window(component, strokes), ink, 0.0), None, outline=True)
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
    image_noise = noise * (scenes.NIGHT_SCALE if style == "night" else 1.0)
    background = background_colour(backdrop[x.shape[0] // 2, 0]) if image_noise <= MAX_BACKGROUND_NOISE else None
    objects = tuple(_colour_objects(x, backdrop, noise))
    return ParsedScene(style, background, objects, x, backdrop, image_noise)
