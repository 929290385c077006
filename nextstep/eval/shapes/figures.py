"""Figures of benchmark results: ``save_grid`` draws each image framed by its verdict, with its caption."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

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
