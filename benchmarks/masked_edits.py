"""Masked editing on the shapes edit set: does a mask over the edited object keep the rest of the image exactly,
without losing edits?

    python benchmarks/masked_edits.py --edits 120

For each edit of ``edit_set(n, seed, size)`` the mask covers the edited object's box: the union of its box before
and after the edit (``source_bbox``, ``target_bbox``; remove: before, add: where the target puts it), and for a
background change every pixel but the objects' own. ``--round tokens`` (default) rounds each box out to 16-pixel
token boundaries, ``--round none`` keeps the pixel boxes. ``--margin`` is the pipeline's ``mask_margin`` (tokens
generated around the mask; default the library's ``MASK_MARGIN``). Each batch of edits runs twice with the same seed,
unmasked and masked (masked tokens draw the noise an unmasked run gives them, so the pair differs only by the kept
tokens and the composite). Printed per edit type and overall: success (the evaluator's ``check_edit``), the
evaluator's PSNR outside its edited region (its boxes grown by 5%), PSNR outside the mask, and per feather width (the
composite's weight ramping up over that many pixels inside the mask instead of a hard edge; the library uses 0) the
success and the PSNR against the ground-truth target inside the mask. PSNR of identical pixels counts as 100 dB.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from nextstep.data.shapes.dataset import _STREAM_EDITS, _rng, edit_set
from nextstep.data.shapes.edits import EDIT_TYPES, generate_edit
from nextstep.data.shapes.scene import object_mask, render
from nextstep.eval.shapes.analysis import analyze
from nextstep.eval.shapes.runner import _mean_psnr
from nextstep.eval.shapes.scoring import _check_edit, _psnr_where
from nextstep.images import to_pil, to_unit
from nextstep.pipeline import MASK_MARGIN, NextStepPipeline

TOKEN = 16  # pixels per token side (f8 VAE, 2x2 patches)
FEATHERS = (0, 2, 4)


def edit_region(edit_type: str, spec: dict, source_scene, side: int, round_to: int) -> np.ndarray:
    """(side, side) bool: where the edit may change the image."""
    if edit_type == "background":  # the background changes: every pixel but the objects' own (never rounded)
        return ~np.logical_or.reduce([object_mask(o, side) for o in source_scene.objects])
    boxes = [b for b in (spec["source_bbox"], spec["target_bbox"]) if b is not None]
    region = np.zeros((side, side), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        if round_to > 1:
            x0, y0 = x0 // round_to * round_to, y0 // round_to * round_to
            x1, y1 = -(-x1 // round_to) * round_to, -(-y1 // round_to) * round_to
        region[y0:y1, x0:x1] = True
    return region


def rgba_mask(region: np.ndarray) -> Image.Image:
    """OpenAI's convention: alpha 0 where to edit, 255 elsewhere."""
    alpha = np.where(region, 0, 255).astype(np.uint8)
    return Image.fromarray(np.dstack([np.zeros((*region.shape, 3), np.uint8), alpha]), "RGBA")


