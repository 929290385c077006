"""The pipeline's CPU kernels against PyTorch's plain ones, interleaved in one process.

    taskset -c 0 python benchmarks/packing.py --threads 1 [--dtype float32 bfloat16] [--repeats 3]

(1) oneDNN-packed linear layers (``nextstep.packing``), whole images: the side-by-side harness's "ns34m" random model
    (``benchmarks/generate.py --shape ns34m``: 64 tokens at 128x128, SDE, shift 1) on its four rows (guidance /
    steps / images 3/10/1, 3/10/4, 1/50/1, 3/50/1), and the bundled model (4 prompts per call, its defaults and fast
    mode), each with the pipeline's default arithmetic twice: as it runs (packed linears on a CPU) and with packing
    turned off (``PACK_LIMIT_BYTES = 0``: every linear layer on ``F.linear``). The two alternate call by call; medians
    of ``--repeats`` calls after one warm-up each.
(2) Attention for one decode step (2 rows, one query each, a KV cache of 90 / 300 / 1,100 keys) at the ns34m shape
    (8 heads / 4 KV heads x 64) and NextStep-1's (40 / 8 x 128): bfloat16 ``scaled_dot_product_attention`` against
    the same inputs upcast to float32 (what ``model/transformer.py`` does on a CPU), microseconds per call.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate import build_parser, build_pipeline, run_one  # noqa: E402  (benchmarks/generate.py)

from nextstep import packing  # noqa: E402
from nextstep.pipeline import NextStepPipeline  # noqa: E402

ROWS = ((3, 10, 1), (3, 10, 4), (1, 50, 1), (3, 50, 1))  # guidance, steps, images
sdpa = torch.nn.functional.scaled_dot_product_attention
BUNDLED_PROMPTS = ["a red circle", "two blue squares", "a green triangle above a yellow circle", "three red squares"]


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
    print("\n| model, dtype | guidance / steps / images | plain s/image | packed s/image | packed speed-up |")
    print("|---|---|---:|---:|---:|")
    for name in a.dtype:
        dtype = getattr(torch, name)
        pipe, _ = build_pipeline(args, dtype, torch.device("cpu"))
        for cfg, steps, images in ROWS:
            def call(pipe=pipe, cfg=cfg, steps=steps, images=images):
                return run_one(pipe, args, (128, 128), images, steps, cfg, "sde", torch.device("cpu"))[0] / images
            plain, packed = interleaved(call, a.repeats, limit)
            print(f"| ns34m {name} | {cfg} / {steps} / {images} | {plain:.3f} | {packed:.3f} | {plain / packed:.2f}x |",
                  flush=True)
        bundled = NextStepPipeline.from_pretrained(dtype=dtype)
        for fast in (False, True):
            def call(bundled=bundled, fast=fast):
                t0 = time.perf_counter()
                bundled(BUNDLED_PROMPTS, generator=torch.Generator().manual_seed(0), progress=False, output_type="pt",
                        fast=fast)
                return (time.perf_counter() - t0) / len(BUNDLED_PROMPTS)
            plain, packed = interleaved(call, 2 * a.repeats + 1, limit)
            print(f"| bundled {name} | {'fast mode' if fast else 'defaults'}, 4 prompts | {plain:.4f} | "
                  f"{packed:.4f} | {plain / packed:.2f}x |", flush=True)
    packing.PACK_LIMIT_BYTES = limit
    attention()
    return 0


def interleaved(call, repeats: int, limit: int) -> tuple[float, float]:
    """Median seconds of ``call()`` with packing off and on, alternating, after one warm-up round."""
    times: dict[int, list[float]] = {0: [], limit: []}
    for rep in range(repeats + 1):
        for lim in times:
            packing.PACK_LIMIT_BYTES = lim
            t = call()
            if rep:
                times[lim].append(t)
    return statistics.median(times[0]), statistics.median(times[limit])


def upcast(q, k, v, bias):
    return sdpa(q.float(), k.float(), v.float(), attn_mask=bias.float(), enable_gqa=True).bfloat16()


def attention() -> None:
    print("\nattention, one decode step (2 rows x 1 query), microseconds per call, median of 5 x 100 calls")
    print("\n| shape | keys | bfloat16 | upcast to float32 | bfloat16 / upcast |")
    print("|---|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for shape, (heads, kv, hd) in (("ns34m", (8, 4, 64)), ("NextStep-1", (40, 8, 128))):
        for keys in (90, 300, 1100):
            q = torch.randn(2, heads, 1, hd, generator=g).bfloat16()
            k, v = (torch.randn(2, kv, keys, hd, generator=g).bfloat16() for _ in range(2))
            bias = torch.zeros(2, 1, 1, keys, dtype=torch.bfloat16)
            half = functools.partial(sdpa, q, k, v, attn_mask=bias, enable_gqa=True)
            up = functools.partial(upcast, q, k, v, bias)
            t = {}
            for name, f in (("half", half), ("up", up)):
                f()
                runs = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    for _ in range(100):
                        f()
                    runs.append((time.perf_counter() - t0) / 100 * 1e6)
                t[name] = statistics.median(runs)
            print(f"| {shape} | {keys} | {t['half']:,.0f} | {t['up']:,.0f} | {t['half'] / t['up']:.1f}x |", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
