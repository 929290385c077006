"""Seconds per image of a model's full head (its default sampler, steps and guidance) against its distilled head
(fast mode at 1, 2 and 4 steps), interleaved in one process, medians; prints a Markdown table.

    taskset -c 0 python benchmarks/fast_speed.py --threads 1 --repeats 7            # the bundled model and head
    taskset -c 0 python benchmarks/fast_speed.py --threads 1 --head A B --steps 4    # two heads, interleaved
    python benchmarks/fast_speed.py --model DIR --head DIR --size 512 --device cuda --dtype bfloat16

Each call draws one image of one prompt (``progress=False``, ``output_type="pt"``, a seeded generator); every
variant runs once per round, rounds repeat ``--repeats`` times after one warm-up round, so machine noise hits all
variants alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from nextstep.pipeline import NextStepPipeline  # noqa: E402

PROMPTS = {False: "a red circle above a blue square", True: "make the circle green"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--vae", default=None)
    ap.add_argument("--head", nargs="+", default=None,
                    help="distilled head directories, each timed (default: the model's fast/)")
    ap.add_argument("--size", type=int, default=None, help="image side (default: the model's native size)")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="distilled steps to time")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--edit", action="store_true", help="time editing (an input image, its guidance) instead")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = NextStepPipeline.from_pretrained(args.model, args.vae, device=args.device, dtype=getattr(torch, args.dtype))
    heads = {"": pipe.head}
    if args.head:
        heads = {}
        for path in args.head:
            pipe.load_head(path)
            heads[f" ({path}, reads {pipe.head.config.branches!r})" if len(args.head) > 1 else ""] = pipe.head
    if None in heads.values():
        raise SystemExit("no distilled head: pass --head DIR")
    size = args.size or pipe.size_multiple * pipe.model.config.base_image_grid_size
    common = dict(height=size, width=size, progress=False, output_type="pt")
    if args.edit:
        source = pipe(PROMPTS[False], generator=torch.Generator().manual_seed(0), **common, fast=True)
        common["image"] = source.images[0]
    full = pipe.defaults.resolve(args.edit)
    variants = {f"full head ({full.sampler}, {full.num_inference_steps} steps, guidance {full.guidance_scale:g})": {}}
    variants.update({f"distilled, {s} step{'s' * (s > 1)}{label}": dict(fast=True, num_inference_steps=s, head=h)
                     for label, h in heads.items() for s in args.steps})
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.repeats + 1):
        for name, kw in variants.items():
            kw = dict(kw)
            pipe.head = kw.pop("head", pipe.head)
            t0 = time.perf_counter()
            pipe(PROMPTS[args.edit], generator=torch.Generator().manual_seed(round_), **common, **kw)
            if round_:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(next(iter(times.values())))
    print(f"{'editing' if args.edit else 'text-to-image'}, {size}x{size}, {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats}")
    print("| sampling | s/image | speed-up |")
    print("|---|---:|---:|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.3f} | {base / m:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
