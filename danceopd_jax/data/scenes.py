"""The shapes world: procedural scenes, their prompts, edits and renders (the capability benchmark).

A scene is a background colour and one or two objects, each a shape, colour, size and a cell of
a 3x3 grid. Everything is a pure function of a seed, so buckets, experts and scores are
reproducible. Capabilities conflict here as in the paper: T2I (prompt -> plain render), local
edits (recolour / reshape / add / remove one object, the rest kept), global edits (night look,
sketch style, background change, the layout kept), and realism (shading, shadow and texture on
the same layout).

Images are float32 HWC RGB in [-1, 1], anti-aliased by rendering 4x larger and averaging.
"""

import dataclasses
import zlib

import numpy as np

COLOURS = {  # object colours, RGB in [0, 1]
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.60, 0.20, 0.80),
    "orange": (0.95, 0.55, 0.10),
}
BACKGROUNDS = {
    "gray": (0.50, 0.50, 0.50),
    "black": (0.06, 0.06, 0.06),
    "white": (0.95, 0.95, 0.95),
    "brown": (0.45, 0.30, 0.18),
}
SHAPES = ("square", "circle", "triangle")
SIZES = {"small": 0.11, "large": 0.19}  # half-extent as a fraction of the image side
_EDGE, _MIDDLE, _FAR = 0.22, 0.5, 0.78  # large objects at an edge cell stay inside the image
POSITIONS = {  # grid cell -> (row, column) centre as fractions of the image side
    "top left": (_EDGE, _EDGE),
    "top": (_EDGE, _MIDDLE),
    "top right": (_EDGE, _FAR),
    "left": (_MIDDLE, _EDGE),
    "center": (_MIDDLE, _MIDDLE),
    "right": (_MIDDLE, _FAR),
    "bottom left": (_FAR, _EDGE),
    "bottom": (_FAR, _MIDDLE),
    "bottom right": (_FAR, _FAR),
}
STYLES = ("plain", "night", "sketch")
LOCAL_EDITS = ("recolour", "reshape", "add", "remove")
GLOBAL_EDITS = ("night", "sketch", "background")

SUPERSAMPLE = 4
NIGHT_SCALE, NIGHT_TINT = 0.30, np.array([0.00, 0.02, 0.14])
SHADOW_OFFSET = 0.05  # drop shadow towards the bottom right, as a fraction of the side
REALISM_GRAIN = 0.03  # std of the per-pixel luminance texture of realistic renders
SKETCH_PAPER, SKETCH_INK, SKETCH_LINE = 0.95, 0.12, 0.045  # line width as a fraction of the side


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str

    def describe(self) -> str:
        """E.g. 'a small red circle at the top left', 'a large blue square in the center'."""
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where}"

    def name(self) -> str:
        """How an edit instruction refers to the object: colour and shape."""
        return f"the {self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]
    style: str = "plain"

    def prompt(self) -> str:
        """The T2I prompt, e.g. 'a small red circle at the top left and ... on a gray background'."""
        return f"{' and '.join(o.describe() for o in self.objects)} on a {self.background} background"

    def key(self) -> int:
        """A stable hash (texture seeds)."""
        return zlib.crc32(repr(self).encode("utf-8"))


def _cell(position: str) -> tuple[int, int]:
    row, col = POSITIONS[position]
    return int(round((row - _EDGE) / (_MIDDLE - _EDGE))), int(round((col - _EDGE) / (_MIDDLE - _EDGE)))


def _apart(a: str, b: str) -> bool:
    """Two objects never overlap when their cells are at Chebyshev distance >= 2."""
    (ra, ca), (rb, cb) = _cell(a), _cell(b)
    return max(abs(ra - rb), abs(ca - cb)) >= 2


def free_positions(scene: Scene) -> list[str]:
    """Cells where one more object fits without overlapping the scene's objects."""
    return [p for p in POSITIONS if all(_apart(p, o.position) for o in scene.objects)]


def _random_object(rng: np.random.Generator, positions: list[str], avoid_colours=()) -> SceneObject:
    colours = [c for c in COLOURS if c not in avoid_colours]
    return SceneObject(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=colours[rng.integers(len(colours))],
        size=tuple(SIZES)[rng.integers(len(SIZES))],
        position=positions[rng.integers(len(positions))],
    )


def sample_scene(rng: np.random.Generator, num_objects: int | None = None) -> Scene:
    """A random plain scene with 1 or 2 objects (of different colours, far enough apart)."""
    num_objects = int(rng.integers(1, 3)) if num_objects is None else num_objects
    scene = Scene(background=tuple(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], objects=())
    for placed in range(num_objects):
        positions = free_positions(scene)
        if placed + 1 < num_objects:  # leave room for the next object: no cell is apart from the center
            positions.remove("center")
        obj = _random_object(rng, positions, avoid_colours=[o.colour for o in scene.objects])
        scene = dataclasses.replace(scene, objects=scene.objects + (obj,))
    return scene


# ---------------------------------------------------------------------------- edits


