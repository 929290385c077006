"""oneDNN-packed linear layers (``nextstep.packing``) against PyTorch's plain kernels, whole images, interleaved.

    taskset -c 0 python benchmarks/packing.py --threads 1 [--dtype float32 bfloat16] [--repeats 3]

Builds the side-by-side harness's "ns34m" random model (``benchmarks/generate.py --shape ns34m``: 64 tokens at
128x128, SDE, shift 1) and times its four rows (guidance / steps / images 3/10/1, 3/10/4, 1/50/1, 3/50/1) with the
pipeline's default arithmetic twice: as it runs (packed linears on a CPU) and with packing turned off
(``PACK_LIMIT_BYTES = 0``: every linear layer on ``F.linear``). The two alternate call by call in one process;
medians of ``--repeats`` calls after one warm-up each. Prints seconds per image and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import build_parser, build_pipeline, run_one  # noqa: E402  (benchmarks/generate.py)

from nextstep import packing  # noqa: E402

ROWS = ((3, 10, 1), (3, 10, 4), (1, 50, 1), (3, 50, 1))  # guidance, steps, images


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    args = build_parser().parse_args(["--shape", "ns34m", "--threads", str(a.threads)])
    limit = packing.PACK_LIMIT_BYTES
    print(f"torch {torch.__version__}, {a.threads} thread(s); bfloat16 packed: "
          f"{'oneDNN' if packing.available(torch.bfloat16) else 'not on this CPU (plain kernel)'}")
    print("\n| dtype | guidance / steps / images | plain s/image | packed s/image | packed speed-up |")
    print("|---|---|---:|---:|---:|")
    for name in a.dtype:
        dtype = getattr(torch, name)
        pipe, _ = build_pipeline(args, dtype, torch.device("cpu"))
        for cfg, steps, images in ROWS:
            times: dict[str, list[float]] = {"plain": [], "packed": []}
            for rep in range(a.repeats + 1):
                for variant in times:
                    packing.PACK_LIMIT_BYTES = 0 if variant == "plain" else limit
                    t, _ = run_one(pipe, args, (128, 128), images, steps, cfg, "sde", torch.device("cpu"))
                    if rep:  # the first round warms up
                        times[variant].append(t / images)
            plain, packed = (statistics.median(times[k]) for k in ("plain", "packed"))
            print(f"| {name} | {cfg} / {steps} / {images} | {plain:.3f} | {packed:.3f} | {plain / packed:.2f}x |",
                  flush=True)
    packing.PACK_LIMIT_BYTES = limit
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
