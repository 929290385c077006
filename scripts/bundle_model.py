"""Copy a trained model into the package (``nextstep/assets/model``) as the bundled default model.

    python scripts/bundle_model.py runs/shapes-ar7/final --vae runs/shapes-vae-dec/final --steps 50 --cfg 3 \
        --edit-cfg 3 --image-cfg 3

Weights are stored in bfloat16 (they load into float32 models); the sampling settings given here become the
model's defaults (``generation_config.json``). Prints the size of what is bundled.

    python scripts/bundle_model.py runs/shapes-ar-parallel/final --weights-only   # the parallel-decoding bundle

``--weights-only`` replaces the model's weights and config.json only: its VAE, tokenizer, distilled head (``fast/``)
and generation config stay (a fine-tune that trained an adapter on the frozen bundled model). ``--dest DIR`` writes
a copy elsewhere instead of the package.
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
    p.add_argument("--weights-only", action="store_true",
                   help="replace the weights and config.json only (keep the VAE, tokenizer, fast/ head, settings)")
    p.add_argument("--dest", type=Path, default=DEST, help="where to write (default: the package's bundled model)")
    args = p.parse_args()
    src, dest = Path(args.model_dir), args.dest
    if args.weights_only:
        if dest != DEST:
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(DEST, dest)
        for old in dest.glob("model*.safetensors"):
            old.unlink()
        NextStep.from_pretrained(src).to(torch.bfloat16).save_pretrained(dest)
        size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
        print(f"weights of {src} -> {dest} ({size / 2**20:.1f} MiB in all)")
        return
    shutil.rmtree(dest, ignore_errors=True)
    NextStep.from_pretrained(src).to(torch.bfloat16).save_pretrained(dest)
    VAE.from_pretrained(args.vae or src / "vae").save_pretrained(dest / "vae")
    Tokenizer.from_pretrained(src).save_pretrained(dest)
    edit_cfg = args.cfg if args.edit_cfg is None else args.edit_cfg
    SamplingConfig(guidance_scale=args.cfg, num_inference_steps=args.steps, time_shift=args.shift,
                   sampler=args.sampler, edit_guidance_scale=edit_cfg, edit_image_guidance_scale=args.image_cfg,
                   edit_time_shift=args.edit_shift, edit_negative_prompt="", trained_sizes=("64x64",)).save(dest)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"bundled {src} -> {dest} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
