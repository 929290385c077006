"""The procedural shapes world: coloured circles, squares and triangles whose every image can be scored exactly.

A ``Scene`` is a background colour plus non-overlapping objects; ``render`` draws it with hard edges (a pixel is
an object's colour when its centre lies inside the shape), so ``nextstep.eval.shapes.analyze`` recovers ground
truth exactly. Geometry is in pixel units with x to the right and y down; an object of ``size`` s fills the box
``[cx - s/2, cx + s/2) x [cy - s/2, cy + s/2)``: a square fills it, a circle is inscribed, an upright triangle
has its apex at the top centre and its base on the bottom edge.

Two kinds of samples, both mirroring public benchmarks:
    text-to-image (GenEval): ``generate_t2i(category, rng, size) -> (caption, spec, scene)``, six ``CATEGORIES``;
    editing (GEdit / ImgEdit): ``generate_edit(edit_type, rng, size) -> (source, instruction, target, spec)``,
    six ``EDIT_TYPES``.
A spec is a small JSON-friendly dict that ``nextstep.eval.shapes.check`` / ``check_edit`` verify on any image.

Randomness always comes from an explicit ``numpy.random.Generator``; the dataset and the evaluation sets derive
one per sample from ``(seed, stream, index)``, so sample i never depends on which samples were drawn before it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image

RGB = tuple[int, int, int]
BBox = tuple[int, int, int, int]  # (x0, y0, x1, y1) pixel indices, ends exclusive

# Object colours, chosen far apart in RGB and from every background (closest pair: yellow/orange, ~107 apart).
OBJECT_COLORS: Mapping[str, RGB] = MappingProxyType({
    "red": (210, 20, 20),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 230, 30),
    "purple": (150, 30, 200),
    "orange": (255, 128, 0),
})
BACKGROUND_COLORS: Mapping[str, RGB] = MappingProxyType({
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
})
DEFAULT_BACKGROUND = "white"
EDIT_BACKGROUNDS = ("black", "gray")  # what "change the background" turns a white source into
COLORS = tuple(OBJECT_COLORS)
SHAPES = ("circle", "square", "triangle")
CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attribution")
EDIT_TYPES = ("recolor", "add", "remove", "move", "replace", "background")
RELATIONS = ("left of", "right of", "above", "below")
DIRECTIONS = ("left", "right", "up", "down")
COUNT_WORDS: Mapping[int, str] = MappingProxyType({2: "two", 3: "three", 4: "four"})

MIN_SIDE = 32  # below this four objects no longer fit with recognisable sizes
SIZE_FRACTIONS = (0.18, 0.28)  # object size range relative to the image side
MIN_OBJECT_PX = 10  # floor on object size so shapes stay distinguishable at small sides
GAP_FRACTION = 0.06  # minimum gap between object boxes, relative to the side
EDGE_FRACTION = 0.03  # minimum gap between an object box and the image border
POSITION_GAP_FRACTION = 0.25  # ground-truth "left of" etc.: centre offset along the asked axis, at least
POSITION_SKEW_FRACTION = 0.15  # ... and at most this much offset across it
MOVE_FRACTIONS = (0.2, 0.45)  # ground-truth move distance range, relative to the side
DEFAULT_MIX: Mapping[str, float] = MappingProxyType({"t2i": 0.8, "edit": 0.2})

_MAX_SCENE_TRIES = 500
_MAX_OBJECT_TRIES = 50
_MAX_EDIT_TRIES = 50
# Independent random streams per use, so the training set and the evaluation sets never share draws.
_STREAM_DATASET, _STREAM_PROMPTS, _STREAM_EDITS, _STREAM_BACKGROUNDS = 0, 1, 2, 3
_MAX_WEIGHT = 1e6  # data weights are relative; a bound keeps their sum finite


class NoRoom(RuntimeError):
    """A requested placement does not fit the canvas (after the allowed number of random tries)."""


@dataclass(frozen=True)
class Obj:
    """One object. ``cx``, ``cy``: centre of its box in pixels; ``size``: box side in pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.color not in OBJECT_COLORS:
            raise ValueError(f"color must be one of {COLORS}, got {self.color!r}")
        if not self.size > 0:
            raise ValueError(f"size must be > 0 pixels, got {self.size}")


