"""Scenes of the shapes world and their exact rendering: the palette, ``Obj`` and ``Scene``, pixel masks and boxes,
and random placement of objects that keep apart from each other and from the border.

Geometry is in pixel units with x to the right and y down; an object of ``size`` s fills the box
``[cx - s/2, cx + s/2) x [cy - s/2, cy + s/2)``: a square fills it, a circle is inscribed, an upright triangle
has its apex at the top centre and its base on the bottom edge, and a star (a concept shape, see below) is a
five-pointed star inscribed in the circle, one point up. ``render`` draws hard edges (a pixel is an object's colour
when its centre lies inside the shape), so ``nextstep.eval.shapes.analyze`` recovers ground truth exactly.

``SHAPES`` are the shapes of the default world (what ``ShapesDataset`` and the evaluation sets draw); the shapes in
``CONCEPT_SHAPES`` render, place and analyse like them but appear only where asked for by name
(``nextstep.data.shapes.concept``), so a model trained on the default world has never seen them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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
COLORS = tuple(OBJECT_COLORS)
SHAPES = ("circle", "square", "triangle")
CONCEPT_SHAPES = ("star",)  # never drawn by the default world: new concepts to teach a trained model
ALL_SHAPES = SHAPES + CONCEPT_SHAPES
RELATIONS = ("left of", "right of", "above", "below")

MIN_SIDE = 32  # below this four objects no longer fit with recognisable sizes
SIZE_FRACTIONS = (0.18, 0.28)  # object size range relative to the image side
MIN_OBJECT_PX = 10  # floor on object size so shapes stay distinguishable at small sides
GAP_FRACTION = 0.06  # minimum gap between object boxes, relative to the side
EDGE_FRACTION = 0.03  # minimum gap between an object box and the image border
POSITION_GAP_FRACTION = 0.25  # ground-truth "left of" etc.: centre offset along the asked axis, at least
POSITION_SKEW_FRACTION = 0.15  # ... and at most this much offset across it
STAR_INNER_RATIO = 0.55  # a star's inner vertices lie at this fraction of its outer radius
# Shapes drawn at other sizes than SIZE_FRACTIONS. Stars: after an encode-decode round trip through the bundled f8
# tokenizer, 0 of 100 stars of the default 12-18 px (64 px image) still read as stars (all as circles: their points
# are a pixel or two wide), 38 of 100 at 18-24 px, 100 of 100 at 24-30 px (benchmarks/concept_vae.py).
SHAPE_SIZE_FRACTIONS: Mapping[str, tuple[float, float]] = MappingProxyType({"star": (0.375, 0.47)})

_MAX_SCENE_TRIES = 500
_MAX_OBJECT_TRIES = 50


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
        if self.shape not in ALL_SHAPES:
            raise ValueError(f"shape must be one of {ALL_SHAPES}, got {self.shape!r}")
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


def size_range(side: int, shape: str | None = None) -> tuple[int, int]:
    """Object sizes (box side in pixels, inclusive range) used for an image of ``side`` pixels: those of the
    default shapes, or of ``shape`` (its ``SHAPE_SIZE_FRACTIONS`` where it has its own)."""
    _check_side(side)
    lo_frac, hi_frac = SHAPE_SIZE_FRACTIONS.get(shape, SIZE_FRACTIONS)
    lo = max(MIN_OBJECT_PX, round(lo_frac * side))
    return lo, max(lo + 2, round(hi_frac * side))


def _in_polygon(xs: np.ndarray, ys: np.ndarray, vertices: Sequence[tuple[float, float]]) -> np.ndarray:
    """Bool mask of the points (xs, ys) inside the polygon (even-odd rule; any array shape)."""
    inside = np.zeros(xs.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(vertices, [*vertices[1:], vertices[0]]):
        if y1 == y2:
            continue  # a horizontal edge crosses no horizontal ray
        crosses = (y1 > ys) != (y2 > ys)
        inside ^= crosses & (xs < x1 + (x2 - x1) * (ys - y1) / (y2 - y1))
    return inside


def _star_vertices(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The 10 vertices of a five-pointed star of outer radius ``r``, one point straight up, clockwise on screen."""
    radii = [r if k % 2 == 0 else STAR_INNER_RATIO * r for k in range(10)]
    angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
    return [(cx + q * math.cos(a), cy + q * math.sin(a)) for q, a in zip(radii, angles)]


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
    if shape == "star":
        return _in_polygon(xs, ys, _star_vertices(cx, cy, r))
    raise ValueError(f"shape must be one of {ALL_SHAPES}, got {shape!r}")


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
    lo, hi = size_range(side, shape)
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
        def accept(objs):
            return _relation_holds_strongly(relation, objs[0], objs[1], size)
    return Scene(tuple(_place(rng, kinds, size, accept=accept)), spec.get("background", DEFAULT_BACKGROUND), size)
