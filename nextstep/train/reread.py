"""Parallel decoding's correction of the state after a draft, learnt from the model's own decodes
(``nextstep train-reread``, docs/parallel-decoding.md).

Parallel decoding draws the first token of each group from the state after the previous group's draft, where a
sequential decoder would have read the token drawn for that draft: that state is corrected (``NextStep.reread``).

1. Targets, computed once on the main rank and cached (``OUT/targets-<key>.safetensors``): the data's prompts
   (captions; edits with their instruction and source image) decoded by the frozen model in parallel, at its sampling
   defaults or, for a fraction of them, in fast mode; every corrected state is recorded with what it is corrected
   from and the state after the token itself (``NextStepPipeline.recording_rereads``): the rows.
2. Training: the correction (``RereadCorrection``) moves the state after the draft to the state after the token;
   loss: the squared distance summed over the state's values. Rows are drawn per (seed, step) from the whole global
   batch, each rank taking its slice, and the loss is normalised by the global row count: any number of processes
   makes the same update, and a resumed run continues exactly.
3. Held-out rows (the last prompts): the corrected state's distance to the state after the token relative to that
   state's size (``holdout_error``), logged at the start for the model as loaded and with every checkpoint.
The export is the model directory with the trained correction (its VAE, tokenizer, defaults and distilled head kept).
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

from ..data.sources import open_source
from ..errors import ConfigError, DataError
from ..model.distilled_head import model_fingerprint, norm_means
from ..model.nextstep import RereadCorrection
from .config import RereadConfig, to_dict
from .distributed import DistInfo, barrier, wrap
from .loop import Task, fit
from .state import plain_state_dict, resume_point, start_run, training_autocast, uses_bf16
from .targets import cached_targets, readable_samples

NAMES = ("before", "after", "drafted", "token", "exact")  # a row: NextStepPipeline.recording_rereads' tuple


class LossModule(nn.Module):
    """The unit DDP / FSDP2 wrap: the corrected states, or with ``exact`` the summed row loss / ``norm``."""

    def __init__(self, correction: RereadCorrection):
        super().__init__()
        self.correction = correction

    def forward(self, before, after, drafted, token, exact=None, norm: float = 1.0):
        out = after + self.correction(before, after, drafted, token)
        if exact is None:
            return out
        return ((out.float() - exact) ** 2).sum(-1).sum() / norm


# ---- 1. targets ------------------------------------------------------------------------------------------------------
def _weights_hash(module: nn.Module | None) -> str:
    h = hashlib.sha256()
    for name, t in sorted((module.state_dict() if module is not None else {}).items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def targets_key(cfg: RereadConfig, pipe) -> str:
    """Names the targets cache: everything the targets depend on (the data, the model, its parallel-decoding weights
    and distilled head, the VAE, the sampling defaults, the recipe's target fields, the seed)."""
    m = pipe.model
    parts = [to_dict(cfg.data), model_fingerprint(m), [round(v, 4) for v in norm_means(m)], m.config.parallel_tokens,
             _weights_hash(m.image_ahead), _weights_hash(getattr(m, "image_reread", None)), str(cfg.vae),
             _weights_hash(pipe.head) if cfg.fast_fraction > 0 else None, json.dumps(dataclasses.asdict(pipe.defaults),
                                                                                    default=str, sort_keys=True),
             cfg.fast_fraction, cfg.prompts_per_call, cfg.holdout, cfg.run.seed]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


@torch.no_grad()
def _chunk_rows(cfg: RereadConfig, pipe, items: list[tuple[int, dict]], fast: bool, size: tuple[int, int]
                ) -> dict[str, torch.Tensor]:
    """The rows of one pipeline call (same-kind samples, each prompt with its own generator): {name: (N, ...)}."""
    edit = items[0][1]["kind"] == "edit"
    texts = [it["instruction"] if edit else it["caption"] for _, it in items]
    gens = [torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + i) for i, _ in items]
    with pipe.recording_rereads() as recorded:
        pipe(texts, image=[it["source"] for _, it in items] if edit else None, height=size[0], width=size[1],
             generator=gens, progress=False, output_type="latent", fast=fast,
             parallel=pipe.model.config.parallel_tokens)
    return {name: torch.cat([r[j][:, 0] for r in recorded]).float().cpu() for j, name in enumerate(NAMES)}


def build_targets(cfg: RereadConfig, pipe, progress: bool) -> tuple[dict[str, torch.Tensor], int, int]:
    """Every sample's rows -> ({name: (N, ...)}, held-out rows at the end, unreadable samples)."""
    from tqdm.auto import tqdm

    items, skipped = readable_samples(open_source(cfg.data))
    if not items:
        raise DataError(f"the dataset has no text-to-image or edit samples ({skipped} unreadable)")
    size = tuple(cfg.data.bucket_sizes[0])
    held = min(cfg.holdout, len(items) - 1)
    fast = np.random.default_rng([cfg.run.seed, 7]).random(len(items)) < cfg.fast_fraction  # per sample
    parts, counts = [], []
    with tqdm(total=len(items), desc="parallel decodes", disable=not progress) as bar:
        for split in (range(len(items) - held), range(len(items) - held, len(items))):
            n = 0
            for kind in ("t2i", "edit"):
                for mode in (False, True):
                    chosen = [items[j] for j in split if items[j][1]["kind"] == kind and fast[j] == mode]
                    for c in range(0, len(chosen), cfg.prompts_per_call):
                        parts.append(_chunk_rows(cfg, pipe, chosen[c:c + cfg.prompts_per_call], mode, size))
                        n += len(parts[-1]["after"])
                        bar.update(len(chosen[c:c + cfg.prompts_per_call]))
            counts.append(n)
    return {name: torch.cat([p[name] for p in parts]) for name in NAMES}, counts[1], skipped


