"""The pipeline's VAE decode in the reference layout (``exact=True``) and with the autograd path's out-of-place
operations against its default (channels-last latents on a CPU, activations and residual sums written over their
intermediates), interleaved, medians; prints ms per call and the largest pixel difference.

    taskset -c 0 python benchmarks/vae_decode.py --threads 1              # the bundled VAE, 4 images at 64x64
    taskset -c 0 python benchmarks/vae_decode.py --threads 1 --ns34m --size 512 --images 1 --repeats 5

``--kept-memory N``: the default decode in processes that keep freed memory (glibc's thresholds as the commands set
them, ``nextstep.cli.keep_freed_memory``, given as ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``) against
processes with glibc's defaults, N of each, alternated (a process-wide setting: one process cannot measure both);
prints each process's median and the medians of those.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
for p in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from generate import SHAPES  # noqa: E402

from nextstep.cli import MALLOC_MMAP_BYTES, MALLOC_SETTINGS, MALLOC_TRIM_BYTES  # noqa: E402
from nextstep.config import VAEConfig  # noqa: E402
from nextstep.model.vae import VAE  # noqa: E402
from nextstep.pipeline import NextStepPipeline  # noqa: E402


def kept_memory(args) -> int:
    argv = ["--size", str(args.size), "--images", str(args.images), "--repeats", str(args.repeats), "--threads",
            str(args.threads)] + ["--ns34m"] * args.ns34m
    rounds = args.kept_memory
    base = {k: v for k, v in os.environ.items() if k not in MALLOC_SETTINGS}
    envs = {"glibc's defaults": base, "freed memory kept": {**base, "MALLOC_MMAP_THRESHOLD_": str(MALLOC_MMAP_BYTES),
                                                            "MALLOC_TRIM_THRESHOLD_": str(MALLOC_TRIM_BYTES)}}
    ms: dict[str, list[float]] = {k: [] for k in envs}
    for _ in range(rounds):
        for name, env in envs.items():
            out = subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True,
                                 check=True).stdout
            ms[name].append(float(re.search(r"^\s*default\s+([\d.]+) ms", out, re.M).group(1)))
    print(f"{'ns34m' if args.ns34m else 'bundled'} VAE, {args.images} x {args.size}x{args.size}, the default decode, "
          f"ms per call (each process's median), {rounds} processes each, alternated:")
    for name, v in ms.items():
        print(f"  {name:18s} {statistics.median(v):8.1f} ms   ({', '.join(f'{x:.1f}' for x in v)})")
    a, b = (statistics.median(v) for v in ms.values())
    print(f"  kept is {a / b:.2f}x faster")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns34m", action="store_true", help="the ns34m workload's random VAE instead of the bundled one")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--kept-memory", type=int, default=0, metavar="N",
                    help="compare the default decode in N processes keeping freed memory against N without")
    args = ap.parse_args(argv)
    if args.kept_memory:
        return kept_memory(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = NextStepPipeline.from_pretrained()
    if args.ns34m:
        torch.manual_seed(0)
        pipe.vae = VAE(VAEConfig(**SHAPES["ns34m"]["vae"])).eval()
    grid = (args.size // pipe.size_multiple,) * 2
    tokens = torch.randn(args.images, grid[0] * grid[1], pipe.model.config.token_dim, generator=torch.Generator()
                         .manual_seed(0))
    pipe.vae.requires_grad_(False)  # so that under enable_grad no graph is built: the out-of-place operations alone
    variants = {  # name -> (exact, grad mode)
        "exact": (True, False),  # the reference's NCHW layout
        "default": (False, False),  # channels-last latents, intermediates overwritten (no autograd)
        "out-of-place": (False, True),  # channels-last, the autograd path's operations (x * sigmoid(x), new sums)
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats + 1):
        for name, (exact, grad) in variants.items():
            with torch.set_grad_enabled(grad):
                t0 = time.perf_counter()
                pipe.decode(tokens, grid, exact)
                times[name].append(time.perf_counter() - t0)
    with torch.no_grad():
        out = {name: pipe.decode(tokens, grid, variants[name][0]) for name in ("exact", "default")}
    with torch.enable_grad():
        out["out-of-place"] = pipe.decode(tokens, grid)
    ms = {k: 1000 * statistics.median(v[1:]) for k, v in times.items()}
    print(f"{'ns34m' if args.ns34m else 'bundled'} VAE, {args.images} x {args.size}x{args.size}, "
          f"{torch.get_num_threads()} thread(s), ms per call (median of {args.repeats}, interleaved):")
    for k in variants:
        diff = (out[k] - out["default"]).abs().max().item()
        print(f"  {k:13s} {ms[k]:8.1f} ms   default is {ms[k] / ms['default']:.2f}x faster   largest pixel difference "
              f"to default {diff:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
