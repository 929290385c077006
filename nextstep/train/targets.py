"""What the trainers that learn from a frozen model's outputs share (``distill-head``, ``train-reread``): the
samples of a data source they read, and their targets, built once on the main rank and cached in the run directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoint import save_safetensors
from ..errors import SampleError
from .distributed import DistInfo, barrier


def readable_samples(source) -> tuple[list[tuple[int, dict]], int]:
    """The (index, item) text-to-image and edit samples of a data source, and how many could not be read."""
    items, skipped = [], 0
    for i in range(len(source)):
        try:
            item = source[i]
        except SampleError:
            skipped += 1
            continue
        if item["kind"] in ("t2i", "edit"):
            items.append((i, item))
    return items, skipped


def cached_targets(path: Path, build: Callable[[], tuple[dict[str, torch.Tensor], int, int]], info: DistInfo
                   ) -> tuple[dict[str, torch.Tensor], int, int]:
    """The targets in ``path`` (its name carries everything they depend on): built by ``build()`` -> (targets,
    held-out rows at the end, unreadable samples) on the main rank when the file is missing, then read by every
    rank. Returns (targets, held-out rows, unreadable samples: 0 when the cache was already there)."""
    skipped = 0
    if info.is_main and not path.is_file():
        targets, held, skipped = build()
        save_safetensors(targets, path, metadata={"holdout": str(held)})
    barrier(info)
    with safe_open(str(path), framework="pt") as f:  # the tensors and their held-out count in one read
        return {k: f.get_tensor(k) for k in f.keys()}, int(f.metadata()["holdout"]), skipped
