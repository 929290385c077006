"""Device check: every device path of the package on the fixture model, then NextStep-1-sized timings; one table.

    python benchmarks/device_check.py --device cuda        # every path, then one 14B-shaped layer and the head
    python benchmarks/device_check.py --device cpu         # what CI runs (.ci/run)
    python benchmarks/device_check.py --only float32,int8 --no-timing

Paths (one row each; a failing path does not stop the others): float32 (the reference images), bfloat16, int8, fp8
(PSNR of their images against float32's, same seed), compile (compiled == eager: max token difference), fast (the
fixture model with an untrained distilled head made from its own head, and the bundled model with its trained one:
one backbone row per image instead of two), edit (the output's size), tp (``nextstep generate --tp 2`` under
``torch.distributed.run``: the image against one device's; CPU: 2 gloo processes; CUDA: NCCL over 2 of the
visible GPUs, skipped with fewer: the fixture's 2 KV heads split 2 ways), and one step of each trainer
(``train``, ``train-vae``, ``distill-head``, ``train-rl``: loss finite, weights changed). A path that cannot run
on this device prints ``skipped: why``; the exit code is 1 when any path FAILED.

Timings: one NextStep-1-shaped decoder layer (hidden 5120, 40 heads / 8 KV heads x 128, MLP 13824; this package's
``DecoderLayer``, random weights) for one decoding step against a KV cache of ``--cache`` positions and a prefill of
``--prefill`` tokens, and the NextStep-1 flow head (width 1536, 12 blocks) for one guided velocity call (2 rows) and a
whole token (``TokenSampler``, NextStep-1's 50-step SDE at guidance 7.5), with the pipeline's kernels (on a CPU
the linear layers oneDNN-packed, ``nextstep.packing``). Defaults: bfloat16 on CUDA, float32 on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # running from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT))

from generate import untrained_head  # noqa: E402  (benchmarks/generate.py: the distilled head a benchmark times)

from nextstep.config import FlowHeadConfig, SamplingConfig, preset  # noqa: E402
from nextstep.eval.metrics import psnr  # noqa: E402
from nextstep.model.flow_head import FlowHead  # noqa: E402
from nextstep.model.kv_cache import KVCache  # noqa: E402
from nextstep.model.transformer import DecoderLayer, attention_bias, rope_cos_sin  # noqa: E402
from nextstep.packing import packed_linears  # noqa: E402
from nextstep.pipeline import NextStepPipeline  # noqa: E402
from nextstep.sampling.guidance import Guidance  # noqa: E402
from nextstep.sampling.token import TokenSampler  # noqa: E402

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "official-v1-a"
PROMPTS = ["a red circle above a blue square", "a green triangle"]  # two rows: left padding, batched sampling
SAMPLING = dict(height=64, width=64, num_inference_steps=10, guidance_scale=3.0)  # 16 tokens per image
# Bounds of the "ok" checks. The random fixture model compounds rounding from token to token (tests/test_tp.py):
# its bfloat16 / int8 / fp8 images are 13-18 dB from float32's however right the kernels are, so those paths are
# held to their FIRST image token (the prompt's prefill and the head, nothing compounded), relative to float32's:
# measured 0.02 / 0.06 / 0.13 (2 threads, AVX-512); a wrong scale or layout lands near 1. Images: reported only.
MAX_FIRST_TOKEN_REL = 0.25  # bfloat16, int8, fp8 against float32; compiled against eager
MIN_PSNR_SAME_MATH = 40.0  # tensor parallel against one device (the order of partial sums only)
PATHS = ("float32", "bfloat16", "int8", "fp8", "compile", "fast", "edit", "tp",
         "train", "train-vae", "distill-head", "train-rl")


class Skip(Exception):
    """This path does not apply on this device; the message says why."""


class CheckFailed(Exception):
    """The path ran but its check number is out of bounds."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def require(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)