@dataclass(frozen=True)
class Scene:
    """A square image of side ``size`` pixels: ``objects`` drawn in order over a ``background`` colour."""

    objects: tuple[Obj, ...]
    background: str = DEFAULT_BACKGROUND
    size: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if self.background not in BACKGROUND_COLORS:
            raise ValueError(f"background must be one of {tuple(BACKGROUND_COLORS)}, got {self.background!r}")
        _check_side(self.size)
        for obj in self.objects:
            x0, y0, x1, y1 = _box(obj)
            if min(x0, y0) < 0 or max(x1, y1) > self.size:
                raise ValueError(f"{obj} does not fit inside a {self.size}x{self.size} image")


# -- geometry and rendering --------------------------------------------------------------------------------------


def _check_side(side: int) -> None:
    if int(side) != side or side < MIN_SIDE:
        raise ValueError(f"image size must be an integer >= {MIN_SIDE} pixels, got {side}")


def size_range(side: int) -> tuple[int, int]:
    """Object sizes (box side in pixels, inclusive range) used for an image of ``side`` pixels."""
    _check_side(side)
    lo = max(MIN_OBJECT_PX, round(SIZE_FRACTIONS[0] * side))
    return lo, max(lo + 2, round(SIZE_FRACTIONS[1] * side))


def shape_mask(shape: str, cx: float, cy: float, size: float, height: int, width: int) -> np.ndarray:
    """(height, width) bool: pixels whose centres lie inside a ``shape`` of box side ``size`` centred at (cx, cy)."""
    ys, xs = np.mgrid[0:height, 0:width] + 0.5  # pixel centres
    dx, dy, r = xs - cx, ys - cy, size / 2
    if shape == "square":
        return (np.abs(dx) < r) & (np.abs(dy) < r)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "triangle":
        depth = dy + r  # 0 at the apex, size at the base; the half-width grows as depth / 2
        return (depth >= 0) & (depth <= size) & (np.abs(dx) <= depth / 2)
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def object_mask(obj: Obj, side: int) -> np.ndarray:
    """(side, side) bool: the pixels whose centres lie inside ``obj`` (hard edges, no antialiasing)."""
    return shape_mask(obj.shape, obj.cx, obj.cy, obj.size, side, side)


