"""The shapes benchmark: exact, model-free scoring of images from the procedural shapes world.

``analyze`` reads an image back into objects: the background is the dominant border colour; a pixel belongs to
an object colour when it lies at least half-way along the straight RGB line from the background to that colour
and close to that line (so the blends a blurred edge makes with the background keep their colour instead of
turning into a neighbouring palette colour); same-colour pixels are grouped into 4-connected components, specks
dropped, and each component's shape read by template matching: the square, circle and upright triangle of
the component's area placed at its centroid, best intersection over union wins.

``check`` scores a text-to-image spec, ``check_edit`` an edit, ``evaluate`` runs a generator over the fixed
evaluation sets of ``nextstep.data.shapes`` and reports GenEval-style accuracies and GEdit-style edit scores.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from ..data.shapes import (
    BACKGROUND_COLORS,
    CATEGORIES,
    COLORS,
    EDIT_TYPES,
    OBJECT_COLORS,
    edit_set,
    prompt_set,
    relation_offsets,
    shape_mask,
    size_range,
)

# Pixel colours (RGB units 0-255).
ALPHA_MIN = 0.5  # a pixel is an object's when at least half-way from the background to the object colour
ALPHA_MAX = 1.6  # ... and not absurdly beyond it
RESIDUAL_MAX = 90.0  # largest distance from a background->colour line still read as that colour (shading, fringes)
UNKNOWN_MIN_DIST = 100.0  # off-palette pixels this far from the background form objects of colour "unknown"
BACKGROUND_MAX_DIST = 60.0  # border colour farther than this from every background name reads as "unknown"
# Objects.
SPECK_FRACTION = 0.3  # components smaller than this fraction of the smallest object's area are noise
SHAPE_FILL = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}  # shape area / box area
SHAPE_MIN_IOU = 0.6  # best template overlap below this: shape "unknown"
# Relations and edits, as fractions of the image side.
POSITION_MARGIN = 0.1  # "left of": centres at least this far apart along the axis (and more than across it)
AT_TOLERANCE = 0.06  # an object that should stay put may shift this much
MOVE_MIN = 0.1  # a moved object must travel at least this far in the asked direction
MOVE_ACROSS_MAX = 0.1  # ... and drift at most this much across it
REGION_PAD = 0.05  # edited regions are grown by this much before measuring preservation outside them
PSNR_CAP_DB = 100.0  # identical pixels give PSNR inf; averages count them as this

_PALETTE = np.array([OBJECT_COLORS[c] for c in COLORS], dtype=np.float32)  # (K, 3)
_UNKNOWN = len(COLORS)  # pixel label of off-palette foreground
_STEPS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


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


# -- reading images ----------------------------------------------------------------------------------------------


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


# -- scoring -----------------------------------------------------------------------------------------------------


def _assign(wants: Sequence[Mapping[str, Any]], found: Sequence[Detected],
            fits: Callable[[Mapping[str, Any], Detected], bool]) -> tuple[Detected, ...] | None:
    """A one-to-one matching of ``found`` to ``wants`` (same count) where every pair fits, or None."""
    if len(found) != len(wants):
        return None
    for perm in itertools.permutations(found):
        if all(fits(w, d) for w, d in zip(wants, perm)):
            return perm
    return None


def _is(want: Mapping[str, Any], d: Detected) -> bool:
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
    return any(all(_is(w, d) for w, d in zip(wants, perm))
               and (relation is None or _relation_ok(relation, perm[0], perm[1], analysis.side))
               for perm in itertools.permutations(analysis.objects))


def _stays(want: Mapping[str, Any], d: Detected, side: int) -> bool:
    """Whether ``d`` is the expected edit-result object: same shape and colour, and where it should be."""
    if (want["shape"], want["color"]) != (d.shape, d.color):
        return False
    if want["where"] == "at":
        return math.hypot(d.cx - want["cx"], d.cy - want["cy"]) <= AT_TOLERANCE * side
    if want["where"] == "moved":
        sx, sy = _STEPS[want["direction"]]
        dx, dy = d.cx - want["start"][0], d.cy - want["start"][1]
        along, across = sx * dx + sy * dy, sy * dx + sx * dy
        return along >= MOVE_MIN * side and abs(across) <= MOVE_ACROSS_MAX * side
    if want["where"] == "free":
        return True
    raise ValueError(f"expected object 'where' must be 'at', 'moved' or 'free', got {want['where']!r}")


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB between two (H, W, 3) uint8 images over the pixels where ``mask`` (H, W) is true.
    inf when they agree exactly, nan when the mask is empty."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    if mask is not None:
        diff = diff[mask]
    if diff.size == 0:
        return float("nan")
    mse = float(np.mean(diff * diff))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


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
    return success, psnr(src, out, keep)


# -- benchmark ---------------------------------------------------------------------------------------------------


def _batched(fn: Callable[..., Sequence[Image.Image]], columns: Sequence[Sequence[Any]], batch_size: int,
             desc: str, progress: bool) -> list[Image.Image]:
    """fn over aligned argument columns in batches; checks it returns one PIL image per input."""
    n = len(columns[0])
    out: list[Image.Image] = []
    with tqdm(total=n, desc=desc, disable=not progress) as bar:
        for i in range(0, n, batch_size):
            args = [col[i:i + batch_size] for col in columns]
            images = list(fn(*args))
            if len(images) != len(args[0]) or not all(isinstance(im, Image.Image) for im in images):
                raise ValueError(f"{desc}: expected {len(args[0])} PIL images from the model, got "
                                 f"{[type(im).__name__ for im in images]}")
            out += [im.convert("RGB") for im in images]
            bar.update(len(args[0]))
    return out


def _percent(flags: Sequence[bool]) -> float:
    return 100.0 * sum(flags) / len(flags) if flags else float("nan")


def _mean_psnr(values: Sequence[float]) -> float:
    """Mean PSNR in dB, identical pixels (inf) counted as PSNR_CAP_DB; nan values (nothing to compare) skipped."""
    kept = [min(v, PSNR_CAP_DB) for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else float("nan")


def evaluate(
    generate_fn: Callable[[list[str]], Sequence[Image.Image]],
    n_per_category: int,
    seed: int,
    size: int = 64,
    edit_fn: Callable[[list[Image.Image], list[str]], Sequence[Image.Image]] | None = None,
    n_edits: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Score a text-to-image model (and optionally an editor) on the fixed shapes evaluation sets
    (``prompt_set`` / ``edit_set`` of ``nextstep.data.shapes`` with this seed and size).

    generate_fn(captions) -> one PIL image per caption; edit_fn(sources, instructions) -> one PIL per source,
    same size as its source. Returns
        "categories": {category: accuracy %} ({} when n_per_category is 0), "overall": their mean (%),
        "edits": {"success": %, "psnr_outside": mean dB (inf counted as PSNR_CAP_DB),
                  "types": {edit type: {"success": %, "psnr_outside": dB}}} or None without edits,
        "records": per sample {"kind": "t2i" | "edit", "category": category or edit type, "caption": the text
                   given to the model (caption or instruction), "passed": bool, "psnr_outside": dB or None,
                   "found": what the evaluator read in the model's image (``describe``)},
        "images": the model's image for each record (PIL, aligned with "records"),
        "sources": the input image of each edit record (None for text-to-image), plus "size" and "seed".
    """
    if n_per_category < 0 or n_edits < 0 or batch_size < 1:
        raise ValueError(f"need n_per_category >= 0, n_edits >= 0, batch_size >= 1; got {n_per_category}, "
                         f"{n_edits}, {batch_size}")
    if n_edits > 0 and edit_fn is None:
        raise ValueError("n_edits > 0 needs an edit_fn")
    categories, records, images, sources = {}, [], [], []
    if n_per_category:
        for category in CATEGORIES:
            accuracy, recs, outs = _evaluate_category(generate_fn, category, n_per_category, seed, size,
                                                      batch_size, progress)
            categories[category] = accuracy
            records += recs
            images += outs
    sources += [None] * len(records)
    edits = None
    if n_edits:
        edits, recs, outs, srcs = _evaluate_edits(edit_fn, n_edits, seed, size, batch_size, progress)
        records += recs
        images += outs
        sources += srcs
    overall = float(np.mean(list(categories.values()))) if categories else float("nan")
    return {"size": size, "seed": seed, "categories": categories, "overall": overall, "edits": edits,
            "records": records, "images": images, "sources": sources}