# ---- the paths ---------------------------------------------------------------------------------------------------
class Checks:
    """Each method is one path: it returns the row's check text, raises Skip, or raises (a failure)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, work: Path):
        self.device, self.dtype, self.work = device, dtype, work
        self._reference: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pipes: dict[str, NextStepPipeline] = {}

    def pipe(self, dtype: torch.dtype | None = None, quantize: str | None = None) -> NextStepPipeline:
        key = f"{dtype}-{quantize}"
        if key not in self._pipes:
            self._pipes[key] = NextStepPipeline.from_pretrained(FIXTURE / "model", FIXTURE / "vae", device=self.device,
                                                                dtype=dtype or self.dtype, quantize=quantize)
        return self._pipes[key]

    def generate(self, pipe: NextStepPipeline, prompt=PROMPTS, **kw) -> tuple[torch.Tensor, torch.Tensor]:
        """-> images (B, 3, 64, 64) in [0, 1] and tokens (B, 16, token_dim), float32 on the CPU; seed 0."""
        out = pipe(prompt, generator=torch.Generator().manual_seed(0), output_type="pt", progress=False,
                   **{**SAMPLING, **kw})
        return out.images.float().cpu(), out.tokens.float().cpu()

    def images(self, pipe: NextStepPipeline, prompt=PROMPTS, **kw) -> torch.Tensor:
        return self.generate(pipe, prompt, **kw)[0]

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._reference is None:
            self._reference = self.generate(self.pipe(torch.float32))
        return self._reference

    def against_reference(self, pipe: NextStepPipeline, what: str) -> str:
        (img, tok), (ref_img, ref_tok) = self.generate(pipe), self.reference()
        rel = ((tok[:, 0] - ref_tok[:, 0]).norm(dim=-1) / ref_tok[:, 0].norm(dim=-1)).max().item()
        db = psnr(img, ref_img).min().item()
        require(rel <= MAX_FIRST_TOKEN_REL, f"{what}'s first token {rel:.3f} from float32's (relative; > "
                                            f"{MAX_FIRST_TOKEN_REL})")
        return f"first token vs float32 {rel:.3f} (relative); images {db:.1f} dB"

    def float32(self) -> str:
        img = self.reference()[0]
        require(bool(torch.isfinite(img).all()) and img.std().item() > 0, "float32 images are not finite or flat")
        return f"{len(PROMPTS)} images {tuple(img.shape[-2:])}, finite, std {img.std().item():.3f}"

    def bfloat16(self) -> str:
        if self.device.type == "cpu" and not torch.backends.mkldnn.is_available():
            raise Skip("no bfloat16 kernels (oneDNN) in this CPU build")
        return self.against_reference(self.pipe(torch.bfloat16), "bfloat16")

    def int8(self) -> str:
        return self.against_reference(self.pipe(quantize="int8"), "int8")

    def fp8(self) -> str:
        if not hasattr(torch, "float8_e4m3fn"):
            raise Skip(f"torch {torch.__version__} has no float8_e4m3fn")
        text = self.against_reference(self.pipe(quantize="fp8"), "fp8")
        if self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < (8, 9):
            return text + " (upcast: compute capability < 8.9)"
        return text + (" (upcast on CPU: memory only)" if self.device.type == "cpu" else " (torch._scaled_mm)")

    def compile(self) -> str:
        pipe = self.pipe()
        eager = self.generate(pipe)[1]
        compiled = self.generate(NextStepPipeline(pipe.model, pipe.vae, pipe.tokenizer, pipe.defaults,
                                                  pipe.format).compile())[1]
        # token 1 comes from the (eager) prefill; token 2 is the first one the compiled decoding step conditions
        rel = ((compiled[:, 1] - eager[:, 1]).norm(dim=-1) / eager[:, 1].norm(dim=-1)).max().item()
        d = (compiled - eager).abs().max().item()
        require(rel <= MAX_FIRST_TOKEN_REL, f"compiled step's first token {rel:.3f} from eager's (relative; > "
                                            f"{MAX_FIRST_TOKEN_REL})")
        return f"compiled vs eager: first compiled token {rel:.1e} (relative); all tokens max abs {d:.1e}"

    def fast(self) -> str:
        texts = []
        fixture = self.pipe()
        fixture.head = untrained_head(fixture)
        bundled = NextStepPipeline.from_pretrained(device=self.device, dtype=self.dtype)
        for name, pipe in (("fixture (untrained head)", fixture), ("bundled", bundled)):
            rows = []
            forward = pipe.model.forward

            def spy(embeds, *a, _forward=forward, _rows=rows, **kw):
                _rows.append(embeds.shape[0])
                return _forward(embeds, *a, **kw)

            pipe.model.forward = spy
            try:
                img = self.images(pipe, fast=True, num_inference_steps=None, guidance_scale=None)
            finally:
                del pipe.model.forward
            # the guidance branches the head reads (both of its teacher's, as the bundled head, or the conditional)
            want = len(PROMPTS) * len(pipe.guidance(pipe.resolve_settings(False, fast=True), False).branches)
            require(set(rows) == {want}, f"{name}: backbone rows {sorted(set(rows))}, not {want}")
            require(bool(torch.isfinite(img).all()), f"{name}: images not finite")
            texts.append(f"{name}: {want} backbone rows")
        fixture.head = None
        return f"{' + '.join(texts)} for {len(PROMPTS)} images, one head row each"

    def edit(self) -> str:
        from PIL import Image

        source = Image.open(FIXTURE / "edit_input.png").convert("RGB")
        out = self.pipe()("<image>make it blue", image=source, image_guidance_scale=1.5, num_inference_steps=10,
                          guidance_scale=3.0, generator=torch.Generator().manual_seed(0), progress=False).images[0]
        require(out.size == source.size, f"edit of a {source.size} image came out {out.size}")
        return f"output {out.size[0]}x{out.size[1]} (input {source.size[0]}x{source.size[1]}), image guidance 1.5"

    def tp(self) -> str:
        if self.device.type == "cuda":
            n = torch.cuda.device_count()
            if n < 2:
                raise Skip(f"{n} GPU visible; tensor parallelism needs 2")
            n = 2  # the fixture's 2 KV heads split at most 2 ways
        else:
            n = 2  # two gloo processes
        out = self.work / "tp.png"
        dtype = str(self.dtype).removeprefix("torch.")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
               "-m", "nextstep.cli", "generate", PROMPTS[0], "--model", str(FIXTURE / "model"), "--vae",
               str(FIXTURE / "vae"), "--tp", str(n), "--device", self.device.type, "--dtype", dtype, "--size", "64x64",
               "--steps", str(SAMPLING["num_inference_steps"]), "--cfg", str(SAMPLING["guidance_scale"]), "--seed", "0",
               "-o", str(out), "--quiet"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        if p.returncode != 0:
            last = (p.stderr.strip() or p.stdout.strip()).splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"torchrun exited {p.returncode}: {last[0]}")
        from PIL import Image

        got = torch.from_numpy(np.array(Image.open(out).convert("RGB"))).permute(2, 0, 1)[None].double() / 255
        one = (self.images(self.pipe(), PROMPTS[0]) * 255).round().double() / 255  # as the PNG holds it
        db = psnr(got, one).item()
        require(db >= MIN_PSNR_SAME_MATH, f"{n} processes' image {db:.1f} dB from one device's")
        return f"{n} processes ({'nccl' if self.device.type == 'cuda' else 'gloo'}): PSNR vs 1 device {db:.1f} dB"

    # ---- one step of each trainer
    def _run(self, name: str) -> dict:
        return {"out_dir": str(self.work / name), "steps": 2, "log_every": 1, "ckpt_every": 0, "seed": 0,
                "precision": "bf16" if self.device.type == "cuda" else "fp32"}

    def _trained(self, train: Callable, cfg_cls, recipe: dict, out: Path) -> list[float]:
        from nextstep.train.config import from_dict
        from nextstep.train.distributed import DistInfo

        with contextlib.redirect_stdout(sys.stderr):  # the trainers' own notes: not in the table
            train(from_dict(cfg_cls, recipe), info=DistInfo(device=self.device), progress=False)
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        require(bool(losses) and all(math.isfinite(v) for v in losses), f"losses {losses}")
        return losses

    @staticmethod
    def moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
        d = max((after[k].float().cpu() - before[k].float().cpu()).abs().max().item() for k in before)
        require(d > 0, "no weight changed")
        return d

    def train(self) -> str:
        from nextstep.model.nextstep import NextStep
        from nextstep.train.ar import train
        from nextstep.train.config import TrainConfig

        run = self._run("ar")
        recipe = {"run": {**run, "batch_size": 4}, "init_from": str(FIXTURE / "model"), "vae": str(FIXTURE / "vae"),
                  "data": {"source": "shapes", "num_samples": 8, "mix": {"t2i": 0.7, "edit": 0.3}},
                  "optim": {"lr": 1e-3, "warmup_steps": 0}}
        losses = self._trained(train, TrainConfig, recipe, Path(run["out_dir"]))
        d = self.moved(NextStep.from_pretrained(FIXTURE / "model").state_dict(),
                       NextStep.from_pretrained(Path(run["out_dir"]) / "final").state_dict())
        return f"{len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, weights moved {d:.1e}"

    def train_vae(self) -> str:
        from nextstep.model.vae import VAE
        from nextstep.train.config import VAETrainConfig
        from nextstep.train.vae import train

        run = self._run("vae")
        recipe = {"run": {**run, "batch_size": 2}, "init_from": str(FIXTURE / "vae"), "holdout": 0,
                  "data": {"source": "shapes", "num_samples": 4, "image_size": 32},
                  "optim": {"lr": 1e-3, "warmup_steps": 0}}
        losses = self._trained(train, VAETrainConfig, recipe, Path(run["out_dir"]))
        d = self.moved(VAE.from_pretrained(FIXTURE / "vae").state_dict(),
                       VAE.from_pretrained(Path(run["out_dir"]) / "final").state_dict())
        return f"{len(losses)} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}, weights moved {d:.1e}"

    def distill_head(self) -> str:
        from nextstep.model.distilled_head import DistilledHead
        from nextstep.train.config import DistillConfig
        from nextstep.train.distill import distill

        run = self._run("distill")
        recipe = {"run": {**run, "batch_size": 32}, "model": str(FIXTURE / "model"), "vae": str(FIXTURE / "vae"),
                  "data": {"source": "shapes", "num_samples": 4, "mix": {"t2i": 0.5, "edit": 0.5}},
                  "optim": {"lr": 1e-3, "warmup_steps": 0}, "teacher_steps": 4, "trained_steps": [1, 2],
                  "steps": 2, "policy_fraction": 0.0, "holdout": 8}
        losses = self._trained(distill, DistillConfig, recipe, Path(run["out_dir"]))
        teacher = self.pipe(torch.float32).model
        student = DistilledHead.from_pretrained(Path(run["out_dir"]) / "final", teacher)
        # the teacher's weights, as distillation starts them (the step embedding's first layer is drawn at random)
        start = {k: v for k, v in DistilledHead.from_teacher(teacher.image_head, student.config).state_dict().items()
                 if k.startswith("net.")}
        d = self.moved(start, student.state_dict())
        return f"{len(losses)} steps, loss {losses[0]:.3g} -> {losses[-1]:.3g}, student moved {d:.1e}"

    def train_rl(self) -> str:
        from nextstep.model.nextstep import NextStep
        from nextstep.rl.config import RLConfig
        from nextstep.rl.trainer import train_rl

        run = self._run("rl")
        recipe = {"run": {**run, "steps": 1, "batch_size": 1}, "model": str(FIXTURE / "model"),
                  "vae": str(FIXTURE / "vae"), "reward": f"{Path(__file__).stem}:darkness", "group": 2,
                  "rollout": {"steps": 2, "guidance_scale": 3.0}, "mix": {"t2i": 1.0}, "updates": 1, "pairs": 4,
                  "optim": {"lr": 1e-3, "warmup_steps": 0}}
        losses = self._trained(train_rl, RLConfig, recipe, Path(run["out_dir"]))
        head = "image_head."
        before = {k: v for k, v in NextStep.from_pretrained(FIXTURE / "model").state_dict().items() if head in k}
        after = NextStep.from_pretrained(Path(run["out_dir"]) / "final").state_dict()
        d = self.moved(before, after)
        return f"{len(losses)} step, loss {losses[0]:.3g}, head moved {d:.1e}"


def darkness(images, prompts, sources) -> list[float]:
    """train-rl's reward here: 1 - mean brightness in [0, 1] (random models' images differ in it, so a group's
    advantages are not all zero and the update moves the head)."""
    return [1 - float(np.asarray(im.convert("L"), dtype=np.float64).mean()) / 255 for im in images]


def reason(e: Exception) -> str:
    """One line for the table: the exception's type and its message's first line (and the next one when the first
    only introduces it, as torch.compile's "backend='inductor' raised:" does)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = " ".join(lines[:2] if len(lines) > 1 and lines[0].endswith(":") else lines[:1])
    text = f"{type(e).__name__}: {text}".replace("|", "/")
    return text if len(text) <= 200 else text[:197] + "..."


def run_path(checks: Checks, name: str) -> tuple[str, float, str]:
    """-> (status, seconds, check or reason)."""
    sync(checks.device)
    t0 = time.perf_counter()
    try:
        text = getattr(checks, name.replace("-", "_"))()
        status = "ok"
    except Skip as e:
        status, text = "skipped", str(e)
    except Exception as e:  # a failing path does not stop the others
        status, text = "FAILED", reason(e)
    sync(checks.device)
    return status, time.perf_counter() - t0, text


# ---- NextStep-1-sized timings ------------------------------------------------------------------------------------
def random_(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Made on the meta device, then random normal weights (std 0.02) in ``dtype``: faster than the initialisers
    for a 14B-shaped layer, and the timing does not depend on the values."""
    module = module.to(dtype=dtype).to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02, generator=g)
    return module.eval()


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of ``repeats`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@torch.no_grad()
def time_layer(device, dtype, prefill: int, cache_len: int, repeats: int) -> list[tuple[str, str, float, str]]:
    cfg = preset("nextstep-1-large").transformer
    with torch.device("meta"):
        layer = DecoderLayer(cfg)
    layer = random_(layer, device, dtype)
    n_layers = cfg.num_layers
    weight_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    rope = rope_cos_sin(torch.arange(cache_len + prefill, device=device), cfg.head_dim, cfg.rope_theta, dtype)
    rows = []
    g = torch.Generator(device).manual_seed(1)
    rows_ = 2  # a guided step: conditional + unconditional row

    # one decoding step: two rows, one new token each, against a cache holding cache_len positions
    cache = KVCache(1, rows_, cache_len + 1, cfg.num_kv_heads, cfg.head_dim, (rope[0][:cache_len + 1],
                    rope[1][:cache_len + 1]), dtype=dtype, device=device)
    cache.k.normal_(generator=g)
    cache.v.normal_(generator=g)
    cache.valid.fill_(True)
    pos = torch.tensor([cache_len], device=device)
    bias = attention_bias(cache.valid, cache.slots, pos, dtype)
    x = torch.randn(rows_, 1, cfg.hidden_size, device=device, dtype=dtype, generator=g)
    cos, sin = cache.cos[pos], cache.sin[pos]
    with packed_linears(layer):  # the pipeline's linear kernels (oneDNN-packed on a CPU; nothing on CUDA)
        ms = timed(lambda: layer(x, cos, sin, bias, cache, 0, pos), device, repeats)
    kv_bytes = 2 * cache.k[0].numel() * cache.k.element_size()
    read = (weight_bytes + kv_bytes) * n_layers
    rows.append(("decoder layer: decode step", f"2 rows x 1 token, KV cache {cache_len}", ms,
                 f"x{n_layers} layers = {ms * n_layers:,.1f} ms/token; reads {weight_bytes / 2**20:,.0f} MiB weights "
                 f"+ {kv_bytes / 2**20:,.0f} MiB KV per layer, {read / 2**30:.2f} GiB per token "
                 f"= {read / (ms * n_layers / 1e3) / 1e9:,.0f} GB/s"))

    # a prefill: one row of `prefill` tokens written into an empty cache (the pipeline's masked attention)
    cache = KVCache(1, 1, prefill, cfg.num_kv_heads, cfg.head_dim, (rope[0][:prefill], rope[1][:prefill]),
                    dtype=dtype, device=device)
    cache.valid.fill_(True)
    pos = torch.arange(prefill, device=device)
    bias = attention_bias(cache.valid, cache.slots, pos, dtype)
    x = torch.randn(1, prefill, cfg.hidden_size, device=device, dtype=dtype, generator=g)
    with packed_linears(layer):
        ms = timed(lambda: layer(x, cache.cos, cache.sin, bias, cache, 0, pos), device, repeats)
    flops = 2 * sum(p.numel() for n, p in layer.named_parameters() if n.endswith("weight") and p.dim() == 2) * prefill
    rows.append(("decoder layer: prefill", f"1 row x {prefill} tokens", ms,
                 f"x{n_layers} layers = {ms * n_layers / 1e3:.2f} s; {flops / (ms / 1e3) / 1e12:.2f} TFLOP/s "
                 f"in the linears"))
    return rows


@torch.no_grad()
def time_head(device, dtype, repeats: int, token: bool) -> list[tuple[str, str, float, str]]:
    big = preset("nextstep-1-large")
    hcfg: FlowHeadConfig = big.head
    with torch.device("meta"):
        head = FlowHead(big.token_dim, big.transformer.hidden_size, hcfg)
    head = random_(head, device, dtype)
    g = torch.Generator(device).manual_seed(2)
    params = sum(p.numel() for p in head.parameters())
    x = torch.randn(2, big.token_dim, device=device, dtype=dtype, generator=g)
    c = torch.randn(2, big.transformer.hidden_size, device=device, dtype=dtype, generator=g)
    t = torch.full((2,), 0.5, device=device, dtype=dtype)
    with packed_linears(head):
        ms = timed(lambda: head(x, t, c), device, repeats)
    desc = f"width {hcfg.width}, {hcfg.depth} blocks, {params / 1e6:.0f}M params"
    weight_bytes = params * head.net.input_proj.weight.element_size()
    rows = [("flow head: velocity", f"2 rows (guidance); {desc}", ms,
             f"reads {weight_bytes / 2**20:,.0f} MiB of weights = {weight_bytes / (ms / 1e3) / 1e9:,.0f} GB/s")]
    if token:
        settings = SamplingConfig.for_format("v1").resolve(False)  # NextStep-1: SDE, 50 steps, guidance 7.5
        guidance = Guidance.from_settings(settings, edit=False)
        sampler = TokenSampler(head, guidance, settings, 2, device, dtype, exact=False)
        noise = torch.randn(sampler.draws, 1, big.token_dim, device=device, generator=g)
        with packed_linears(head):
            ms = timed(lambda: sampler(c, (settings.guidance_scale, 1.0), noise), device, max(1, repeats // 2))
        rows.append(("flow head: one token", f"{settings.sampler}, {settings.num_inference_steps} steps, guidance "
                     f"{settings.guidance_scale:g}", ms, "TokenSampler, exact=False: batched AdaLN modulations, "
                     "fused SDE steps (the pipeline's default)"))
    return rows


# ---- main --------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="of the paths without a dtype of their own and of the timings (default: bfloat16 on CUDA, "
                        "float32 on CPU)")
    p.add_argument("--only", help=f"comma-separated paths to run, of {', '.join(PATHS)} (default: all)")
    p.add_argument("--no-timing", action="store_true", help="leave out the NextStep-1-sized timings")
    p.add_argument("--prefill", type=int, default=256, help="prompt tokens of the layer's prefill timing")
    p.add_argument("--cache", type=int, default=1024, help="KV-cache positions of the decoding step")
    p.add_argument("--repeats", type=int,
                   help="timed calls per timing after one warm-up, median shown (default: 20 on CUDA, 3 on CPU)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible to torch")
    only = PATHS if args.only is None else tuple(s.strip() for s in args.only.split(",") if s.strip())
    bad = [s for s in only if s not in PATHS]
    if bad:
        p.error(f"--only: unknown paths {bad}; choose from {', '.join(PATHS)}")
    args.only = only
    cuda = args.device == "cuda"
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.repeats = args.repeats or (20 if cuda else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    start = time.perf_counter()
    print(f"device check: {device.type} ({device_name(device)}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, default dtype {str(args.dtype).removeprefix('torch.')}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="nextstep-device-check-") as tmp:
        checks = Checks(device, args.dtype, Path(tmp))
        for name in args.only:
            status, seconds, text = run_path(checks, name)
            rows.append((name, status, seconds, text))
            print(f"  {name}: {status} ({seconds:.1f} s)", file=sys.stderr, flush=True)
    timings = []
    if not args.no_timing:
        try:
            timings = time_layer(device, args.dtype, args.prefill, args.cache, args.repeats)
            timings += time_head(device, args.dtype, args.repeats, token=True)
        except Exception as e:
            rows.append(("timings", "FAILED", 0.0, reason(e)))

    print()
    print("| path | result | s | check |")
    print("|---|---|---:|---|")
    for name, status, seconds, text in rows:
        result = status if status != "skipped" else f"skipped: {text}"
        print(f"| {name} | {result} | {seconds:.1f} | {text if status != 'skipped' else ''} |")
    if timings:
        print()
        print(f"NextStep-1-sized timings, {str(args.dtype).removeprefix('torch.')}, median of {args.repeats}:")
        print()
        print("| what | shape | ms | notes |")
        print("|---|---|---:|---|")
        for what, shape, ms, note in timings:
            print(f"| {what} | {shape} | {ms:,.1f} | {note} |")
    failed = [r[0] for r in rows if r[1] == "FAILED"]
    print()
    print(f"{len(rows) - len(failed)} of {len(rows)} paths ok or skipped; total {time.perf_counter() - start:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
