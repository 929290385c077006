"""Seed-to-seed variety of the bundled model's images: for each of 12 prompts, ``--images`` images from one generator
(one call), and the mean over prompts and image pairs of their RMS pixel distance (pixels in [0, 1]). Rows: the
defaults (the teacher), fast mode as it samples (every second image token drawn from the centre of its noise:
``FewStepSampler.central``), fast mode with every token drawn with its noise, and with none (a floor: the images then
differ only by the context noise).

    taskset -c 0 python benchmarks/diversity.py --threads 1

A sampler that trades variety for accuracy shows here: compare with ``nextstep eval shapes`` for accuracy.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from nextstep.pipeline import NextStepPipeline  # noqa: E402
from nextstep.sampling.token import FewStepSampler  # noqa: E402

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle", "three red squares",
           "a purple circle to the left of an orange square", "two yellow triangles",
           "a blue square below a red circle", "four green circles", "an orange triangle",
           "a red square to the right of a blue triangle", "a yellow circle and a purple square",
           "three blue triangles"]


def variety(pipe: NextStepPipeline, images: int, fast: bool) -> float:
    distances = []
    for i, prompt in enumerate(PROMPTS):
        out = pipe(prompt, num_images_per_prompt=images, fast=fast, output_type="pt", progress=False,
                   generator=torch.Generator().manual_seed(100 + i))
        x = out.images.float()
        distances += [(x[a] - x[b]).pow(2).mean().sqrt().item() for a, b in itertools.combinations(range(images), 2)]
    return statistics.mean(distances)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=6, help="images per prompt")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    pipe = NextStepPipeline.from_pretrained()
    central = FewStepSampler.__dict__["central"]  # the staticmethod itself
    rows = [("defaults (SDE, 50 steps, guidance 3)", False, central),
            ("fast mode (every second token central)", True, central),
            ("fast mode, every token with its noise", True, staticmethod(lambda k: False)),
            ("fast mode, every token central", True, staticmethod(lambda k: True))]
    print(f"bundled model, {len(PROMPTS)} prompts x {a.images} images (64x64), mean pairwise RMS pixel distance\n")
    print("| sampling | variety |\n|---|---:|")
    try:
        for name, fast, rule in rows:
            FewStepSampler.central = rule
            print(f"| {name} | {variety(pipe, a.images, fast):.4f} |", flush=True)
    finally:
        FewStepSampler.central = central
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
