"""New concepts for a model trained on the shapes world: the shapes of ``CONCEPT_SHAPES`` (the star), which the
default world never draws, with their captions, fixed evaluation sets and a small training set written to disk.

A concept's captions take the default world's wording, the new shape in place of the old ones, in three
``CONCEPT_CATEGORIES``:
    single_object  "a red star", "one green star", "a picture of a blue star" ...
    two_objects    "a star and a circle", "one square and one star" (the other object a default shape)
    counting       "two yellow stars" (two at most: stars are drawn larger, ``scene.SHAPE_SIZE_FRACTIONS``)
Their specs are ordinary text-to-image specs, so ``nextstep.eval.shapes.check`` scores them unchanged.

Randomness comes from generators derived from ``(seed, stream, concept, ...)`` on streams the default world never
uses, so neither ``ShapesDataset`` nor its evaluation sets change.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from .dataset import _check_non_negative, _rng
from .scene import COLORS, CONCEPT_SHAPES, SHAPES, Scene, _check_side, _choice, render, scene_for_spec
from .t2i import COUNTING_TEMPLATES, SINGLE_OBJECT_TEMPLATES, TWO_OBJECTS_TEMPLATES, _a, _caption, _want

CONCEPT_CATEGORIES = ("single_object", "two_objects", "counting")
# Share of each category in a concept's training set: mostly the shape alone, as it is named most often.
CONCEPT_MIX: Mapping[str, float] = MappingProxyType({"single_object": 0.5, "two_objects": 0.25, "counting": 0.25})
CONCEPT_INDEX = "captions.jsonl"  # the folder layout of nextstep.data.sources.FolderSource
_STREAM_CONCEPT_PROMPTS, _STREAM_CONCEPT_DATA = 10, 11  # the default world uses streams 0-3


def _check_concept(concept: str) -> int:
    if concept not in CONCEPT_SHAPES:
        raise ValueError(f"concept must be one of {CONCEPT_SHAPES}, got {concept!r}")
    return CONCEPT_SHAPES.index(concept)


def _plural(shape: str) -> str:
    return shape + "s"


def concept_caption(concept: str, category: str, rng: np.random.Generator) -> tuple[str, dict]:
    """(caption, spec) of ``category`` naming ``concept``: one coloured concept shape, the concept shape and a
    default shape (order drawn), or two concept shapes of one colour."""
    _check_concept(concept)
    if category == "single_object":
        color = _choice(rng, COLORS)
        bare = f"{color} {concept}"
        spec = {"category": category, "objects": [_want(concept, color)]}
        return _caption(rng, SINGLE_OBJECT_TEMPLATES, spec, obj=_a(bare), bare=bare)
    if category == "two_objects":
        shapes = [concept, _choice(rng, SHAPES)]
        s1, s2 = shapes if rng.random() < 0.5 else shapes[::-1]
        spec = {"category": category, "objects": [_want(s1), _want(s2)]}
        return _caption(rng, TWO_OBJECTS_TEMPLATES, spec, obj1=_a(s1), obj2=_a(s2), bare1=s1, bare2=s2)
    if category == "counting":
        color = _choice(rng, COLORS)
        spec = {"category": category, "objects": [_want(concept, color) for _ in range(2)]}
        return _caption(rng, COUNTING_TEMPLATES, spec, count="two", plural=f"{color} {_plural(concept)}")
    raise ValueError(f"category must be one of {CONCEPT_CATEGORIES}, got {category!r}")


def generate_concept(concept: str, category: str, rng: np.random.Generator, size: int = 64
                     ) -> tuple[str, dict, Scene]:
    """One sample naming ``concept``: (caption, spec, scene), the scene satisfying the spec (``generate_t2i``'s
    contract)."""
    caption, spec = concept_caption(concept, category, rng)
    return caption, spec, scene_for_spec(spec, rng, size)


def concept_prompt_set(concept: str, category: str, n: int, seed: int, size: int = 64) -> list[tuple[str, dict]]:
    """``n`` fixed evaluation prompts of ``category`` naming ``concept``: [(caption, spec)], a pure function of the
    arguments, drawn from a stream that ``concept_dataset`` never uses."""
    k = _check_concept(concept)
    if category not in CONCEPT_CATEGORIES:
        raise ValueError(f"category must be one of {CONCEPT_CATEGORIES}, got {category!r}")
    _check_non_negative("n", n)
    _check_non_negative("seed", seed)
    _check_side(size)
    cat = CONCEPT_CATEGORIES.index(category)
    return [concept_caption(concept, category, _rng(seed, _STREAM_CONCEPT_PROMPTS, k, cat, i)) for i in range(n)]


def concept_sample(concept: str, i: int, seed: int, size: int = 64, mix: Mapping[str, float] = CONCEPT_MIX
                   ) -> tuple[str, dict, Scene]:
    """Training sample ``i`` of ``concept``'s set: its category drawn by ``mix`` (a weight per category of
    ``CONCEPT_CATEGORIES``, missing ones 0), then ``generate_concept``."""
    k = _check_concept(concept)
    rng = _rng(seed, _STREAM_CONCEPT_DATA, k, i)
    p = np.array([_check_mix(mix)[c] for c in CONCEPT_CATEGORIES])
    category = CONCEPT_CATEGORIES[int(rng.choice(len(p), p=p / p.sum()))]
    return generate_concept(concept, category, rng, size)


def _check_mix(mix: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(mix) - set(CONCEPT_CATEGORIES))
    weights = {c: mix.get(c, 0.0) for c in CONCEPT_CATEGORIES}
    if unknown or any(not isinstance(w, (int, float)) or isinstance(w, bool) or not w >= 0 for w in weights.values()) \
            or not sum(weights.values()) > 0:
        raise ValueError(f"mix must give weights >= 0, not all 0, to categories among {CONCEPT_CATEGORIES}, got "
                         f"{dict(mix)!r}")
    return weights


def concept_dataset(concept: str, out_dir: str | os.PathLike, n: int = 64, seed: int = 0, size: int = 64,
                    replay: int = 0, repeat: int = 1, mix: Mapping[str, float] = CONCEPT_MIX,
                    replay_options: Mapping[str, Any] | None = None) -> Path:
    """Write ``n`` text-to-image samples naming ``concept`` (``concept_sample`` 0..n-1) as a folder source:
    ``OUT/images/NNNNN.png`` and ``OUT/captions.jsonl`` ({"image", "caption", "spec"} per line, written last, so a
    folder without it is incomplete). ``replay`` more samples come from the default shapes world (``ShapesDataset``
    with seed ``seed + 1`` and ``replay_options``, its ``mix``, ``backgrounds`` and ``weights``: text-to-image and
    edits drawn as the base model's last training stage drew them), so that fine-tuning on the concept keeps what the
    model could do (their lines carry ``"replay": true`` and no "spec"); ``repeat`` lists each concept sample that
    many times (its image written once), so that it keeps its share of the batches beside a large replay; ``mix``
    weighs the categories of the concept samples (``concept_sample``). Returns the
    path of ``captions.jsonl``.
    FileExistsError if it exists."""
    from .dataset import ShapesDataset

    _check_concept(concept)
    _check_mix(mix)
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    _check_non_negative("seed", seed)
    _check_non_negative("replay", replay)
    if int(repeat) != repeat or repeat < 1:
        raise ValueError(f"repeat must be a positive integer, got {repeat!r}")
    _check_side(size)
    root = Path(out_dir)
    index = root / CONCEPT_INDEX
    if index.exists():
        raise FileExistsError(f"{index} exists: choose another directory or remove it")
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        caption, spec, scene = concept_sample(concept, i, seed, size, mix)
        rel = f"images/{i:05d}.png"
        render(scene).save(root / rel, format="PNG")
        lines.append(json.dumps({"image": rel, "caption": caption, "spec": spec}))
    lines *= int(repeat)
    world = ShapesDataset(replay, seed=seed + 1, size=size, **dict(replay_options or {}))
    for i in range(replay):
        sample, stem = world[i], f"images/{n + i:05d}"
        if sample["kind"] == "t2i":
            sample["image"].save(root / f"{stem}.png", format="PNG")
            lines.append(json.dumps({"image": f"{stem}.png", "caption": sample["caption"], "replay": True}))
        else:
            sample["source"].save(root / f"{stem}_src.png", format="PNG")
            sample["target"].save(root / f"{stem}_tgt.png", format="PNG")
            lines.append(json.dumps({"source": f"{stem}_src.png", "target": f"{stem}_tgt.png",
                                     "instruction": sample["instruction"], "replay": True}))
    tmp = index.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(index)
    return index
