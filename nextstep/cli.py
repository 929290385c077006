"""Command line: ``nextstep generate``, ``edit``, ``generate-many``, ``info`` and the rest, thin layers over the
Python API."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from . import hub
from .config import SamplingConfig
from .data.shapes.scene import CONCEPT_SHAPES
from .errors import (
    DataError,
    InputError,
    MissingFileError,
    NextStepError,
    NextStepWarning,
    SettingError,
    UsageError,
    WriteError,
)
from .generate_many import LAYOUTS
from .images import grid_image, load_mask, save_pngs
from .pipeline import FAST_HEAD_DIR, NextStepPipeline, bundled_model_dir
from .prompt import area_text, require_prompt
from .sampling.flow import DISTILLED, NEXTSTEP_11_SAMPLERS
from .settings import SPECS, Settings

MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes
MAX_IMAGES_PER_CALL = 8  # -n is drawn in pipeline calls of at most this many images (written as done, sheet aside)
MAX_GRID_IMAGES = 64  # -n up to this also writes a grid sheet (and all its files at once); beyond, the images only
# the pipeline's argument names -> this CLI's flags, so errors speak the user's words
FLAGS = {**{s.name: s.flag for s in SPECS if s.flag}, "num_images_per_prompt": "-n", "height": "--size height",
         "width": "--size width"}


def cli_words(e: InputError) -> str:
    if isinstance(e, SettingError):  # only the setting's name, not the words of its problem
        return f"{FLAGS.get(e.field, e.field)} {e.problem}"
    return re.sub(r"\b(" + "|".join(FLAGS) + r")\b", lambda m: FLAGS[m.group(1)], str(e))


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like WIDTHxHEIGHT (e.g. 512x768), got {text!r}") from None
    return w, h


def _common(p: argparse.ArgumentParser, edit: bool) -> None:
    p.add_argument("-o", "--output", default="out.png",
                   help="output PNG (default out.png; with -n N: out_0.png ... + out_grid.png)")
    p.add_argument("-n", "--num-images", type=int, default=1, help="images to generate (default 1)")
    _sampling_flags(p, edit)
    p.add_argument("--think", action="store_true", help="let the model write its thoughts before drawing")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallelism: split the model over N processes started with torchrun "
                        "--nproc_per_node N (default 1)")
    _loading_flags(p)


def _sampling_flags(p: argparse.ArgumentParser, edit: bool) -> None:
    p.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT, multiples of 16 "
                   + ("(default: the input image's size)" if edit else "(default: the model's native size)"))
    _setting_flags(p, edit)
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed, the same image (default 0)")
    _fast_flag(p)


def _setting_flags(p: argparse.ArgumentParser, edit: bool) -> None:
    """A flag per sampling setting (``nextstep.settings``), None unless given: the model's default."""
    for s in SPECS:
        if s.flag is None or s.edit_only and not edit:
            continue
        kind = dict(action=argparse.BooleanOptionalAction) if s.type is bool else dict(type=s.type, choices=s.choices)
        bounds = f", in {s.interval}" if s.hi is not None else ""
        p.add_argument(s.flag, dest=s.name, default=None, help=f"{s.help}{bounds} (default: the model's)", **kind)


def _fast_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fast", action="store_true",
                   help="sample with the distilled few-step head (the model's fast/ head, or --head DIR): one "
                        "head call per token over the guidance branches it reads, its own steps (default: the "
                        "head's; --steps 1 to 4), the guidance it was distilled for")


def _loading_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    p.add_argument("--vae", default=None, help="VAE directory (default: the model's vae/)")
    p.add_argument("--head", default=None, metavar="DIR",
                   help="a distilled head for --fast (default: the model's fast/ subdirectory)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda where available, else cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--compile", action="store_true",
                   help="compile the per-token backbone step with torch.compile (for GPUs: on a CPU the eager "
                        "step is faster)")
    p.add_argument("--quantize", default=None, choices=["int8", "fp8"],
                   help="weight-only quantization of the model's linear layers while loading (default: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _lora_flag(p)


def _lora_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", default=[], metavar="DIR[:SCALE]",
                   help="a LoRA adapter of the model (nextstep train with a lora section), at SCALE (default 1); "
                        "repeatable: the adapters add up")


