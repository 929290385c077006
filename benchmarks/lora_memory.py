"""Measured peak memory of LoRA training against its estimate (``nextstep info --lora-rank``): a random model of about
1B parameters (the bundled model's tokenizer, VAE and protocol, a wider and deeper backbone) is written to a model
directory, then a child process runs ``nextstep train``'s LoRA path on it for a few steps and reports its peak RSS
(VmHWM). Prints the estimate's terms, the measurement and their ratio.

    python benchmarks/lora_memory.py                                # hidden 2048, 23 layers (1.04B), 128x128, batch 2
    python benchmarks/lora_memory.py --layers 12 --steps 2 --keep /tmp/lora-mem   # reuse the model dir next time

On the CPU in float32 (the estimate's precision here); the model dir takes 4 bytes per parameter on disk, the child
about 1.2x that in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPES_PROMPT = "a red circle above a blue square"  # the estimate's prompt: a typical shapes-world caption


def vm_hwm() -> int:
    """Peak resident set size of this process in bytes (/proc/self/status VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not in /proc/self/status (Linux only)")


def make_model_dir(out: Path, hidden: int, layers: int, seed: int) -> int:
    """A randomly initialised model of the bundled model's protocol with a bigger backbone, saved as a model dir."""
    import torch

    from nextstep.model.nextstep import NextStep
    from nextstep.pipeline import NextStepPipeline, bundled_model_dir

    bundled = NextStepPipeline.from_pretrained(bundled_model_dir())
    cfg = bundled.model.config
    t = dataclasses.replace(cfg.transformer, hidden_size=hidden, num_layers=layers, num_heads=hidden // 128,
                            num_kv_heads=max(1, hidden // 512), head_dim=128,
                            intermediate_size=int(hidden * 2.75) // 256 * 256)
    model = NextStep(dataclasses.replace(cfg, transformer=t))
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    NextStepPipeline(model, bundled.vae, bundled.tokenizer, bundled.defaults).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def child(args) -> None:
    """Train, then print the peak RSS as JSON on the last line."""
    from nextstep.train.ar import train
    from nextstep.train.config import TrainConfig, from_dict

    model_dir, run_dir = Path(args.model_dir), Path(args.run_dir)
    cfg = from_dict(TrainConfig, {
        "run": {"out_dir": str(run_dir), "steps": args.steps, "batch_size": args.batch, "seed": 0,
                "precision": "fp32", "activation_checkpointing": True, "log_every": 1, "ckpt_every": 10**6},
        "data": {"source": "shapes", "num_samples": 4 * args.batch, "image_size": args.size, "mix": {"t2i": 1.0},
                 "caption_dropout": 0.0},
        "optim": {"lr": 1e-4, "warmup_steps": 0},
        "init_from": str(model_dir), "vae": str(model_dir / "vae"),
        "lora": {"rank": args.rank, "alpha": 2 * args.rank, "targets": ["attn", "mlp"]},
        "sample_prompts": [SHAPES_PROMPT]})
    train(cfg, progress=False)
    print(json.dumps({"vm_hwm": vm_hwm()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=23)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--size", type=int, default=128, help="training image side (default 128)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--keep", default=None, metavar="DIR", help="write (or reuse) the model dir here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    from nextstep.info import format_lora_memory, human, lora_memory_info

    tmp = Path(tempfile.mkdtemp(prefix="lora-memory-"))
    model_dir = Path(args.keep) if args.keep else tmp / "model"
    try:
        if not (model_dir / "config.json").is_file():
            n = make_model_dir(model_dir, args.hidden, args.layers, seed=0)
            print(f"random model: {human(n)} parameters in {model_dir}")
        plan = lora_memory_info(model_dir, rank=args.rank, height=args.size, width=args.size, batch=args.batch,
                                dtype="float32", checkpointing=True, prompt=SHAPES_PROMPT)
        print(format_lora_memory(plan, plan["model"]))
        cmd = [sys.executable, __file__, "--child", "--model-dir", str(model_dir), "--run-dir", str(tmp / "run"),
               "--rank", str(args.rank), "--size", str(args.size), "--batch", str(args.batch),
               "--steps", str(args.steps)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        measured = json.loads(done.stdout.strip().splitlines()[-1])["vm_hwm"]
        est = plan["total_bytes"]
        print(f"measured peak RSS of {args.steps} LoRA training steps: {human(measured, 'B')}; estimate "
              f"{human(est, 'B')}; estimate / measured = {est / measured:.3f} ({100 * (est / measured - 1):+.1f}%)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
