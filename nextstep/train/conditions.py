"""The flow head's conditions, teacher-forced: what the backbone hands the head at every image token of known images.

Sampling computes a token's condition from the backbone's cache step by step; for known tokens one forward over the
whole sequence gives the same states (no cache): the prompt rows of every guidance branch, then the image tokens as
they are fed back while sampling. RL post-training recomputes a rollout's conditions this way; head distillation
builds its training conditions this way, on dataset images and on the model's own samples.
"""

from __future__ import annotations

import torch

from ..model.nextstep import NextStep
from ..prompt import left_pad
from ..sampling.guidance import image_blocks


def teacher_forced(model: NextStep, ids: list[list[list[int]]], pad_id: int, branches: tuple[str, ...],
                   sources: torch.Tensor | None, fed: torch.Tensor, grid: tuple[int, int], parallel: int = 1
                   ) -> torch.Tensor:
    """The head's condition at every image token of B images, for every guidance branch.

    ``ids``: per image, the prefill row of each branch (branch order, as ``NextStepPipeline.prompt_rows`` gives them);
    ``sources``: (B, C, h, w) scaled input-image latents of edits (read by the branches that carry the image), or
    None; ``fed``: (B, T - 1, token_dim) the image's tokens as fed back (context noise included); ``grid``: (h, w)
    token grid, T = h * w. Returns (copies * B, T, D) rows branch-major ([cond; uncond...], images within): the
    pipeline's layout. ``parallel`` = K > 1 appends, for each ahead in 2..K, the conditions parallel decoding gives
    tokens ahead - 1 .. T - 1 (``NextStep.conditions``): (copies * B, T + (T - 1) + ... + (T - K + 1), D), from
    one forward."""
    copies, b = len(branches), len(ids)
    device = model.device
    batch = left_pad([rows[c] for c in range(copies) for rows in ids], pad_id)
    latents = None
    if sources is not None:
        latents = [z for _ in range(image_blocks(branches)) for z in sources]
    prompt = model.embed(batch.input_ids.to(device), latents)  # (R, L, Dm)
    tokens = fed.shape[1] + 1
    image = model.embed_image_tokens(fed.to(device, model.dtype))  # (B, T - 1, Dm)
    embeds = torch.cat([prompt, torch.cat([image] * copies)], 1)
    mask = torch.cat([batch.attention_mask, torch.ones(copies * b, tokens - 1, dtype=torch.long)], 1)
    hidden = model(embeds, attention_mask=mask.to(device))[:, prompt.shape[1] - 1:]  # (R, T, Dm)
    read = torch.cat([fed.to(device)] * copies) if parallel > 1 else None
    return torch.cat([model.conditions(hidden, read, grid, a) for a in range(1, parallel + 1)], 1)
