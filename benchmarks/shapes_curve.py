"""Shapes accuracy against training time: evaluate every exported model of one or more chained training runs.

    python benchmarks/shapes_curve.py runs/shapes-ar runs/shapes-ar2 --n 20 --edits 24 --plot docs/curve.png

Each RUN_DIR contributes its intermediate exports (``exports/step_N``, written with ``run.export_every``) and its
``final``. Runs are chained in the order given (a later run fine-tunes the previous one's ``final``): steps and
wall time add up. Wall time comes from ``metrics.jsonl`` (its clock restarts at each resume; the segments are
summed). Every model is sampled with the same settings: those of ``--settings`` (default: the bundled model's
``generation_config.json``), so the curve measures training, not tuning. Prints a markdown table; ``--json`` and
``--plot`` (a PNG line chart, drawn with Pillow) write the same numbers. ``--reuse`` takes the points of models
already scored in an earlier ``--json`` file (same settings, prompt counts, seed, size and ``--vae``) instead of
sampling them again, so adding a stage costs only its own models. Points are matched by model path: do not reuse
across a run directory trained again in place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from nextstep.config import SamplingConfig
from nextstep.data.shapes import CATEGORIES
from nextstep.eval.shapes import evaluate_pipeline
from nextstep.pipeline import NextStepPipeline, bundled_model_dir


def wall_time_per_step(run: Path) -> dict[int, float]:
    """{step: seconds of training up to that step} from a run's metrics.jsonl, resumed segments summed."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "time" in r and "step" in r]
    out, offset, last_t, last_step = {}, 0.0, 0.0, 0
    for r in rows:
        if r["time"] < last_t or r["step"] <= last_step:  # a new process (resume): its clock starts again
            offset += last_t
        last_t, last_step = r["time"], r["step"]
        out[r["step"]] = offset + r["time"]
    return out


def models_of(run: Path, last_step: int) -> list[tuple[int, Path]]:
    """(step within the run, model dir) of the exports and the final model (at ``last_step``), by step."""
    found = []
    for d in sorted((run / "exports").glob("step_*")):
        m = re.fullmatch(r"step_(\d+)", d.name)
        if m and (d / "config.json").is_file():
            found.append((int(m.group(1)), d))
    if (run / "final" / "config.json").is_file():
        found.append((last_step, run / "final"))
    return found


def score(model_dir: Path, settings: SamplingConfig, n: int, edits: int, seed: int, size: int,
          vae: Path | None = None) -> dict:
    pipe = NextStepPipeline.from_pretrained(model_dir, vae)
    pipe.defaults = settings
    res = evaluate_pipeline(pipe, n, seed, size=size, n_edits=edits, progress=False)
    return {"categories": res["categories"], "overall": res["overall"],
            "edit_success": res["edits"]["success"] if res["edits"] else None,
            "edit_psnr": res["edits"]["psnr_outside"] if res["edits"] else None}


def reusable_points(path: Path, settings: SamplingConfig, args: argparse.Namespace) -> dict[str, dict]:
    """{model dir: its scores} from an earlier --json file; an error if it was made with other settings."""
    old = json.loads(path.read_text())
    fields = ("settings", "n", "edits", "seed", "size", "vae")
    if any(f not in old for f in fields):
        sys.exit(f"{path} does not record {', '.join(f for f in fields if f not in old)}: drop --reuse")
    made = tuple(old[f] for f in fields)
    asked = (dataclasses.asdict(settings), args.n, args.edits, args.seed, args.size, args.vae and str(args.vae))
    if json.loads(json.dumps(made)) != json.loads(json.dumps(asked)):
        sys.exit(f"{path} was scored with other settings or prompt counts ({made}), not {asked}: "
                 "drop --reuse to score every model again")
    keys = ("categories", "overall", "edit_success", "edit_psnr")
    return {q["model"]: {k: q[k] for k in keys} for q in old["points"]}