def object_bbox(obj: Obj, side: int) -> BBox:
    """(x0, y0, x1, y1), ends exclusive: the box of the pixels ``render`` gives ``obj``."""
    ys, xs = np.nonzero(object_mask(obj, side))
    if len(xs) == 0:
        raise ValueError(f"{obj} covers no pixel of a {side}x{side} image")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def bbox_center(bbox: BBox) -> tuple[float, float]:
    """Centre (x, y) of a pixel box, in the same units as ``Obj.cx``, ``Obj.cy``."""
    x0, y0, x1, y1 = bbox
    return (x0 + x1) / 2, (y0 + y1) / 2


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of ``scene.size`` x ``scene.size`` pixels, colours exactly from the palette."""
    side = scene.size
    canvas = np.empty((side, side, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND_COLORS[scene.background]
    for obj in scene.objects:
        canvas[object_mask(obj, side)] = OBJECT_COLORS[obj.color]
    return Image.fromarray(canvas)


# -- placement ---------------------------------------------------------------------------------------------------


def _choice(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _box(obj: Obj) -> tuple[float, float, float, float]:
    r = obj.size / 2
    return obj.cx - r, obj.cy - r, obj.cx + r, obj.cy + r


def _apart(a: Obj, b: Obj, gap: float) -> bool:
    """Whether the boxes of ``a`` and ``b`` are at least ``gap`` pixels apart along some axis."""
    ax0, ay0, ax1, ay1 = _box(a)
    bx0, by0, bx1, by1 = _box(b)
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def _inside(obj: Obj, side: int) -> bool:
    pad = _edge_pad(side)
    x0, y0, x1, y1 = _box(obj)
    return x0 >= pad and y0 >= pad and x1 <= side - pad and y1 <= side - pad


def _gap(side: int) -> int:
    return max(2, round(GAP_FRACTION * side))


def _edge_pad(side: int) -> int:
    return max(2, round(EDGE_FRACTION * side))


def _fits(obj: Obj, others: Sequence[Obj], side: int) -> bool:
    return _inside(obj, side) and all(_apart(obj, o, _gap(side)) for o in others)


def _random_obj(rng: np.random.Generator, shape: str, color: str, side: int) -> Obj:
    """An object of a random size at a random integer corner inside the canvas (overlap not checked)."""
    lo, hi = size_range(side)
    s = int(rng.integers(lo, hi + 1))
    pad = _edge_pad(side)
    x0, y0 = (int(v) for v in rng.integers(pad, side - pad - s + 1, size=2))
    return Obj(shape, color, x0 + s / 2, y0 + s / 2, s)


def _place(
    rng: np.random.Generator,
    kinds: Sequence[tuple[str, str]],
    side: int,
    fixed: Sequence[Obj] = (),
    accept: Callable[[list[Obj]], bool] | None = None,
    tries: int = _MAX_SCENE_TRIES,
) -> list[Obj]:
    """Objects of the given (shape, color) kinds, inside the canvas and apart from each other and from ``fixed``.

    ``accept`` may reject a whole placement (e.g. a required spatial relation); placement is retried until one
    is accepted. Raises ``NoRoom`` if none is found in ``tries`` attempts.
    """
    for _ in range(tries):
        placed: list[Obj] = []
        for shape, color in kinds:
            for _ in range(_MAX_OBJECT_TRIES):
                obj = _random_obj(rng, shape, color, side)
                if _fits(obj, [*fixed, *placed], side):
                    placed.append(obj)
                    break
            else:
                break
        else:
            if accept is None or accept(placed):
                return placed
    raise NoRoom(f"could not place {len(kinds)} objects next to {len(fixed)} in a {side}px image")


def relation_offsets(relation: str, subject_xy: tuple[float, float],
                     reference_xy: tuple[float, float]) -> tuple[float, float]:
    """(along, across) in pixels: the subject centre's offset from the reference centre along the relation's
    direction (> 0 when the relation holds; y grows downwards, so "above" means a smaller y) and across it."""
    (sx, sy), (rx, ry) = subject_xy, reference_xy
    if relation == "left of":
        return rx - sx, sy - ry
    if relation == "right of":
        return sx - rx, sy - ry
    if relation == "above":
        return ry - sy, sx - rx
    if relation == "below":
        return sy - ry, sx - rx
    raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}")


def _relation_holds_strongly(relation: str, subject: Obj, reference: Obj, side: int) -> bool:
    """Ground-truth placements: clearly offset along the asked axis, little offset across it."""
    along, across = relation_offsets(relation, (subject.cx, subject.cy), (reference.cx, reference.cy))
    return along >= POSITION_GAP_FRACTION * side and abs(across) <= POSITION_SKEW_FRACTION * side


def scene_for_spec(spec: Mapping[str, Any], rng: np.random.Generator, size: int = 64) -> Scene:
    """A random scene that satisfies a text-to-image ``spec`` (unspecified shapes and colours drawn at random).

    The scene has exactly the spec's objects on the spec's background (white when unnamed); with a ``relation``
    the first object is placed clearly in that relation to the second.
    """
    _check_side(size)
    kinds = [(w.get("shape") or _choice(rng, SHAPES), w.get("color") or _choice(rng, COLORS)) for w in spec["objects"]]
    accept = None
    if "relation" in spec:
        relation = spec["relation"]
        accept = lambda objs: _relation_holds_strongly(relation, objs[0], objs[1], size)
    return Scene(tuple(_place(rng, kinds, size, accept=accept)), spec.get("background", DEFAULT_BACKGROUND), size)


# -- text-to-image categories ------------------------------------------------------------------------------------


def _a(phrase: str) -> str:
    """The phrase with its indefinite article: "an orange circle", "a circle"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _want(shape: str | None = None, color: str | None = None) -> dict[str, str | None]:
    return {"shape": shape, "color": color}


