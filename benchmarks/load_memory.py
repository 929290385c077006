"""Peak host memory while loading a large checkpoint (``NextStep.from_pretrained``), against the checkpoint's size.

    python benchmarks/load_memory.py                      # ~3.1B bfloat16 and ~1.4B float32 (12 GB of disk)
    python benchmarks/load_memory.py --layers 2 --vocab 32000 --shard-gb 0.5   # ~1 GB each, a quick run

Writes random checkpoints in the official layout (``layers.N.*`` keys, ``config.json``, Hugging Face shards plus
``model.safetensors.index.json``) into a temporary directory, one shard at a time, then loads each in a fresh
process (cwd in the temporary directory, so ``PYTHONPATH`` picks the code under test):

    bf16 checkpoint (default: hidden 4096, MLP 11008, 10 layers, vocabulary 152064, 3.1B parameters, 6.2 GB)
      -> bfloat16
    fp32 checkpoint (default: the same with 6 layers and vocabulary 32000, 1.4B parameters, 5.7 GB)
      -> float32, -> bfloat16, -> quantize="int8"

Each load touches every byte the model holds afterwards (weights assigned from a memory-mapped file are otherwise
read from disk only when first used) and reports the process's peak resident set (``VmHWM``: anonymous and
file-backed pages, Linux), the resident set right after ``import nextstep`` (the interpreter, torch), what the
model holds, and peak / checkpoint. The temporary checkpoints are deleted at the end. Needs the disk space of both
checkpoints (see ``df -h /tmp``) and RAM for the largest load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nextstep.checkpoint import save_safetensors, write_json
from nextstep.config import FlowHeadConfig, NextStepConfig, TransformerConfig
from nextstep.model.nextstep import NextStep, ours_to_official

GiB = 1 << 30

LOAD = r"""
import json, sys, time
import torch
import nextstep
from nextstep.model.nextstep import NextStep
from nextstep.quant import QuantizedLinear

def status(field):  # kB -> bytes
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

path, target = sys.argv[1], sys.argv[2]
base = status("VmRSS")
t0 = time.perf_counter()
if target == "int8":
    model = NextStep.from_pretrained(path, quantize="int8")
else:
    model = NextStep.from_pretrained(path, dtype=getattr(torch, target))
seconds = time.perf_counter() - t0
held = 0
with torch.no_grad():
    for mod in model.modules():
        for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
            if t is not None:  # max of a flat byte view reads every page and allocates nothing (sum would upcast)
                t.detach().reshape(-1).view(torch.uint8).max()
                held += t.numel() * t.element_size()
        if isinstance(mod, QuantizedLinear) and mod.qweight is None:  # fbgemm's packed copy: anonymous memory
            held += mod.out_features * mod.in_features
print(json.dumps({"base": base, "peak": status("VmHWM"), "after": status("VmRSS"), "held": held,
                  "seconds": seconds, "code": nextstep.__file__}))
"""


def model_config(hidden: int, mlp: int, layers: int, vocab: int) -> NextStepConfig:
    return NextStepConfig(
        transformer=TransformerConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=hidden // 128,
                                      num_kv_heads=max(1, hidden // 512), head_dim=128, intermediate_size=mlp),
        head=FlowHeadConfig(width=1536, depth=6))


def write_checkpoint(out: Path, cfg: NextStepConfig, dtype: torch.dtype, shard_bytes: int) -> int:
    """Random weights (N(0, 0.02)) under official key names, generated and written one shard at a time in the layout
    of ``save_safetensors_sharded`` (``model-0000i-of-0000n.safetensors`` + index). Returns the parameter count."""
    with torch.device("meta"):
        shapes = {ours_to_official(k): v.shape for k, v in NextStep(cfg).state_dict().items()}
    shapes["gen_pos_embed"] = torch.Size([1, cfg.base_image_grid_size ** 2, cfg.transformer.hidden_size])
    shards: list[list[str]] = [[]]
    size = 0
    for k, shape in shapes.items():
        n = shape.numel() * dtype.itemsize
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors({k: (torch.randn(shapes[k], generator=g) * 0.02).to(dtype) for k in keys}, out / name,
                         metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    total = sum(s.numel() for s in shapes.values())
    write_json({"metadata": {"total_size": total * dtype.itemsize}, "weight_map": weight_map},
               out / "model.safetensors.index.json")
    write_json(cfg.to_official("v1"), out / "config.json")
    return total


def load_in_subprocess(path: Path, target: str) -> dict:
    res = subprocess.run([sys.executable, "-c", LOAD, str(path), target], capture_output=True, text=True, cwd=path)
    if res.returncode != 0:
        raise SystemExit(f"loading {path} as {target} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--mlp", type=int, default=11008)
    p.add_argument("--layers", type=int, default=None, help="both checkpoints (default: 10 bf16, 6 fp32)")
    p.add_argument("--vocab", type=int, default=None, help="both checkpoints (default: 152064 bf16, 32000 fp32)")
    p.add_argument("--shard-gb", type=float, default=4.0, help="shard size in GiB (default 4)")
    p.add_argument("--cases", default="bf16,fp32", help="checkpoints to write and load: bf16, fp32 or both")
    args = p.parse_args()
    plans = {"bf16": (torch.bfloat16, 10, 152064, ("bfloat16",)),
             "fp32": (torch.float32, 6, 32000, ("float32", "bfloat16", "int8"))}
    print("| checkpoint | parameters | size (MiB) | load as | model holds (MiB) | after import (MiB) "
          "| peak RSS (MiB) | peak / checkpoint | (peak - import) / checkpoint | load (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    code = None
    for case in args.cases.split(","):
        dtype, layers, vocab, targets = plans[case]
        cfg = model_config(args.hidden, args.mlp, args.layers or layers, args.vocab or vocab)
        with tempfile.TemporaryDirectory(prefix="nextstep-load-") as tmp:
            n = write_checkpoint(Path(tmp), cfg, dtype, int(args.shard_gb * GiB))
            disk = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
            shards = len(list(Path(tmp).glob("*.safetensors")))
            for target in targets:
                r = load_in_subprocess(Path(tmp), target)
                code = r["code"]
                print(f"| {case}, {shards} shards | {n / 1e9:.2f}B | {disk / 2**20:,.0f} | {target} "
                      f"| {r['held'] / 2**20:,.0f} | {r['base'] / 2**20:,.0f} | {r['peak'] / 2**20:,.0f} "
                      f"| {r['peak'] / disk:.2f} | {(r['peak'] - r['base']) / disk:.2f} | {r['seconds']:.1f} |",
                      flush=True)
    print(f"\ncode under test: {code}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
