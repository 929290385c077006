"""Copy a trained model into the package (``nextstep/assets/model``) as the bundled default model.

    python scripts/bundle_model.py runs/shapes-ar7/final --vae runs/shapes-vae-dec/final --steps 50 --cfg 3 \
        --edit-cfg 3 --image-cfg 3

Weights are stored in bfloat16 (they load into float32 models); the sampling settings given here become the
model's defaults (``generation_config.json``). Prints the size of what is bundled.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from nextstep.config import SamplingConfig
from nextstep.model.nextstep import NextStep
from nextstep.model.vae import VAE
from nextstep.tokenizer import Tokenizer

DEST = Path(__file__).resolve().parents[1] / "nextstep" / "assets" / "model"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="an exported model directory (OUT/final of `nextstep train`)")
    p.add_argument("--vae", default=None, help="VAE directory (default: MODEL_DIR/vae)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--edit-cfg", type=float, default=None, help="text guidance for edits (default: --cfg)")
    p.add_argument("--image-cfg", type=float, default=1.5)
    p.add_argument("--shift", type=float, default=1.0)
    p.add_argument("--edit-shift", type=float, default=1.0)
    p.add_argument("--sampler", default="sde")
    args = p.parse_args()
    src = Path(args.model_dir)
    shutil.rmtree(DEST, ignore_errors=True)
    NextStep.from_pretrained(src).to(torch.bfloat16).save_pretrained(DEST)
    VAE.from_pretrained(args.vae or src / "vae").save_pretrained(DEST / "vae")
    Tokenizer.from_pretrained(src).save_pretrained(DEST)
    edit_cfg = args.cfg if args.edit_cfg is None else args.edit_cfg
    SamplingConfig(guidance_scale=args.cfg, num_inference_steps=args.steps, time_shift=args.shift,
                   sampler=args.sampler, edit_guidance_scale=edit_cfg, edit_image_guidance_scale=args.image_cfg,
                   edit_time_shift=args.edit_shift, edit_negative_prompt="", trained_sizes=("64x64",)).save(DEST)
    size = sum(f.stat().st_size for f in DEST.rglob("*") if f.is_file())
    print(f"bundled {src} -> {DEST} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
