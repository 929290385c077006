"""Reading an image of the shapes world back into objects (``analyze``), exactly and without a model.

The background is the dominant border colour; a pixel belongs to an object colour when it lies at least half-way
along the straight RGB line from the background to that colour and close to that line (so the blends a blurred
edge makes with the background keep their colour instead of turning into a neighbouring palette colour);
same-colour pixels are grouped into 4-connected components, specks dropped, and each component's shape read by
template matching: the square, circle and upright triangle of the component's area placed at its centroid, best
intersection over union wins. The concept shapes (``CONCEPT_SHAPES``: the star) are templates too, so an image of
the default world is read the same way, only a component that matches a star better than every default shape
(never one of the default world's ground truth, clean or blurred and noisy: ``tests/test_shapes.py``) reads as one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ...data.shapes.scene import BACKGROUND_COLORS, COLORS, OBJECT_COLORS, STAR_INNER_RATIO, shape_mask, size_range

# Pixel colours (RGB units 0-255).
ALPHA_MIN = 0.5  # a pixel is an object's when at least half-way from the background to the object colour
ALPHA_MAX = 1.6  # ... and not absurdly beyond it
RESIDUAL_MAX = 90.0  # largest distance from a background->colour line still read as that colour (shading, fringes)
UNKNOWN_MIN_DIST = 100.0  # off-palette pixels this far from the background form objects of colour "unknown"
BACKGROUND_MAX_DIST = 60.0  # border colour farther than this from every background name reads as "unknown"
# Objects.
SPECK_FRACTION = 0.3  # components smaller than this fraction of the smallest object's area are noise
SHAPE_FILL = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5,  # shape area / box area
              "star": 1.25 * STAR_INNER_RATIO * math.sin(math.pi / 5)}  # 10 triangles of sides R, kR at 36 degrees
SHAPE_MIN_IOU = 0.6  # best template overlap below this: shape "unknown"

_PALETTE = np.array([OBJECT_COLORS[c] for c in COLORS], dtype=np.float32)  # (K, 3)
_UNKNOWN = len(COLORS)  # pixel label of off-palette foreground


@dataclass(frozen=True)
class Detected:
    """One object found in an image. ``cx``, ``cy``: centre of ``bbox`` in pixels (x right, y down);
    ``area``: pixel count; ``bbox``: (x0, y0, x1, y1), ends exclusive. shape/color may be "unknown"."""

    shape: str
    color: str
    cx: float
    cy: float
    area: int
    bbox: tuple[int, int, int, int]


@dataclass
class Analysis:
    """What ``analyze`` read from a ``width`` x ``height`` image; objects sorted top to bottom, left to right."""

    background: str
    objects: list[Detected]
    width: int
    height: int

    @property
    def side(self) -> int:
        """The length that relative tolerances refer to (the shorter side)."""
        return min(self.width, self.height)


def _rgb_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 from a PIL image (any mode)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    return np.asarray(image.convert("RGB"))


def _background(arr: np.ndarray) -> tuple[str, np.ndarray]:
    """(name, measured RGB) of the background: the median colour of the one-pixel border ring."""
    border = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]]).astype(np.float32)  # (P, 3)
    rgb = np.median(border, axis=0)
    dists = {name: float(np.linalg.norm(rgb - np.array(c))) for name, c in BACKGROUND_COLORS.items()}
    name = min(dists, key=dists.get)
    return (name if dists[name] <= BACKGROUND_MAX_DIST else "unknown"), rgb


def _pixel_colors(arr: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """(H, W) int labels: -1 background, k an index into ``COLORS``, ``_UNKNOWN`` off-palette foreground.

    Each pixel p is projected on every line bg -> colour: p = bg + alpha * (colour - bg) + residual. It takes
    the colour whose line passes closest among those it is at least ALPHA_MIN along; a pixel near no line
    (not even as a faint blend, alpha < ALPHA_MIN) and far from the background is off-palette."""
    h, w, _ = arr.shape
    p = arr.reshape(-1, 3).astype(np.float32) - bg  # (N, 3)
    d = _PALETTE - bg  # (K, 3)
    proj = p @ d.T  # (N, K)
    alpha = proj / np.maximum((d * d).sum(1), 1.0)
    p2 = (p * p).sum(1)  # (N,)
    resid = np.sqrt(np.maximum(p2[:, None] - proj * alpha, 0.0))  # (N, K) distance from each line
    near = resid <= RESIDUAL_MAX
    strong = np.where(near & (alpha >= ALPHA_MIN) & (alpha <= ALPHA_MAX), resid, np.inf)
    best = strong.argmin(axis=1)  # (N,)
    is_color = np.isfinite(strong.min(axis=1))
    is_blend = (near & (alpha >= 0) & (alpha <= ALPHA_MAX)).any(axis=1)
    is_far = p2 >= UNKNOWN_MIN_DIST**2
    return np.where(is_color, best, np.where(is_far & ~is_blend, _UNKNOWN, -1)).reshape(h, w)


def _components(mask: np.ndarray) -> np.ndarray:
    """(H, W) int labels of the 4-connected components of ``mask`` (the smallest flat index in each component),
    H*W outside the mask. Min-label propagation with pointer jumping: a few dozen numpy passes at most."""
    h, w = mask.shape
    none = h * w
    labels = np.where(mask, np.arange(none).reshape(h, w), none)
    while True:
        new = labels.copy()
        new[1:] = np.minimum(new[1:], labels[:-1])
        new[:-1] = np.minimum(new[:-1], labels[1:])
        new[:, 1:] = np.minimum(new[:, 1:], labels[:, :-1])
        new[:, :-1] = np.minimum(new[:, :-1], labels[:, 1:])
        new = np.where(mask, new, none)
        flat = np.append(new.ravel(), none)
        new = np.where(mask, flat[flat[new]], none)  # jump to the label of the pixel each label points at
        if np.array_equal(new, labels):
            return labels
        labels = new


def _min_area(side: int) -> float:
    """Components below this many pixels are specks: a fraction of the smallest triangle's area."""
    return SPECK_FRACTION * 0.5 * size_range(side)[0] ** 2


