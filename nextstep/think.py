"""Self-CoT: the model writes text after each prompt until it starts an image (``pipe(..., think=True)``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import InputError
from .model.nextstep import NextStep
from .prompt import left_pad
from .sampling.noise import Generators
from .tokenizer import Tokenizer


def _next_ids(probs: torch.Tensor, generator: Generators) -> torch.Tensor:
    """(B, V) probabilities -> (B,) sampled ids; a list of generators draws row i with generator i, each on its own
    device (so a CUDA generator is used, not silently replaced by the global RNG)."""
    if isinstance(generator, Sequence):
        return torch.cat([_next_ids(probs[i:i + 1], g) for i, g in enumerate(generator)])
    device = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(device), 1, generator=generator)[:, 0].to(probs.device)


@torch.no_grad()
def think(model: NextStep, tok: Tokenizer, cond_ids: list[list[int]], latents: list[torch.Tensor] | None,
          max_tokens: int, generator: Generators) -> tuple[list[list[int]], list[str]]:
    """Sample up to ``max_tokens`` text tokens after each prompt's ids (one generator, or one per prompt); a row stops
    at ``<boi>``, ``<|image_area|>`` or EOS. Returns the extended ids and the text each row wrote."""
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise InputError(f"max_think_tokens must be an integer >= 0, got {max_tokens!r}")
    if isinstance(generator, Sequence) and len(generator) != len(cond_ids):
        raise InputError(f"got {len(generator)} generators for {len(cond_ids)} prompts")
    s, device = tok.special, model.device
    stop = {s.boi, s.image_area, model.config.eos_id}
    batch = left_pad(cond_ids, s.pad)
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    cache = model.new_cache(len(cond_ids), ids.shape[1] + max_tokens)
    h = model(model.embed(ids, latents), attention_mask=mask, cache=cache)[:, -1]
    written: list[list[int]] = [[] for _ in cond_ids]
    done = [False] * len(cond_ids)
    for _ in range(max_tokens):
        nxt = _next_ids(torch.softmax(model.logits(h).float(), -1), generator)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                if t in stop:
                    done[i] = True
                else:
                    written[i].append(t)
        if all(done):
            break
        still = torch.tensor([not d for d in done], dtype=torch.long, device=device)[:, None]
        h = model(model.embed(nxt[:, None]), attention_mask=still, cache=cache)[:, -1]
    return [c + w for c, w in zip(cond_ids, written)], [tok.decode(w) for w in written]
