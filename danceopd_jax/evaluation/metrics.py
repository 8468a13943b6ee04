"""Capability scores of images against the scenes they should show (GenEval- and GEdit-like).

Everything but realism is read by the deterministic parser (``parse.parse_scene``); realism is
the handcrafted cue score of ``realism.py``. Nothing is learned or fitted. Each ``*_items``
function returns per-image arrays (NaN where an item does not apply, e.g. ``two_objects`` for a
one-object prompt); each ``*_scores`` function returns their batch means, floats in [0, 1].
Images are HWC (or a batch BHWC) in [-1, 1].

``python -m danceopd_jax.evaluation.accuracy`` prints the scorers' accuracy on ground-truth renders.
"""

import itertools

import numpy as np

from danceopd_jax.data.scenes import Scene, SceneObject
from danceopd_jax.evaluation.parse import ParsedObject, ParsedScene, parse_scene
from danceopd_jax.evaluation.realism import realism

METRIC_DOCS = {  # one line per metric name, as the score dicts name them (local and global edits share two)
    "single_object": "T2I, one-object prompts: exactly one object parsed, with the requested shape and colour",
    "two_objects": "T2I, two-object prompts: both requested (shape, colour) objects parsed, as distinct objects",
    "colour": "T2I: per image, fraction of requested objects whose matched parsed object has the requested colour",
    "position": "T2I: per image, fraction of requested objects whose matched parsed object is in the requested cell",
    "count": "T2I: as many objects parsed as requested",
    "background": "T2I: the parsed background colour is the requested one",
    "overall": "T2I: mean of single_object, two_objects, colour, position and count (as GenEval's overall), over those with examples",
    "success": "edit visible. Local: the recoloured/reshaped object has the new colour/shape in its cell, the added "
    "object is present, the removed one gone. Global: night / sketch style detected, or the new background colour",
    "preservation": "rest kept. Local: plain style, target background and every unedited object (all attributes). "
    "Global: objects' shapes, sizes, cells and (except sketches) colours as in the source; night keeps the background",
    "exact": "local edit: the whole parsed scene equals the target scene",
    "realism": "mean over the visible realistic-render cues (background gradient, object shading, drop shadow, grain) "
    "of where each lies between its plain-render and realistic-render level; 0 = plain or no object, 1 = realistic",
}
_MATCH_WEIGHTS = {"shape": 2, "colour": 2, "position": 1, "size": 1}
T2I_CATEGORIES = ("single_object", "two_objects", "colour", "position", "count")


def parse_batch(images) -> list[ParsedScene]:
    """Parse every image of a batch BHWC (or a list of HWC images)."""
    return [parse_scene(image) for image in np.asarray(images)]


def _attributes(obj) -> tuple:
    return obj.shape, obj.colour, obj.size, obj.position


def _identity(obj) -> tuple:
    return obj.shape, obj.colour


def _layout(obj) -> tuple:
    return obj.shape, obj.size, obj.position


def _multiset(objects, key) -> list:
    return sorted(map(key, objects), key=repr)


def match_objects(requested, parsed) -> list[ParsedObject | None]:
    """For each requested object its parsed object (one-to-one, None when too few were parsed).

    The assignment maximises the agreeing attributes, shape and colour weighted 2, cell and size 1
    (the first such assignment on ties).
    """
    slots = list(parsed) + [None] * len(requested)

    def agreement(want, got) -> int:
        if got is None:
            return 0
        return sum(weight for key, weight in _MATCH_WEIGHTS.items() if getattr(want, key) == getattr(got, key))

    best = max(
        itertools.permutations(range(len(slots)), len(requested)),
        key=lambda perm: sum(agreement(want, slots[i]) for want, i in zip(requested, perm)),
    )
    return [slots[i] for i in best]


def _columns(rows: list[dict]) -> dict[str, np.ndarray]:
    if not rows:
        raise ValueError("cannot score an empty batch")
    return {name: np.array([row[name] for row in rows], np.float64) for name in rows[0]}


def _nanmeans(items: dict[str, np.ndarray]) -> dict[str, float]:
    """Batch means, NaN items left out (NaN when no item applies)."""
    return {name: float(np.nanmean(v)) if np.any(~np.isnan(v)) else float("nan") for name, v in items.items()}


# ---------------------------------------------------------------------------- text to image


def t2i_items(images, scenes: list[Scene]) -> dict[str, np.ndarray]:
    """Per-image GenEval-like categories (see METRIC_DOCS)."""
    rows = []
    for parsed, scene in zip(parse_batch(images), scenes, strict=True):
        want = scene.objects
        got = [_identity(o) for o in parsed.objects]
        matched = match_objects(want, parsed.objects)
        pairs = itertools.permutations(got, len(want))  # distinct parsed objects, one per requested
        present = any(list(pair) == [_identity(w) for w in want] for pair in pairs)
        rows.append(
            {
                "single_object": float(len(got) == 1 and present) if len(want) == 1 else np.nan,
                "two_objects": float(present) if len(want) == 2 else np.nan,
                "colour": np.mean([m is not None and m.colour == w.colour for w, m in zip(want, matched)]),
                "position": np.mean([m is not None and m.position == w.position for w, m in zip(want, matched)]),
                "count": float(len(got) == len(want)),
                "background": float(parsed.background == scene.background),
            }
        )
    return _columns(rows)