def _shape(ys: np.ndarray, xs: np.ndarray) -> str:
    """Shape name of a component (pixel coordinates ``ys``, ``xs``): the shape whose template, sized to the same
    area and placed at the same centroid, overlaps it best (intersection over union); "unknown" below
    SHAPE_MIN_IOU. Templates tolerate what fill ratios do not: one-pixel nubs, eroded corners, ragged edges."""
    area = len(xs)
    pad = max(xs.max() - xs.min(), ys.max() - ys.min()) // 2 + 2
    x0, y0 = xs.min() - pad, ys.min() - pad
    h, w = ys.max() - y0 + pad + 1, xs.max() - x0 + pad + 1
    comp = np.zeros((h, w), dtype=bool)
    comp[ys - y0, xs - x0] = True
    cx, cy = xs.mean() + 0.5 - x0, ys.mean() + 0.5 - y0  # centroid, window coordinates
    ious = {}
    for shape, fill in SHAPE_FILL.items():
        size = math.sqrt(area / fill)
        box_cy = cy - size / 6 if shape == "triangle" else cy  # a triangle's centroid sits 2/3 of the way down
        template = shape_mask(shape, cx, box_cy, size, h, w)
        ious[shape] = (comp & template).sum() / (comp | template).sum()
    best = max(ious, key=ious.get)
    return best if ious[best] >= SHAPE_MIN_IOU else "unknown"


def _detect(component: np.ndarray, color: str) -> Detected:
    ys, xs = np.nonzero(component)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return Detected(_shape(ys, xs), color, (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2, len(xs), bbox)


def analyze(image: Image.Image) -> Analysis:
    """Objects and background of an image (PIL, any mode; shorter side >= 32 pixels). Deterministic."""
    arr = _rgb_array(image)
    h, w, _ = arr.shape
    background, bg_rgb = _background(arr)
    colors = _pixel_colors(arr, bg_rgb)
    min_area = _min_area(min(h, w))
    objects = []
    for k in np.unique(colors[colors >= 0]):
        name = COLORS[k] if k < _UNKNOWN else "unknown"
        labels = _components(colors == k)
        ids, areas = np.unique(labels[labels < h * w], return_counts=True)
        objects += [_detect(labels == i, name) for i, a in zip(ids, areas) if a >= min_area]
    objects.sort(key=lambda o: (o.cy, o.cx))
    return Analysis(background, objects, w, h)


def describe(analysis: Analysis) -> str:
    """What ``analyze`` read, in words: "red circle, blue ? on white" ("?" = a colour, shape or background it could
    not name)."""
    def word(name: str) -> str:
        return "?" if name == "unknown" else name

    names = [f"{word(d.color)} {word(d.shape)}" for d in analysis.objects]
    return f"{', '.join(names) or 'nothing'} on {word(analysis.background)}"
