"""GRPO post-training (``nextstep train-rl``): the model learns from scored samples of its own.

One step:
    1. prompts: ``run.batch_size`` shapes-world prompts, a pure function of (seed, step) (``step_prompts``), all
       text-to-image or all edits; every process takes its contiguous slice (a prompt's group never splits);
    2. rollouts: ``group`` images per prompt sampled by the pipeline with the current weights, each prompt's noise
       from its own generator seeded by (seed, step, prompt), every head step recorded (``rl.rollout``);
    3. rewards per image, advantages normalised within each group (``rl.grpo.group_advantages``);
    4. ``updates`` optimizer steps on ``rl.grpo.grpo_loss`` over a random subset of (token, head step) pairs per
       update (drawn from (seed, step, update), the same on every process): ratios against the log-probabilities the
       first update starts from (recomputed, so the first ratio is exactly 1), the exact KL to a frozen copy of the
       starting model.
Every process holds the same number of images and pairs, so the mean of its loss, averaged over processes by DDP /
FSDP2, is the mean over the global batch: N processes make the update of one. The pipeline calls fall on the same
prompts whatever the number of processes (``rollout.batch`` prompts each), and the updates compute each call's images
apart, so every row rounds alike: measured, 2 DDP processes end bit-identical to one.

Only the chosen parameter set is trained (``policy.set_trainable``); the text head never is (the loss does not read
it). With ``kl_weight`` > 0 a frozen copy of the starting model is the reference (a full copy on every process, also
under FSDP2); under FSDP2 the rollouts sample from a full copy of the weights, refreshed from the shards every step.
"""

from __future__ import annotations

import copy
import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import ConfigError
from ..data.shapes import CATEGORIES, EDIT_TYPES, generate_edit, generate_t2i, render
from ..errors import TrainingError
from ..images import grid_image, save_png
from ..model.nextstep import NextStep
from ..model.transformer import DecoderLayer
from ..train.config import to_dict
from ..train.distributed import DistInfo, all_sum, apply_activation_checkpointing, barrier, wrap
from ..train.state import (EMA, Progress, checkpoints, load_checkpoint, lr_at, make_optimizer, plain_copy, plain_key,
                           resume_point, save_checkpoint, start_run, training_autocast)
from .config import RLConfig
from .grpo import gaussian_kl, group_advantages, grpo_loss, reward_metrics
from .policy import StepStats, Steps, all_steps, conditions, random_steps, set_trainable, step_stats
from .rewards import RewardFn, load_reward
from .rollout import Prompt, Rollout, rollout

# Random streams of a run's seed. The shapes world's own use 0-3 (training set, evaluation prompts, evaluation edits,
# backgrounds) in the same place of the seed sequence, so rollout prompts never share draws with the evaluation sets.
_STREAM_KIND, _STREAM_PROMPTS, _STREAM_NOISE, _STREAM_PAIRS = 4, 5, 6, 7
LOSS_METRICS = ("loss", "policy_loss", "kl", "clip_fraction", "ratio_mean", "neg_log_prob")


def _seed(*key: int) -> int:
    """A 64-bit torch seed from a key of integers (distinct keys of one length give independent seeds)."""
    lo, hi = np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint32)
    return int(hi) << 32 | int(lo)


# ---- 1. prompts ------------------------------------------------------------------------------------------------------
def step_prompts(cfg: RLConfig, step: int) -> list[Prompt]:
    """The ``run.batch_size`` prompts of step ``step`` (all processes together): all edits or all text-to-image (the
    kind drawn by ``mix``), categories or edit types by ``weights``, each a shapes-world prompt with its spec."""
    seed, size = cfg.run.seed, cfg.rollout.image_size
    edit = np.random.default_rng([seed, _STREAM_KIND, step]).random() < cfg.kind_weights[1]
    names, p = (EDIT_TYPES if edit else CATEGORIES), cfg.draw_probabilities(edit)
    out = []
    for i in range(cfg.run.batch_size):
        rng = np.random.default_rng([seed, _STREAM_PROMPTS, step, i])
        name = names[int(rng.choice(len(names), p=p))]
        if edit:
            source, instruction, _, spec = generate_edit(name, rng, size)
            out.append(Prompt(instruction, render(source), spec))
        else:
            caption, spec, _ = generate_t2i(name, rng, size)
            out.append(Prompt(caption, spec=spec))
    return out


def local_slice(cfg: RLConfig, info: DistInfo) -> slice:
    """This process's prompts of a step's global batch."""
    per = cfg.run.batch_size // info.world
    return slice(info.rank * per, (info.rank + 1) * per)