def lora_specs(args) -> list[tuple[Path, float]]:
    """--lora DIR[:SCALE] flags, each directory checked before the model loads."""
    from .lora import parse_spec

    specs = []
    for text in getattr(args, "lora", []):
        path, scale = parse_spec(text)
        if not Path(path).is_dir():
            raise InputError(f"--lora {text}: no such adapter directory {path!r}")
        specs.append((Path(path), scale))
    return specs


def named_loras(flags: list[str]) -> dict[str, str]:
    """serve's --lora NAME=DIR flags -> {NAME: DIR}."""
    out = {}
    for text in flags:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--lora {text!r}: expected NAME=DIR")
        if name in out:
            raise InputError(f"--lora {name}: the name is given twice")
        out[name] = path
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextstep", description="NextStep-1 image generation and editing")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="text to image")
    g.add_argument("prompt", help="what to draw")
    _common(g, edit=False)
    m = sub.add_parser("generate-many", help="images for a file of prompts (a benchmark), resumable, data parallel "
                                             "under torchrun")
    m.add_argument("prompts", help="a .txt file (one prompt per line) or a .jsonl file (objects with a 'prompt' key; "
                                   "GenEval's evaluation_metadata.jsonl)")
    m.add_argument("--out", required=True, help="output directory (run again with the same arguments to resume)")
    m.add_argument("-n", "--num-images", type=int, default=4, help="images per prompt (default 4)")
    m.add_argument("--batch", type=int, default=1,
                   help="prompts per pipeline call (default 1); part of a run's identity, since batched rows round "
                        "differently")
    m.add_argument("--layout", default="flat", choices=LAYOUTS,
                   help="flat: images/<i>_<k>.png; geneval: <i>/metadata.jsonl + <i>/samples/<k>.png (default flat)")
    _sampling_flags(m, edit=False)
    _loading_flags(m)
    e = sub.add_parser("edit", help="edit an image with an instruction")
    e.add_argument("image", help="input image file")
    e.add_argument("instruction", help="what to change in the image")
    e.add_argument("--mask", default=None, metavar="FILE",
                   help="edit only where this PNG, the input image's size, is fully transparent (alpha 0; OpenAI's "
                        "convention): the rest of the output is the input's pixels")
    _common(e, edit=True)
    for name, what in (("train", "train the autoregressive model"), ("train-vae", "train the VAE tokenizer"),
                       ("distill-head", "distill the flow head into a few-step head (guidance included)"),
                       ("train-rl", "post-train a model with GRPO on scored samples of its own"),
                       ("train-reread", "train parallel decoding's correction of the state after a draft")):
        t = sub.add_parser(name, help=f"{what} (single process, or under torchrun for DDP / FSDP2)")
        t.add_argument("config", help="a JSON recipe (see configs/)")
        t.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
        t.add_argument("--out", default=None, help="override run.out_dir")
        t.add_argument("--steps", type=int, default=None, help="override run.steps")
        t.add_argument("--quiet", action="store_true", help="no progress bar")
    ev = sub.add_parser("eval", help="score a model on a benchmark")
    ev.add_argument("benchmark", choices=["shapes"], help="shapes: the bundled shapes world's GenEval-style scorer")
    ev.add_argument("--n", type=int, default=100, help="prompts per category (default 100)")
    ev.add_argument("--edits", type=int, default=0,
                    help="edit instructions to score, spread over the 6 types (default 0: text-to-image only)")
    ev.add_argument("--seed", type=int, default=0, help="prompt-set and sampling seed")
    ev.add_argument("--size", type=int, default=64, help="image side in pixels")
    ev.add_argument("--batch", type=int, default=32, help="prompts per pipeline call")
    ev.add_argument("--concept", default=None, choices=CONCEPT_SHAPES,
                    help="score prompts naming this shape the default shapes world never draws (--n per category)")
    _setting_flags(ev, edit=True)
    _fast_flag(ev)
    ev.add_argument("--head", default=None, metavar="DIR", help="a distilled head for --fast (default: the model's)")
    ev.add_argument("--json", default=None, help="write the results (without images) to this JSON file")
    ev.add_argument("--save-grid", default=None, help="write a PNG grid of generations with pass/fail marks")
    ev.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    ev.add_argument("--vae", default=None, help="VAE directory (default: the model's vae/)")
    ev.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="default: cuda where available, else cpu")
    ev.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on GPU, float32 on CPU")
    ev.add_argument("--quantize", default=None, choices=["int8", "fp8"], help="weight-only quantization of the model")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    _lora_flag(ev)
    sv = sub.add_parser("serve", help="web page + OpenAI-compatible images API with live previews")
    sv.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    sv.add_argument("--vae", default=None, help="VAE directory (default: the model's vae/)")
    sv.add_argument("--host", default="127.0.0.1",
                    help="bind address (default: loopback only; any other needs --api-key or --public-without-key)")
    sv.add_argument("--port", type=int, default=8000, help="default 8000")
    sv.add_argument("--device", default=None, help="default: cuda where available, else cpu")
    sv.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on GPU, float32 on CPU")
    sv.add_argument("--head", default=None, metavar="DIR",
                    help="a distilled head for requests with \"fast\": true (default: the model's fast/, if any)")
    sv.add_argument("--api-key", default=None, metavar="KEY",
                    help="clients must send 'Authorization: Bearer KEY' (default: $NEXTSTEP_API_KEY, else none; the "
                         "variable keeps the key out of the process list)")
    sv.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                    help="let web pages on ORIGIN (e.g. https://app.example:8443) call the API, and accept its host "
                         "name as this server's; repeatable")
    sv.add_argument("--public-without-key", action="store_true",
                    help="allow binding beyond loopback with no API key (only on a network you trust)")
    sv.add_argument("--tp", type=int, default=1, metavar="N",
                    help="tensor parallelism: split the model over N processes started with torchrun "
                         "--nproc_per_node N; rank 0 serves (default 1)")
    sv.add_argument("--reproducible", action="store_true",
                    help="one fixed layout per batched call (filled up to the batch limit, prompts padded to fixed "
                         "token steps: serve.limits MAX_BATCH, PROMPT_BUCKET): a request's images are bit for bit the "
                         "same whatever it is batched with; a request alone then costs a full batch")
    sv.add_argument("--lora", action="append", default=[], metavar="NAME=DIR",
                    help="load the LoRA adapter in DIR under NAME; a request picks it with \"lora\": \"NAME\" "
                         "(default: the base model); repeatable")
    i = sub.add_parser("info", help="parameters, weight and KV-cache memory, largest image: from config.json and "
                                    "file headers, no weights read")
    i.add_argument("model_dir", nargs="?", default=None, help="model directory or hub id (default: the bundled model)")
    i.add_argument("--vae", default=None, help="VAE directory (default: the model's vae/)")
    i.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the KV-cache figures (default bfloat16)")
    i.add_argument("--prompt", default=None, help="the prompt for the KV-cache and largest-image figures "
                                                   "(default: a typical 17-word prompt)")
    i.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="instead: the memory plan of LoRA training at rank R (see docs/lora.md, Memory plan)")
    i.add_argument("--lora-targets", default="attn,mlp", help="LoRA target groups, comma-separated (default attn,mlp)")
    i.add_argument("--train-size", default="512x512", metavar="HxW", help="LoRA training image size (default 512x512)")
    i.add_argument("--batch", type=int, default=1, help="LoRA training images per step (default 1)")
    i.add_argument("--quantize", default=None, choices=["int8", "fp8"], help="LoRA training: the frozen base's weights")
    i.add_argument("--checkpointing", action="store_true", help="LoRA training with activation checkpointing")
    i.add_argument("--preset", default=None, help="LoRA training: a nextstep.config preset (nextstep-1-large) instead "
                                                  "of a model directory")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    t = sub.add_parser("make-tokenizer", help="train a small byte-level BPE with the image protocol's tokens")
    t.add_argument("out", help="output directory (tokenizer.json)")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--texts", help="a text file, one caption per line")
    src.add_argument("--shapes", type=int, metavar="N", help="use N captions/instructions of the shapes world")
    t.add_argument("--vocab", type=int, default=512, help="vocabulary size (default 512)")
    return parser