# ---- 2. training -----------------------------------------------------------------------------------------------------
def draw_rows(cfg: RereadConfig, step: int, train_rows: int) -> torch.Tensor:
    """The global batch of step ``step``: (B,) row indices."""
    g = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step)
    return torch.randint(train_rows, (cfg.run.batch_size,), generator=g)


@torch.no_grad()
def holdout_error(correct, targets: dict[str, torch.Tensor], start: int) -> float:
    """Mean over the held-out rows (from ``start``) of |corrected state - state after the token| / |the latter|;
    ``correct(before, after, drafted, token)`` -> the corrected states."""
    rows = [targets[name][start:] for name in NAMES]
    if not len(rows[0]):
        return math.nan
    exact = rows[-1]
    return float(((correct(*rows[:-1]).float() - exact).norm(dim=-1) / exact.norm(dim=-1)).mean())


class RereadTask(Task):
    """The loop's view of the training: each step's rows and their loss; the held-out error at checkpoints."""

    desc = "reread"

    def __init__(self, cfg: RereadConfig, trainable: nn.Module, pipe, targets: dict[str, torch.Tensor],
                 train_rows: int, info: DistInfo):
        self.cfg, self.trainable, self.pipe, self.targets = cfg, trainable, pipe, targets
        self.train_rows, self.info = train_rows, info
        self.autocast = training_autocast(cfg.run, info)

    def updates(self, step: int):
        run, info = self.cfg.run, self.info
        per_rank = run.batch_size // info.world
        rows = draw_rows(self.cfg, step, self.train_rows)[info.rank * per_rank:(info.rank + 1) * per_rank]
        with self.autocast:
            loss = self.trainable(*(self.targets[name][rows].to(info.device) for name in NAMES),
                                  norm=run.batch_size / info.world)
        yield loss, {}

    def _correction(self, ema) -> RereadCorrection | None:
        """A plain CPU copy of the trained correction (the EMA's weights where there are some), main rank only."""
        state = plain_state_dict(self.trainable, ema, "correction")
        if state is None:
            return None
        mc = self.pipe.model.config
        c = RereadCorrection(mc.transformer.hidden_size, mc.token_dim, state["fc1.weight"].shape[0])
        c.load_state_dict(state)
        return c.eval()

    def metrics(self, seconds: float, checkpoint: bool) -> dict[str, float]:
        c = self._correction(None) if checkpoint else None
        if c is None:
            return {}
        return {"holdout_error": holdout_error(lambda b, a, d, t: a + c(b, a, d, t), self.targets, self.train_rows)}

    def export(self, ema, path: Path) -> Path:
        """The model directory with the trained correction: ``NextStepPipeline.from_pretrained(path)``."""
        c = self._correction(ema)
        if c is not None:
            model = self.pipe.model
            model.enable_reread(c.fc1.out_features)
            model.image_reread.load_state_dict(c.state_dict())
            self.pipe.save_pretrained(path)
        barrier(self.info)
        return path


def train_reread(cfg: RereadConfig, *, resume: bool = False, info: DistInfo | None = None,
                 progress: bool = True) -> Path:
    """Run (or resume) the training of a model's reread correction; returns the model directory ``OUT/final``."""
    from ..pipeline import NextStepPipeline

    info = info or DistInfo()
    run = cfg.run
    out = start_run(run, info)
    ckpt = resume_point(out, cfg, resume, info)
    pipe = NextStepPipeline.from_pretrained(cfg.model, cfg.vae, device=info.device)
    mc = pipe.model.config
    if mc.parallel_tokens < 2:
        raise ConfigError(f"the model decodes one token per forward (parallel_tokens={mc.parallel_tokens}): train its "
                          f"parallel decoding first (configs/shapes-ar-parallel.json)")
    if cfg.fast_fraction > 0 and pipe.head is None:
        raise ConfigError("fast_fraction > 0 needs the model's distilled head (its fast/ directory): set "
                          "fast_fraction to 0 or distill one (nextstep distill-head)")
    pipe.model.requires_grad_(False)
    targets, held, skipped = cached_targets(out / f"targets-{targets_key(cfg, pipe)}.safetensors",
                                            lambda: build_targets(cfg, pipe, progress), info)
    train_rows = targets["after"].shape[0] - held
    if train_rows < 1:
        raise ConfigError("no training rows left after the holdout: lower holdout or add data")
    if info.is_main:
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    width = cfg.width or 2 * mc.transformer.hidden_size
    correction = RereadCorrection(mc.transformer.hidden_size, mc.token_dim, width).to(info.device)
    correction.reset_parameters(torch.Generator().manual_seed(run.seed))
    trainable = wrap(LossModule(correction.train()), info, run.parallel, (), uses_bf16(run, info))
    errors = {"uncorrected": holdout_error(lambda b, a, d, t: a, targets, train_rows),
              "as loaded": holdout_error(pipe.model.reread, targets, train_rows)}
    notes = [f"skipped {skipped} unreadable samples"] if skipped else []
    notes.append(f"{train_rows} training rows, {held} held out; held-out error (|state - state after the token| / "
                 f"|state after the token|): " + ", ".join(f"{k} {v:.4g}" for k, v in errors.items()))
    return fit(RereadTask(cfg, trainable, pipe, targets, train_rows, info), cfg, trainable, out, ckpt, info,
               progress=progress, notes=notes)
