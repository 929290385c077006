"""Does a model read its prompt, or copy what earlier image tokens give away? Two numbers on the shapes world.

1. Leak: how much each token of an empty white image changes (relative L2) when one object is drawn in the
   bottom-right corner. A VAE encoder with attention or GroupNorm spreads every object into every token, so even
   the first (top-left) token tells which colour is coming.
2. Exposure gap: single-object accuracy when each token is sampled with the true earlier tokens as context
   (teacher forcing) against free-running sampling. A large gap means the model learned to continue the traces
   in its context instead of reading the prompt (the cure in this project: ``NextStepConfig.context_noise``).

    python benchmarks/shortcut.py --model runs/shapes-ar3/final --vae runs/shapes-vae-dec/final --n 32
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from nextstep.data.shapes import Obj, Scene, generate_t2i, render
from nextstep.eval.shapes import analyze, check
from nextstep.images import load_image, to_pil, to_unit
from nextstep.model.latents import patchify, token_grid
from nextstep.pipeline import NextStepPipeline
from nextstep.prompt import caption_ids, image_block_ids, left_pad
from nextstep.sampling.guidance import Guidance
from nextstep.sampling.noise import NoiseSource
from nextstep.sampling.token import TokenSampler


def pixels(images) -> torch.Tensor:
    return torch.stack([load_image(im) for im in images])


@torch.no_grad()
def leak(pipe: NextStepPipeline) -> np.ndarray:
    """(rows, cols) relative change of each token when a red circle appears in the bottom-right corner."""
    vae, p = pipe.vae, pipe.model.config.patch_size
    z = vae.scale(vae.encode(pixels([render(Scene(())), render(Scene((Obj("circle", "red", 52, 52, 14),)))])).mode())
    grid = token_grid(tuple(z.shape[-2:]), p)
    empty, full = patchify(z, p)
    return ((full - empty).norm(dim=-1) / empty.norm(dim=-1)).reshape(grid).numpy()


@torch.no_grad()
def teacher_forced(pipe: NextStepPipeline, items, steps: int, guidance: float, seed: int):
    """Sample every token of each ground-truth image given its true earlier tokens (no feedback of samples), read
    back with the model's context noise like sampled ones."""
    model, tok = pipe.model, pipe.tokenizer
    z = pipe.vae.scale(pipe.vae.encode(pixels([scene for _, _, scene in items])).mode())
    grid = token_grid(tuple(z.shape[-2:]), model.config.patch_size)
    n, total = len(items), grid[0] * grid[1]
    image = image_block_ids(tok, grid)[:-1]  # the ground-truth image up to its last token (no <eoi>)
    rows = [caption_ids(tok, c) + image for c, _, _ in items] + [image] * n  # [cond; uncond_all]
    batch = left_pad(rows, tok.special.pad)
    g = torch.Generator().manual_seed(seed)
    d = model.config.token_dim
    noise = model.config.context_noise * torch.randn(n * total, d, generator=g)  # read back as in sampling
    hidden = model(model.embed(batch.input_ids, torch.cat([z, z]), torch.cat([noise, noise])),
                   attention_mask=batch.attention_mask)
    before = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    before[:, :-1] = batch.input_ids[:, 1:] == tok.special.placeholder  # positions whose next token is an image token
    hs = hidden[before].reshape(2 * n, total, -1)
    cfg = Guidance(text_scale=guidance)
    settings = pipe.defaults.resolve(False, sampler="sde", num_inference_steps=steps, guidance_scale=guidance,
                                     time_shift=1.0, token_norm=True)
    sample = TokenSampler(model.image_head, cfg, settings, 2 * n, model.device, model.dtype)
    source = NoiseSource(g, 1, n, d, model.device)
    out = torch.empty(n, total, d)
    for k in range(total):
        cond = model.condition(hs[:, k], torch.full((2 * n,), k), grid)
        out[:, k] = sample(cond, (guidance, 1.0), source.block(sample.draws))
    return to_pil(to_unit(pipe.decode(out, grid)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--vae", default=None)
    ap.add_argument("--n", type=int, default=32, help="single-object prompts")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = NextStepPipeline.from_pretrained(args.model, args.vae)
    print("relative change of each token when a red circle is drawn bottom-right:")
    for row in leak(pipe):
        print("  " + "  ".join(f"{v:5.2f}" for v in row))
    rng = np.random.default_rng([args.seed, 99])
    items = [generate_t2i("single_object", rng) for _ in range(args.n)]
    items = [(c, spec, render(scene)) for c, spec, scene in items]
    tf = teacher_forced(pipe, items, args.steps, args.cfg, args.seed)
    free = pipe([c for c, _, _ in items], generator=torch.Generator().manual_seed(args.seed), progress=False,
                num_inference_steps=args.steps, guidance_scale=args.cfg, time_shift=1.0, sampler="sde").images
    def score(ims):
        return 100 * np.mean([check(spec, analyze(im)) for (_, spec, _), im in zip(items, ims)])
    print(f"context_noise {pipe.model.config.context_noise}; single-object accuracy over {args.n} prompts "
          f"(SDE {args.steps} steps, guidance {args.cfg}):")
    print(f"  teacher forced {score(tf):5.1f}%   free running {score(free):5.1f}%")


if __name__ == "__main__":
    main()