def plot(points: list[dict], path: Path) -> None:
    """Accuracy (%) per category against training minutes, one coloured line each, with a legend."""
    series = {c: [(p["minutes"], p["categories"][c]) for p in points] for c in CATEGORIES}
    if points[0]["edit_success"] is not None:
        series["edits"] = [(p["minutes"], p["edit_success"]) for p in points]
    colors = [(220, 40, 40), (40, 80, 220), (40, 170, 60), (230, 150, 0), (150, 60, 200), (0, 160, 170), (0, 0, 0)]
    W, H, L, R, T, B = 720, 420, 50, 170, 20, 40
    img = Image.new("RGB", (W, H), "white")
    d, font = ImageDraw.Draw(img), ImageFont.load_default()
    xmax = max(p["minutes"] for p in points) or 1.0

    def xy(m, a):
        return L + (W - L - R) * m / xmax, H - B - (H - T - B) * a / 100

    for a in range(0, 101, 25):
        d.line([xy(0, a), xy(xmax, a)], fill=(225, 225, 225))
        d.text((8, xy(0, a)[1] - 6), f"{a}%", fill="black", font=font)
    d.line([xy(0, 0), xy(xmax, 0)], fill="black")
    d.line([xy(0, 0), xy(0, 100)], fill="black")
    tick = next(t for t in (15, 30, 60, 120, 240, 480, 10**9) if xmax / t <= 8)  # round minutes, <= 8 labels
    for m in range(0, int(xmax) + 1, tick):
        x, y = xy(m, 0)
        d.line([(x, y), (x, y + 3)], fill="black")
        d.text((x - 10, y + 6), str(m), fill="black", font=font)
    d.text((L + (W - L - R) // 2 - 60, H - 16), "training minutes", fill="black", font=font)
    for i, (name, pts) in enumerate(series.items()):
        c = colors[i % len(colors)]
        if len(pts) > 1:
            d.line([xy(*p) for p in pts], fill=c, width=2)
        for p in pts:
            x, y = xy(*p)
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
        d.line([(W - R + 15, T + 10 + 18 * i), (W - R + 35, T + 10 + 18 * i)], fill=c, width=3)
        d.text((W - R + 40, T + 4 + 18 * i), name, fill="black", font=font)
    img.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="training run directories, in training order")
    p.add_argument("--n", type=int, default=20, help="prompts per category")
    p.add_argument("--edits", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--settings", type=Path, default=None,
                   help="a model dir whose generation_config.json gives the sampling settings (default: bundled)")
    p.add_argument("--vae", type=Path, default=None, help="decode every model with this VAE (default: its vae/)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--reuse", type=Path, default=None, help="an earlier --json file whose points to keep")
    args = p.parse_args()
    settings = SamplingConfig.from_model_dir(args.settings or bundled_model_dir())
    known = reusable_points(args.reuse, settings, args) if args.reuse else {}
    points, step0, time0 = [], 0, 0.0
    for run in args.runs:
        times = wall_time_per_step(run)
        if not times:
            sys.exit(f"{run}: no metrics.jsonl records")
        for step, model_dir in models_of(run, max(times)):
            t = times.get(step, max(times.values()))
            r = known.get(str(model_dir))
            reused = " (reused)" if r else ""
            r = r or score(model_dir, settings, args.n, args.edits, args.seed, args.size, args.vae)
            points.append({"model": str(model_dir), "step": step0 + step, "minutes": (time0 + t) / 60, **r})
            print(f"{model_dir}: step {step0 + step}, {(time0 + t) / 60:.0f} min, overall {r['overall']:.1f}%{reused}",
                  file=sys.stderr, flush=True)
        step0, time0 = step0 + max(times), time0 + max(times.values())
    head = ["step", "minutes", *CATEGORIES, "edits", "PSNR out"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---:|" * len(head))
    for q in points:
        edits = "" if q["edit_success"] is None else f"{q['edit_success']:.0f}"
        psnr = "" if q["edit_psnr"] is None else f"{q['edit_psnr']:.1f}"
        cells = [str(q["step"]), f"{q['minutes']:.0f}", *(f"{q['categories'][c]:.0f}" for c in CATEGORIES), edits, psnr]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"settings": dataclasses.asdict(settings), "n": args.n, "edits": args.edits,
                                         "seed": args.seed, "size": args.size,
                                         "vae": args.vae and str(args.vae), "points": points}, indent=2))
    if args.plot and points:
        plot(points, args.plot)


if __name__ == "__main__":
    main()
