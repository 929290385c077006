"""Text-to-image generation speed of ``NextStepPipeline`` over a grid of settings; prints a Markdown table.

Examples (from the repository root):

    # random weights, the fixture-sized preset (fast on CPU)
    python benchmarks/generate.py --preset tiny --repeats 1
    # a wider random model on top of tiny (keeps tiny's vocabulary and special ids)
    python benchmarks/generate.py --preset tiny --hidden 512 --layers 8 --head-width 256 --head-depth 4
    # a checkpoint directory (official NextStep-1 layout or ours), bfloat16 on a GPU
    python benchmarks/generate.py --model path/to/NextStep-1-Large --vae path/to/vae \
        --dtype bfloat16 --device cuda --size 256x256 512x512 --batch 1 4 --steps 28 --cfg 7.5

For every combination of --size x --batch x --steps x --cfg x --sampler: one warm-up call, then --repeats timed
calls (``progress=False``, ``generator=torch.Generator().manual_seed(0)``, ``output_type="pt"``); the table shows
medians. Phase shares come from ``PipelineOutput.timings`` (``timings=True``) (prefill, backbone, head, decode)
divided by the median wall time of the whole call.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import shlex
import statistics
import sys
import time
from itertools import product
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # running from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

from nextstep.config import PRESETS, VAEConfig, preset  # noqa: E402
from nextstep.model.distilled_head import DistilledHead, DistilledHeadConfig, model_fingerprint, norm_means  # noqa: E402
from nextstep.model.nextstep import NextStep  # noqa: E402
from nextstep.model.vae import VAE  # noqa: E402
from nextstep.pipeline import NextStepPipeline  # noqa: E402
from nextstep.prompt import check_special_ids  # noqa: E402
from nextstep.quant import quantize_  # noqa: E402
from nextstep.sampling.flow import SAMPLERS  # noqa: E402
from nextstep.tokenizer import Tokenizer  # noqa: E402

DEFAULT_TOKENIZER = REPO_ROOT / "tests" / "fixtures" / "official-v1-a" / "model"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# The reference workload "ns34m": a random model in the official layout (9.1M parameters), the f8/16 VAE layout,
# one prompt at 128x128 (64 tokens), SDE sampler, shift 1, no token norm. Rows: (guidance, steps, images). Ratios
# against the official code come only from running both in one process (../shared/official_speed/run.sh).
SHAPES = {"ns34m": dict(
    transformer=dict(vocab_size=1024, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                     intermediate_size=1408),
    head=dict(width=512, depth=6),
    vae=dict(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16),  # this benchmark's default VAE
    size=(128, 128),
    rows=[(3.0, 10, 1), (3.0, 10, 4), (1.0, 50, 1), (3.0, 50, 1)],
)}
PHASES = ("prefill", "backbone", "head", "decode")


# ---- arguments -------------------------------------------------------------------------------------------------

def parse_size(text: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' (or a single number for a square) -> (width, height)."""
    parts = text.lower().split("x")
    try:
        if len(parts) == 1:
            w = h = int(parts[0])
        elif len(parts) == 2:
            w, h = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 64x64 (width x height), got {text!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return w, h


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_argument_group("model source (one of --model / --preset)")
    g = src.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", type=Path, help="checkpoint directory (config.json, weights, tokenizer.json)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="random weights of a named configuration")
    g.add_argument("--shape", choices=sorted(SHAPES), help="a reference workload: its random model and its rows "
                   "(ns34m: the side-by-side harness's rows)")
    src.add_argument("--vae", type=Path, help="VAE directory for --model (default: the model's vae/ subdirectory)")
    src.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                     help="tokenizer directory for --preset (its special ids must match the preset's)")
    src.add_argument("--vae-ch", type=int, default=32, help="base channels of the random VAE for --preset")
    src.add_argument("--hidden", type=int, help="--preset: backbone hidden size (heads follow: hidden / head_dim)")
    src.add_argument("--layers", type=int, help="--preset: backbone layers")
    src.add_argument("--head-width", type=int, help="--preset: flow head width")
    src.add_argument("--head-depth", type=int, help="--preset: flow head residual blocks")
    src.add_argument("--seed", type=int, default=0, help="seed of the random weights")

    run = p.add_argument_group("runtime")
    run.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave torch's choice)")
    run.add_argument("--exact", action="store_true",
                     help="the reference's head arithmetic (pipe._generate(..., exact=True))")
    run.add_argument("--quantize", choices=["int8", "fp8"], help="weight-only quantization of the model's linears")
    run.add_argument("--fast", type=int, nargs="+", metavar="STEPS",
                     help="time a distilled few-step head (fast=True) at these step counts instead of the sampler "
                          "grid: an untrained student made from the model's head (same cost as a trained one)")

    grid = p.add_argument_group("grid (every combination is run)")
    grid.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="images per prompt")
    grid.add_argument("--steps", type=int, nargs="+", default=[10, 28], help="flow sampling steps per token")
    grid.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0], help="text guidance scales")
    grid.add_argument("--size", type=parse_size, nargs="+", default=[(64, 64)], metavar="WxH",
                      help="image sizes, width x height")
    grid.add_argument("--sampler", nargs="+", default=["sde"], choices=sorted(SAMPLERS))
    grid.add_argument("--repeats", type=int, default=2, help="timed calls per combination (median reported)")
    grid.add_argument("--prompt", default="a red cube on a wooden table, studio lighting")

    p.add_argument("--json", type=Path, help="also write the rows (and the run's metadata) to this JSON file")
    return p


