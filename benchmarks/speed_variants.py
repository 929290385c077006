"""The speed issue's reference workload (``--shape`` of generate.py, default ns34m) with the pipeline's speed options
side by side, interleaved in one process so that machine noise hits all of them alike; prints the README's table.

    python benchmarks/speed_variants.py --threads 1 --repeats 3

Variants: ``exact=True`` (the reference's head arithmetic), the default (batched AdaLN modulations), and the default
on a copy of the model with ``quantize="int8"``. Seconds per image are medians over ``--repeats`` calls after one
warm-up; the official implementation's figures (float32, one thread) come from generate.py's SHAPES table. Each
speed-up is given against that figure and against the exact variant of the same rounds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate  # noqa: E402  (the workload definitions and the random-model builder)

from nextstep.pipeline import NextStepPipeline  # noqa: E402
from nextstep.quant import quantize_  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="ns34m", choices=sorted(generate.SHAPES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = generate.SHAPES[args.shape]
    pipe, desc = generate.build_pipeline(generate.build_parser().parse_args(["--shape", args.shape]),
                                         torch.float32, torch.device("cpu"))
    int8 = NextStepPipeline(quantize_(copy.deepcopy(pipe.model), "int8"), pipe.vae, pipe.tokenizer)
    variants = {"exact": (pipe, True), "default": (pipe, False), "int8": (int8, False)}
    print(f"{desc}; torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}\n")
    print("| guidance | steps | images | official | exact | default | default + int8 |")
    print("|---|---|---|---:|---:|---:|---:|")
    w, h = spec["size"]
    for cfg, steps, n, official in spec["rows"]:
        kw = dict(height=h, width=w, num_images_per_prompt=n, guidance_scale=cfg, num_inference_steps=steps,
                  sampler="sde", time_shift=1.0, token_norm=False, output_type="pt", progress=False)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for rep in range(args.repeats + 1):  # the first round warms up
            for name, (p, exact) in variants.items():
                t0 = time.perf_counter()
                p._generate("a red cube", generator=torch.Generator().manual_seed(0), exact=exact, **kw)
                if rep:
                    times[name].append((time.perf_counter() - t0) / n)
        s = {name: statistics.median(v) for name, v in times.items()}
        # "vs exact": the ratio to the reference arithmetic measured in the same rounds (as fast as the official
        # code, per the speed issue): steadier on a noisy machine than the ratio to the quoted official figure
        print(f"| {cfg:g} | {steps} | {n} | {official} | {s['exact']:.2f} | {s['default']:.2f} "
              f"({official / s['default']:.2f}x; {s['exact'] / s['default']:.2f}x vs exact) | {s['int8']:.2f} "
              f"({official / s['int8']:.2f}x; {s['exact'] / s['int8']:.2f}x vs exact) |", flush=True)


if __name__ == "__main__":
    main()
