"""Editing samples of the shapes world, mirroring GEdit / ImgEdit: six ``EDIT_TYPES``, each a (source scene,
instruction, target scene, spec) from ``generate_edit``. Sources are white with 1-3 objects of distinct
(shape, colour), so every instruction names its object unambiguously.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import numpy as np

from .scene import (
    _MAX_OBJECT_TRIES,
    COLORS,
    DEFAULT_BACKGROUND,
    SHAPES,
    NoRoom,
    Obj,
    Scene,
    _check_side,
    _choice,
    _fits,
    _place,
    bbox_center,
    object_bbox,
)
from .t2i import _a

EDIT_TYPES = ("recolor", "add", "remove", "move", "replace", "background")
EDIT_BACKGROUNDS = ("black", "gray")  # what "change the background" turns a white source into
DIRECTIONS = ("left", "right", "up", "down")
# (dx, dy) of one pixel in each direction; y grows downwards
DIRECTION_STEPS: Mapping[str, tuple[int, int]] = MappingProxyType({"left": (-1, 0), "right": (1, 0), "up": (0, -1),
                                                                   "down": (0, 1)})
MOVE_FRACTIONS = (0.2, 0.45)  # ground-truth move distance range, relative to the side

_MAX_EDIT_TRIES = 50

RECOLOR_TEMPLATES = ("make the {ref} {new}", "change the color of the {ref} to {new}", "paint the {ref} {new}",
                     "recolor the {ref} {new}")
ADD_TEMPLATES = ("add {obj}", "put {obj} in the picture", "insert {obj}", "draw {obj} in an empty spot")
REMOVE_TEMPLATES = ("remove the {ref}", "delete the {ref}", "take away the {ref}", "erase the {ref}")
MOVE_TEMPLATES = ("move the {ref} {dir}", "shift the {ref} {dir}", "slide the {ref} {dir}")
DIRECTION_PHRASES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "left": ("to the left", "left", "leftward"),
    "right": ("to the right", "right", "rightward"),
    "up": ("up", "upward", "higher"),
    "down": ("down", "downward", "lower"),
})
REPLACE_TEMPLATES = ("turn the {ref} into {a_new}", "replace the {ref} with {a_colored_new}",
                     "change the {ref} into {a_new}", "make the {ref} {a_new}")
BACKGROUND_TEMPLATES = ("make the background {bg}", "change the background to {bg}",
                        "set the background color to {bg}", "turn the background {bg}", "give it {a_bg} background")


def _edit_source(rng: np.random.Generator, side: int, n_lo: int, n_hi: int) -> Scene:
    """A white scene of n_lo..n_hi objects with distinct (shape, color) pairs, so a reference is unambiguous."""
    n = int(rng.integers(n_lo, n_hi + 1))
    pairs = [(s, c) for s in SHAPES for c in COLORS]
    kinds = [pairs[int(i)] for i in rng.choice(len(pairs), size=n, replace=False)]
    return Scene(tuple(_place(rng, kinds, side)), DEFAULT_BACKGROUND, side)


def _refer(rng: np.random.Generator, obj: Obj, scene: Scene) -> str:
    """A unique name for ``obj``: its shape alone when no other object shares it (half the time), else color + shape."""
    alone = sum(o.shape == obj.shape for o in scene.objects) == 1
    return obj.shape if alone and rng.random() < 0.5 else f"{obj.color} {obj.shape}"


def _unused(options: Sequence[str], taken: set[str]) -> list[str]:
    return [o for o in options if o not in taken]


def _describe(obj: Obj, side: int) -> dict[str, Any]:
    """{"shape", "color", "cx", "cy"} of ``obj``, the centre that of the pixels ``render`` gives it."""
    cx, cy = bbox_center(object_bbox(obj, side))
    return {"shape": obj.shape, "color": obj.color, "cx": cx, "cy": cy}


def _expect(obj: Obj, side: int, where: str = "at", **extra: Any) -> dict[str, Any]:
    return {**_describe(obj, side), "where": where, **extra}


def _edit_spec(edit: str, target: Scene, before: Obj | None, after: Obj | None,
               expected: list[dict[str, Any]]) -> dict[str, Any]:
    side = target.size
    return {
        "edit": edit,
        "background": target.background,
        "source_object": _describe(before, side) if before else None,
        "target_object": _describe(after, side) if after else None,
        "source_bbox": list(object_bbox(before, side)) if before else None,
        "target_bbox": list(object_bbox(after, side)) if after else None,
        "expected": expected,
    }


def _swap(scene: Scene, i: int, new: Obj | None, background: str | None = None) -> Scene:
    objs = [*scene.objects[:i], *([new] if new else []), *scene.objects[i + 1:]]
    return Scene(tuple(objs), background or scene.background, scene.size)


def _kept(scene: Scene, skip: int) -> list[dict[str, Any]]:
    return [_expect(o, scene.size) for j, o in enumerate(scene.objects) if j != skip]


def _edit_recolor(rng: np.random.Generator, side: int):
    source = _edit_source(rng, side, 1, 3)
    i = int(rng.integers(len(source.objects)))
    old = source.objects[i]
    new_color = _choice(rng, _unused(COLORS, {o.color for o in source.objects if o.shape == old.shape}))
    new = replace(old, color=new_color)
    target = _swap(source, i, new)
    instruction = _choice(rng, RECOLOR_TEMPLATES).format(ref=_refer(rng, old, source), new=new_color)
    return source, instruction, target, _edit_spec("recolor", target, old, new, [*_kept(source, i), _expect(new, side)])


def _edit_add(rng: np.random.Generator, side: int):
    source = _edit_source(rng, side, 1, 2)
    taken = {(o.shape, o.color) for o in source.objects}
    kind = _choice(rng, [(s, c) for s in SHAPES for c in COLORS if (s, c) not in taken])
    new = _place(rng, [kind], side, fixed=source.objects, tries=_MAX_EDIT_TRIES)[0]
    target = Scene((*source.objects, new), source.background, side)
    instruction = _choice(rng, ADD_TEMPLATES).format(obj=_a(f"{new.color} {new.shape}"))
    expected = [*_kept(source, -1), _expect(new, side, "free")]
    return source, instruction, target, _edit_spec("add", target, None, new, expected)


def _edit_remove(rng: np.random.Generator, side: int):
    source = _edit_source(rng, side, 1, 3)
    i = int(rng.integers(len(source.objects)))
    old = source.objects[i]
    target = _swap(source, i, None)
    instruction = _choice(rng, REMOVE_TEMPLATES).format(ref=_refer(rng, old, source))
    return source, instruction, target, _edit_spec("remove", target, old, None, _kept(source, i))


def _moves(rng: np.random.Generator, scene: Scene):
    """Random (index, direction, moved object) candidates that stay inside and apart from the other objects."""
    side = scene.size
    lo, hi = (math.ceil(f * side) for f in MOVE_FRACTIONS)
    for _ in range(_MAX_OBJECT_TRIES):
        i = int(rng.integers(len(scene.objects)))
        direction = _choice(rng, DIRECTIONS)
        dist = int(rng.integers(lo, hi + 1))
        old = scene.objects[i]
        sx, sy = DIRECTION_STEPS[direction]
        new = replace(old, cx=old.cx + sx * dist, cy=old.cy + sy * dist)
        if _fits(new, [o for j, o in enumerate(scene.objects) if j != i], side):
            yield i, direction, new


def _edit_move(rng: np.random.Generator, side: int):
    source = _edit_source(rng, side, 1, 3)
    for i, direction, new in _moves(rng, source):
        old = source.objects[i]
        target = _swap(source, i, new)
        instruction = _choice(rng, MOVE_TEMPLATES).format(ref=_refer(rng, old, source),
                                                          dir=_choice(rng, DIRECTION_PHRASES[direction]))
        start = list(bbox_center(object_bbox(old, side)))
        moved = _expect(new, side, "moved", direction=direction, start=start)
        return source, instruction, target, _edit_spec("move", target, old, new, [*_kept(source, i), moved])
    raise NoRoom(f"found no room to move an object in a {side}px image")


def _edit_replace(rng: np.random.Generator, side: int):
    source = _edit_source(rng, side, 1, 3)
    free = {j: _unused(SHAPES, {o.shape for o in source.objects if o.color == source.objects[j].color})
            for j in range(len(source.objects))}
    replaceable = [j for j, shapes in free.items() if shapes]  # another shape of its color must not exist yet
    if not replaceable:
        raise NoRoom("every object's color already shows every shape")
    i = replaceable[int(rng.integers(len(replaceable)))]
    old = source.objects[i]
    new_shape = _choice(rng, free[i])
    new = replace(old, shape=new_shape)
    target = _swap(source, i, new)
    instruction = _choice(rng, REPLACE_TEMPLATES).format(ref=_refer(rng, old, source), a_new=_a(new_shape),
                                                         a_colored_new=_a(f"{old.color} {new_shape}"))
    return source, instruction, target, _edit_spec("replace", target, old, new, [*_kept(source, i), _expect(new, side)])


def _edit_background(rng: np.random.Generator, side: int):
    source = _edit_source(rng, side, 1, 3)
    background = _choice(rng, EDIT_BACKGROUNDS)
    target = Scene(source.objects, background, side)
    instruction = _choice(rng, BACKGROUND_TEMPLATES).format(bg=background, a_bg=_a(background))
    return source, instruction, target, _edit_spec("background", target, None, None, _kept(source, -1))


_EDITS = MappingProxyType({
    "recolor": _edit_recolor,
    "add": _edit_add,
    "remove": _edit_remove,
    "move": _edit_move,
    "replace": _edit_replace,
    "background": _edit_background,
})


def generate_edit(edit_type: str, rng: np.random.Generator, size: int = 64) -> tuple[Scene, str, Scene, dict]:
    """One editing triplet: (source scene, instruction, target scene, spec).

    Sources are white with 1-3 objects of distinct (shape, color). spec:
        "edit": the edit type; "background": the target's background name;
        "source_object" / "target_object": {"shape", "color", "cx", "cy"} of the edited object before / after
            (None where it does not exist: add has no source object, remove and background no target one);
        "source_bbox" / "target_bbox": [x0, y0, x1, y1] (ends exclusive) of the edited object before / after;
        "expected": every object the result must show, {"shape", "color", "cx", "cy", "where"} with where =
            "at" (centre stays at cx, cy), "free" (anywhere; add) or "moved" (from "start" [x, y] in "direction").
    """
    if edit_type not in _EDITS:
        raise ValueError(f"edit type must be one of {EDIT_TYPES}, got {edit_type!r}")
    _check_side(size)
    for _ in range(_MAX_EDIT_TRIES):
        try:
            return _EDITS[edit_type](rng, size)
        except NoRoom:  # a crowded source: draw another one
            continue
    raise NoRoom(f"could not make a {edit_type!r} edit in a {size}px image in {_MAX_EDIT_TRIES} tries")
