"""Weight-only quantization (``nextstep.quant``): peak host memory while loading, and per-layer matmul speed.

    python benchmarks/quant.py                 # both parts
    python benchmarks/quant.py --skip-memory   # only the layer timings
    python benchmarks/quant.py --skip-layers --layers 6 --hidden 4096

(a) Memory: writes a random checkpoint in the official layout into a temporary directory (default ~1.5B parameters,
    float32, 1 GB shards: hidden 4096, MLP 11008, 6 layers, 32k vocabulary), loads it in a fresh process once in
    float32 and once with ``quantize="int8"`` (and fp8), touches every weight (float32 weights assigned from the
    memory-mapped file are otherwise paged in only when first used), prints each process's peak resident set
    (``VmHWM``, Linux) against the size of what the model holds, and deletes the checkpoint.
(b) Layers: one thread, 1/2/6 rows (the flow head's and the decode step's batch), medians of interleaved runs of
    float32 ``F.linear``, ``QuantizedLinear`` int8 / fp8, and float32 / bfloat16 ``nn.Linear`` inside
    ``nextstep.packing.packed_linears`` (oneDNN-prepacked weights, what the pipeline uses on a CPU) against bfloat16
    ``F.linear``, for the layer shapes of the "ns34m" workload (hidden 512,
    MLP 1408, head width 512) and of NextStep-1-Large (hidden 5120, MLP 13824, head width 1536).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from nextstep import packing, quant
from nextstep.config import FlowHeadConfig, NextStepConfig, TransformerConfig
from nextstep.model.nextstep import NextStep, ours_to_official

SHARD_BYTES = 1 << 30
MiB = 1 << 20

# (name, out, in) per workload: backbone projections, then the flow head's layers
SHAPES = {
    "ns34m": [("q/o proj", 512, 512), ("k/v proj", 256, 512), ("gate/up", 1408, 512), ("down", 512, 1408),
              ("head mlp", 512, 512), ("head adaLN", 1536, 512)],
    "Large": [("q/o proj", 5120, 5120), ("k/v proj", 1024, 5120), ("gate/up", 13824, 5120), ("down", 5120, 13824),
              ("head cond", 1536, 5120), ("head mlp", 1536, 1536), ("head adaLN", 4608, 1536)],
}


# ---- (a) memory --------------------------------------------------------------------------------------------------
def write_random_checkpoint(out: Path, hidden: int, mlp: int, layers: int, vocab: int) -> tuple[NextStepConfig, int]:
    """Random float32 weights in the official layout, generated and written one shard at a time."""
    cfg = NextStepConfig(
        transformer=TransformerConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=hidden // 128,
                                      num_kv_heads=hidden // 128 // 4, head_dim=128, intermediate_size=mlp),
        head=FlowHeadConfig(width=1536, depth=6))
    with torch.device("meta"):
        shapes = {ours_to_official(k): v.shape for k, v in NextStep(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    shard, size, weight_map, n_params, index = {}, 0, {}, 0, 0

    def flush():
        nonlocal shard, size, index
        index += 1
        name = f"model-{index:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for k, shape in shapes.items():
        t = torch.randn(shape, generator=g) * 0.02
        n_params += t.numel()
        shard[k] = t
        size += t.numel() * 4
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg.to_official("v1")))
    return cfg, n_params


LOAD = """
import sys, torch
from nextstep.model.nextstep import NextStep
from nextstep.quant import QuantizedLinear

def status(field):  # kB -> bytes; VmHWM is this process's peak resident set (file-backed mmap pages included)
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

base = status("VmRSS")
m = NextStep.from_pretrained(sys.argv[1], quantize=None if sys.argv[2] == "float32" else sys.argv[2])
held = 0
with torch.no_grad():  # touch every weight: float32 tensors assigned from the memory-mapped file are paged in lazily
    for mod in m.modules():
        own = [t for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)) if t is not None]
        if isinstance(mod, QuantizedLinear):
            own.append(mod.int_weight())
        for t in own:
            t.view(torch.uint8).max()  # touches every page; .sum() would make an int64 copy
            held += t.numel() * t.element_size()