# ---- 2.-3. rollouts and rewards --------------------------------------------------------------------------------------
def check_processes(cfg: RLConfig, info: DistInfo) -> None:
    """Each process's share of a step's prompts must be whole pipeline calls (``rollout.batch``)."""
    share = cfg.run.batch_size // info.world
    if share % cfg.rollout.batch:
        raise ConfigError(f"each of the {info.world} processes rolls out {share} prompts per step, not a multiple of "
                          f"rollout.batch ({cfg.rollout.batch} prompts per pipeline call): make run.batch_size a "
                          f"multiple of {info.world * cfg.rollout.batch}, or lower rollout.batch")


def roll(cfg: RLConfig, pipe, step: int, info: DistInfo) -> Rollout:
    """This process's rollouts of step ``step``, ``rollout.batch`` prompts per pipeline call (the calls fall on the
    same prompts whatever the number of processes); the pipeline samples in inference mode, without gradients."""
    part = local_slice(cfg, info)
    prompts = step_prompts(cfg, step)
    size, n = cfg.rollout.image_size, cfg.rollout.batch
    parts = []
    for start in range(part.start, part.stop, n):
        gens = [torch.Generator().manual_seed(_seed(cfg.run.seed, _STREAM_NOISE, step, i))
                for i in range(start, start + n)]
        parts.append(rollout(pipe, prompts[start:start + n], cfg.group, size, size, gens,
                             group_noise=cfg.rollout.group_noise, **cfg.rollout.settings()))
    return Rollout.concat(parts)


def score(reward: RewardFn, r: Rollout) -> torch.Tensor:
    """(B,) float32 rewards of a rollout's images (image b answers prompt b // group)."""
    return reward(r.images, [p for p in r.prompts for _ in range(r.group)])


