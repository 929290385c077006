"""Training throughput: samples/s and tokens/s of the AR trainer (and an MFU estimate on a GPU).

    python benchmarks/train.py                       # tiny preset on the shapes world, CPU
    python benchmarks/train.py --preset tiny --batch 16 64 --precision fp32 bf16 --steps 20

Each row trains a fresh model for --steps steps (after --warmup steps that are not timed) in a temporary directory,
then reads the trainer's own metrics. Latent encoding of the dataset happens once, before timing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch

from nextstep.config import VAEConfig, num_params_estimate, preset
from nextstep.model.vae import VAE
from nextstep.train.ar import train
from nextstep.train.config import TrainConfig, from_dict

ROOT = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16


def flops_per_step(cfg, tokens: float, head_rows: float) -> float:
    """6 x parameters x tokens for the backbone (forward + backward), the same for the head's rows."""
    t = cfg.transformer
    per_layer = (t.hidden_size * t.head_dim * (t.num_heads * 2 + t.num_kv_heads * 2)
                 + 3 * t.hidden_size * t.intermediate_size)
    backbone = t.num_layers * per_layer + 2 * t.vocab_size * t.hidden_size
    head = num_params_estimate(cfg) - backbone - t.num_layers * 2 * t.hidden_size
    return 6 * backbone * tokens + 6 * head * head_rows


def run(args, batch: int, precision: str, tmp: Path, vae_dir: Path, tok_dir: Path) -> dict:
    out = tmp / f"b{batch}-{precision}"
    cfg = from_dict(TrainConfig, {
        "run": {"out_dir": str(out), "steps": args.warmup + args.steps, "batch_size": batch, "log_every": 1,
                "ckpt_every": 0, "precision": precision},
        "data": {"source": "shapes", "num_samples": args.samples, "image_size": args.size},
        "model": args.preset, "vae": str(vae_dir), "tokenizer": str(tok_dir),
        "optim": {"warmup_steps": 1}})
    train(cfg, progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][args.warmup:]
    sps = sum(r["samples/s"] for r in rows) / len(rows)
    tps = sum(r["tokens/s"] for r in rows) / len(rows)
    mcfg = cfg.model_config()
    tokens_per_sample = tps / sps
    image_tokens = (args.size // 16) ** 2
    flops = flops_per_step(mcfg, tokens_per_sample * batch, image_tokens * batch * mcfg.head.batch_mul)
    step_s = batch / sps
    row = {"batch": batch, "precision": precision, "samples/s": sps, "tokens/s": tps,
           "TFLOP/s": flops / step_s / 1e12}
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        row["MFU %"] = 100 * row["TFLOP/s"] / peak if peak else float("nan")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--samples", type=int, default=512, help="shapes-world samples to encode")
    p.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "fixtures" / "official-v1-a" / "model"))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"device {'cuda: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    cfg = preset(args.preset)
    print(f"model: {args.preset} ({num_params_estimate(cfg) / 1e6:.2f} M parameters), {args.size}x{args.size} images"
          f" = {(args.size // 16) ** 2} image tokens, head batch_mul {cfg.head.batch_mul}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            VAE(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)).save_pretrained(tmp / "vae")
        rows = [run(args, b, prec, tmp, tmp / "vae", Path(args.tokenizer))
                for b in args.batch for prec in args.precision]
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
