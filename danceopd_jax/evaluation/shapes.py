"""Shape, size and grid cell of one object from its soft coverage map, by analysis-by-synthesis.

Every (shape, size) of the shapes world is rendered anti-aliased exactly as ``scenes.render`` draws
it, centred so that its centroid sits on the measured centroid, optionally blurred (generated
images are softer than renders); the template closest to the coverage map in squared error wins.
"""

import dataclasses

import numpy as np
from scipy import ndimage

from danceopd_jax.data import scenes

BLURS = (0.0, 0.7, 1.2)  # template blur (pixels) tried as a nuisance parameter
_CENTRE = scenes.POSITIONS["center"]
_CELLS = np.array(list(scenes.POSITIONS.values()))


@dataclasses.dataclass(frozen=True)
class ShapeFit:
    shape: str
    size: str
    position: str
    error: float  # squared error of the best template relative to its area (0 = perfect)


def coverage(shape: str, size: str, centre: tuple[float, float], image_size: int) -> np.ndarray:
    """Anti-aliased [S, S] coverage of a shape centred at ``centre`` (row, column fractions)."""
    side = image_size * scenes.SUPERSAMPLE
    axis = (np.arange(side) + 0.5) / side
    rows, cols = np.meshgrid(axis - (centre[0] - _CENTRE[0]), axis - (centre[1] - _CENTRE[1]), indexing="ij")
    mask = scenes.shape_mask(scenes.SceneObject(shape, "red", size, "center"), rows, cols)
    return mask.reshape(image_size, scenes.SUPERSAMPLE, image_size, scenes.SUPERSAMPLE).mean(axis=(1, 3))


def centroid_offset(shape: str, size: str) -> float:
    """Row offset (fraction of the side) of a shape's centroid below its centre: r/3 for the triangle."""
    return scenes.SIZES[size] / 3.0 if shape == "triangle" else 0.0


def nearest_cell(centre: tuple[float, float]) -> str:
    """The grid cell whose centre is nearest to ``centre`` (row, column fractions)."""
    return tuple(scenes.POSITIONS)[int(np.argmin(((_CELLS - np.asarray(centre)) ** 2).sum(axis=1)))]


def fit_shape(alpha: np.ndarray) -> ShapeFit | None:
    """Best (shape, size, cell) for a coverage map in [0, 1] (None when it is empty)."""
    side = alpha.shape[0]
    mass = float(alpha.sum())
    if mass <= 0:
        return None
    idx = (np.arange(side) + 0.5) / side
    centroid = (float((alpha.sum(axis=1) * idx).sum() / mass), float((alpha.sum(axis=0) * idx).sum() / mass))
    best = None
    for shape in scenes.SHAPES:
        for size in scenes.SIZES:
            centre = (centroid[0] - centroid_offset(shape, size), centroid[1])
            template = coverage(shape, size, centre, side)
            for blur in BLURS:
                candidate = ndimage.gaussian_filter(template, blur) if blur else template
                error = float(((alpha - candidate) ** 2).sum() / template.sum())
                if best is None or error < best.error:
                    best = ShapeFit(shape, size, nearest_cell(centre), error)
    return best
