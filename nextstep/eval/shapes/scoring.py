"""Scoring analysed images against specs of the shapes world: ``check`` for a text-to-image spec (GenEval-style:
exactly the asked objects, in the asked relation), ``check_edit`` for an edit (GEdit-style: the asked change
happened, and how well the rest of the source was preserved).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...data.shapes.edits import DIRECTION_STEPS, EDIT_TYPES
from ...data.shapes.scene import relation_offsets
from ...data.shapes.t2i import CATEGORIES
from ..metrics import psnr
from .analysis import Analysis, Detected, _background, _pixel_colors, _rgb_array, analyze

# Relations and edits, as fractions of the image side.
POSITION_MARGIN = 0.1  # "left of": centres at least this far apart along the axis (and more than across it)
AT_TOLERANCE = 0.06  # an object that should stay put may shift this much
MOVE_MIN = 0.1  # a moved object must travel at least this far in the asked direction
MOVE_ACROSS_MAX = 0.1  # ... and drift at most this much across it
REGION_PAD = 0.05  # edited regions are grown by this much before measuring preservation outside them


def _assign(wants: Sequence[Mapping[str, Any]], found: Sequence[Detected],
            fits: Callable[[Mapping[str, Any], Detected], bool]) -> tuple[Detected, ...] | None:
    """A one-to-one matching of ``found`` to ``wants`` (same count) where every pair fits, or None."""
    if len(found) != len(wants):
        return None
    for perm in itertools.permutations(found):
        if all(fits(w, d) for w, d in zip(wants, perm)):
            return perm
    return None


def matches(want: Mapping[str, Any], d: Detected) -> bool:
    """Whether a detected object is what a spec entry asks for (a missing shape or colour matches any)."""
    return want.get("shape") in (None, d.shape) and want.get("color") in (None, d.color)


def _relation_ok(relation: str, subject: Detected, reference: Detected, side: int) -> bool:
    along, across = relation_offsets(relation, (subject.cx, subject.cy), (reference.cx, reference.cy))
    return along >= POSITION_MARGIN * side and along > abs(across)


def check(spec: Mapping[str, Any], analysis: Analysis) -> bool:
    """Whether an analysed image satisfies a text-to-image spec (``nextstep.data.shapes.generate_t2i``):
    exactly the spec's objects (by shape and colour where given), the relation if any, the background if named."""
    if spec.get("category") not in CATEGORIES or "objects" not in spec:
        raise ValueError(f"not a text-to-image spec (category among {CATEGORIES} and objects): {spec!r}")
    if "background" in spec and analysis.background != spec["background"]:
        return False
    wants = spec["objects"]
    if len(analysis.objects) != len(wants):
        return False
    relation = spec.get("relation")
    return any(all(matches(w, d) for w, d in zip(wants, perm))
               and (relation is None or _relation_ok(relation, perm[0], perm[1], analysis.side))
               for perm in itertools.permutations(analysis.objects))


def _stays(want: Mapping[str, Any], d: Detected, side: int) -> bool:
    """Whether ``d`` is the expected edit-result object: same shape and colour, and where it should be."""
    if (want["shape"], want["color"]) != (d.shape, d.color):
        return False
    if want["where"] == "at":
        return math.hypot(d.cx - want["cx"], d.cy - want["cy"]) <= AT_TOLERANCE * side
    if want["where"] == "moved":
        sx, sy = DIRECTION_STEPS[want["direction"]]
        dx, dy = d.cx - want["start"][0], d.cy - want["start"][1]
        along, across = sx * dx + sy * dy, sy * dx + sx * dy
        return along >= MOVE_MIN * side and abs(across) <= MOVE_ACROSS_MAX * side
    if want["where"] == "free":
        return True
    raise ValueError(f"expected object 'where' must be 'at', 'moved' or 'free', got {want['where']!r}")


def _psnr_where(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """PSNR in dB between two (H, W, 3) uint8 images over the pixels where ``mask`` (H, W) is true (in float64).
    inf when they agree exactly, nan when the mask is empty."""
    pixels = [torch.from_numpy(x[mask]).double()[None] for x in (a, b)]  # (1, N, 3) each
    return float(psnr(*pixels, peak=255.0)[0])


def _grow(mask: np.ndarray, r: int, shrink: bool = False) -> np.ndarray:
    """Binary dilation (or erosion) of an (H, W) mask by an r-pixel square."""
    out = mask.copy()
    for _ in range(r):
        padded = np.pad(out, 1, constant_values=not shrink)
        shifted = [padded[1 + dy:1 + dy + out.shape[0], 1 + dx:1 + dx + out.shape[1]]
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        out = np.logical_and.reduce(shifted) if shrink else np.logical_or.reduce(shifted)
    return out


def _edited_region(spec: Mapping[str, Any], result: Analysis, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the spec's source and target boxes, and for add/move wherever the output put the edited
    object (the instruction leaves its place open), grown by ``REGION_PAD``."""
    boxes = [b for b in (spec.get("source_bbox"), spec.get("target_bbox")) if b is not None]
    changed = spec.get("target_object")
    if spec["edit"] in ("add", "move") and changed:
        boxes += [d.bbox for d in result.objects if (d.shape, d.color) == (changed["shape"], changed["color"])]
    region = np.zeros(shape, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        region[y0:y1, x0:x1] = True
    return _grow(region, max(1, round(REGION_PAD * min(shape))))


def check_edit(spec: Mapping[str, Any], source: Image.Image, output: Image.Image) -> tuple[bool, float]:
    """(success, psnr_outside) of an edit (spec from ``nextstep.data.shapes.generate_edit``).

    success: the output shows exactly the spec's expected objects (each where it should be) on the expected
    background. psnr_outside (dB): source vs output outside the edited region; for a background change, over
    the source's object pixels instead (eroded by one pixel). inf when those pixels are unchanged.
    """
    return _check_edit(spec, source, output, analyze(output))


def _check_edit(spec: Mapping[str, Any], source: Image.Image, output: Image.Image, result: Analysis
                ) -> tuple[bool, float]:
    """``check_edit`` given ``result = analyze(output)``."""
    if spec.get("edit") not in EDIT_TYPES or "expected" not in spec:
        raise ValueError(f"not an edit spec (edit among {EDIT_TYPES} and expected): {spec!r}")
    src, out = _rgb_array(source), _rgb_array(output)
    if src.shape != out.shape:
        raise ValueError(f"output is {out.shape[1]}x{out.shape[0]} but the source is {src.shape[1]}x{src.shape[0]}")
    side = result.side
    success = (result.background == spec["background"]
               and _assign(spec["expected"], result.objects, lambda w, d: _stays(w, d, side)) is not None)
    if spec["edit"] == "background":
        keep = _grow(_pixel_colors(src, _background(src)[1]) >= 0, 1, shrink=True)
    else:
        keep = ~_edited_region(spec, result, src.shape[:2])
    return success, _psnr_where(src, out, keep)
