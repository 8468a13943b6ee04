"""Realism of an image: how strongly it shows what realistic renders add to a scene.

A handcrafted, deterministic score (nothing is fitted). ``scenes.render(..., realistic=True)``
adds four things to the plain render; each is measured on the parsed image, in the renderer's
own units (0 on a plain render):

* ``gradient``: the background's vertical light fall-off, relative to its colour (render ~0.12).
* ``shading``: an object's brightness drop per object width along the top-left light direction,
  relative to its median brightness (render ~0.2).
* ``shadow``: how much darker the background is just below-right of an object than just
  above-left, as a fraction of the drop shadow's full darkening (render ~0.2).
* ``grain``: std of the pixel texture common to the three channels (render 0.03). Independent
  per-channel noise (what degraded or generated images carry) does not count.

Each cue scores 0 at or below its level on plain renders with mild noise and blur, 1 at or above
the level of realistic renders (``CUE_RANGES``, set from renders); the realism score is the mean
over the cues that can be seen: gradient and shadow vanish on dark backgrounds, shading needs an
object. A background too noisy to be a flat colour (e.g. pure noise) shows no cue at all, and
neither does an image with no object: every scene has one, so an empty background, however
realistic its light and grain, is no realistic render of the scene (it scores 0).
"""

import numpy as np
from scipy import ndimage

from danceopd_jax.data import scenes
from danceopd_jax.evaluation.parse import MAX_BACKGROUND_NOISE, SHADOW_FACTOR, ParsedScene

CUE_RANGES = {  # (plain level, realistic level): a cue scores 0 below the first and 1 above the second
    "gradient": (0.03, 0.08),
    "shading": (0.04, 0.12),
    "shadow": (0.04, 0.12),
    "grain": (0.005, 0.015),
}
MIN_BACKGROUND_BRIGHTNESS = 0.2  # darker backgrounds show neither light gradient nor shadow
_EIGHT = np.ones((3, 3), bool)


def _lum(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=-1)


def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.mgrid[0:side, 0:side]
    return rows.astype(np.float64), cols.astype(np.float64)


def gradient(parsed: ParsedScene) -> float:
    """Drop of the background model from the top row to the bottom row, relative to its colour."""
    backdrop = parsed.backdrop[:, 0]  # the model varies along rows only
    middle = backdrop[len(backdrop) // 2]
    return float((backdrop[0] - backdrop[-1]) @ middle / (middle @ middle))


def shading(parsed: ParsedScene) -> float | None:
    """Mean over objects of the relative brightness drop per object width along the light direction."""
    rows, cols = _grid(parsed.image.shape[0])
    lum = _lum(parsed.image)
    slopes = []
    for obj in parsed.objects:
        inside = obj.alpha > 0.75
        if obj.shape is None or inside.sum() < 6:
            continue
        diagonal = (rows[inside] + cols[inside]) / (2.0 * scenes.SIZES[obj.size] * lum.shape[0])  # (dy + dx) / 2r
        diagonal = diagonal - diagonal.mean()
        values = lum[inside]
        slope = (diagonal @ (values - values.mean())) / max(diagonal @ diagonal, 1e-6)
        slopes.append(-slope / max(np.median(values), 0.05))
    return float(np.mean(slopes)) if slopes else None


def shadow(parsed: ParsedScene) -> float | None:
    """Mean over objects of the background's darkening below-right minus above-left of the object.

    Read on background pixels (coverage < 0.15) within 3 pixels of the object and away from other
    objects, as a fraction of the drop shadow's full darkening of the background there.
    """
    rows, cols = _grid(parsed.image.shape[0])
    excess = _lum(parsed.image) - _lum(parsed.backdrop)
    bodies = [obj.alpha > 0.5 for obj in parsed.objects]
    values = []
    for k, (obj, body) in enumerate(zip(parsed.objects, bodies)):
        if obj.shape is None:
            continue
        band = ndimage.binary_dilation(body, _EIGHT, iterations=3) & (obj.alpha < 0.15)
        for other in bodies[:k] + bodies[k + 1 :]:
            band &= ~ndimage.binary_dilation(other, _EIGHT, iterations=3)
        direction = (rows - rows[body].mean()) + (cols - cols[body].mean())
        below, above = band & (direction > 0), band & (direction < 0)
        if below.sum() < 3 or above.sum() < 3:
            continue
        darkening = (1.0 - SHADOW_FACTOR) * np.mean(_lum(parsed.backdrop)[band])
        values.append((np.mean(excess[above]) - np.mean(excess[below])) / darkening)
    return float(np.mean(values)) if values else None


def grain(parsed: ParsedScene) -> float | None:
    """Std of the per-pixel texture shared by the channels, from neighbour differences on the background."""
    free = np.ones(parsed.image.shape[:2], bool)
    for obj in parsed.objects:
        free &= ~ndimage.binary_dilation(np.abs(obj.alpha) > 0.05, _EIGHT, iterations=3)
    pairs = free[:, 1:] & free[:, :-1]
    if pairs.sum() < 20:
        return None
    cov = np.cov((parsed.image[:, 1:] - parsed.image[:, :-1])[pairs].T)
    shared = (cov[0, 1] + cov[0, 2] + cov[1, 2]) / 3.0  # grain differences: variance 2 std^2 in every pair
    return float(np.sqrt(max(shared, 0.0) / 2.0))


def realism_cues(parsed: ParsedScene) -> dict[str, float]:
    """The cues that can be seen in this image (see the module docstring); none for sketches, noise
    and images without an object."""
    if parsed.backdrop is None or parsed.noise > MAX_BACKGROUND_NOISE or not parsed.objects:
        return {}
    cues = {"shading": shading(parsed), "grain": grain(parsed)}
    if _lum(parsed.backdrop).mean() >= MIN_BACKGROUND_BRIGHTNESS:
        cues.update(gradient=gradient(parsed), shadow=shadow(parsed))
    return {name: value for name, value in cues.items() if value is not None}


def realism(parsed: ParsedScene) -> float:
    """Mean over the visible cues of where each lies between its plain and realistic level, in [0, 1]."""
    levels = [(value - CUE_RANGES[cue][0]) / np.ptp(CUE_RANGES[cue]) for cue, value in realism_cues(parsed).items()]
    return float(np.mean(np.clip(levels, 0.0, 1.0))) if levels else 0.0