# Templates: (format string, whether it names the background). Fields are filled by each category's function.
_ON_WHITE = " on a white background"
SINGLE_OBJECT_TEMPLATES = (("{obj}", False), ("one {bare}", False), ("{obj}" + _ON_WHITE, True),
                           ("a single {bare}", False), ("a picture of {obj}", False))
TWO_OBJECTS_TEMPLATES = (("{obj1} and {obj2}", False), ("one {bare1} and one {bare2}", False),
                         ("{obj1} and {obj2}" + _ON_WHITE, True), ("a picture of {obj1} and {obj2}", False),
                         ("{obj1} together with {obj2}", False))
COUNTING_TEMPLATES = (("{count} {plural}", False), ("exactly {count} {plural}", False),
                      ("{count} {plural}" + _ON_WHITE, True), ("a group of {count} {plural}", False),
                      ("a picture of {count} {plural}", False))
COLORS_TEMPLATES = (("{a_color} object", False), ("something {color}", False), ("{a_color} shape", False),
                    ("{a_color} thing" + _ON_WHITE, True), ("an object that is {color}", False))
POSITION_TEMPLATES = (("{obj1} {rel} {obj2}", False), ("{obj1} placed {rel} {obj2}", False),
                      ("there is {obj1} {rel} {obj2}", False), ("{obj1} {rel} {obj2}" + _ON_WHITE, True))
COLOR_ATTRIBUTION_TEMPLATES = (("{obj1} and {obj2}", False), ("one {bare1} and one {bare2}", False),
                               ("{a_shape1} that is {color1} and {a_shape2} that is {color2}", False),
                               ("{obj1} with {obj2}", False), ("{obj1} and {obj2}" + _ON_WHITE, True))
RELATION_PHRASES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "left of": ("to the left of", "left of", "on the left side of"),
    "right of": ("to the right of", "right of", "on the right side of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "beneath"),
})


def _caption(rng: np.random.Generator, templates, spec: dict[str, Any], **fields: str) -> tuple[str, dict]:
    """Fill a random template; a template that names the background adds it to the spec."""
    template, names_background = _choice(rng, templates)
    if names_background:
        spec = {**spec, "background": DEFAULT_BACKGROUND}
    return template.format(**fields), spec


def _single_object(rng: np.random.Generator) -> tuple[str, dict]:
    shape, color = _choice(rng, SHAPES), _choice(rng, COLORS)
    spec = {"category": "single_object", "objects": [_want(shape, color)]}
    bare = f"{color} {shape}"
    return _caption(rng, SINGLE_OBJECT_TEMPLATES, spec, obj=_a(bare), bare=bare)


def _two_objects(rng: np.random.Generator) -> tuple[str, dict]:
    s1, s2 = (str(s) for s in rng.permutation(SHAPES)[:2])
    spec = {"category": "two_objects", "objects": [_want(s1), _want(s2)]}
    return _caption(rng, TWO_OBJECTS_TEMPLATES, spec, obj1=_a(s1), obj2=_a(s2), bare1=s1, bare2=s2)