def run_eval(args) -> list[Path]:
    from .eval.shapes import evaluate_pipeline, format_table, save_grid

    for flag, v, least in (("--n", args.n, 0), ("--edits", args.edits, 0), ("--batch", args.batch, 1),
                           ("--size", args.size, 16)):
        if v < least:
            raise UsageError(f"{flag} must be >= {least}, got {v}")
    if args.n == 0 and args.edits == 0:
        raise UsageError("nothing to score: --n 0 and --edits 0 (give --n N prompts per category, --edits N edits, "
                         "or both)")
    settings = sampling_overrides(args)
    results = evaluate_pipeline(load_pipeline(args), args.n, args.seed, size=args.size, n_edits=args.edits,
                                batch_size=args.batch, progress=not args.quiet,
                                image_guidance_scale=settings.pop("image_guidance_scale"), concept=args.concept,
                                **settings,
                                **({"fast": True} if args.fast else {}))
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
            raise MissingFileError(f"text file not found: {path}")
        texts = [line for line in path.read_text().splitlines() if line.strip()]
    else:
        from .data.shapes import ShapesDataset

        ds = ShapesDataset(args.shapes, seed=0)
        texts = [s.get("caption", s.get("instruction", "")) for s in (ds[i] for i in range(len(ds)))]
    if not texts:
        raise DataError("no texts to train the tokenizer on")
    areas = [area_text((h, w)) for h in range(1, 65) for w in range(1, 65)]  # so every grid's area is few tokens
    tok = train_tokenizer(texts + areas, args.vocab)
    tok.save_pretrained(args.out)
    return [Path(args.out) / "tokenizer.json"]