def global_rewards(cfg: RLConfig, rewards: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Every process's rewards in global prompt order (each places its own in a zero vector; the sum is exact)."""
    full = torch.zeros(cfg.run.batch_size * cfg.group, dtype=torch.float64)
    part = local_slice(cfg, info)
    full[part.start * cfg.group:part.stop * cfg.group] = rewards.double()
    return torch.tensor(all_sum(full.tolist(), info), dtype=torch.float32)


# ---- 4. updates ------------------------------------------------------------------------------------------------------
def chunks(cfg: RLConfig, r: Rollout) -> list[Rollout]:
    """A process's rollout in the pieces its pipeline calls made (``rollout.batch`` prompts): the updates compute
    each piece apart, so every row rounds as it would on any number of processes."""
    n = cfg.rollout.batch * r.group
    return [r.select(range(i, i + n)) for i in range(0, r.states.shape[0], n)]


def _cat(stats: list[StepStats]) -> StepStats:
    """The pieces' stats as one batch (the std depends only on the pairs: the same in every piece)."""
    return StepStats(torch.cat([s.log_prob for s in stats]), torch.cat([s.mean for s in stats]), stats[0].std)


class PolicyModule(nn.Module):
    """The unit DDP / FSDP2 wrap: its forward recomputes the head conditions of each rollout piece (``steps`` None),
    or the log-probabilities, means and stds of the chosen steps of every piece (concatenated), differentiable in the
    trained parameters. One forward per update whatever the pieces (DDP and FSDP2 pair it with one backward);
    tensors out, so the wrappers see every output."""

    def __init__(self, model: NextStep):
        super().__init__()
        self.model = model

    def forward(self, pieces: list[Rollout], steps: Steps | None = None, conds: list[torch.Tensor] | None = None):
        if steps is None:
            return [conditions(self.model, r) for r in pieces]
        s = _cat([step_stats(self.model, r, steps, c) for r, c in zip(pieces, conds or [None] * len(pieces))])
        return s.log_prob, s.mean, s.std


@dataclass
class Batch:
    """A rollout made ready for its updates: its pieces, the pairs of each update, the log-probabilities they start
    from, the reference model's means (KL), the advantages, and the conditions when the backbone is frozen."""

    pieces: list[Rollout]  # ``chunks``: B images in all
    advantages: torch.Tensor  # (B,)
    pairs: list[Steps]  # per update
    old: list[StepStats]  # per update, under the rollout's weights
    ref: list[StepStats] | None  # per update, under the reference model (kl_weight > 0)
    conds: list[torch.Tensor] | None  # per piece when the backbone is frozen ("head"), else recomputed per update


def update_pairs(cfg: RLConfig, r: Rollout, step: int) -> list[Steps]:
    """The (token, head step) pairs of each update of step ``step``: a pure function of (seed, step, update)."""
    if cfg.pairs is None:
        return [all_steps(r)] * cfg.updates
    return [random_steps(r, cfg.pairs, torch.Generator().manual_seed(_seed(cfg.run.seed, _STREAM_PAIRS, step, u)))
            for u in range(cfg.updates)]


@torch.no_grad()
def prepare(cfg: RLConfig, trainable: nn.Module, reference: NextStep | None, r: Rollout, advantages: torch.Tensor,
            step: int) -> Batch:
    """Everything the updates of a rollout need, computed before the first changes the weights."""
    pairs, pieces = update_pairs(cfg, r, step), chunks(cfg, r)
    conds = trainable(pieces) if cfg.parameters == "head" else None  # a frozen backbone: the same at every update
    old = [StepStats(*trainable(pieces, p, conds)) for p in pairs]
    ref = None
    if reference is not None:  # "head": the reference's backbone is the policy's, and so are its conditions
        ref_conds = conds or [conditions(reference, piece) for piece in pieces]
        ref = [_cat([step_stats(reference, piece, p, c) for piece, c in zip(pieces, ref_conds)])
               for p in pairs]
    return Batch(pieces, advantages, pairs, old, ref, conds)


def update_loss(cfg: RLConfig, trainable: nn.Module, batch: Batch, u: int):
    """The loss of update ``u`` (a ``GRPOOutput``: differentiable loss and its local metrics)."""
    new = StepStats(*trainable(batch.pieces, batch.pairs[u], batch.conds))
    kl = gaussian_kl(new.mean, batch.ref[u].mean, new.std) if batch.ref is not None else None
    return grpo_loss(new.log_prob, batch.old[u].log_prob, batch.advantages, cfg.clip, kl, cfg.kl_weight)


def run_updates(cfg: RLConfig, trainable: nn.Module, params: list[nn.Parameter], optimizer, ema: EMA | None,
                batch: Batch, info: DistInfo, out: Path, step: int, autocast=nullcontext()) -> dict[str, float]:
    """The ``updates`` optimizer steps of one rollout batch -> the loss metrics (``LOSS_METRICS`` and the gradient
    norm before clipping), means over the updates and the processes. ``params``: the trained parameters as the
    optimizer holds them (under FSDP2 the shards: listed before any forward, which leaves the root's gathered);
    ``autocast``: the forwards' context."""
    sums = dict.fromkeys([*LOSS_METRICS, "grad_norm"], 0.0)
    for u in range(cfg.updates):
        with autocast:
            result = update_loss(cfg, trainable, batch, u)
        values = all_sum([float(result.loss.detach()), *(result.metrics.get(k, 0.0) for k in LOSS_METRICS[1:])], info)
        if not math.isfinite(values[0]):
            last = checkpoints(out)
            raise TrainingError(f"non-finite loss at step {step}, update {u}; stopping. Last good checkpoint: "
                                f"{last[-1] if last else 'none'}")
        result.loss.backward()
        # the norm of every process's gradient (each holds the all-reduced one): no sum over processes for it
        norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or math.inf))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(trainable)
        for k, v in zip(LOSS_METRICS, values):
            sums[k] += v / info.world / cfg.updates
        sums["grad_norm"] += norm / cfg.updates
    return sums