def feather_weight(region: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, W) bool -> (B, 1, H, W) weight of the generated pixels: 0 outside the mask, rising linearly to 1 over
    ``width`` pixels inside it (Chebyshev distance to the nearest pixel outside; the image border is not an edge)."""
    outside = (~region)[:, None].float()
    inside = torch.ones_like(outside)
    for r in range(1, width + 1):  # pixels at least r + 1 away from outside
        inside += 1 - F.max_pool2d(outside, 2 * r + 1, stride=1, padding=r)
    return (inside * region[:, None] / (width + 1)).clamp(max=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edits", type=int, default=120, help="edits (edit types in turn)")
    p.add_argument("--seed", type=int, default=0, help="edit set and sampling seed")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=12, help="edits per pipeline call")
    p.add_argument("--round", choices=("tokens", "none"), default="tokens",
                   help="round the mask boxes out to token boundaries (default) or keep the pixel boxes")
    p.add_argument("--margin", type=int, default=MASK_MARGIN, help="tokens generated around the mask (pipeline's "
                   "mask_margin; default the library's)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = NextStepPipeline.from_pretrained()
    cases = edit_set(args.edits, args.seed, args.size)
    rows: list[dict] = []
    seconds = {"unmasked": 0.0, "masked": 0.0}
    for start in range(0, len(cases), args.batch):
        idx = list(range(start, min(start + args.batch, len(cases))))
        truth = [generate_edit(EDIT_TYPES[i % len(EDIT_TYPES)], _rng(args.seed, _STREAM_EDITS, i), args.size)
                 for i in idx]
        assert all(t[1] == cases[i][1] for t, i in zip(truth, idx)), "edit_set drew other edits than generate_edit"
        sources, instructions = [cases[i][0] for i in idx], [cases[i][1] for i in idx]
        regions = [edit_region(cases[i][2]["edit"], cases[i][2], t[0], args.size, TOKEN if args.round == "tokens"
                               else 1) for i, t in zip(idx, truth)]
        outs = {}
        for name, mask in (("unmasked", None), ("masked", [rgba_mask(r) for r in regions])):
            t0 = time.perf_counter()
            outs[name] = pipe._generate(instructions, image=sources, mask=mask, generator=torch.Generator().manual_seed(
                args.seed + start), progress=False, output_type="pt", mask_margin=args.margin)
            seconds[name] += time.perf_counter() - t0
        with torch.no_grad():
            raw = pipe.decode(outs["masked"].tokens, outs["masked"].grid)  # before the composite
        src = torch.stack([torch.from_numpy(np.asarray(s, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1
                           for s in sources])
        region_t = torch.from_numpy(np.stack(regions))
        for j, i in enumerate(idx):
            spec, target = cases[i][2], np.asarray(render(truth[j][2]))
            src_arr = np.asarray(sources[j])
            row = {"type": spec["edit"]}
            for name in ("unmasked", "masked"):
                out = to_pil(outs[name].images[j:j + 1])[0]
                ok, psnr_eval = _check_edit(spec, sources[j], out, analyze(out))
                row[name] = (ok, psnr_eval, _psnr_where(src_arr, np.asarray(out), ~regions[j]))
            for f in FEATHERS:
                w = feather_weight(region_t[j:j + 1], f)
                out = to_pil(to_unit(w * raw[j:j + 1] + (1 - w) * src[j:j + 1]))[0]
                ok, _ = _check_edit(spec, sources[j], out, analyze(out))
                row[f"feather{f}"] = (ok, _psnr_where(target, np.asarray(out), regions[j]))
            rows.append(row)
    report(rows, seconds, args)


def report(rows: list[dict], seconds: dict, args) -> None:
    def pct(flags):
        return 100.0 * np.mean(flags)

    print(f"{len(rows)} edits, seed {args.seed}, {args.size}px, masks: object boxes"
          f"{' rounded out to tokens' if args.round == 'tokens' else ' (pixels)'}, margin {args.margin} token(s); "
          f"bundled model, defaults")
    head = ["edit", "n", "success unmasked", "success masked", "eval PSNR out unmasked", "eval PSNR out masked",
            "PSNR out-of-mask unmasked", "PSNR out-of-mask masked",
            *[f"feather {f}: success / PSNR in mask vs target" for f in FEATHERS]]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for t in (*EDIT_TYPES, "all"):
        rs = [r for r in rows if t in ("all", r["type"])]
        if not rs:
            continue
        cells = [t, str(len(rs))]
        cells += [f"{pct([r[k][0] for r in rs]):.1f}" for k in ("unmasked", "masked")]
        cells += [f"{_mean_psnr([r[k][1] for r in rs]):.1f}" for k in ("unmasked", "masked")]
        cells += [f"{_mean_psnr([r[k][2] for r in rs]):.1f}" for k in ("unmasked", "masked")]
        cells += [f"{pct([r[f'feather{f}'][0] for r in rs]):.1f} / {_mean_psnr([r[f'feather{f}'][1] for r in rs]):.1f}"
                  for f in FEATHERS]
        print("| " + " | ".join(cells) + " |")
    exact = sum(r["masked"][2] == float("inf") for r in rows)
    print(f"outside the mask identical to the input in {exact}/{len(rows)} masked edits; seconds per edit "
          f"(batches of {args.batch}): unmasked {seconds['unmasked'] / len(rows):.3f}, masked "
          f"{seconds['masked'] / len(rows):.3f}")


if __name__ == "__main__":
    main()