def run_training(args) -> list[Path]:
    from .rl.config import RLConfig
    from .train.config import DistillConfig, RereadConfig, TrainConfig, VAETrainConfig, load_recipe
    from .train.distributed import init_from_env, shutdown

    cls = {"train": TrainConfig, "train-vae": VAETrainConfig, "distill-head": DistillConfig,
           "train-rl": RLConfig, "train-reread": RereadConfig}[args.command]
    cfg = load_recipe(args.config, cls)
    if args.out:
        cfg.run.out_dir = args.out
    if args.steps:
        cfg.run.steps = args.steps
    info = init_from_env()
    try:
        if args.command == "train":
            from .train.ar import train
        elif args.command == "distill-head":
            from .train.distill import distill as train
        elif args.command == "train-rl":
            from .rl.trainer import train_rl as train
        elif args.command == "train-reread":
            from .train.reread import train_reread as train
        else:
            from .train.vae import train
        return [train(cfg, resume=args.resume, info=info, progress=not args.quiet)]
    finally:
        shutdown()


def model_path(args) -> Path:
    """--model as a directory (a hub id is fetched into or read from the hub cache), else the bundled model."""
    if args.model:
        return hub.resolve(args.model)
    bundled = bundled_model_dir()
    if bundled is None:
        raise UsageError("no bundled model in this installation; pass --model DIR (a NextStep checkpoint directory or "
                         "a Hugging Face Hub id) and --vae DIR if the model has no vae/ subdirectory")
    return bundled