# ---- the run ---------------------------------------------------------------------------------------------------------
def train_rl(cfg: RLConfig, *, resume: bool = False, info: DistInfo | None = None, progress: bool = True) -> Path:
    """Run (or resume) GRPO post-training; returns the exported model directory ``OUT/final``."""
    from ..pipeline import NextStepPipeline

    info = info or DistInfo()
    run = cfg.run
    out = start_run(run, info)
    check_processes(cfg, info)
    ckpt = resume_point(out, cfg, resume, info)
    reward = load_reward(cfg.reward)  # a missing user reward fails here, before anything is loaded
    pipe = NextStepPipeline.from_pretrained(cfg.model, cfg.vae, device=info.device)
    if info.is_main:
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    model = pipe.model
    set_trainable(model, cfg.parameters, cfg.last_layers)
    model.lm_head.requires_grad_(False)  # the loss never reads the text head ("all" would leave DDP a gradless one)
    reference = copy.deepcopy(model).requires_grad_(False) if cfg.kl_weight > 0 else None
    fsdp = info.enabled and run.parallel == "fsdp"
    if fsdp:  # FSDP2 shards the trained model; rollouts sample from a full copy of its weights
        pipe.model = copy.deepcopy(model).requires_grad_(False)
    bf16 = run.precision == "bf16"
    if run.activation_checkpointing:
        apply_activation_checkpointing(model, (DecoderLayer,))
    # the head's parts are called one by one (condition and time embeddings, velocity): it stays in the root's unit
    trainable = wrap(PolicyModule(model), info, run.parallel, (DecoderLayer,), bf16)
    optimizer = make_optimizer(trainable, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay)
    params = [p for p in trainable.parameters() if p.requires_grad]  # as the optimizer holds them (FSDP2: shards)
    ema = EMA(trainable, run.ema_decay) if run.ema_decay > 0 else None
    start = load_checkpoint(ckpt, trainable, optimizer, ema, info)["step"] if ckpt else 0
    bar = Progress(out, run.steps, start, info, "train-rl", show=progress)
    autocast = training_autocast(run, info)
    try:
        for step in range(start, run.steps):
            t0 = time.perf_counter()
            if fsdp:
                _sync_policy(trainable, pipe.model)
            r = roll(cfg, pipe, step, info)
            rewards = score(reward, r)
            everyone = global_rewards(cfg, rewards, info)
            t1 = time.perf_counter()
            with autocast:
                advantages = group_advantages(rewards, cfg.group, cfg.advantage_eps)
                batch = prepare(cfg, trainable, reference, r, advantages, step)
            lr = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, run.steps, cfg.optim.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = run_updates(cfg, trainable, params, optimizer, ema, batch, info, out, step, autocast)
            done = step + 1
            rewarded = reward_metrics(everyone, cfg.group)
            rewarded["reward_edit" if r.edit else "reward_t2i"] = rewarded["reward_mean"]
            if reference is None:
                del losses["kl"]
            metrics = {"step": done, **rewarded, **losses, "lr": lr, "rollout_s": t1 - t0,
                       "update_s": time.perf_counter() - t1}
            bar.step(metrics, log=run.log_every > 0 and (done % run.log_every == 0 or done == run.steps))
            if run.sample_every and done % run.sample_every == 0:
                sample_grid(cfg, trainable, ema, pipe, out / "samples" / f"step_{done:07d}.png", info)
            if run.ckpt_every and done % run.ckpt_every == 0 or done == run.steps:
                save_checkpoint(out, done, trainable, optimizer, ema, {"config": to_dict(cfg), "data_position": done},
                                info, run.keep_checkpoints)
            if run.export_every and done % run.export_every == 0 and done != run.steps:
                export(trainable, ema, pipe, out / "exports" / f"step_{done:07d}", info)
    finally:
        bar.close()
    return export(trainable, ema, pipe, out / "final", info)


@torch.no_grad()
def _sync_policy(trainable: nn.Module, policy: NextStep) -> None:
    """Copy the trained parameters, gathered from their FSDP2 shards, into the rollout model (every rank calls)."""
    own = dict(policy.named_parameters())
    for name, p in trainable.named_parameters():
        if p.requires_grad:  # a DTensor shard, or a parameter FSDP2 holds gathered since a forward without backward
            own[plain_key(name).removeprefix("model.")].copy_(p.full_tensor() if hasattr(p, "full_tensor") else p)


def sample_grid(cfg: RLConfig, trainable: nn.Module, ema: EMA | None, pipe, path: Path, info: DistInfo) -> None:
    """One image of each of the run's ``sample_prompts`` under the rollout settings (seed 0), side by side."""
    from ..pipeline import NextStepPipeline

    model = plain_copy(trainable, ema, "model", NextStep)
    if model is not None:
        grids = NextStepPipeline(model.to(info.device), pipe.vae, pipe.tokenizer, pipe.defaults, pipe.format)
        size = cfg.rollout.image_size
        images = grids(cfg.sample_prompts, height=size, width=size, generator=torch.Generator().manual_seed(0),
                       progress=False, **cfg.rollout.settings()).images
        save_png(grid_image(images), path)
    barrier(info)


def export(trainable: nn.Module, ema: EMA | None, pipe, final: Path, info: DistInfo) -> Path:
    """Write ``final`` so that ``NextStepPipeline.from_pretrained(final)`` loads it: the trained weights, the base
    model's tokenizer, VAE and sampling defaults. A base model's distilled ``fast/`` head is not carried over: it was
    distilled from the weights before post-training."""
    model = plain_copy(trainable, ema, "model", NextStep)
    if model is not None:
        model.save_pretrained(final)
        pipe.defaults.save(final)
        pipe.tokenizer.save_pretrained(final)
        pipe.vae.save_pretrained(final / "vae")
    barrier(info)
    return final
