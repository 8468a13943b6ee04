"""Shape, size and grid cell of one object from its soft coverage map, by analysis-by-synthesis.

Every (shape, size) of the shapes world is rendered anti-aliased exactly as ``scenes.render`` draws
it (filled, or as a sketch outline), placed so that its centroid sits on the measured centroid,
optionally blurred (generated images are softer than renders); the template closest to the
coverage map in squared error wins, and its centre gives the nearest grid cell.
"""

import dataclasses
import functools

import numpy as np
from scipy import ndimage

from danceopd_jax.data import scenes

BLURS = (0.0, 0.7, 1.2)  # template blur (pixels) tried as a nuisance parameter
_CENTRE = scenes.POSITIONS["center"]
_CELLS = np.array(list(scenes.POSITIONS.values()))
_CROSS = ndimage.generate_binary_structure(2, 1)


@dataclasses.dataclass(frozen=True)
class ShapeFit:
    shape: str
    size: str
    position: str
    error: float  # squared error of the best template relative to its mass (0 = perfect)


def coverage(shape: str, size: str, centre: tuple[float, float], image_size: int, outline: bool = False):
    """Anti-aliased [S, S] coverage of a shape centred at ``centre`` (row, column fractions).

    ``outline``: only its sketch stroke, as ``scenes.render`` draws sketches.
    """
    side = image_size * scenes.SUPERSAMPLE
    axis = (np.arange(side) + 0.5) / side
    # scenes.shape_mask draws at a cell centre: shift the grid to draw at ``centre`` instead
    rows, cols = np.meshgrid(axis - (centre[0] - _CENTRE[0]), axis - (centre[1] - _CENTRE[1]), indexing="ij")
    mask = scenes.shape_mask(scenes.SceneObject(shape, "red", size, "center"), rows, cols)  # colour unused
    if outline:
        width = max(1, int(round(scenes.SKETCH_LINE * side)))
        mask = mask & ~ndimage.binary_erosion(mask, _CROSS, iterations=width, border_value=1)
    return mask.reshape(image_size, scenes.SUPERSAMPLE, image_size, scenes.SUPERSAMPLE).mean(axis=(1, 3))


def centroid(alpha: np.ndarray) -> tuple[float, float]:
    """Coverage-weighted centre (row, column fractions) of a map."""
    side = alpha.shape[0]
    idx = (np.arange(side) + 0.5) / side
    mass = alpha.sum()
    return float((alpha.sum(axis=1) * idx).sum() / mass), float((alpha.sum(axis=0) * idx).sum() / mass)


@functools.lru_cache(maxsize=None)
def _centroid_offset(shape: str, size: str, image_size: int, outline: bool) -> tuple[float, float]:
    """Where a template's centroid lies relative to its centre (the triangle's is below it)."""
    row, col = centroid(coverage(shape, size, _CENTRE, image_size, outline))
    return row - _CENTRE[0], col - _CENTRE[1]


def nearest_cell(centre: tuple[float, float]) -> str:
    """The grid cell whose centre is nearest to ``centre`` (row, column fractions)."""
    return tuple(scenes.POSITIONS)[int(np.argmin(((_CELLS - np.asarray(centre)) ** 2).sum(axis=1)))]


def fit_shape(alpha: np.ndarray, outline: bool = False) -> ShapeFit | None:
    """Best (shape, size, cell) for a coverage map (None when it has no positive mass)."""
    side = alpha.shape[0]
    positive = np.maximum(alpha, 0.0)
    if positive.sum() <= 0:
        return None
    measured = centroid(positive)
    best = None
    for shape in scenes.SHAPES:
        for size in scenes.SIZES:
            offset = _centroid_offset(shape, size, side, outline)
            centre = (measured[0] - offset[0], measured[1] - offset[1])
            template = coverage(shape, size, centre, side, outline)
            if template.sum() <= 0:  # the centre is far outside the image
                continue
            for blur in BLURS:
                candidate = ndimage.gaussian_filter(template, blur) if blur else template
                error = float(((alpha - candidate) ** 2).sum() / template.sum())
                if best is None or error < best.error:
                    best = ShapeFit(shape, size, nearest_cell(centre), error)
    return best