def _counting(rng: np.random.Generator) -> tuple[str, dict]:
    shape, color, n = _choice(rng, SHAPES), _choice(rng, COLORS), int(rng.integers(2, 5))
    spec = {"category": "counting", "objects": [_want(shape, color) for _ in range(n)]}
    return _caption(rng, COUNTING_TEMPLATES, spec, count=COUNT_WORDS[n], plural=f"{color} {shape}s")


def _colors(rng: np.random.Generator) -> tuple[str, dict]:
    color = _choice(rng, COLORS)
    spec = {"category": "colors", "objects": [_want(color=color)]}
    return _caption(rng, COLORS_TEMPLATES, spec, color=color, a_color=_a(color))


def _position(rng: np.random.Generator) -> tuple[str, dict]:
    s1, s2 = (str(s) for s in rng.permutation(SHAPES)[:2])
    c1, c2 = (_choice(rng, COLORS), _choice(rng, COLORS)) if rng.random() < 0.5 else (None, None)
    relation = _choice(rng, RELATIONS)
    spec = {"category": "position", "objects": [_want(s1, c1), _want(s2, c2)], "relation": relation}
    obj1, obj2 = (_a(f"{c} {s}" if c else s) for c, s in ((c1, s1), (c2, s2)))
    return _caption(rng, POSITION_TEMPLATES, spec, obj1=obj1, obj2=obj2,
                    rel=_choice(rng, RELATION_PHRASES[relation]))


def _color_attribution(rng: np.random.Generator) -> tuple[str, dict]:
    s1, s2 = (str(s) for s in rng.permutation(SHAPES)[:2])
    c1, c2 = (str(c) for c in rng.permutation(COLORS)[:2])
    spec = {"category": "color_attribution", "objects": [_want(s1, c1), _want(s2, c2)]}
    bare1, bare2 = f"{c1} {s1}", f"{c2} {s2}"
    return _caption(rng, COLOR_ATTRIBUTION_TEMPLATES, spec, obj1=_a(bare1), obj2=_a(bare2), bare1=bare1,
                    bare2=bare2, a_shape1=_a(s1), a_shape2=_a(s2), color1=c1, color2=c2)


_CONTENT: Mapping[str, Callable[[np.random.Generator], tuple[str, dict]]] = MappingProxyType({
    "single_object": _single_object,
    "two_objects": _two_objects,
    "counting": _counting,
    "colors": _colors,
    "position": _position,
    "color_attribution": _color_attribution,
})


def generate_t2i(category: str, rng: np.random.Generator, size: int = 64) -> tuple[str, dict, Scene]:
    """One text-to-image sample of ``category``: (caption, spec, scene), the scene satisfying the spec.

    spec: {"category": str, "objects": [{"shape": str | None, "color": str | None}, ...],
           "relation": one of RELATIONS (position only; objects[0] is the subject, objects[1] the reference),
           "background": "white" (only when the caption names it)}.
    An image satisfies it when it shows exactly these objects (None = any), in the relation if one is given.
    """
    if category not in _CONTENT:
        raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
    caption, spec = _CONTENT[category](rng)
    return caption, spec, scene_for_spec(spec, rng, size)


# -- editing -----------------------------------------------------------------------------------------------------

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


def _expect(obj: Obj, side: int, where: str = "at", **extra: Any) -> dict[str, Any]:
    cx, cy = bbox_center(object_bbox(obj, side))
    return {"shape": obj.shape, "color": obj.color, "cx": cx, "cy": cy, "where": where, **extra}


def _describe(obj: Obj | None, side: int) -> dict[str, Any] | None:
    if obj is None:
        return None
    cx, cy = bbox_center(object_bbox(obj, side))
    return {"shape": obj.shape, "color": obj.color, "cx": cx, "cy": cy}