def t2i_scores(images, scenes: list[Scene]) -> dict[str, float]:
    """Batch means of the T2I categories, and ``overall`` (mean of the GenEval-like categories)."""
    scores = _nanmeans(t2i_items(images, scenes))
    scores["overall"] = float(np.nanmean([scores[name] for name in T2I_CATEGORIES]))
    return scores


# ---------------------------------------------------------------------------- local edits


def local_edit_kind(source: Scene, target: Scene) -> tuple[str, SceneObject]:
    """('recolour' | 'reshape' | 'add' | 'remove', the edited object: as in the target, or as removed)."""
    added = [o for o in target.objects if o not in source.objects]
    removed = [o for o in source.objects if o not in target.objects]
    if len(target.objects) > len(source.objects) and added:
        return "add", added[0]
    if len(target.objects) < len(source.objects) and removed:
        return "remove", removed[0]
    if len(added) == 1 and len(removed) == 1:
        return ("recolour" if added[0].colour != removed[0].colour else "reshape"), added[0]
    raise ValueError(f"not a local edit: {source} -> {target}")


def _has(parsed: ParsedScene, obj) -> bool:
    return any(_attributes(p) == _attributes(obj) for p in parsed.objects)


def _equals(parsed: ParsedScene, scene: Scene) -> bool:
    sketch = scene.style == "sketch"
    want = _multiset(scene.objects, lambda o: (o.shape, None if sketch else o.colour, o.size, o.position))
    background = None if sketch else scene.background
    same_look = parsed.style == scene.style and parsed.background == background
    return same_look and _multiset(parsed.objects, _attributes) == want


def local_edit_items(images, source_scenes: list[Scene], target_scenes: list[Scene]) -> dict[str, np.ndarray]:
    """Per-image local edit success, preservation and exactness (see METRIC_DOCS)."""
    rows = []
    for parsed, source, target in zip(parse_batch(images), source_scenes, target_scenes, strict=True):
        kind, edited = local_edit_kind(source, target)
        at_cell = [p for p in parsed.objects if p.position == edited.position]
        if kind == "recolour":
            success = any(p.colour == edited.colour for p in at_cell)
        elif kind == "reshape":
            success = any(p.shape == edited.shape for p in at_cell)
        elif kind == "add":
            success = _has(parsed, edited)
        else:
            success = not at_cell and not any(_identity(p) == _identity(edited) for p in parsed.objects)
        kept = [o for o in target.objects if o != edited]
        preserved = parsed.style == "plain" and parsed.background == target.background
        preserved = preserved and all(_has(parsed, o) for o in kept)
        rows.append({"success": success, "preservation": preserved, "exact": _equals(parsed, target)})
    return _columns(rows)


def local_edit_scores(images, source_scenes: list[Scene], target_scenes: list[Scene]) -> dict[str, float]:
    """Batch means of local edit success, preservation and exactness."""
    return _nanmeans(local_edit_items(images, source_scenes, target_scenes))


# ---------------------------------------------------------------------------- global edits


def global_edit_kind(source: Scene, target: Scene) -> str:
    """'night' | 'sketch' (the target's new style) or 'background' (a new background colour)."""
    if target.style != source.style and target.style in ("night", "sketch"):
        return target.style
    if target.background != source.background and target.objects == source.objects:
        return "background"
    raise ValueError(f"not a global edit: {source} -> {target}")


def global_edit_items(images, source_scenes: list[Scene], target_scenes: list[Scene]) -> dict[str, np.ndarray]:
    """Per-image global edit success and layout preservation (see METRIC_DOCS)."""
    rows = []
    for parsed, source, target in zip(parse_batch(images), source_scenes, target_scenes, strict=True):
        kind = global_edit_kind(source, target)
        if kind == "background":
            success = parsed.style == "plain" and parsed.background == target.background
        else:
            success = parsed.style == kind
        if kind == "sketch":  # colours are gone; the layout must stay
            preserved = _multiset(parsed.objects, _layout) == _multiset(source.objects, _layout)
        else:
            preserved = _multiset(parsed.objects, _attributes) == _multiset(source.objects, _attributes)
            preserved &= kind != "night" or parsed.background == source.background
        rows.append({"success": success, "preservation": preserved})
    return _columns(rows)


def global_edit_scores(images, source_scenes: list[Scene], target_scenes: list[Scene]) -> dict[str, float]:
    """Batch means of global edit success and preservation."""
    return _nanmeans(global_edit_items(images, source_scenes, target_scenes))


# ---------------------------------------------------------------------------- realism


def realism_items(images) -> dict[str, np.ndarray]:
    """Per-image realism in [0, 1] (see ``realism.py``)."""
    return {"realism": np.array([realism(parsed) for parsed in parse_batch(images)], np.float64)}


def realism_score(images) -> dict[str, float]:
    """Batch mean realism: ~1 for realistic renders, ~0 for plain renders, sketches and noise."""
    return _nanmeans(realism_items(images))
