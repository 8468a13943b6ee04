"""Scatter-plot grids of the field world: one row per capability, exact target against models.

Points are drawn in the layout plane (the first two layout coordinates, ``targets.to_layout``), on
the same axes in every panel, with the world's mode centres as grey crosses. An edit row also
draws its sources (light grey) and an arrow from each of the first ``EDIT_LINES`` sources to its sample.
Figures are drawn on matplotlib's Agg canvas (``Figure``, no pyplot): no display, no global backend.
"""

import dataclasses

import numpy as np
from matplotlib.figure import Figure

from danceopd_jax.fieldworld.targets import FieldWorld, to_layout

LIMIT = 2.9  # both axes span [-LIMIT, LIMIT]: every class and every edit target
EDIT_LINES = 12


@dataclasses.dataclass(frozen=True)
class Panel:
    """One row: ``target`` samples and each model's (``models``: column title -> samples) [N, ..., D]
    (world frame), ``sources`` [N, ..., D] of an edit row (None for T2I)."""

    title: str
    target: np.ndarray
    models: dict[str, np.ndarray]
    sources: np.ndarray | None = None


def _plane(world: FieldWorld, points) -> np.ndarray:
    return np.asarray(to_layout(world, np.asarray(points, np.float32)))[:, :2]


def _scatter(ax, world: FieldWorld, points, sources, colour: str, title: str) -> None:
    modes = world.mode_means[:, :2]
    ax.scatter(modes[:, 0], modes[:, 1], marker="x", s=14, c="0.55", linewidths=0.8, zorder=1)
    plane = _plane(world, points)
    if sources is not None:
        start = _plane(world, sources)
        ax.scatter(start[:, 0], start[:, 1], s=3, c="0.7", alpha=0.5, linewidths=0, zorder=2)
        for a, b in zip(start[:EDIT_LINES], plane[:EDIT_LINES]):
            arrow = {"arrowstyle": "->", "color": "0.15", "lw": 0.7, "shrinkA": 0, "shrinkB": 0}
            ax.annotate("", xy=b, xytext=a, zorder=5, arrowprops=arrow)
    ax.scatter(plane[:, 0], plane[:, 1], s=3, c=colour, alpha=0.6, linewidths=0, zorder=4)
    ax.set(xlim=(-LIMIT, LIMIT), ylim=(-LIMIT, LIMIT), aspect="equal", xticks=[], yticks=[])
    ax.set_title(title, fontsize=9)


def scatter_grid(world: FieldWorld, panels: list[Panel], path: str) -> None:
    """Write a PNG at ``path``: a row per panel, the exact target left and its models to the right."""
    columns = 1 + max(len(panel.models) for panel in panels)
    fig = Figure(figsize=(3.2 * columns, 3.2 * len(panels)))
    axes = fig.subplots(len(panels), columns, squeeze=False)
    for row, panel in zip(axes, panels):
        _scatter(row[0], world, panel.target, panel.sources, "tab:blue", f"{panel.title}\nexact target")
        for ax, (label, samples) in zip(row[1:], panel.models.items()):
            _scatter(ax, world, samples, panel.sources, "tab:orange", f"{panel.title}\n{label}")
        for ax in row[1 + len(panel.models) :]:
            ax.set_axis_off()
    fig.suptitle(f"field world, D = {world.dim} (layout plane)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
