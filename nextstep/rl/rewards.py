"""Rewards: one score per image, higher is better.

A reward is named in a recipe and made by :func:`load_reward`:
    "shapes"         the shapes evaluator: text-to-image 1 if ``check`` passes else 0; edits ``edit_score``
    "shapes_graded"  the same with partial credit for text-to-image (``graded_score``): failing images still rank
    "module:function" any importable callable ``function(images, prompts, sources) -> scores``: images a list of B
                     PIL images, prompts their B texts, sources their input images (None for text-to-image); it
                     returns B finite numbers (a list, array or tensor). CLIP, aesthetic or VLM judges plug in here.
The loaded reward is called as ``reward(images, prompts)`` with the rollout's ``Prompt`` objects and returns a
(B,) float32 tensor; a user callable that fails or returns the wrong number of scores is a :class:`RewardError`
that names it.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import RewardError
from ..eval.shapes import analyze, check, check_edit
from ..eval.shapes.analysis import Analysis
from ..eval.shapes.scoring import matches
from .rollout import Prompt

RewardFn = Callable[[list[Image.Image], Sequence[Prompt]], torch.Tensor]
EDIT_PSNR_TARGET_DB = 28.0  # preservation outside the edit counts fully from here (the edit target)
EDIT_PSNR_FLOOR_DB = 10.0  # ... and not at all below this (unrelated images score about this)
EDIT_SUCCESS_WEIGHT = 2 / 3  # an edit score: this much for success, the rest for preservation


def _matched(wants: Sequence[Mapping[str, Any]], found: Sequence[Any]) -> int:
    """Most wanted objects that distinct found objects satisfy at once (bipartite matching by shape and colour)."""
    owner: dict[int, int] = {}  # found index -> wanted index

    def place(w: int, seen: set[int]) -> bool:
        for f, d in enumerate(found):
            if f not in seen and matches(wants[w], d):
                seen.add(f)
                if f not in owner or place(owner[f], seen):
                    owner[f] = w
                    return True
        return False

    return sum(place(w, set()) for w in range(len(wants)))


def graded_score(spec: Mapping[str, Any], analysis: Analysis) -> float:
    """1 when ``check`` passes; otherwise half the mean of partial credits in [0, 1]: the share of asked objects
    present, how close the object count is, and the background when the spec names one."""
    if check(spec, analysis):
        return 1.0
    wants, found = spec["objects"], analysis.objects
    parts = [_matched(wants, found) / len(wants), min(len(wants), len(found)) / max(len(wants), len(found))]
    if "background" in spec:
        parts.append(float(analysis.background == spec["background"]))
    return 0.5 * float(np.mean(parts))


def edit_score(spec: Mapping[str, Any], source: Image.Image, output: Image.Image) -> float:
    """``EDIT_SUCCESS_WEIGHT`` * success + the rest * preservation, preservation the PSNR outside the edit mapped
    linearly from EDIT_PSNR_FLOOR_DB (0) to EDIT_PSNR_TARGET_DB (1), clipped; 1 when nothing outside was left to
    compare or it is unchanged."""
    success, psnr = check_edit(spec, source, output)
    kept = 1.0 if math.isnan(psnr) else min(1.0, max(0.0, (psnr - EDIT_PSNR_FLOOR_DB)
                                                      / (EDIT_PSNR_TARGET_DB - EDIT_PSNR_FLOOR_DB)))
    return EDIT_SUCCESS_WEIGHT * float(success) + (1 - EDIT_SUCCESS_WEIGHT) * kept


def _shapes(graded: bool) -> RewardFn:
    def reward(images: list[Image.Image], prompts: Sequence[Prompt]) -> torch.Tensor:
        scores = []
        for i, (image, p) in enumerate(zip(images, prompts, strict=True)):
            if p.spec is None:
                raise RewardError(f"the shapes rewards need each prompt's shapes spec (Prompt.spec); prompt {i} "
                                  f"({p.text!r}) has none")
            if p.source is not None:
                scores.append(edit_score(p.spec, p.source, image))
            elif graded:
                scores.append(graded_score(p.spec, analyze(image)))
            else:
                scores.append(float(check(p.spec, analyze(image))))
        return torch.tensor(scores, dtype=torch.float32)
    return reward


BUILTIN_REWARDS: dict[str, RewardFn] = {"shapes": _shapes(graded=False), "shapes_graded": _shapes(graded=True)}


def _import(name: str) -> Callable[..., Any]:
    """The callable named "module:function" (the function may be dotted: "module:Class.method")."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise RewardError(f"reward {name!r}: expected a built-in name {sorted(BUILTIN_REWARDS)} or "
                          f"'module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # not found, or the module itself failed while importing
        raise RewardError(f"reward {name!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}); it "
                          f"must be importable (installed, or on PYTHONPATH)") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward {name!r}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward {name!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj


def _scores(name: str, out: Any, n: int) -> torch.Tensor:
    """A user reward's output as (n,) float32, or a RewardError saying what was wrong with it."""
    try:
        scores = torch.as_tensor(np.asarray(out, dtype=np.float64), dtype=torch.float32)
    except (TypeError, ValueError) as e:
        raise RewardError(f"reward {name!r} returned {type(out).__name__}, not {n} numbers ({e})") from None
    if scores.shape != (n,):
        raise RewardError(f"reward {name!r} returned shape {tuple(scores.shape)} for {n} images; expected ({n},): "
                          f"one score per image")
    if not torch.isfinite(scores).all():
        raise RewardError(f"reward {name!r} returned non-finite scores: {scores.tolist()}")
    return scores


def load_reward(name: str) -> RewardFn:
    """The reward named ``name``: a built-in (``BUILTIN_REWARDS``) or "module:function" (see the module
    docstring). A missing module or function is a RewardError now, not at the first rollout."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    fn = _import(name)

    def reward(images: list[Image.Image], prompts: Sequence[Prompt]) -> torch.Tensor:
        try:
            out = fn(list(images), [p.text for p in prompts], [p.source for p in prompts])
        except Exception as e:
            raise RewardError(f"reward {name!r} failed on a batch of {len(images)} images: "
                              f"{type(e).__name__}: {e}") from e
        return _scores(name, out, len(images))
    return reward