def _edit_spec(edit: str, target: Scene, before: Obj | None, after: Obj | None,
               expected: list[dict[str, Any]]) -> dict[str, Any]:
    side = target.size
    return {
        "edit": edit,
        "background": target.background,
        "source_object": _describe(before, side),
        "target_object": _describe(after, side),
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


_STEPS: Mapping[str, tuple[int, int]] = MappingProxyType({"left": (-1, 0), "right": (1, 0), "up": (0, -1),
                                                          "down": (0, 1)})


def _moves(rng: np.random.Generator, scene: Scene):
    """Random (index, direction, moved object) candidates that stay inside and apart from the other objects."""
    side = scene.size
    lo, hi = (math.ceil(f * side) for f in MOVE_FRACTIONS)
    for _ in range(_MAX_OBJECT_TRIES):
        i = int(rng.integers(len(scene.objects)))
        direction = _choice(rng, DIRECTIONS)
        dist = int(rng.integers(lo, hi + 1))
        old = scene.objects[i]
        sx, sy = _STEPS[direction]
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


# -- datasets and evaluation sets --------------------------------------------------------------------------------


def _check_seed(seed: int) -> None:
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _check_count(name: str, n: int) -> None:
    if int(n) != n or n < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {n!r}")


def _rng(seed: int, stream: int, *index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), stream, *(int(i) for i in index)])


def data_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    """Checked, canonical ``ShapesDataset`` weights: {name: float} for the categories and edit types whose draw they
    change. A kind whose weights are all equal (names left out weigh 1) is dropped, as are weights of 1, so two
    mappings that give the same samples give the same dict. ValueError names what is wrong."""
    weights = {} if weights is None else weights
    if not isinstance(weights, Mapping):
        raise ValueError(f"weights must map names to numbers, got {weights!r}")
    unknown = set(weights) - set(CATEGORIES) - set(EDIT_TYPES)
    if unknown:
        raise ValueError(f"weights: names must be categories {CATEGORIES} or edit types {EDIT_TYPES}, "
                         f"got unknown {sorted(unknown)}")
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not 0 <= w <= _MAX_WEIGHT:  # NaN fails too
            raise ValueError(f"weights must be numbers in [0, {_MAX_WEIGHT:g}], got {name}: {w!r}")
    out = {}
    for names, what in ((CATEGORIES, "category"), (EDIT_TYPES, "edit type")):
        w = [float(weights.get(n, 1.0)) for n in names]
        if max(w) <= 0:
            raise ValueError(f"weights: every {what} weighs 0; give at least one a weight > 0")
        if len(set(w)) > 1:
            out.update({n: v for n, v in zip(names, w) if v != 1.0})
    return out


def _draw_weights(weights: Mapping[str, float], names: Sequence[str]) -> np.ndarray | None:
    """Probabilities over ``names`` from ``data_weights`` output, or None for the uniform draw of ``_choice``."""
    if not set(weights) & set(names):
        return None
    w = np.array([weights.get(n, 1.0) for n in names])
    return w / w.sum()


def _weighted(rng: np.random.Generator, names: Sequence[str], p: np.ndarray | None) -> str:
    return _choice(rng, names) if p is None else names[int(rng.choice(len(names), p=p))]