def local_edit(scene: Scene, rng: np.random.Generator, kind: str | None = None) -> tuple[str, Scene]:
    """``(instruction, edited scene)``: one object recoloured, reshaped, added or removed."""
    kinds = [k for k in LOCAL_EDITS if local_edit_possible(scene, k)]
    kind = kinds[rng.integers(len(kinds))] if kind is None else kind
    if not local_edit_possible(scene, kind):
        raise ValueError(f"local edit {kind!r} is not possible on {scene}")
    objects = list(scene.objects)
    if kind == "add":
        new = _random_object(rng, free_positions(scene), avoid_colours=[o.colour for o in objects])
        return f"add {new.describe()}", dataclasses.replace(scene, objects=scene.objects + (new,))
    index = int(rng.integers(len(objects)))
    target = objects[index]
    if kind == "remove":
        del objects[index]
        return f"remove {target.name()}", dataclasses.replace(scene, objects=tuple(objects))
    if kind == "recolour":
        taken = {o.colour for o in objects}
        colours = [c for c in COLOURS if c not in taken]
        colour = colours[rng.integers(len(colours))]
        objects[index] = dataclasses.replace(target, colour=colour)
        return f"make {target.name()} {colour}", dataclasses.replace(scene, objects=tuple(objects))
    shapes = [s for s in SHAPES if s != target.shape]
    shape = shapes[rng.integers(len(shapes))]
    objects[index] = dataclasses.replace(target, shape=shape)
    return f"turn {target.name()} into a {shape}", dataclasses.replace(scene, objects=tuple(objects))


def local_edit_possible(scene: Scene, kind: str) -> bool:
    if kind not in LOCAL_EDITS:
        raise ValueError(f"unknown local edit {kind!r}; valid: {', '.join(LOCAL_EDITS)}")
    if kind == "add":
        return len(scene.objects) < 2 and bool(free_positions(scene))
    if kind == "remove":
        return len(scene.objects) > 1
    return bool(scene.objects)


def global_edit(scene: Scene, rng: np.random.Generator, kind: str | None = None) -> tuple[str, Scene]:
    """``(instruction, edited scene)``: night look, sketch style, or a new background; layout kept."""
    kind = GLOBAL_EDITS[rng.integers(len(GLOBAL_EDITS))] if kind is None else kind
    if kind == "night":
        return "make it night", dataclasses.replace(scene, style="night")
    if kind == "sketch":
        return "turn it into a pencil sketch", dataclasses.replace(scene, style="sketch")
    if kind == "background":
        backgrounds = [b for b in BACKGROUNDS if b != scene.background]
        background = backgrounds[rng.integers(len(backgrounds))]
        return f"change the background to {background}", dataclasses.replace(scene, background=background)
    raise ValueError(f"unknown global edit {kind!r}; valid: {', '.join(GLOBAL_EDITS)}")


# ---------------------------------------------------------------------------- rendering


def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (row, column) as fractions of the side."""
    centres = (np.arange(side) + 0.5) / side
    return np.meshgrid(centres, centres, indexing="ij")


def shape_mask(obj: SceneObject, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Boolean mask of an object: square (side 2r), circle (radius r), upright triangle (height 2r)."""
    cy, cx = POSITIONS[obj.position]
    r = SIZES[obj.size]
    dy, dx = rows - cy, cols - cx
    if obj.shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if obj.shape == "circle":
        return dx**2 + dy**2 <= r**2
    if obj.shape == "triangle":
        depth = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
        return (depth >= 0) & (depth <= 1) & (np.abs(dx) <= r * depth)
    raise ValueError(f"unknown shape {obj.shape!r}; valid: {', '.join(SHAPES)}")


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` pixels of its edge."""
    inner = mask.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def _shading(canvas, scene, masks, rows, cols) -> np.ndarray:
    """Realism: shading lit from the top left, drop shadows and a background gradient."""
    canvas = canvas * (1.08 - 0.16 * rows[..., None])  # background light falls off downwards
    for obj, mask in zip(scene.objects, masks):
        cy, cx = POSITIONS[obj.position]
        r = SIZES[obj.size]
        offset = int(SHADOW_OFFSET * rows.shape[0])
        shadow = np.zeros_like(mask)
        shadow[offset:, offset:] = mask[:-offset, :-offset]
        shadow &= ~mask
        canvas[shadow] *= 0.55
        light = 1.0 - 0.5 * np.clip(((rows - cy) + (cols - cx)) / (2 * r) + 0.5, 0.0, 1.0)
        canvas[mask] = np.asarray(COLOURS[obj.colour]) * (0.55 + 0.6 * light[mask][:, None])
    return canvas


def render(scene: Scene, image_size: int = 32, realistic: bool = False) -> np.ndarray:
    """The scene as float32 [S, S, 3] in [-1, 1] (plain, night or sketch style; optionally realistic)."""
    side = image_size * SUPERSAMPLE
    rows, cols = _grid(side)
    masks = [shape_mask(o, rows, cols) for o in scene.objects]
    if scene.style == "sketch":
        canvas = np.full((side, side, 3), SKETCH_PAPER)
        width = max(1, int(round(SKETCH_LINE * side)))
        for mask in masks:
            canvas[_outline(mask, width)] = SKETCH_INK
    else:
        canvas = np.empty((side, side, 3))
        canvas[:] = BACKGROUNDS[scene.background]
        for obj, mask in zip(scene.objects, masks):
            canvas[mask] = COLOURS[obj.colour]
        if realistic:
            canvas = _shading(canvas, scene, masks, rows, cols)
    image = canvas.reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    if realistic and scene.style != "sketch":  # fine grain texture, fixed per scene
        image = image + np.random.default_rng(scene.key()).normal(0.0, REALISM_GRAIN, image.shape[:2])[..., None]
    if scene.style == "night":
        image = image * NIGHT_SCALE + NIGHT_TINT
    return (np.clip(image, 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)