def pick_device(name: str) -> torch.device:
    """--device, checked against what this machine has (a clear error instead of a CUDA stack trace)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device name (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {name}: no CUDA GPU is visible to torch {torch.__version__}; use --device cpu")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: supported device types are cpu, cuda and mps")
    return device


def dtype_name(args, device: torch.device) -> str:
    return args.dtype or ("bfloat16" if device.type == "cuda" else "float32")


def load_pipeline(args, model_dir: Path | None = None, device: torch.device | None = None,
                  tp_mesh=None) -> NextStepPipeline:
    device = device or pick_device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name(args, device)]
    vae = hub.resolve(args.vae, "VAE") if args.vae else None
    return NextStepPipeline.from_pretrained(model_dir or model_path(args), vae, dtype=dtype, device=device,
                                            quantize=args.quantize, tp_mesh=tp_mesh, head=getattr(args, "head", None),
                                            lora=lora_specs(args) or None)


def settings_in_force(args, model_dir: Path, edit: bool) -> Settings:
    """The settings a run will use, checked before the model loads: the model's defaults under the flags, or with
    --fast the distilled head's (its config is read, not its weights)."""
    defaults = SamplingConfig.from_model_dir(model_dir)
    overrides = sampling_overrides(args)
    if not args.fast:
        return defaults.resolve(edit, **overrides)
    from .model.distilled_head import DistilledHeadConfig

    head = Path(args.head) if args.head else model_dir / FAST_HEAD_DIR
    if not head.is_dir():
        raise UsageError(f"--fast needs a distilled head: {head} does not exist (pass --head DIR, or make one with "
                         f"`nextstep distill-head`)")
    return DistilledHeadConfig.read(head).settings(defaults, edit, **overrides)


def tensor_parallel_setup(args, device: torch.device):
    """--tp N: join torchrun's N processes -> (DistInfo, 1-D mesh, this rank's device); (None, None, device)
    without it."""
    if args.tp < 1:
        raise UsageError(f"--tp must be >= 1, got {args.tp}")
    if args.tp == 1:
        return None, None, device
    if args.quantize or args.compile or args.fast:
        raise UsageError("--tp cannot be combined with --quantize, --compile or --fast (not supported yet)")
    from .parallel import join_tensor_parallel

    return join_tensor_parallel(args.tp, device)


def describe(s: Settings, edit: bool) -> str:
    """One line with the sampling settings a run uses (the model's defaults merged with the options given)."""
    sampler = f"{s.sampler} (noise level {s.noise_level:g})" if s.sampler in NEXTSTEP_11_SAMPLERS else s.sampler
    guidance = f"{s.guidance_scale:g}" + (f" text / {s.image_guidance_scale:g} image" if edit else "")
    return (f"sampler {sampler}, {s.num_inference_steps} steps, guidance {guidance} ({s.guidance_schedule}), "
            f"shift {s.time_shift:g}, token norm {'on' if s.token_norm else 'off'}"
            + (f", negative prompt {s.negative_prompt!r}" if s.negative_prompt else "")
            + (f", {s.parallel} image tokens per forward" if s.parallel > 1 else ""))


