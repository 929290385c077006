"""Sequential against parallel decoding (``parallel=K``): backbone forwards per image, seconds per image and the phase
split, interleaved in one process, medians; prints a Markdown table.

    # a model trained for parallel decoding (default: the bundled model), 4 prompts per call, one core
    taskset -c 0 python benchmarks/parallel_speed.py --threads 1 --repeats 7
    # cost only: the ns34m reference workload with random weights (parallel parameters and a distilled head included)
    taskset -c 0 python benchmarks/parallel_speed.py --shape ns34m --size 128 512 --parallel 2 4 8 --threads 1 \
        --prompts 1 --fast-only [--quantize int8]

Rows per size: the model's defaults sequentially (parallel=1, the baseline every speed-up divides), the defaults at
each K of ``--parallel``, then fast mode (the distilled head, 1 step) sequentially and at each K (``--fast-only``:
the fast rows alone, divided by fast mode's sequential row). Every row runs once
per round; rounds repeat ``--repeats`` times after a warm-up round, so machine noise hits all rows alike. Forwards are
the backbone calls after the prefill (counted), per image drawn.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
for p in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from generate import SHAPES, build_pipeline, quantize_pipeline, untrained_head  # noqa: E402

from nextstep.pipeline import NextStepPipeline  # noqa: E402

PROMPTS = ["a red circle above a blue square", "two green triangles", "a yellow square on the left of a purple circle",
           "a blue circle"]  # the distill issue's measurement: 4 prompts in one call
PHASES = ("prefill", "backbone", "head", "decode")


def load(args) -> tuple[NextStepPipeline, str]:
    if args.shape is None:
        pipe = NextStepPipeline.from_pretrained(args.model, head=args.head)
        return pipe, f"model {args.model or 'bundled'} (parallel_tokens {pipe.model.config.parallel_tokens})"
    ns = argparse.Namespace(model=None, shape=args.shape, preset=None, tokenizer=REPO_ROOT / "tests" / "fixtures" /
                            "official-v1-a" / "model", seed=0)
    pipe, desc = build_pipeline(ns, torch.float32, torch.device("cpu"))
    pipe.model.enable_parallel(max(args.parallel))
    pipe.model.enable_reread(4 * pipe.model.config.transformer.hidden_size)  # as wide as the bundled one: 4 x hidden
    with torch.no_grad():  # random like the rest: cost only
        for q in (*pipe.model.image_ahead.parameters(), *pipe.model.image_reread.parameters()):
            q.normal_(0, 0.02)
    pipe.head = untrained_head(pipe)
    return pipe, desc + (f"; parallel parameters for K = {max(args.parallel)} (adapter and correction); an untrained "
                         f"distilled head")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    ap.add_argument("--head", default=None, help="distilled head (default: the model's fast/)")
    ap.add_argument("--shape", default=None, choices=sorted(SHAPES), help="a random reference workload instead")
    ap.add_argument("--size", type=int, nargs="+", default=None, help="image sides (default: the native size)")
    ap.add_argument("--parallel", type=int, nargs="+", default=None,
                    help="K values to time (default: the model's parallel_tokens)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per call (default 4)")
    ap.add_argument("--fast-only", action="store_true", help="time fast mode only (the speed-ups then divide its "
                                                             "sequential row)")
    ap.add_argument("--quantize", choices=["int8", "fp8"], help="weight-only quantization of the model and the "
                                                                 "distilled head (as --quantize does)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.parallel is None:
        args.parallel = [2] if args.shape else [NextStepPipeline.from_pretrained(args.model).model.config
                                                .parallel_tokens]
    pipe, desc = load(args)
    if args.quantize:
        desc += quantize_pipeline(pipe, args.quantize)
    prompts = (PROMPTS * args.prompts)[:args.prompts]
    calls = [0]
    step = pipe._decode_step

    def counted(*a, **kw):
        calls[0] += 1
        return step(*a, **kw)

    pipe._decode_step = counted
    sizes = args.size or [pipe.size_multiple * pipe.model.config.base_image_grid_size]
    print(f"{desc}; {len(prompts)} prompt(s) per call, {torch.get_num_threads()} thread(s), median of {args.repeats}")
    for size in sizes:
        tokens = (size // pipe.size_multiple) ** 2
        rows = {} if args.fast_only else {f"defaults, parallel {k}": dict(parallel=k) for k in [1, *args.parallel]}
        if pipe.head is not None:
            rows.update({f"fast (1 step), parallel {k}": dict(fast=True, num_inference_steps=1, parallel=k)
                         for k in [1, *args.parallel]})
        times = {name: [] for name in rows}
        phases = {name: {p: [] for p in PHASES} for name in rows}
        forwards = {}
        for round_ in range(args.repeats + 1):
            for name, kw in rows.items():
                calls[0] = 0
                t0 = time.perf_counter()
                out = pipe._generate(prompts, height=size, width=size, generator=torch.Generator().manual_seed(round_),
                                     output_type="pt", progress=False, timings=True, **kw)
                if round_:
                    times[name].append(time.perf_counter() - t0)
                    for p in PHASES:
                        phases[name][p].append(out.timings.get(p, 0.0))
                forwards[name] = calls[0]
        base = statistics.median(next(iter(times.values())))
        print(f"\n{size}x{size} ({tokens} image tokens)\n")
        print("| decoding | backbone forwards | per token | s per call | s/image | speed-up | prefill ms | backbone ms "
              "| head ms | decode ms |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, ts in times.items():
            m = statistics.median(ts)
            ms = [1000 * statistics.median(phases[name][p]) for p in PHASES]
            print(f"| {name} | {forwards[name]} | {forwards[name] / tokens:.2f} | {m:.3f} | {m / len(prompts):.4f} | "
                  f"{base / m:.2f}x | " + " | ".join(f"{x:.0f}" for x in ms) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
