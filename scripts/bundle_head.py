"""Copy a distilled head into the bundled model (``nextstep/assets/model/fast``): ``fast=True`` / ``--fast`` then
use it with no ``--head``.

    python scripts/bundle_head.py runs/distill-head/final --steps 4

Weights are stored in bfloat16, like the bundled model's (they load into float32 heads). The head must have been
distilled from the bundled model (checked by its fingerprint). Prints the size of what is bundled.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import torch

from nextstep.model.distilled_head import DistilledHead
from nextstep.model.nextstep import NextStep
from nextstep.pipeline import FAST_HEAD_DIR, bundled_model_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("head_dir", help="a distilled head directory (OUT/final of `nextstep distill-head`)")
    p.add_argument("--steps", type=int, default=None, help="the head's default steps (one of its trained steps)")
    args = p.parse_args()
    model_dir = bundled_model_dir()
    if model_dir is None:
        raise SystemExit("no bundled model in this checkout")
    dest = model_dir / FAST_HEAD_DIR
    model = NextStep.from_pretrained(model_dir)  # the bare model: a stale fast/ head is not loaded with it
    head = DistilledHead.from_pretrained(args.head_dir, model)  # refuses a head of another model
    if args.steps is not None:
        if args.steps not in head.config.trained_steps:
            raise SystemExit(f"--steps {args.steps}: the head was trained for {list(head.config.trained_steps)} steps")
        head.config = dataclasses.replace(head.config, steps=args.steps)
    shutil.rmtree(dest, ignore_errors=True)
    head.to(torch.bfloat16).save_pretrained(dest)
    size = sum(f.stat().st_size for f in Path(dest).rglob("*") if f.is_file())
    print(f"bundled {args.head_dir} -> {dest} ({size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