def output_paths(output: str, n: int) -> tuple[Callable[[int], Path], Path | None]:
    """The files a run writes (image ``i``'s path, and the grid sheet or None), checked before anything is generated:
    a .png path whose directory exists (or can be made) and is writable, and that is not itself a directory."""
    out = Path(output)
    if out.suffix.lower() != ".png":
        raise UsageError(f"-o must name a .png file, got {output}")

    def image_path(i: int) -> Path:
        return out if n == 1 else out.with_name(f"{out.stem}_{i}.png")

    grid = out.with_name(f"{out.stem}_grid.png") if 1 < n <= MAX_GRID_IMAGES else None
    for p in [image_path(i) for i in range(min(n, MAX_GRID_IMAGES))] + ([grid] if grid else []):
        if p.is_dir():
            raise UsageError(f"-o {output}: {p} is a directory")
    parent = out.parent.resolve()
    existing = next(d for d in (parent, *parent.parents) if d.exists())
    if not existing.is_dir():
        raise UsageError(f"-o {output}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"-o {output}: cannot write in {existing}")
    try:  # access() trusts the mode bits; a file made and removed is what the write will meet (e.g. /sys as root)
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".tmp-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"-o {output}: cannot write in {existing} ({e.strerror or e})") from None
    return image_path, grid


class Interrupted(KeyboardInterrupt):
    """Ctrl-C after some images of a chunked run were written: the message says which are kept."""


def check_input_image(path: str) -> None:
    if Path(path).is_dir():
        raise UsageError(f"the input image {path} is a directory: name an image file in it")
    if not Path(path).is_file():
        raise UsageError(f"input image not found: {path}")


def check_mask(path: str, image: str) -> None:
    """--mask read and checked against the input image before the model loads (the pipeline checks it again, and
    reports an unreadable input image)."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise UsageError(f"--mask {path}: not found" + (" (a directory)" if Path(path).is_dir() else ""))
    edit = load_mask(path)
    try:
        with Image.open(image) as im:
            size = im.size
    except (UnidentifiedImageError, OSError):
        return
    if (edit.shape[1], edit.shape[0]) != size:
        raise UsageError(f"--mask {path} is {edit.shape[1]}x{edit.shape[0]} but the input image is {size[0]}x{size[1]}"
                         f": the mask must have the input image's size")


def run(args) -> list[Path]:
    if args.num_images < 1:
        raise UsageError(f"-n must be >= 1, got {args.num_images}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be an integer from 0 to 2**64 - 1, got {args.seed}")
    image_path, grid_path = output_paths(args.output, args.num_images)
    edit = args.command == "edit"
    require_prompt(args.instruction if edit else args.prompt, "instruction" if edit else "prompt")
    if edit:
        check_input_image(args.image)
        if args.mask is not None:
            check_mask(args.mask, args.image)
    device = pick_device(args.device)
    settings = {**sampling_overrides(args), **({"fast": True} if args.fast else {})}
    model_dir = model_path(args)
    in_force = settings_in_force(args, model_dir, edit)  # bad settings fail before loading
    info, mesh, device = tensor_parallel_setup(args, device)
    main = info is None or info.is_main  # under --tp every rank draws the same images: the first speaks and saves
    written: list[Path] = []
    try:
        if main and not args.quiet:
            print(f"nextstep: {describe(in_force, edit)}; seed {args.seed}", file=sys.stderr)
        pipe = load_pipeline(args, model_dir, device, tp_mesh=mesh)
        if args.compile:
            pipe.compile(announce=not args.quiet)
        width, height = args.size if args.size else (None, None)
        generator = torch.Generator().manual_seed(args.seed)  # one generator over the chunks: -n 16 starts as -n 8
        kept = []  # the images for the grid sheet (grid_path: at most MAX_GRID_IMAGES)
        for start in range(0, args.num_images, MAX_IMAGES_PER_CALL):
            count = min(MAX_IMAGES_PER_CALL, args.num_images - start)
            kwargs = dict(height=height, width=width, num_images_per_prompt=count, think=args.think,
                          generator=generator, progress=main and not args.quiet, **settings)
            out = (pipe(args.instruction, image=args.image, mask=args.mask, **kwargs) if edit
                   else pipe(args.prompt, **kwargs))
            if not main:
                continue
            if out.thoughts:  # each call thinks anew: its images follow its thoughts
                chunked = args.num_images > MAX_IMAGES_PER_CALL
                print(f"thoughts{f' (images {start}-{start + count - 1})' if chunked else ''}: {out.thoughts[0]}")
            paths = [image_path(i) for i in range(start, start + count)]
            images = list(out.images)
            if grid_path is not None:
                kept += images
                if start + count == args.num_images:  # with a sheet: every image and the sheet written at the end
                    images, paths = kept + [grid_image(kept)], [image_path(i) for i in range(len(kept))] + [grid_path]
                else:
                    continue
            save_pngs(images, paths)  # all files of a chunk or none
            written += paths
    except KeyboardInterrupt:
        if written:
            raise Interrupted(f"nextstep: interrupted (the {len(written)} images written are kept: {written[0]} to "
                              f"{written[-1]})") from None
        raise
    finally:
        if info is not None:
            from .train.distributed import shutdown

            shutdown()
    return written


def sampling_overrides(args) -> dict:
    """The sampling flags as pipeline arguments (None: the model's default)."""
    return {s.name: getattr(args, s.name, None) for s in SPECS}


def run_generate_many(args) -> list[Path]:
    """``generate-many``: one pipeline replica per torchrun rank (or a single process), prompts dealt over ranks."""
    from .generate_many import Job, describe_rate, generate_many, model_fingerprint, read_prompts
    from .train.distributed import init_from_env, shutdown

    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be an integer from 0 to 2**64 - 1, got {args.seed}")
    for flag, v in (("-n", args.num_images), ("--batch", args.batch)):
        if v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    items = read_prompts(args.prompts)  # bad input fails before anything is loaded, alike on every rank
    model_dir = model_path(args)
    settings = settings_in_force(args, model_dir, edit=False)
    device = pick_device(args.device)
    info = init_from_env()
    try:
        if device.type == "cuda" and device.index is None and info.world > 1:
            device = torch.device("cuda", info.local_rank)  # one replica per GPU
        vae_dir = hub.resolve(args.vae, "VAE") if args.vae else model_dir / "vae"
        identity = {"model": model_fingerprint(model_dir), "vae": model_fingerprint(vae_dir),
                    "dtype": dtype_name(args, device), "quantize": args.quantize, "compile": args.compile,
                    "device": device.type}
        if args.fast:
            identity["head"] = head_digest(Path(args.head) if args.head else model_dir / FAST_HEAD_DIR)
        if args.lora:  # each adapter's files and scale: a resumed run with other adapters is refused
            identity["lora"] = [[head_digest(path), scale] for path, scale in lora_specs(args)]
        width, height = args.size if args.size else (None, None)
        job = Job(items, Path(args.out), n=args.num_images, seed=args.seed, batch=args.batch, layout=args.layout,
                  height=height, width=width, settings=settings, identity=identity)
        job.prepare(info.is_main)
        if info.is_main and not args.quiet:
            print(f"nextstep: {describe(settings, False)}; seed {args.seed}; {len(items)} prompts x "
                  f"{args.num_images} images, {info.world} process(es)", file=sys.stderr)
        pipe = load_pipeline(args, model_dir, device)
        if args.compile:
            pipe.compile(announce=not args.quiet)
        summary = generate_many(pipe, job, info, progress=not args.quiet)
    finally:
        shutdown()
    if not info.is_main:
        return []
    if not args.quiet:
        print(f"nextstep: {describe_rate(summary)}", file=sys.stderr)
    return [summary.manifest]


def head_digest(head_dir: Path) -> str:
    """A hash of a distilled head's or a LoRA adapter's files (config and weights, a few MB): two of one shape
    differ."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in head_dir.iterdir() if p.is_file()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def run_info(args) -> list[Path]:
    from .info import TYPICAL_PROMPT, format_info, model_info

    args.model = args.model_dir
    vae = hub.resolve(args.vae, "VAE") if args.vae else None
    if args.lora_rank is not None or args.preset is not None:
        return run_lora_memory(args, vae)
    info = model_info(model_path(args), vae, kv_dtype=args.dtype, prompt=args.prompt or TYPICAL_PROMPT)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return []


@contextlib.contextmanager
def warnings_in_one_line():
    """The library's NextStepWarnings printed as ``nextstep: warning: ...`` lines, each once per command; other
    warnings as Python shows them."""
    shown: set[str] = set()
    show = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        if not issubclass(category, NextStepWarning):
            return show(message, category, filename, lineno, file, line)
        if str(message) not in shown:
            shown.add(str(message))
            print(f"nextstep: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", NextStepWarning)
        warnings.showwarning = one_line
        yield


def run_lora_memory(args, vae) -> list[Path]:
    from .info import TYPICAL_PROMPT, format_lora_memory, lora_memory_info

    if args.lora_rank is None:
        raise UsageError("--preset estimates LoRA training memory: give --lora-rank R")
    size = re.fullmatch(r"(\d+)x(\d+)", args.train_size)
    if size is None:
        raise UsageError(f"--train-size must be HxW, e.g. 512x512, got {args.train_size!r}")
    kw = dict(rank=args.lora_rank, height=int(size[1]), width=int(size[2]), batch=args.batch,
              targets=[t for t in args.lora_targets.split(",") if t], quantize=args.quantize, dtype=args.dtype,
              checkpointing=args.checkpointing)
    if args.preset is not None:
        plan = lora_memory_info(preset_name=args.preset, **kw)
    else:
        plan = lora_memory_info(model_path(args), vae_dir=vae, prompt=args.prompt or TYPICAL_PROMPT, **kw)
    print(json.dumps(plan, indent=2) if args.json else format_lora_memory(plan, plan["model"]))
    return []


MALLOC_MMAP_BYTES = 256 << 20  # allocations up to this size come from glibc's heap (keep_freed_memory)
MALLOC_MMAP_BYTES_OLD = 32 << 20  # the most glibc before 2.35 accepts
MALLOC_TRIM_BYTES = 1 << 30  # and up to this much freed memory at its top stays in the process
MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Ask glibc (Linux) to serve allocations up to 256 MiB from its heap (32 MiB before glibc 2.35) and to keep up
    to 1 GiB of what is freed there (``mallopt``: M_MMAP_THRESHOLD and M_TRIM_THRESHOLD). By default it maps each
    allocation over its mmap threshold (128 KiB, raised as large blocks are freed, up to 32 MiB) afresh and hands
    freed memory back to the system, so the large intermediates of every call (a token's batched modulations, the
    VAE decode's activations) are page-faulted in again and again. The commands own their process, so they keep it
    (``main``; a Python caller of ``main`` gets it too). Nothing is changed where the environment sets glibc's
    allocator (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``glibc.malloc.*`` in ``GLIBC_TUNABLES``: the
    user's choice) or without glibc. Returns whether both settings took."""
    if (not sys.platform.startswith("linux") or any(k in os.environ for k in MALLOC_SETTINGS)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    trim = bool(mallopt(m_trim_threshold, MALLOC_TRIM_BYTES))
    mmap = bool(mallopt(m_mmap_threshold, MALLOC_MMAP_BYTES) or mallopt(m_mmap_threshold, MALLOC_MMAP_BYTES_OLD))
    return trim and mmap


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    with warnings_in_one_line():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "sampler", None) == DISTILLED:  # the distilled head's sampler: fast mode by its other name
        args.fast = True
    try:
        if args.command in ("train", "train-vae", "distill-head", "train-rl", "train-reread"):
            written = run_training(args)
        elif args.command == "serve":
            try:
                from .serve.runner import serve
            except ImportError as e:
                raise UsageError(f"nextstep serve needs the serve extra: pip install 'nextstep[serve]' ({e})") from None
            serve(args.model, args.vae, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
                  api_key=args.api_key or os.environ.get("NEXTSTEP_API_KEY") or None,
                  allow_origins=args.allow_origin, public_without_key=args.public_without_key, head=args.head,
                  tp=args.tp, reproducible=args.reproducible, loras=named_loras(args.lora))
            written = []
        elif args.command == "eval":
            written = run_eval(args)
        elif args.command == "make-tokenizer":
            written = make_tokenizer(args)
        elif args.command == "generate-many":
            written = run_generate_many(args)
        elif args.command == "info":
            written = run_info(args)
        else:
            written = run(args)
    except NextStepError as e:  # what a user can fix; anything else is a bug and shows its traceback
        print(f"nextstep: error: {cli_words(e) if isinstance(e, InputError) else e}", file=sys.stderr)
        return 1 if isinstance(e, WriteError) else 2
    except Interrupted as e:
        print(e, file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print({"generate": "nextstep: interrupted (nothing written)", "edit": "nextstep: interrupted (nothing written)",
               "generate-many": "nextstep: interrupted (the images written are kept: run the same command to resume)"}
              .get(args.command, "nextstep: interrupted"), file=sys.stderr)
        return 130
    for p in written:
        print(p)
    return 0


def _leave_if_distributed(code: int) -> None:
    """Under torchrun (``-m nextstep.cli``), end the process without interpreter finalization once the command is
    done and its process group destroyed: gloo's threads, still joinable then, now and then abort a loaded process
    at finalization ("terminate called without an active exception", SIGABRT after all the work), which torchrun
    reports as a failed run."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    exit_code = main()
    _leave_if_distributed(exit_code)
    sys.exit(exit_code)
