"""Distilling the flow head into a few-step head, guidance included (``nextstep distill-head``).

1. Targets, computed once on the main rank and cached (``OUT/targets-<key>.safetensors``). For each sample of the
   data, its image tokens (the dataset's image, or for a fraction of prompts the model's own sample) go through the
   frozen backbone teacher-forced (``train.conditions``): the head's condition at every token, for every guidance
   branch. From a seeded start x_0 the teacher then integrates its guided velocity over K Euler steps of the
   probability-flow ODE (its own head and guidance, on its own time grid): the path x_0 .. x_K. Kept per token: the
   conditional branch's condition (with ``branches`` "all" the other branches' too: what the student reads), the
   path and its time grid.
2. Training. Each row of a step is a token, a step count S and one of its S intervals [t_i, t_j] on the path:
       "trajectory"  target (x_j - x_i) / (t_j - t_i): the teacher's own jump, for S in ``trained_steps``;
       "shortcut"    (after Frans et al., 2024) only the finest level (S = K) reads the teacher; a coarser interval's
                     target is the time-weighted mean of the student's own velocities over its two halves (no
                     gradient), the second taken where the first lands; every level from 1 to K is trained.
   The student reads (x_i, t_i, t_j - t_i, condition); the loss is the mean squared error.
3. Held-out tokens (other prompts): the student's S-step endpoint against the teacher's (``holdout_mse_S``), logged
   at the start and with every checkpoint.

Rows are drawn per (seed, step) from the whole global batch, each rank taking its slice, and the loss is normalised
by the global row count: any number of processes makes the same update, and a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import Settings
from ..data.sources import open_source
from ..errors import ConfigError, DataError
from ..images import fit_image, load_image
from ..model.distilled_head import DistilledHead, DistilledHeadConfig, model_fingerprint, norm_means, split_branches
from ..model.latents import patchify
from ..sampling.flow import times
from ..sampling.guidance import Guidance
from ..sampling.token import TokenSampler
from .conditions import teacher_forced
from .config import DistillConfig, to_dict
from .distributed import DistInfo, barrier, wrap
from .loop import Task, fit
from .state import plain_copy, resume_point, start_run, training_autocast, uses_bf16
from .targets import cached_targets, readable_samples

CHUNK = 16  # prompts per teacher call while building the targets


class LossModule(nn.Module):
    """The unit DDP / FSDP2 wrap: the student's prediction, or with a target the summed row loss / ``norm``."""

    def __init__(self, student: DistilledHead):
        super().__init__()
        self.student = student

    def forward(self, x, t, d, c, target=None, norm: float = 1.0, other=None):
        u = self.student(x, t, d, c, other).float()
        if target is None:
            return u
        return ((u - target) ** 2).mean(-1).sum() / norm


# ---- 1. targets ------------------------------------------------------------------------------------------------------
def teacher_settings(cfg: DistillConfig, pipe) -> dict[bool, Settings]:
    """The teacher's settings for text-to-image (False) and editing (True): the model's defaults under the recipe's
    overrides. Its guidance must be constant over the image (one head serves every token)."""
    out = {}
    for edit in (False, True):
        s = pipe.defaults.resolve(edit, guidance_scale=cfg.edit_guidance_scale if edit else cfg.guidance_scale,
                                  image_guidance_scale=cfg.edit_image_guidance_scale if edit else None,
                                  time_shift=cfg.edit_time_shift if edit else cfg.time_shift)
        if s.guidance_schedule != "constant":
            raise ConfigError(f"the model's guidance schedule is {s.guidance_schedule!r}: a distilled head "
                              f"reproduces constant guidance only")
        out[edit] = s
    return out


def targets_key(cfg: DistillConfig, pipe) -> str:
    """Names the targets cache: everything the targets depend on (the data, the base model and VAE, the teacher's
    resolved settings, the recipe's target fields, the seed)."""
    teacher = teacher_settings(cfg, pipe)
    parts = [to_dict(cfg.data), model_fingerprint(pipe.model), [round(m, 4) for m in norm_means(pipe.model)],
             str(cfg.vae), [dataclasses.asdict(teacher[e]) for e in (False, True)], cfg.teacher_steps,
             cfg.policy_fraction, cfg.policy_steps, cfg.holdout, cfg.run.seed, cfg.tokens_per_image]
    if cfg.branches != "cond":  # (keys of the targets of one-branch students stay as they were)
        parts.append(cfg.branches)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


