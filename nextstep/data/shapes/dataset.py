"""The shapes world as training data and as fixed evaluation sets: ``ShapesDataset`` mixes text-to-image and
editing samples (weighted by ``data_weights``), ``prompt_set`` and ``edit_set`` are what the benchmark scores.

Randomness always comes from an explicit ``numpy.random.Generator``; the dataset and the evaluation sets derive
one per sample from ``(seed, stream, index)``, so sample i never depends on which samples were drawn before it.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image

from .edits import EDIT_BACKGROUNDS, EDIT_TYPES, generate_edit
from .scene import Scene, _check_side, _choice, render
from .t2i import _ON_WHITE, CATEGORIES, _a, generate_t2i

DEFAULT_MIX: Mapping[str, float] = MappingProxyType({"t2i": 0.8, "edit": 0.2})

# Independent random streams per use, so the training set and the evaluation sets never share draws.
_STREAM_DATASET, _STREAM_PROMPTS, _STREAM_EDITS, _STREAM_BACKGROUNDS = 0, 1, 2, 3
_MAX_WEIGHT = 1e6  # data weights are relative; a bound keeps their sum finite


def _check_non_negative(name: str, n: int) -> None:
    """A seed or a count: ValueError unless ``n`` is an integer >= 0."""
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
        _check_non_negative("num_samples", num_samples)
        _check_non_negative("seed", seed)
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
    _check_non_negative("n", n)
    _check_non_negative("seed", seed)
    cat = CATEGORIES.index(category)
    return [generate_t2i(category, _rng(seed, _STREAM_PROMPTS, cat, i), size)[:2] for i in range(n)]


def edit_set(n: int, seed: int, size: int = 64) -> list[tuple[Image.Image, str, dict]]:
    """``n`` fixed evaluation edits: [(source image, instruction, spec)], edit types in turn (``EDIT_TYPES``),
    so any n >= 6 covers all six."""
    _check_non_negative("n", n)
    _check_non_negative("seed", seed)
    out = []
    for i in range(n):
        edit_type = EDIT_TYPES[i % len(EDIT_TYPES)]
        source, instruction, _, spec = generate_edit(edit_type, _rng(seed, _STREAM_EDITS, i), size)
        out.append((render(source), instruction, spec))
    return out
