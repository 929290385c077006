"""THE prompt protocol, built on token ids (never by decoding and re-encoding text).

A text-to-image prompt is ``caption <|image_area|>{h}*{w} <|begin_of_image|>`` followed by h*w image tokens,
where h, w is the token grid (pixels / 16 for an f8 VAE with 2x2 patches). An image inside a prompt (editing) is
``<|image_area|>{h}*{w} <|begin_of_image|> <|image_placeholder|> x h*w <|end_of_image|>``, written where the
caption says ``<image>`` (or prepended when it does not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import CheckpointError, InputError
from .tokenizer import Tokenizer

IMAGE_TAG = "<image>"


def require_prompt(text: str, what: str = "prompt") -> None:
    """The one rule for prompts, alike in the Python API, the CLI and the server: a blank one (empty, or only
    whitespace) is refused: the model would draw its unconditional picture, which nobody asks for by an empty
    prompt. ``what`` names it as the caller's user knows it (the CLI's "instruction", the server's field)."""
    if not text.strip():
        raise InputError(f"{what} is empty: say what to draw" if what == "prompt" else f"{what} is empty")


def area_text(grid: tuple[int, int]) -> str:
    """The text after ``<|image_area|>`` that states a token grid: rows*cols."""
    return f"{grid[0]}*{grid[1]}"


def image_area_ids(tok: Tokenizer, grid: tuple[int, int]) -> list[int]:
    return [tok.special.image_area] + tok.encode(area_text(grid))


def check_special_ids(tok: Tokenizer, config) -> None:
    """The tokenizer and the model (``NextStepConfig``) must agree on the image protocol's ids."""
    s, c = tok.special, config
    if (s.boi, s.eoi, s.placeholder) != (c.boi_id, c.eoi_id, c.image_placeholder_id):
        raise CheckpointError(f"tokenizer special ids (boi {s.boi}, eoi {s.eoi}, placeholder {s.placeholder}) "
                              f"differ from the model config ({c.boi_id}, {c.eoi_id}, {c.image_placeholder_id})")


def image_block_ids(tok: Tokenizer, grid: tuple[int, int]) -> list[int]:
    """Ids of an input image of ``grid`` tokens: area, boi, placeholders, eoi."""
    s = tok.special
    return image_area_ids(tok, grid) + [s.boi] + [s.placeholder] * (grid[0] * grid[1]) + [s.eoi]


def generation_suffix_ids(tok: Tokenizer, grid: tuple[int, int]) -> list[int]:
    """What follows the caption when an image of ``grid`` tokens is to be generated: area, boi."""
    return image_area_ids(tok, grid) + [tok.special.boi]


def caption_ids(tok: Tokenizer, caption: str, image_grids: list[tuple[int, int]] = (), bos: bool = False
                ) -> list[int]:
    """Caption text -> ids, with one image block per ``<image>`` tag (in order).

    Images without a tag in the caption are prepended (reference behaviour for editing prompts), so
    ``caption_ids(tok, text, [grid])`` is an edit prompt whether or not ``text`` names the image. ``bos``: start
    with the tokenizer's BOS token when it has one (NextStep-1.1 prompts; NextStep-1's never carry one)."""
    n_tags = caption.count(IMAGE_TAG)
    grids = list(image_grids)
    if n_tags > len(grids):
        raise InputError(f"caption has {n_tags} {IMAGE_TAG} tags but only {len(grids)} images were given")
    if n_tags < len(grids):
        caption = IMAGE_TAG * (len(grids) - n_tags) + caption
    parts = caption.split(IMAGE_TAG)
    ids = [tok.special.bos] if bos and tok.special.bos is not None else []
    ids += tok.encode(parts[0]) if parts[0] else []
    for grid, text in zip(grids, parts[1:]):
        ids += image_block_ids(tok, grid)
        if text:
            ids += tok.encode(text)
    return ids


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) left padded
    attention_mask: torch.Tensor  # (B, L) 1 = real token


def left_pad(rows: list[list[int]], pad_id: int, length: int | None = None) -> Batch:
    """Left-pad id lists to one (B, L) batch with its attention mask; L is the longest row's length, or ``length``
    when given (at least the longest)."""
    if not rows:
        raise ValueError("no sequences to batch")
    n = max(len(r) for r in rows)
    if length is not None:
        if length < n:
            raise ValueError(f"cannot left-pad a {n}-token row to {length} tokens")
        n = length
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, n - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, n - len(r):] = 1
    return Batch(ids, mask)
