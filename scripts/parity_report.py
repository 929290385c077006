"""How far this machine's kernels take each official pipeline run from the reference: one table.

    python scripts/parity_report.py                        # this CPU's best kernels
    ATEN_CPU_CAPABILITY=default python scripts/parity_report.py   # or avx2 / avx512: another kernel path

For every ``pipe_*`` run of the fixtures (tests/fixtures, or $NEXTSTEP_FIXTURES): the largest token difference when
teacher-forced (each token sampled from the reference's context: what the parity tests bound), when free-running (the
differences compound from token to token), and the free-running picture's PSNR against the reference's.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from nextstep import pipeline as pipeline_module
from nextstep.pipeline import NextStepPipeline
from nextstep.sampling.token import TokenSampler

ROOT = Path(os.environ.get("NEXTSTEP_FIXTURES") or Path(__file__).resolve().parents[1] / "tests" / "fixtures")
V11_SAMPLER = {"ode": "ode", "sde": "flow_sde", "cps": "cps"}


def v1_runs(d: Path):
    def g(seed, skip=False):
        gen = torch.Generator().manual_seed(seed)
        if skip:
            torch.randn(2, 16, 8, 8, generator=gen)  # the reference samples its zero-variance posterior first
        return gen
    common = dict(progress=False, exact=True)  # the reference's head arithmetic: a hook of the private entry
    yield "pipe_t2i", lambda p: p._generate("a red circle on the left", height=64, width=64, guidance_scale=3.0,
                                  num_inference_steps=10, generator=g(0), token_norm=True, **common)
    yield "pipe_t2i_b2", lambda p: p._generate("a blue square at the top", height=48, width=48, num_images_per_prompt=2,
                                     guidance_scale=2.0, guidance_schedule="linear", time_shift=2.0,
                                     num_inference_steps=6, generator=g(7), token_norm=False,
                                     positive_prompt="best quality", negative_prompt="blurry", **common)
    yield "pipe_edit", lambda p: p._generate("<image>make it blue", image=d / "edit_input.png", guidance_scale=3.0,
                                   image_guidance_scale=1.5, num_inference_steps=10, generator=g(0, skip=True),
                                   token_norm=True, time_shift=1.0, negative_prompt="", **common)


def v11_runs(d: Path):
    for name, run in json.loads((d / "reference.json").read_text())["pipeline_runs"].items():
        kw = run["kwargs"]
        args = dict(height=kw["hw"][0], width=kw["hw"][1], guidance_scale=kw.get("cfg", 1.0),
                    image_guidance_scale=kw.get("cfg_img", 1.0), num_inference_steps=kw["num_sampling_steps"],
                    time_shift=kw.get("timesteps_shift", 1.0), token_norm=kw["use_norm"],
                    sampler=V11_SAMPLER[kw["sde_type"]], num_images_per_prompt=kw.get("num_images_per_caption", 1),
                    positive_prompt=kw.get("positive_prompt"), negative_prompt=kw.get("negative_prompt") or "",
                    progress=False)
        if "images" in kw:
            args["image"] = d / kw["images"]
        yield f"pipe_{name}", (lambda p, kw=kw, args=args:
                               p(kw["captions"], generator=torch.Generator().manual_seed(kw["seed"]), **args))


def forced(pipe, run, tokens) -> float:
    sampled = []

    class Forced(TokenSampler):
        def __call__(self, cond, scales, noise):
            x = super().__call__(cond, scales, noise)
            sampled.append(x.clone())
            return tokens[:, len(sampled) - 1].to(x)

    original = pipeline_module.TokenSampler
    pipeline_module.TokenSampler = Forced
    try:
        run(pipe)
    finally:
        pipeline_module.TokenSampler = original
    return max((x - tokens[:, k]).abs().max().item() for k, x in enumerate(sampled))


def main() -> None:
    torch.set_num_threads(1)  # the fixtures were made with one thread
    print(f"kernels: {torch.backends.cpu.get_cpu_capability()}  (ATEN_CPU_CAPABILITY="
          f"{os.environ.get('ATEN_CPU_CAPABILITY', '')!s}, MKL_ENABLE_INSTRUCTIONS="
          f"{os.environ.get('MKL_ENABLE_INSTRUCTIONS', '')!s})")
    print(f"{'run':<28} {'teacher-forced':>15} {'free-running':>13} {'PSNR dB':>8}")
    for fixture, runs in (("official-v1-a", v1_runs), ("official-v11-a", v11_runs)):
        d = ROOT / fixture
        ref = load_file(str(d / "reference.safetensors"))
        pipe = NextStepPipeline.from_pretrained(d / "model", d / "vae")
        for name, run in runs(d):
            tokens = ref[f"{name}.tokens"]
            out = run(pipe)
            free = (out.tokens - tokens).abs().max().item()
            a = (pipe.decode(out.tokens, out.grid) / 2 + 0.5).clamp(0, 1)
            b = (ref[f"{name}.vae_decode_output"] / 2 + 0.5).clamp(0, 1)
            psnr = 10 * math.log10(1 / max(((a - b) ** 2).mean().item(), 1e-20))
            print(f"{fixture[9:] + ' ' + name:<28} {forced(pipe, run, tokens):>15.1e} {free:>13.1e} {psnr:>8.1f}")


if __name__ == "__main__":
    main()