@torch.no_grad()
def _chunk_targets(cfg: DistillConfig, pipe, settings: Settings, items: list[tuple[int, dict]], policy: bool,
                   size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Conditions and teacher paths of one chunk of same-kind samples: {"cond" (N, D), "path" (N, K + 1, d),
    "ts" (N, K + 1)} with N = samples x tokens; with ``branches`` "all" also "other" (N, 2, D), the other guidance
    branches' conditions (``OTHER_BRANCHES``, zeros where the teacher has no such branch)."""
    model, k = pipe.model, cfg.teacher_steps
    edit = items[0][1]["kind"] == "edit"
    height, width = size
    texts = [it["instruction"] if edit else it["caption"] for _, it in items]
    seed = cfg.run.seed * 1_000_003 + items[0][0]
    gen = torch.Generator().manual_seed(seed)
    sources = [fit_image(load_image(it["source"]), height, width) for _, it in items] if edit else None
    if policy:  # the model's own samples, each prompt with its own generator
        gens = [torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + i + 1) for i, _ in items]
        tokens = pipe(texts, image=[it["source"] for _, it in items] if edit else None, height=height, width=width,
                      generator=gens, num_inference_steps=cfg.policy_steps, progress=False,
                      output_type="latent").tokens.float()
    else:
        images = [fit_image(load_image(it["target" if edit else "image"]), height, width) for _, it in items]
        tokens = patchify(pipe.encode_latents(images), model.config.patch_size).float()
    b, total, dim = tokens.shape
    grid = (height // pipe.size_multiple, width // pipe.size_multiple)
    guidance = Guidance.from_settings(settings, edit)
    copies = len(guidance.branches)
    fed = tokens[:, :-1] + model.config.context_noise * torch.randn(tokens[:, :-1].shape, generator=gen)
    latents = pipe.encode_latents(sources) if edit else None
    ids = [pipe.prompt_rows(t, grid, settings, edit) for t in texts]
    # every token's condition, then (a model trained for parallel decoding) the conditions parallel decoding gives
    cond = teacher_forced(model, ids, pipe.tokenizer.special.pad, guidance.branches, latents, fed, grid,
                          model.config.parallel_tokens)
    total = cond.shape[1]  # conditions per image
    keep = cfg.tokens_per_image or total
    if keep < total:  # a random subset of each image's tokens (large images: storage and teacher time)
        pick = torch.stack([torch.randperm(total, generator=gen)[:keep].sort().values for _ in range(b)])
        cond = cond.reshape(copies, b, total, -1)[:, torch.arange(b)[:, None], pick]
    n = b * keep
    cond = cond.reshape(copies * n, -1)  # (copies * N, D) branch-major, N = images x kept tokens
    ode = dataclasses.replace(settings, sampler="ode", num_inference_steps=k, token_norm=False)
    sampler = TokenSampler(model.image_head, guidance, ode, copies * n, model.device, model.dtype,
                           exact=False, trace=True)
    x0 = torch.randn(1, n, dim, generator=gen).to(model.device)
    sampler(cond, guidance.scales_at(0, total), x0)
    path = sampler.trace[0].permute(1, 0, 2).float().cpu()  # (N, K + 1, d)
    ts = times("ode", k, settings.time_shift).expand(n, k + 1)
    out = {"cond": cond[:n].float().cpu(), "path": path, "ts": ts.contiguous()}
    if cfg.branches == "all":
        out["other"] = split_branches(cond.float().cpu(), guidance.branches)[1]
    return out


def build_targets(cfg: DistillConfig, pipe, progress: bool) -> tuple[dict[str, torch.Tensor], int, int]:
    """Every sample's conditions and teacher paths -> ({"cond", "path", "ts"}, held-out rows at the end, skipped)."""
    from tqdm.auto import tqdm

    settings = teacher_settings(cfg, pipe)
    items, skipped = readable_samples(open_source(cfg.data))
    if not items:
        raise DataError(f"the dataset has no text-to-image or edit samples ({skipped} unreadable)")
    size = tuple(cfg.data.bucket_sizes[0])
    tokens = pipe.model.config.flow_rows((size[0] // pipe.size_multiple) * (size[1] // pipe.size_multiple))
    tokens = min(tokens, cfg.tokens_per_image or tokens)  # conditions per image
    held = min(math.ceil(cfg.holdout / tokens), len(items) - 1)
    rng = np.random.default_rng([cfg.run.seed, 7])
    on_policy = rng.random(len(items)) < cfg.policy_fraction  # per sample, fixed by the seed
    parts: list[dict[str, torch.Tensor]] = []
    with tqdm(total=len(items), desc="teacher targets", disable=not progress) as bar:
        for split in (range(len(items) - held), range(len(items) - held, len(items))):
            for kind in ("t2i", "edit"):
                for policy in (False, True):
                    chosen = [items[j] for j in split if items[j][1]["kind"] == kind and on_policy[j] == policy]
                    for c in range(0, len(chosen), CHUNK):
                        chunk = chosen[c:c + CHUNK]
                        parts.append(_chunk_targets(cfg, pipe, settings[kind == "edit"], chunk, policy, size))
                        bar.update(len(chunk))
    out = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    return out, held * tokens, skipped


# ---- 2. training rows -----------------------------------------------------------------------------------------------
def levels(cfg: DistillConfig) -> list[int]:
    """Step counts trained: the recipe's ("trajectory"), or every power of 2 up to the teacher's ("shortcut")."""
    if cfg.method == "trajectory":
        return list(cfg.trained_steps)
    return [2 ** e for e in range(int(math.log2(cfg.teacher_steps)) + 1)]


def draw_rows(cfg: DistillConfig, step: int, train_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch of step ``step``: (token rows, step counts S, interval index in [0, S)), each (B,)."""
    g = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step)
    b = cfg.run.batch_size
    rows = torch.randint(train_rows, (b,), generator=g)
    options = torch.tensor(levels(cfg))
    if cfg.method == "shortcut":  # half the rows on the teacher's finest steps, the rest spread over coarser levels
        coarse = options[:-1] if len(options) > 1 else options
        pick = coarse[torch.randint(len(coarse), (b,), generator=g)]
        s = torch.where(torch.rand(b, generator=g) < 0.5, options[-1], pick)
    else:
        s = options[torch.randint(len(options), (b,), generator=g)]
    interval = (torch.rand(b, generator=g) * s).long().clamp(max=s - 1)
    return rows, s, interval


def _at(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (N, K + 1, ...) -> x[n, index[n]] (N, ...)."""
    return x[torch.arange(x.shape[0]), index]


def row_targets(cfg: DistillConfig, trainable: nn.Module, cond, path, ts, s, interval, other=None):
    """Inputs (x, t, d) and targets of the rows: see the module docstring."""
    k = cfg.teacher_steps
    span = k // s  # fine steps per interval
    i, j = interval * span, (interval + 1) * span
    x, ti, tj = _at(path, i), _at(ts, i), _at(ts, j)
    if cfg.method == "trajectory" or bool((s == k).all()):
        return x, ti, tj - ti, (_at(path, j) - x) / (tj - ti)[:, None]
    target = (_at(path, j) - x) / (tj - ti)[:, None]  # the finest level's rows keep the teacher's step
    coarse = s < k
    with torch.no_grad():
        m = (i + span // 2)[coarse]
        xc, tic, tmc, tjc, cc = x[coarse], ti[coarse], _at(ts[coarse], m), tj[coarse], cond[coarse]
        oc = other[coarse] if other is not None else None
        u1 = trainable(xc, tic, tmc - tic, cc, other=oc)
        u2 = trainable(xc + (tmc - tic)[:, None] * u1, tmc, tjc - tmc, cc, other=oc)
        target[coarse] = ((tmc - tic)[:, None] * u1 + (tjc - tmc)[:, None] * u2) / (tjc - tic)[:, None]
    return x, ti, tj - ti, target


@torch.no_grad()
def holdout_errors(student: DistilledHead, targets: dict[str, torch.Tensor], start: int, steps: list[int]
                   ) -> dict[str, float]:
    """Mean squared distance per value between the student's S-step endpoint and the teacher's, on the held-out
    rows (from ``start``), for each S."""
    cond, path, ts = (targets[n][start:] for n in ("cond", "path", "ts"))
    other = targets["other"][start:] if "other" in targets else None
    if not len(cond):
        return {}
    device, dtype = next(student.parameters()).device, next(student.parameters()).dtype
    cond = cond.to(device, dtype)
    other = other.to(device, dtype) if other is not None else None
    k = path.shape[1] - 1
    out = {}
    for s in steps:
        x = path[:, 0].to(device)
        for n in range(s):
            t0, t1 = ts[:, n * k // s].to(device), ts[:, (n + 1) * k // s].to(device)
            x = x + (t1 - t0)[:, None] * student(x.to(dtype), t0.to(dtype), (t1 - t0).to(dtype), cond,
                                                 other).float()
        out[f"holdout_mse_{s}"] = float(((x.cpu() - path[:, -1]) ** 2).mean())
    return out


# ---- the run ---------------------------------------------------------------------------------------------------------
def head_config(cfg: DistillConfig, pipe) -> DistilledHeadConfig:
    settings = teacher_settings(cfg, pipe)
    t2i, edit = settings[False], settings[True]
    mc = pipe.model.config
    return DistilledHeadConfig(
        token_dim=mc.token_dim, cond_dim=mc.transformer.hidden_size,
        head=dataclasses.replace(mc.head, depth=cfg.student_depth or mc.head.depth),
        base_model=str(cfg.model or "bundled"), fingerprint=model_fingerprint(pipe.model),
        norm_means=tuple(norm_means(pipe.model)),
        guidance_scale=t2i.guidance_scale, edit_guidance_scale=edit.guidance_scale,
        edit_image_guidance_scale=edit.image_guidance_scale, time_shift=t2i.time_shift,
        edit_time_shift=edit.time_shift, negative_prompt=edit.negative_prompt, steps=cfg.steps,
        trained_steps=tuple(cfg.trained_steps), method=cfg.method,
        teacher={"sampler": "ode", "steps": cfg.teacher_steps, "token_norm": t2i.token_norm},
        branches=cfg.branches)


class DistillTask(Task):
    """The loop's view of a distillation: each step's rows and their loss; the held-out errors at checkpoints."""

    desc = "distill"

    def __init__(self, cfg: DistillConfig, trainable: nn.Module, targets: dict[str, torch.Tensor], train_rows: int,
                 info: DistInfo):
        self.cfg, self.trainable, self.targets, self.train_rows, self.info = cfg, trainable, targets, train_rows, info
        self.autocast = training_autocast(cfg.run, info)

    def updates(self, step: int):
        run, info, dev, t = self.cfg.run, self.info, self.info.device, self.targets
        per_rank = run.batch_size // info.world
        rows, s, interval = (v[info.rank * per_rank:(info.rank + 1) * per_rank] for v in
                             draw_rows(self.cfg, step, self.train_rows))
        cond = t["cond"][rows].to(dev)
        other = t["other"][rows].to(dev) if "other" in t else None
        with self.autocast:
            x, ti, d, target = row_targets(self.cfg, self.trainable, cond, t["path"][rows].to(dev),
                                           t["ts"][rows].to(dev), s.to(dev), interval.to(dev), other)
            loss = self.trainable(x, ti, d, cond, target, run.batch_size / info.world, other)
        yield loss, {}

    def metrics(self, seconds: float, checkpoint: bool) -> dict[str, float]:
        student = plain_copy(self.trainable, None, "student", DistilledHead) if checkpoint else None
        return {} if student is None else holdout_errors(student, self.targets, self.train_rows,
                                                         list(self.cfg.trained_steps))

    def export(self, ema, path: Path) -> Path:
        """The head directory that ``NextStepPipeline.from_pretrained(..., head=path)`` loads."""
        head = plain_copy(self.trainable, None, "student", DistilledHead)
        if head is not None:
            head.save_pretrained(path)
        barrier(self.info)
        return path


def distill(cfg: DistillConfig, *, resume: bool = False, info: DistInfo | None = None, progress: bool = True) -> Path:
    """Run (or resume) a distillation; returns the head directory ``OUT/final``."""
    from ..pipeline import NextStepPipeline

    info = info or DistInfo()
    run = cfg.run
    out = start_run(run, info)
    ckpt = resume_point(out, cfg, resume, info)
    pipe = NextStepPipeline.from_pretrained(cfg.model, cfg.vae, device=info.device)
    pipe.model.requires_grad_(False)
    targets, held, skipped = cached_targets(out / f"targets-{targets_key(cfg, pipe)}.safetensors",
                                            lambda: build_targets(cfg, pipe, progress), info)
    train_rows = targets["cond"].shape[0] - held
    if train_rows < 1:
        raise ConfigError("no training rows left after the holdout: lower holdout or add data")
    if info.is_main:
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    hc = head_config(cfg, pipe)
    student = DistilledHead.from_teacher(pipe.model.image_head, hc, torch.Generator().manual_seed(run.seed)).train()
    teacher_errors = holdout_errors(student, targets, train_rows, list(cfg.trained_steps))
    # FSDP2 shards the student as one unit: its forward calls the net's parts directly (no per-block unsharding)
    trainable = wrap(LossModule(student), info, run.parallel, (), uses_bf16(run, info))
    notes = [f"skipped {skipped} unreadable samples"] if skipped else []
    notes.append(f"{train_rows} training tokens, {held} held out; untrained student (the teacher's conditional head) "
                 f"vs the teacher on held-out tokens: " + ", ".join(f"{k} {v:.4g}" for k, v in teacher_errors.items()))
    return fit(DistillTask(cfg, trainable, targets, train_rows, info), cfg, trainable, out, ckpt, info,
               progress=progress, notes=notes)