def evaluate_pipeline(pipe, n_per_category: int, seed: int, size: int = 64, n_edits: int = 0, batch_size: int = 16,
                      progress: bool = True, image_guidance_scale: float | None = None, **settings: Any
                      ) -> dict[str, Any]:
    """``evaluate`` for a ``NextStepPipeline``: one generator seeded with ``seed`` for all its calls, ``size`` x
    ``size`` images; ``settings`` (steps, guidance, ...) go to every call, ``image_guidance_scale`` to edits only.
    Settings left out take the pipeline's defaults (``pipe.defaults``)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    kw = dict(height=size, width=size, generator=gen, progress=False, **settings)

    def generate(captions):
        return pipe(captions, **kw).images

    def edit(sources, instructions):
        return pipe(instructions, image=sources, image_guidance_scale=image_guidance_scale, **kw).images

    return evaluate(generate, n_per_category, seed, size=size, edit_fn=edit if n_edits else None, n_edits=n_edits,
                    batch_size=batch_size, progress=progress)


def _evaluate_category(generate_fn, category, n, seed, size, batch_size, progress):
    """(accuracy %, records, images) of the generator on ``prompt_set(category, n, seed, size)``."""
    prompts = prompt_set(category, n, seed, size)
    outputs = _batched(generate_fn, [[c for c, _ in prompts]], batch_size, category, progress)
    analyses = [analyze(im) for im in outputs]
    passed = [check(spec, a) for (_, spec), a in zip(prompts, analyses)]
    records = [{"kind": "t2i", "category": category, "caption": c, "passed": ok, "psnr_outside": None,
                "found": describe(a)} for (c, _), ok, a in zip(prompts, passed, analyses)]
    return _percent(passed), records, outputs


def _evaluate_edits(edit_fn, n, seed, size, batch_size, progress):
    """(summary, records, images, sources) of the editor on ``edit_set(n, seed, size)``."""
    cases = edit_set(n, seed, size)
    outputs = _batched(edit_fn, [[s for s, _, _ in cases], [i for _, i, _ in cases]], batch_size, "edits", progress)
    records = []
    for (source, instruction, spec), out in zip(cases, outputs):
        result = analyze(out)
        ok, value = _check_edit(spec, source, out, result)
        records.append({"kind": "edit", "category": spec["edit"], "caption": instruction, "passed": ok,
                        "psnr_outside": value, "found": describe(result)})
    types = {}
    for t in EDIT_TYPES:
        recs = [r for r in records if r["category"] == t]
        if recs:
            types[t] = {"success": _percent([r["passed"] for r in recs]),
                        "psnr_outside": _mean_psnr([r["psnr_outside"] for r in recs])}
    summary = {"success": _percent([r["passed"] for r in records]),
               "psnr_outside": _mean_psnr([r["psnr_outside"] for r in records]), "types": types}
    return summary, records, outputs, [source for source, _, _ in cases]


def format_table(results: Mapping[str, Any]) -> str:
    """Markdown tables of ``evaluate``'s results: accuracy per category and overall, then edits if any."""
    lines = []
    if results["categories"]:
        lines += ["| category | accuracy (%) |", "|---|---:|"]
        lines += [f"| {c} | {a:.1f} |" for c, a in results["categories"].items()]
        lines += [f"| **overall** | **{results['overall']:.1f}** |"]
    edits = results.get("edits")
    if edits:
        lines += [""] if lines else []
        lines += ["| edit | success (%) | PSNR outside (dB) |", "|---|---:|---:|"]
        lines += [f"| {t} | {v['success']:.1f} | {v['psnr_outside']:.1f} |" for t, v in edits["types"].items()]
        lines += [f"| **all** | **{edits['success']:.1f}** | **{edits['psnr_outside']:.1f}** |"]
    return "\n".join(lines)


