"""Deterministic synthetic buckets: toy scenes rendered from a seed, no files, numpy only.

A scene is one shape (square or disc) of a foreground colour at one of five positions on a
background colour. Its prompt names exactly these four attributes, and the image is a
deterministic render of the scene, so prompt -> image (and label -> image, edit -> target) is
a learnable mapping. Images are float32 HWC in [-1, 1].

Each bucket is a random-access source (``__len__``, ``__getitem__``) that grain reads with
``grain.MapDataset.source``. The scene attributes of all records are drawn once from the seed
(small integer arrays); images are rendered on access, so memory does not grow with image size.
"""

import dataclasses
import itertools

import numpy as np

COLOURS = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
    "cyan": (-1.0, 1.0, 1.0),
    "magenta": (1.0, -1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "black": (-1.0, -1.0, -1.0),
}
SHAPES = ("square", "disc")
POSITIONS = {  # (row, column) of the shape's centre, as fractions of the image side
    "top left": (0.28, 0.28),
    "top right": (0.28, 0.72),
    "bottom left": (0.72, 0.28),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
SHAPE_RADIUS = 0.2  # half side of the square, radius of the disc, as a fraction of the image side

_COLOUR_NAMES = tuple(COLOURS)
_POSITION_NAMES = tuple(POSITIONS)
_LUMINANCE = np.array([0.299, 0.587, 0.114])

BUCKET_KINDS: dict[str, frozenset[str]] = {
    "t2i": frozenset({"prompt", "image"}),
    "edit": frozenset({"prompt", "source", "image"}),
    "class": frozenset({"label", "image"}),
}


@dataclasses.dataclass(frozen=True)
class Scene:
    """One toy scene; the fields are indices into ``COLOURS``, ``SHAPES`` and ``POSITIONS``."""

    foreground: int
    background: int
    shape: int
    position: int

    @property
    def prompt(self) -> str:
        """E.g. ``"a red disc at the top left on blue"``."""
        return (
            f"a {_COLOUR_NAMES[self.foreground]} {SHAPES[self.shape]} "
            f"at the {_POSITION_NAMES[self.position]} on {_COLOUR_NAMES[self.background]}"
        )


def _colour_vector(colour: int, channels: int) -> np.ndarray:
    """The colour in ``channels`` channels: luminance for 1, RGB cycled over the channels otherwise."""
    rgb = np.array(COLOURS[_COLOUR_NAMES[colour]])
    if channels == 1:
        return np.array([rgb @ _LUMINANCE])
    return rgb[np.arange(channels) % 3]


def render(scene: Scene, image_size: int, channels: int) -> np.ndarray:
    """float32 [image_size, image_size, channels] in [-1, 1]: the scene, sampled at pixel centres."""
    centre_row, centre_col = POSITIONS[_POSITION_NAMES[scene.position]]
    coords = (np.arange(image_size) + 0.5) / image_size
    d_row = (coords - centre_row)[:, None]
    d_col = (coords - centre_col)[None, :]
    if SHAPES[scene.shape] == "square":
        inside = (np.abs(d_row) <= SHAPE_RADIUS) & (np.abs(d_col) <= SHAPE_RADIUS)
    else:
        inside = d_row**2 + d_col**2 <= SHAPE_RADIUS**2
    image = np.where(
        inside[..., None],
        _colour_vector(scene.foreground, channels),
        _colour_vector(scene.background, channels),
    )
    return image.astype(np.float32)


def _random_scenes(rng: np.random.Generator, size: int) -> list[Scene]:
    """``size`` uniformly random scenes whose foreground and background colours differ."""
    n_colours = len(COLOURS)
    foreground = rng.integers(n_colours, size=size)
    background = (foreground + rng.integers(1, n_colours, size=size)) % n_colours
    shape = rng.integers(len(SHAPES), size=size)
    position = rng.integers(len(POSITIONS), size=size)
    return [Scene(*map(int, attrs)) for attrs in zip(foreground, background, shape, position)]


class _SceneSource:
    """Shared random-access plumbing: ``size`` records, images rendered on access."""

    def __init__(self, size: int, image_size: int, channels: int):
        if size < 0 or image_size <= 0 or channels <= 0:
            raise ValueError(
                f"need size >= 0, image_size > 0, channels > 0; "
                f"got size={size}, image_size={image_size}, channels={channels}"
            )
        self._size = size
        self.image_size = image_size
        self.channels = channels

    def __len__(self) -> int:
        return self._size

    def _check_index(self, index: int) -> int:
        if not -self._size <= index < self._size:
            raise IndexError(
                f"index {index} out of range for {type(self).__name__} of size {self._size}"
            )
        return index % self._size

    def _render(self, scene: Scene) -> np.ndarray:
        return render(scene, self.image_size, self.channels)


class SyntheticT2I(_SceneSource):
    """Records ``{"prompt": str, "image": float32[H, W, C]}``: a scene and its description."""

    def __init__(self, size: int, seed: int, image_size: int, channels: int):
        super().__init__(size, image_size, channels)
        self._scenes = _random_scenes(np.random.default_rng([seed, 0]), size)

    def __getitem__(self, index: int) -> dict:
        scene = self._scenes[self._check_index(index)]
        return {"prompt": scene.prompt, "image": self._render(scene)}


class SyntheticEdit(_SceneSource):
    """Records ``{"prompt": instruction, "source": image, "image": edited image}``.

    Each record changes exactly one attribute of a random scene to a different value:
    ``"make it <colour>"``, ``"make the background <colour>"``, ``"turn it into a <shape>"`` or
    ``"move it to the <position>"``.
    """

    def __init__(self, size: int, seed: int, image_size: int, channels: int):
        super().__init__(size, image_size, channels)
        rng = np.random.default_rng([seed, 1])
        self._edits = [self._random_edit(rng, scene) for scene in _random_scenes(rng, size)]

    @staticmethod
    def _random_edit(rng: np.random.Generator, scene: Scene) -> tuple[str, Scene, Scene]:
        """(instruction, source scene, target scene) for one random single-attribute edit."""
        kind = ("foreground", "background", "shape", "position")[rng.integers(4)]
        if kind == "shape":
            value = 1 - scene.shape
            return f"turn it into a {SHAPES[value]}", scene, dataclasses.replace(scene, shape=value)
        if kind == "position":
            value = int((scene.position + rng.integers(1, len(POSITIONS))) % len(POSITIONS))
            instruction = f"move it to the {_POSITION_NAMES[value]}"
            return instruction, scene, dataclasses.replace(scene, position=value)
        # A new colour that differs from both current colours, so the edit is always visible
        # and the shape never vanishes into its background.
        choices = [c for c in range(len(COLOURS)) if c not in (scene.foreground, scene.background)]
        value = int(choices[rng.integers(len(choices))])
        if kind == "foreground":
            instruction = f"make it {_COLOUR_NAMES[value]}"
        else:
            instruction = f"make the background {_COLOUR_NAMES[value]}"
        return instruction, scene, dataclasses.replace(scene, **{kind: value})

    def __getitem__(self, index: int) -> dict:
        instruction, source, target = self._edits[self._check_index(index)]
        return {"prompt": instruction, "source": self._render(source), "image": self._render(target)}


class SyntheticClass(_SceneSource):
    """Records ``{"label": int, "image": float32[H, W, C]}``; class ``k`` is one fixed scene.

    The class -> scene table is fixed (independent of the seed), so a label means the same image
    in every bucket and run; the seed only draws the labels of the records.
    """

    def __init__(self, size: int, seed: int, image_size: int, channels: int, num_classes: int):
        super().__init__(size, image_size, channels)
        all_scenes = [
            Scene(fg, bg, shape, pos)
            for fg, bg, shape, pos in itertools.product(
                range(len(COLOURS)), range(len(COLOURS)), range(len(SHAPES)), range(len(POSITIONS))
            )
            if fg != bg
        ]
        if not 1 <= num_classes <= len(all_scenes):
            raise ValueError(f"num_classes must be in [1, {len(all_scenes)}], got {num_classes}")
        order = np.random.default_rng(0).permutation(len(all_scenes))
        self.class_scenes = [all_scenes[i] for i in order[:num_classes]]
        self._labels = np.random.default_rng([seed, 2]).integers(num_classes, size=size)

    def __getitem__(self, index: int) -> dict:
        label = int(self._labels[self._check_index(index)])
        return {"label": label, "image": self._render(self.class_scenes[label])}


def make_bucket_source(
    kind: str, size: int, seed: int, image_size: int, channels: int, num_classes: int = 0
) -> SyntheticT2I | SyntheticEdit | SyntheticClass:
    """The synthetic source of one bucket kind (see ``BUCKET_KINDS`` for the fields it provides)."""
    if kind == "t2i":
        return SyntheticT2I(size, seed, image_size, channels)
    if kind == "edit":
        return SyntheticEdit(size, seed, image_size, channels)
    if kind == "class":
        return SyntheticClass(size, seed, image_size, channels, num_classes)
    raise ValueError(f"unknown bucket kind {kind!r}; valid kinds: {sorted(BUCKET_KINDS)}")
