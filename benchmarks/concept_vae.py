"""Can the tokenizer carry a concept shape? Single stars at several sizes, encoded and decoded by a VAE, then read by
the shapes evaluator: the share still read as one star of its colour. A model's images pass through the same decoder,
so this bounds what any training of the autoregressive model (a LoRA included) can reach at that size.

    python benchmarks/concept_vae.py                 # the bundled model's VAE, 100 stars per size range
    python benchmarks/concept_vae.py --vae DIR --n 200

It is why stars are drawn at 24-30 px at 64x64 (``scene.SHAPE_SIZE_FRACTIONS``) where the default shapes take 12-18.
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import torch
from PIL import Image

from nextstep.data.shapes import COLORS, Obj, Scene, render, size_range
from nextstep.eval.shapes import analyze, describe
from nextstep.model.vae import VAE
from nextstep.pipeline import bundled_model_dir

RANGES = ((12, 18), (18, 24), (24, 30))  # box side in pixels at 64x64: the default shapes', between, the star's


def round_trip(vae: VAE, images) -> list:
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in images])
    with torch.no_grad():
        out = vae.decode(vae.encode(x).mode()).clamp(-1, 1)  # (B, 3, 64, 64)
    return [Image.fromarray(((o + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()) for o in out]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", default=None, help="VAE directory (default: the bundled model's)")
    p.add_argument("--n", type=int, default=100, help="stars per size range")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    vae = VAE.from_pretrained(args.vae or bundled_model_dir() / "vae").float().eval()
    rng = np.random.default_rng(args.seed)
    print(f"star size range at 64x64 (the star's own: {size_range(64, 'star')}) | read as a star after the VAE | "
          "most common misreadings")
    for lo, hi in RANGES:
        scenes = []
        for i in range(args.n):
            s = int(rng.integers(lo, hi + 1))
            x0, y0 = (int(v) for v in rng.integers(2, 64 - 2 - s + 1, size=2))
            scenes.append(Scene((Obj("star", COLORS[i % len(COLORS)], x0 + s / 2, y0 + s / 2, s),)))
        outs = round_trip(vae, [render(sc) for sc in scenes])
        reads = [describe(analyze(o)).removesuffix(" on white") for o in outs]
        ok = sum(r == f"{sc.objects[0].color} star" for r, sc in zip(reads, scenes))
        wrong = Counter(r.split(" ", 1)[-1] for r, sc in zip(reads, scenes) if r != f"{sc.objects[0].color} star")
        print(f"{lo}-{hi} px | {100 * ok / args.n:.0f}% | {', '.join(f'{k} {v}' for k, v in wrong.most_common(3))}")


if __name__ == "__main__":
    main()