# -- grids -------------------------------------------------------------------------------------------------------

GRID_CELL_MIN = 128  # images are enlarged (nearest neighbour) to at least this many pixels across
GRID_BORDER = 3
GRID_TEXT_LINES = 4
PASS_COLOR, FAIL_COLOR, INPUT_COLOR = (40, 170, 60), (210, 40, 40), (150, 150, 150)


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """Greedy word wrap to ``width`` pixels, at most GRID_TEXT_LINES lines (the last one cut with "...")."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    if len(lines) > GRID_TEXT_LINES:
        lines = lines[:GRID_TEXT_LINES]
        lines[-1] += " ..."
    return lines


def save_grid(records: Sequence[Mapping[str, Any]], images: Sequence[Image.Image], path: str | Path,
              cols: int = 8, sources: Sequence[Image.Image | None] | None = None) -> Image.Image:
    """Write a PNG grid: each image (enlarged to >= GRID_CELL_MIN px) framed green (passed) or red (failed),
    with its record's "caption" wrapped below. With ``sources`` (aligned with ``records``, None where there is no
    input image), an edit's input comes first in a gray frame, then its output. Returns the grid image."""
    if len(records) != len(images) or not images:
        raise ValueError(f"need one record per image and at least one image, got {len(records)} and {len(images)}")
    if sources is not None and len(sources) != len(images):
        raise ValueError(f"need one source (or None) per image, got {len(sources)} for {len(images)} images")
    if cols < 1:
        raise ValueError(f"cols must be >= 1, got {cols}")
    cells = []  # (image, caption, frame colour)
    for i, (rec, im) in enumerate(zip(records, images)):
        if sources is not None and sources[i] is not None:
            cells.append((sources[i], "input", INPUT_COLOR))
        cells.append((im, rec["caption"], PASS_COLOR if rec["passed"] else FAIL_COLOR))
    w, h = images[0].size
    scale = max(1, math.ceil(GRID_CELL_MIN / w))
    font = ImageFont.load_default()
    line_h = font.getbbox("Ag")[3] + 2
    cell_w, cell_h = w * scale + 2 * GRID_BORDER, h * scale + 2 * GRID_BORDER + GRID_TEXT_LINES * line_h + 4
    rows = math.ceil(len(cells) / cols)
    grid = Image.new("RGB", (min(cols, len(cells)) * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, caption, color) in enumerate(cells):
        x, y = (i % cols) * cell_w, (i // cols) * cell_h
        draw.rectangle([x, y, x + cell_w - 1, y + h * scale + 2 * GRID_BORDER - 1], fill=color)
        grid.paste(im.convert("RGB").resize((w * scale, h * scale), Image.NEAREST), (x + GRID_BORDER, y + GRID_BORDER))
        for j, line in enumerate(_wrap(caption, font, cell_w - 4, draw)):
            draw.text((x + 2, y + h * scale + 2 * GRID_BORDER + 2 + j * line_h), line, fill="black", font=font)
    grid.save(path, format="PNG")
    return grid