# ---- building the pipeline ------------------------------------------------------------------------------------

def model_config(args: argparse.Namespace):
    cfg = preset(args.preset)
    t, h = cfg.transformer, cfg.head
    t_kw: dict = {}
    if args.hidden is not None:
        heads = max(1, args.hidden // t.head_dim)
        group = t.num_heads // t.num_kv_heads
        kv = heads // group if heads % group == 0 and heads >= group else heads
        # keep the preset's MLP ratio, rounded to a multiple of 32
        inter = max(32, int(round(args.hidden * t.intermediate_size / t.hidden_size / 32)) * 32)
        t_kw.update(hidden_size=args.hidden, num_heads=heads, num_kv_heads=kv, intermediate_size=inter)
    if args.layers is not None:
        t_kw["num_layers"] = args.layers
    h_kw: dict = {}
    if args.head_width is not None:
        h_kw["width"] = args.head_width
    if args.head_depth is not None:
        h_kw["depth"] = args.head_depth
    return dataclasses.replace(cfg, transformer=dataclasses.replace(t, **t_kw), head=dataclasses.replace(h, **h_kw))


def randomise_flow_head_outputs(model: NextStep, std: float = 0.02) -> None:
    """``init_weights`` zeroes the head's AdaLN modulations and output layer (so a fresh head predicts 0); give them
    small normal values so the velocity depends on its inputs, like a trained head's. Timing is the same either way."""
    net = model.image_head.net
    layers: list[nn.Linear] = [b.adaLN_modulation[-1] for b in net.res_blocks]
    layers += [net.final_layer.adaLN_modulation[-1], net.final_layer.linear]
    with torch.no_grad():
        for lin in layers:
            nn.init.normal_(lin.weight, std=std)
            nn.init.normal_(lin.bias, std=std)


def shape_config(name: str):
    spec = SHAPES[name]
    cfg = preset("tiny")
    return dataclasses.replace(cfg, transformer=dataclasses.replace(cfg.transformer, **spec["transformer"]),
                               head=dataclasses.replace(cfg.head, **spec["head"]))


def build_pipeline(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> tuple[NextStepPipeline, str]:
    if args.model is not None:
        for flag in ("hidden", "layers", "head_width", "head_depth"):
            if getattr(args, flag) is not None:
                raise SystemExit(f"--{flag.replace('_', '-')} only applies to --preset (a checkpoint fixes its size)")
        pipe = NextStepPipeline.from_pretrained(args.model, args.vae, dtype=dtype, device=device)
        return pipe, f"checkpoint {args.model}" + (f" + VAE {args.vae}" if args.vae else "")

    cfg = shape_config(args.shape) if args.shape else model_config(args)
    tok = Tokenizer.from_pretrained(args.tokenizer)
    try:
        check_special_ids(tok, cfg)
    except ValueError as e:
        raise SystemExit(f"preset {args.preset!r} and tokenizer {tok.source}: {e}: pass a matching --tokenizer, or "
                         f"use --preset tiny with --hidden/--layers/--head-width/--head-depth for a bigger random "
                         f"model") from None
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = NextStep(cfg).init_weights()
        randomise_flow_head_outputs(model)
        vae_cfg = SHAPES[args.shape]["vae"] if args.shape else dict(ch=args.vae_ch, z_channels=cfg.latent_channels)
        vae = VAE(VAEConfig(**vae_cfg))  # PyTorch's default (random) init
    pipe = NextStepPipeline(model.to(dtype=dtype), vae.to(dtype=dtype), tok)
    t, h = cfg.transformer, cfg.head
    desc = (f"random {args.shape or args.preset}: hidden {t.hidden_size}, layers {t.num_layers}, heads {t.num_heads}/"
            f"{t.num_kv_heads} kv, mlp {t.intermediate_size}, flow head {h.width}x{h.depth}; "
            f"random VAE ch {vae.config.ch}; tokenizer {args.tokenizer}")
    return pipe, desc


def quantize_pipeline(pipe: NextStepPipeline, kind: str) -> str:
    """Weight-only quantization of the model and its distilled head, if any; returns the description's suffix."""
    for module in (pipe.model, pipe.head):
        if module is not None:
            quantize_(module, kind)
    return f"; weights {kind}"


def untrained_head(pipe: NextStepPipeline, branches: str = "all") -> DistilledHead:
    """A distilled head of the pipeline's model as distillation starts it (the teacher's weights, a zero step input):
    it costs what a trained one costs. ``branches``: what it reads, by default every guidance branch of its teacher
    (guidance 3: two backbone rows per image), as the bundled head and ``configs/distill-head.json``."""
    model = pipe.model
    cfg = DistilledHeadConfig(token_dim=model.config.token_dim, cond_dim=model.config.transformer.hidden_size,
                              head=model.config.head, base_model="benchmark", fingerprint=model_fingerprint(model),
                              norm_means=tuple(norm_means(model)),
                              guidance_scale=3.0, edit_guidance_scale=3.0, edit_image_guidance_scale=1.0,
                              branches=branches)
    return DistilledHead.from_teacher(model.image_head, cfg).to(model.dtype).eval()


# ---- measuring ------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_mb() -> float:
    """Peak resident set size of this process so far, MB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def run_one(pipe: NextStepPipeline, args, size, batch, steps, cfg, sampler, device) -> tuple[float, dict[str, float]]:
    w, h = size
    sync(device)
    t0 = time.perf_counter()
    settings = (dict(fast=True) if sampler == "distilled" else
                dict(guidance_scale=cfg, sampler=sampler, time_shift=1.0, exact=args.exact))
    out = pipe._generate(args.prompt, height=h, width=w, num_images_per_prompt=batch, num_inference_steps=steps,
                         generator=torch.Generator().manual_seed(0), output_type="pt", progress=False, timings=True,
                         token_norm=False if args.shape else None, **settings)
    sync(device)
    return time.perf_counter() - t0, dict(out.timings)


def measure(pipe, args, combo, device, rss_base: float) -> dict:
    size, batch, steps, cfg, sampler = combo
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run_one(pipe, args, size, batch, steps, cfg, sampler, device)  # warm-up
    totals, phases = [], {k: [] for k in ("encode",) + PHASES}
    for _ in range(args.repeats):
        total, timings = run_one(pipe, args, size, batch, steps, cfg, sampler, device)
        totals.append(total)
        for k in phases:
            phases[k].append(timings.get(k, 0.0))
    total = statistics.median(totals)
    m = pipe.size_multiple
    tokens = (size[0] // m) * (size[1] // m)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = rss_mb() - rss_base
    phase_s = {k: statistics.median(v) for k, v in phases.items()}
    return {
        "size": f"{size[0]}x{size[1]}", "width": size[0], "height": size[1], "batch": batch, "steps": steps,
        "cfg": cfg, "sampler": sampler, "tokens_per_image": tokens,
        "total_s": total, "all_totals_s": totals,
        "s_per_image": total / batch,
        "ms_per_token": 1000 * total / (batch * tokens),
        "phase_s": phase_s,
        "phase_pct": {k: 100 * v / total for k, v in phase_s.items()},
        "peak_mb": peak,
    }


# ---- output ---------------------------------------------------------------------------------------------------

def fmt_time(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def table(rows: list[dict], mem_label: str) -> str:
    head = ["size", "batch", "steps", "cfg", "sampler", "s/image", "ms/token", "prefill %", "backbone %", "head %",
            "decode %", f"peak memory (MB){mem_label}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 5 + ["---:"] * (len(head) - 5)) + "|"]
    for r in rows:
        pct = r["phase_pct"]
        cells = [r["size"], str(r["batch"]), str(r["steps"]), f"{r['cfg']:g}", r["sampler"],
                 fmt_time(r["s_per_image"]), fmt_time(r["ms_per_token"])]
        cells += [f"{pct[k]:.1f}" for k in PHASES]
        cells.append(f"{r['peak_mb']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[args.dtype]
    rss_start = rss_mb()

    t0 = time.perf_counter()
    pipe, desc = build_pipeline(args, dtype, device)
    if args.fast:  # made from the float head, before any quantization
        pipe.head = untrained_head(pipe)
        desc += "; an untrained distilled head (timing only)"
    if args.quantize:
        desc += quantize_pipeline(pipe, args.quantize)
    load_s = time.perf_counter() - t0
    sync(device)

    m = pipe.size_multiple
    for w, h in args.size:
        if w % m or h % m:
            raise SystemExit(f"size {w}x{h}: width and height must be multiples of {m}")
    for sampler, steps in product(args.sampler, args.steps):
        if steps < (2 if sampler == "sde" else 1):
            raise SystemExit(f"sampler {sampler!r} needs --steps >= {2 if sampler == 'sde' else 1}, got {steps}")

    params = sum(p.numel() for p in pipe.model.parameters())
    vae_params = sum(p.numel() for p in pipe.vae.parameters())
    cmd = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["generate.py", *argv])
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor()
                                                                                 or platform.machine())
    meta = {
        "command": cmd, "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "device": str(device), "device_name": dev_name, "dtype": args.dtype,
        "model": desc, "model_params": params, "vae_params": vae_params, "load_s": load_s,
        "prompt": args.prompt, "repeats": args.repeats,
        "memory": "cuda_max_memory_allocated" if device.type == "cuda" else "ru_maxrss_growth_since_model_loaded",
    }
    print(f"command: {cmd}")
    print(f"torch {torch.__version__} | threads {meta['threads']} | device {device} ({dev_name}) | dtype {args.dtype}")
    print(f"model: {desc}")
    print(f"params: backbone+heads {params / 1e6:.2f} M, VAE {vae_params / 1e6:.2f} M | loaded in {load_s:.2f} s | "
          f"{args.repeats} timed call(s) after 1 warm-up per row, median shown")
    print(flush=True)

    rss_base = rss_mb()
    if args.fast:
        sizes = [SHAPES[args.shape]["size"]] if args.shape else args.size
        combos = [(size, batch, steps, 1.0, "distilled") for size, batch, steps in
                  product(sizes, [1] if args.shape else args.batch, args.fast)]
    elif args.shape:  # the workload's own rows
        spec = SHAPES[args.shape]
        combos = [(spec["size"], n, steps, cfg, "sde") for cfg, steps, n in spec["rows"]]
    else:
        combos = list(product(args.size, args.batch, args.steps, args.cfg, args.sampler))
    rows = []
    for i, combo in enumerate(combos, 1):
        size, batch, steps, cfg, sampler = combo
        print(f"[{i}/{len(combos)}] {size[0]}x{size[1]} batch {batch} steps {steps} cfg {cfg:g} {sampler} ...",
              file=sys.stderr, flush=True)
        rows.append(measure(pipe, args, combo, device, rss_base))

    if device.type == "cuda":
        mem_note = ("¹ peak memory: torch.cuda.max_memory_allocated during the row's warm-up and timed calls "
                    "(weights included).")
    else:
        mem_note = (f"¹ peak memory: growth of the process's peak RSS (resource.getrusage ru_maxrss) over its value "
                    f"after the model was built ({rss_base:.0f} MB; {rss_start:.0f} MB at start). It is a high-water "
                    f"mark: a row also shows any larger peak of an earlier row.")
    print(table(rows, "¹"))
    print()
    print(mem_note)
    print("s/image = median wall time of one call / batch; ms/token = that time / (batch x image tokens); phase % = "
          "median phase time (PipelineOutput.timings) / median wall time; the rest is tokenization, output "
          "formatting and Python overhead (encode is 0 for text-to-image).")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        print(f"rows written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