print(base, status("VmHWM"), status("VmRSS"), held)
"""


def measure_memory(args) -> None:
    with tempfile.TemporaryDirectory(prefix="nextstep-quant-") as tmp:
        t0 = time.perf_counter()
        cfg, n = write_random_checkpoint(Path(tmp), args.hidden, args.mlp, args.layers, args.vocab)
        disk = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        print(f"random checkpoint: {n / 1e9:.2f}B parameters, {disk / MiB:,.0f} MiB float32 on disk "
              f"(hidden {args.hidden}, MLP {args.mlp}, {args.layers} layers, vocab {args.vocab}; "
              f"written in {time.perf_counter() - t0:.0f} s)")
        print("\n| load | peak RSS (MiB) | RSS after load (MiB) | after import (MiB) | model holds (MiB) "
              "| peak / held | peak / float32 file |")
        print("|---|---|---|---|---|---|---|")
        for kind in ("float32", "int8", "fp8"):
            res = subprocess.run([sys.executable, "-c", LOAD, tmp, kind], capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(res.stderr)
            base, peak, after, held = (int(v) for v in res.stdout.split())
            print(f"| {kind} | {peak / MiB:,.0f} | {after / MiB:,.0f} | {base / MiB:,.0f} | {held / MiB:,.0f} | "
                  f"{peak / held:.2f} | {peak / disk:.2f} |", flush=True)


# ---- (b) layers --------------------------------------------------------------------------------------------------
def measure_layers(args) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print(f"\nper-layer matmul, one thread, microseconds per call (median of interleaved runs), "
          f"torch {torch.__version__}")
    bf16 = packing.available(torch.bfloat16)
    print(f"(bfloat16 packed: {'oneDNN' if bf16 else 'not available on this CPU, the plain kernel'})")
    print("\n| workload | layer | out x in | rows | float32 | int8 | fp8 | float32 packed | bfloat16 | bfloat16 packed "
          "| int8 speed-up | fp8 speed-up | float32 packed speed-up | bfloat16 packed / bfloat16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for workload, shapes in SHAPES.items():
        for name, n_out, n_in in shapes:
            lin = nn.Linear(n_in, n_out)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(n_out, n_in, generator=g) / n_in**0.5)
            half = nn.Linear(n_in, n_out).to(torch.bfloat16)
            with torch.no_grad():
                half.weight.copy_(lin.weight)
                half.bias.copy_(lin.bias)
            reps = max(3, min(args.reps, int(args.reps * 4e6 / (n_out * n_in))))
            for rows in (1, 2, 6):
                x = torch.randn(rows, n_in, generator=g)
                xb = x.bfloat16()
                with packing.packed_linears(lin, half):  # packed on each layer's first call (the warm-up)
                    layers = {"float32": lambda x, w=lin.weight, b=lin.bias: F.linear(x, w, b),
                              "int8": quant.QuantizedLinear.from_linear(lin, "int8"),
                              "fp8": quant.QuantizedLinear.from_linear(lin, "fp8"),
                              "float32 packed": lin,
                              "bfloat16": lambda x, xb=xb, w=half.weight, b=half.bias: F.linear(xb, w, b),
                              "bfloat16 packed": lambda x, xb=xb, half=half: half(xb)}
                    t = time_interleaved(layers, x, reps)
                print(f"| {workload} | {name} | {n_out}x{n_in} | {rows} | "
                      + " | ".join(f"{t[k]:,.0f}" for k in layers)
                      + f" | {t['float32'] / t['int8']:.2f}x | {t['float32'] / t['fp8']:.2f}x | "
                      f"{t['float32'] / t['float32 packed']:.2f}x | {t['bfloat16'] / t['bfloat16 packed']:.2f}x |",
                      flush=True)


@torch.no_grad()
def time_interleaved(fns: dict, x: torch.Tensor, reps: int) -> dict[str, float]:
    for f in fns.values():
        f(x)
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f(x)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--mlp", type=int, default=11008)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--reps", type=int, default=50, help="timed calls per kernel for small layers (fewer for big)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-layers", action="store_true")
    args = p.parse_args()
    if not args.skip_memory:
        measure_memory(args)
    if not args.skip_layers:
        measure_layers(args)


if __name__ == "__main__":
    main()
