"""The shapes benchmark run: a model's images for the fixed evaluation sets (``prompt_set`` / ``edit_set`` of
``nextstep.data.shapes``), scored by ``check`` / ``check_edit`` and summed up as GenEval-style accuracies and
GEdit-style edit scores (``evaluate``, ``evaluate_pipeline``), and as Markdown (``format_table``). With a
``concept`` (a shape of ``CONCEPT_SHAPES``) the text-to-image sets are the concept's (``concept_prompt_set``):
every prompt names the new shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ...data.shapes.concept import CONCEPT_CATEGORIES, concept_prompt_set
from ...data.shapes.dataset import edit_set, prompt_set
from ...data.shapes.edits import EDIT_TYPES
from ...data.shapes.scene import CONCEPT_SHAPES
from ...data.shapes.t2i import CATEGORIES
from ...errors import InputError
from .analysis import analyze, describe
from .scoring import _check_edit, check

PSNR_CAP_DB = 100.0  # identical pixels give PSNR inf; averages count them as this


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
    concept: str | None = None,
) -> dict[str, Any]:
    """Score a text-to-image model (and optionally an editor) on the fixed shapes evaluation sets
    (``prompt_set`` / ``edit_set`` of ``nextstep.data.shapes`` with this seed and size).

    generate_fn(captions) -> one PIL image per caption; edit_fn(sources, instructions) -> one PIL per source,
    same size as its source. ``concept``: score ``concept_prompt_set(concept, category, ...)`` for the
    ``CONCEPT_CATEGORIES`` instead (prompts that name the new shape). Returns
        "categories": {category: accuracy %} ({} when n_per_category is 0), "overall": their mean (%),
        "concept": the concept or None,
        "edits": {"success": %, "psnr_outside": mean dB (inf counted as PSNR_CAP_DB),
                  "types": {edit type: {"success": %, "psnr_outside": dB}}} or None without edits,
        "records": per sample {"kind": "t2i" | "edit", "category": category or edit type, "caption": the text
                   given to the model (caption or instruction), "passed": bool, "psnr_outside": dB or None,
                   "found": what the evaluator read in the model's image (``describe``)},
        "images": the model's image for each record (PIL, aligned with "records"),
        "sources": the input image of each edit record (None for text-to-image), plus "size" and "seed".
    """
    if n_per_category < 0 or n_edits < 0 or batch_size < 1:
        raise InputError(f"need n_per_category >= 0, n_edits >= 0, batch_size >= 1; got {n_per_category}, "
                         f"{n_edits}, {batch_size}")
    if n_edits > 0 and edit_fn is None:
        raise InputError("n_edits > 0 needs an edit_fn")
    if concept is not None and concept not in CONCEPT_SHAPES:
        raise InputError(f"concept must be one of {CONCEPT_SHAPES}, got {concept!r}")
    categories, records, images, sources = {}, [], [], []
    if n_per_category:
        for category in CATEGORIES if concept is None else CONCEPT_CATEGORIES:
            prompts = (prompt_set(category, n_per_category, seed, size) if concept is None
                       else concept_prompt_set(concept, category, n_per_category, seed, size))
            accuracy, recs, outs = _evaluate_category(generate_fn, category, prompts, batch_size, progress)
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
    return {"size": size, "seed": seed, "concept": concept, "categories": categories, "overall": overall,
            "edits": edits,
            "records": records, "images": images, "sources": sources}


def evaluate_pipeline(pipe, n_per_category: int, seed: int, size: int = 64, n_edits: int = 0, batch_size: int = 16,
                      progress: bool = True, image_guidance_scale: float | None = None, concept: str | None = None,
                      **settings: Any) -> dict[str, Any]:
    """``evaluate`` for a ``NextStepPipeline``: one generator seeded with ``seed`` for all its calls, ``size`` x
    ``size`` images; ``settings`` (steps, guidance, ...) go to every call, ``image_guidance_scale`` to edits only.
    Settings left out take the pipeline's defaults (``pipe.defaults``); ``concept`` as in ``evaluate``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    kw = dict(height=size, width=size, generator=gen, progress=False, **settings)

    def generate(captions):
        return pipe(captions, **kw).images

    def edit(sources, instructions):
        return pipe(instructions, image=sources, image_guidance_scale=image_guidance_scale, **kw).images

    return evaluate(generate, n_per_category, seed, size=size, edit_fn=edit if n_edits else None, n_edits=n_edits,
                    batch_size=batch_size, progress=progress, concept=concept)


def _evaluate_category(generate_fn, category, prompts, batch_size, progress):
    """(accuracy %, records, images) of the generator on ``prompts`` ([(caption, spec)] of ``category``)."""
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
        what = "category" if results.get("concept") is None else f"category ({results['concept']} prompts)"
        lines += [f"| {what} | accuracy (%) |", "|---|---:|"]
        lines += [f"| {c} | {a:.1f} |" for c, a in results["categories"].items()]
        lines += [f"| **overall** | **{results['overall']:.1f}** |"]
    edits = results.get("edits")
    if edits:
        lines += [""] if lines else []
        lines += ["| edit | success (%) | PSNR outside (dB) |", "|---|---:|---:|"]
        lines += [f"| {t} | {v['success']:.1f} | {v['psnr_outside']:.1f} |" for t, v in edits["types"].items()]
        lines += [f"| **all** | **{edits['success']:.1f}** | **{edits['psnr_outside']:.1f}** |"]
    return "\n".join(lines)