class ShapesDataset:
    """``num_samples`` procedural samples, sample i a pure function of (seed, i, size, mix, weights, backgrounds).

    Items: {"kind": "t2i", "image": PIL RGB, "caption": str} or
           {"kind": "edit", "source": PIL RGB, "target": PIL RGB, "instruction": str}.
    ``mix`` weighs the two kinds (missing kinds weigh 0); a t2i sample draws its category from
    ``CATEGORIES``, an edit its type from ``EDIT_TYPES``, by ``weights``.
    ``weights``: relative weights of t2i categories and edit types by name (names left out weigh 1, at most
    ``_MAX_WEIGHT``); where all of a kind weigh the same, that kind keeps the uniform draw of earlier versions, so the
    same samples.
    ``backgrounds``: the fraction of t2i samples redrawn on a black or gray background that the caption then names
    (drawn from a separate random stream, so 0 gives exactly the samples of earlier versions and a fraction p
    changes only the samples it picks). Without it those backgrounds appear only as edit targets.
    """

    def __init__(self, num_samples: int, seed: int, size: int = 64, mix: Mapping[str, float] = DEFAULT_MIX,
                 backgrounds: float = 0.0, weights: Mapping[str, float] | None = None):
        _check_count("num_samples", num_samples)
        _check_seed(seed)
        _check_side(size)
        if isinstance(backgrounds, bool) or not isinstance(backgrounds, (int, float)) or not 0 <= backgrounds <= 1:
            raise ValueError(f"backgrounds must be a fraction in [0, 1], got {backgrounds!r}")
        unknown = set(mix) - {"t2i", "edit"}
        if unknown:
            raise ValueError(f"mix keys must be 't2i' and/or 'edit', got unknown {sorted(unknown)}")
        kinds = [float(mix.get("t2i", 0.0)), float(mix.get("edit", 0.0))]
        if min(kinds) < 0 or sum(kinds) <= 0:
            raise ValueError(f"mix weights must be >= 0 and not all zero, got {dict(mix)}")
        self.num_samples, self.seed, self.size = int(num_samples), int(seed), int(size)
        self.p_t2i = kinds[0] / sum(kinds)
        self.backgrounds = float(backgrounds)
        weights = data_weights(weights)
        self.p_category = _draw_weights(weights, CATEGORIES)
        self.p_edit = _draw_weights(weights, EDIT_TYPES)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, Any]:
        if int(i) != i or not 0 <= i < self.num_samples:
            raise IndexError(f"index {i!r} out of range for {self.num_samples} samples")
        rng = _rng(self.seed, _STREAM_DATASET, i)
        if rng.random() < self.p_t2i:
            caption, _, scene = generate_t2i(_weighted(rng, CATEGORIES, self.p_category), rng, self.size)
            if self.backgrounds > 0:
                caption, scene = self._maybe_recolor_background(i, caption, scene)
            return {"kind": "t2i", "image": render(scene), "caption": caption}
        source, instruction, target, _ = generate_edit(_weighted(rng, EDIT_TYPES, self.p_edit), rng, self.size)
        return {"kind": "edit", "source": render(source), "target": render(target), "instruction": instruction}

    def _maybe_recolor_background(self, i: int, caption: str, scene: Scene) -> tuple[str, Scene]:
        """With probability ``backgrounds`` (own stream): the scene on black or gray, the caption naming it."""
        rng = _rng(self.seed, _STREAM_BACKGROUNDS, i)
        if rng.random() >= self.backgrounds:
            return caption, scene
        background = _choice(rng, EDIT_BACKGROUNDS)
        caption = caption.removesuffix(_ON_WHITE) + f" on {_a(background)} background"
        return caption, Scene(scene.objects, background, scene.size)


def prompt_set(category: str, n: int, seed: int, size: int = 64) -> list[tuple[str, dict]]:
    """``n`` fixed evaluation prompts of ``category``: [(caption, spec)], a pure function of the arguments
    (drawn from a random stream the training set never uses)."""
    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
    _check_count("n", n)
    _check_seed(seed)
    cat = CATEGORIES.index(category)
    return [generate_t2i(category, _rng(seed, _STREAM_PROMPTS, cat, i), size)[:2] for i in range(n)]


def edit_set(n: int, seed: int, size: int = 64) -> list[tuple[Image.Image, str, dict]]:
    """``n`` fixed evaluation edits: [(source image, instruction, spec)], edit types in turn (``EDIT_TYPES``),
    so any n >= 6 covers all six."""
    _check_count("n", n)
    _check_seed(seed)
    out = []
    for i in range(n):
        edit_type = EDIT_TYPES[i % len(EDIT_TYPES)]
        source, instruction, _, spec = generate_edit(edit_type, _rng(seed, _STREAM_EDITS, i), size)
        out.append((render(source), instruction, spec))
    return out
