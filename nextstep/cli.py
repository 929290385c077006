"""Command line: ``nextstep generate`` and ``nextstep edit``, thin layers over ``NextStepPipeline``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .images import grid_image, save_png
from .pipeline import NextStepPipeline, bundled_model_dir
from .prompt import area_text
from .sampling.flow import NEXTSTEP_11_SAMPLERS, SAMPLERS
from .sampling.guidance import SCHEDULES
from .config import SamplingConfig, Settings
from .errors import TrainingError



def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like WIDTHxHEIGHT (e.g. 512x768), got {text!r}") from None
    return w, h


def _common(p: argparse.ArgumentParser, edit: bool) -> None:
    p.add_argument("-o", "--output", default="out.png", help="output PNG (with -n N: out_0.png ... + out_grid.png)")
    p.add_argument("-n", "--num-images", type=int, default=1, help="images to generate (default 1)")
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT, multiples of 16 "
                   + ("(default: the input image's size)" if edit else "(default: the model's native size)"))
    p.add_argument("--steps", type=int, default=None, help="flow steps per image token (default: the model's)")
    p.add_argument("--cfg", type=float, default=None,
                   help="text guidance scale (default: the model's; NextStep-1: 7.5)")
    if edit:
        p.add_argument("--image-cfg", type=float, default=None,
                       help="image guidance scale (default: the model's; NextStep-1-Edit: 2.0)")
    p.add_argument("--negative", default=None,
                   help="negative prompt" + (" (default: the model's, 'Copy original image.')" if edit else ""))
    p.add_argument("--shift", type=float, default=None,
                   help="time shift (default: the model's; NextStep-1: 1.0, 3.2 for edits)")
    p.add_argument("--schedule", default=None, choices=SCHEDULES, help="guidance schedule (default: the model's)")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                   help="default: the model's (NextStep-1: sde; NextStep-1.1: flow_sde)")
    p.add_argument("--noise-level", type=float, default=None,
                   help="noise level of the 1.1 samplers flow_sde and cps, in [0, 1] (default: the model's, 0.8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-token-norm", action="store_true", help="do not re-normalise sampled tokens")
    p.add_argument("--think", action="store_true", help="let the model write its thoughts before drawing")
    p.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    p.add_argument("--vae", default=None, help="VAE directory (default: the model's vae/)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--compile", action="store_true",
                   help="compile the per-token backbone step with torch.compile (pays off on large models/images)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextstep", description="NextStep-1 image generation and editing")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text to image")
    g.add_argument("prompt")
    _common(g, edit=False)
    e = sub.add_parser("edit", help="edit an image with an instruction")
    e.add_argument("image", help="input image file")
    e.add_argument("instruction")
    _common(e, edit=True)
    for name, what in (("train", "train the autoregressive model"), ("train-vae", "train the VAE tokenizer")):
        t = sub.add_parser(name, help=f"{what} (single process, or under torchrun for DDP / FSDP2)")
        t.add_argument("config", help="a JSON recipe (see configs/)")
        t.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
        t.add_argument("--out", default=None, help="override run.out_dir")
        t.add_argument("--steps", type=int, default=None, help="override run.steps")
        t.add_argument("--quiet", action="store_true", help="no progress bar")
    ev = sub.add_parser("eval", help="score a model on a benchmark")
    ev.add_argument("benchmark", choices=["shapes"])
    ev.add_argument("--n", type=int, default=100, help="prompts per category (default 100)")
    ev.add_argument("--edits", type=int, default=0, help="edit instructions to score (spread over the 6 types)")
    ev.add_argument("--seed", type=int, default=0, help="prompt-set and sampling seed")
    ev.add_argument("--size", type=int, default=64, help="image side in pixels")
    ev.add_argument("--batch", type=int, default=32, help="prompts per pipeline call")
    ev.add_argument("--steps", type=int, default=None)
    ev.add_argument("--cfg", type=float, default=None)
    ev.add_argument("--image-cfg", type=float, default=None)
    ev.add_argument("--shift", type=float, default=None)
    ev.add_argument("--sampler", default=None, choices=sorted(SAMPLERS))
    ev.add_argument("--json", default=None, help="write the results (without images) to this JSON file")
    ev.add_argument("--save-grid", default=None, help="write a PNG grid of generations with pass/fail marks")
    ev.add_argument("--model", default=None)
    ev.add_argument("--vae", default=None)
    ev.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ev.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--quiet", action="store_true")
    sv = sub.add_parser("serve", help="web page + OpenAI-compatible images API with live previews")
    sv.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    sv.add_argument("--vae", default=None)
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback: there is no auth)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--device", default=None)
    sv.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    t = sub.add_parser("make-tokenizer", help="train a small byte-level BPE with the image protocol's tokens")
    t.add_argument("out", help="output directory (tokenizer.json)")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--texts", help="a text file, one caption per line")
    src.add_argument("--shapes", type=int, metavar="N", help="use N captions/instructions of the shapes world")
    t.add_argument("--vocab", type=int, default=512)
    return parser


def run_eval(args) -> list[Path]:
    from .eval.shapes import evaluate_pipeline, format_table, save_grid

    results = evaluate_pipeline(load_pipeline(args), args.n, args.seed, size=args.size, n_edits=args.edits,
                                batch_size=args.batch, progress=not args.quiet, image_guidance_scale=args.image_cfg,
                                num_inference_steps=args.steps, guidance_scale=args.cfg, time_shift=args.shift,
                                sampler=args.sampler)
    print(format_table(results))
    written = []
    if args.json:
        slim = {k: v for k, v in results.items() if k not in ("images", "sources")}
        Path(args.json).write_text(json.dumps(slim, indent=2, default=str))
        written.append(Path(args.json))
    if args.save_grid:
        save_grid(results["records"], results["images"], args.save_grid, sources=results["sources"])
        written.append(Path(args.save_grid))
    return written


def make_tokenizer(args) -> list[Path]:
    from .tokenizer import train_tokenizer

    if args.texts:
        path = Path(args.texts)
        if not path.is_file():
            raise FileNotFoundError(f"text file not found: {path}")
        texts = [line for line in path.read_text().splitlines() if line.strip()]
    else:
        from .data.shapes import ShapesDataset

        ds = ShapesDataset(args.shapes, seed=0)
        texts = [s.get("caption", s.get("instruction", "")) for s in (ds[i] for i in range(len(ds)))]
    if not texts:
        raise ValueError("no texts to train the tokenizer on")
    areas = [area_text((h, w)) for h in range(1, 65) for w in range(1, 65)]  # so every grid's area is few tokens
    tok = train_tokenizer(texts + areas, args.vocab)
    tok.save_pretrained(args.out)
    return [Path(args.out) / "tokenizer.json"]


def run_training(args) -> list[Path]:
    from .train.config import TrainConfig, VAETrainConfig, load_recipe
    from .train.distributed import init_from_env, shutdown

    cls = TrainConfig if args.command == "train" else VAETrainConfig
    cfg = load_recipe(args.config, cls)
    if args.out:
        cfg.run.out_dir = args.out
    if args.steps:
        cfg.run.steps = args.steps
    info = init_from_env()
    try:
        if args.command == "train":
            from .train.ar import train
        else:
            from .train.vae import train
        return [train(cfg, resume=args.resume, info=info, progress=not args.quiet)]
    finally:
        shutdown()


def load_pipeline(args) -> NextStepPipeline:
    model_dir = args.model or bundled_model_dir()
    if model_dir is None:
        raise SystemExit("nextstep: no bundled model in this installation; pass --model DIR (a NextStep checkpoint "
                         "directory) and --vae DIR (its tokenizer VAE) if the model has no vae/ subdirectory")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    return NextStepPipeline.from_pretrained(model_dir, args.vae, dtype=dtype, device=args.device)


def describe(s: Settings, edit: bool) -> str:
    """One line with the sampling settings a run uses (the model's defaults merged with the options given)."""
    sampler = f"{s.sampler} (noise level {s.noise_level:g})" if s.sampler in NEXTSTEP_11_SAMPLERS else s.sampler
    guidance = f"{s.guidance_scale:g}" + (f" text / {s.image_guidance_scale:g} image" if edit else "")
    return (f"sampler {sampler}, {s.num_inference_steps} steps, guidance {guidance} ({s.guidance_schedule}), "
            f"shift {s.time_shift:g}, token norm {'on' if s.token_norm else 'off'}"
            + (f", negative prompt {s.negative_prompt!r}" if s.negative_prompt else ""))


def output_paths(output: str, n: int) -> tuple[list[Path], Path | None]:
    out = Path(output)
    if out.suffix.lower() != ".png":
        raise SystemExit(f"nextstep: output must be a .png file, got {output}")
    if n == 1:
        return [out], None
    return [out.with_name(f"{out.stem}_{i}.png") for i in range(n)], out.with_name(f"{out.stem}_grid.png")


def run(args) -> list[Path]:
    if args.num_images < 1:
        raise SystemExit("nextstep: -n must be >= 1")
    paths, grid_path = output_paths(args.output, args.num_images)
    if args.command == "edit" and not Path(args.image).is_file():
        raise SystemExit(f"nextstep: input image not found: {args.image}")
    edit = args.command == "edit"
    settings = dict(negative_prompt=args.negative, guidance_scale=args.cfg, guidance_schedule=args.schedule,
                    time_shift=args.shift, token_norm=False if args.no_token_norm else None, sampler=args.sampler,
                    num_inference_steps=args.steps, image_guidance_scale=args.image_cfg if edit else None,
                    noise_level=args.noise_level)
    model_dir = args.model or bundled_model_dir()
    if model_dir is not None:  # bad settings fail here, before minutes of loading a large model
        in_force = SamplingConfig.from_model_dir(model_dir).resolve(edit, **settings)
        if not args.quiet:
            print(f"nextstep: {describe(in_force, edit)}", file=sys.stderr)
    pipe = load_pipeline(args)
    if args.compile:
        pipe.compile()
    width, height = args.size if args.size else (None, None)
    kwargs = dict(height=height, width=width, num_images_per_prompt=args.num_images, think=args.think,
                  generator=torch.Generator().manual_seed(args.seed), progress=not args.quiet, **settings)
    if edit:
        out = pipe(args.instruction, image=args.image, **kwargs)
    else:
        out = pipe(args.prompt, **kwargs)
    for im, path in zip(out.images, paths):
        save_png(im, path)
    written = list(paths)
    if grid_path is not None:
        save_png(grid_image(out.images), grid_path)
        written.append(grid_path)
    if out.thoughts:
        print(f"thoughts: {out.thoughts[0]}")
    return written


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("train", "train-vae"):
            written = run_training(args)
        elif args.command == "serve":
            try:
                from .serve.runner import serve
            except ImportError as e:
                raise SystemExit(f"nextstep serve needs the serve extra: pip install 'nextstep[serve]' ({e})")
            serve(args.model, args.vae, host=args.host, port=args.port, device=args.device, dtype=args.dtype)
            written = []
        elif args.command == "eval":
            written = run_eval(args)
        elif args.command == "make-tokenizer":
            written = make_tokenizer(args)
        else:
            written = run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, TrainingError) as e:
        print(f"nextstep: error: {e}", file=sys.stderr)
        return 2
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
