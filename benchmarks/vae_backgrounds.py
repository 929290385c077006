"""Tokenizer reconstruction by background colour: does a VAE draw black and gray backgrounds as well as white?

    python benchmarks/vae_backgrounds.py runs/shapes-vae-dec/final runs/shapes-vae-dec2/final

For each VAE: held-out PSNR / SSIM (posterior mean, as ``nextstep train-vae`` reports it) on the same shapes
text-to-image scenes drawn on white (``backgrounds`` 0) and on black or gray (``backgrounds`` 1); the colour a
plain black background decodes to; and the cosine between the top-left token of one scene on white and on black
(far from 1: the encoder tells them apart, so a decoder-only fine-tune can fix the decoding).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from nextstep.data.shapes import Obj, Scene, ShapesDataset, render
from nextstep.images import load_image, to_unit
from nextstep.model.vae import VAE
from nextstep.train.vae import evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vaes", nargs="+", type=Path)
    p.add_argument("--n", type=int, default=256, help="held-out scenes per background setting")
    p.add_argument("--seed", type=int, default=12345, help="scene seed (not a training seed of the recipes)")
    args = p.parse_args()
    scenes = {bg: torch.stack([load_image(ShapesDataset(args.n, args.seed, mix={"t2i": 1.0}, backgrounds=bg)[i]
                                          ["image"]) for i in range(args.n)]) for bg in (0.0, 1.0)}
    circle = Obj("circle", "red", 48, 48, 12)
    one = {bg: load_image(render(Scene((circle,), bg, 64)))[None] for bg in ("white", "black")}
    print("| VAE | PSNR / SSIM on white | PSNR / SSIM on black or gray | plain black decodes as | token cosine "
          "white vs black |")
    print("|---|---|---|---|---|")
    for path in args.vaes:
        vae = VAE.from_pretrained(path).eval()
        white, dark = (evaluate(vae, scenes[bg]) for bg in (0.0, 1.0))
        with torch.no_grad():
            z = {bg: vae.encode(x).mode() for bg, x in one.items()}
            black = (to_unit(vae.decode(z["black"]))[0, :, 4, 4] * 255).round().int().tolist()
        cos = F.cosine_similarity(z["white"][0, :, :2, :2].flatten(), z["black"][0, :, :2, :2].flatten(), dim=0)
        print(f"| {path} | {white['psnr']:.2f} dB / {white['ssim']:.3f} | {dark['psnr']:.2f} dB / {dark['ssim']:.3f} "
              f"| RGB {tuple(black)} | {float(cos):.2f} |")


if __name__ == "__main__":
    main()
