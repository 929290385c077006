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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.shapes import CATEGORIES, EDIT_TYPES, generate_edit, generate_t2i, render
from ..errors import ConfigError
from ..images import grid_image, save_png
from ..model.nextstep import NextStep
from ..model.transformer import DecoderLayer
from ..train.config import to_dict
from ..train.distributed import DistInfo, all_sum, apply_activation_checkpointing, barrier, wrap
from ..train.loop import Task, fit
from ..train.state import EMA, plain_copy, plain_key, resume_point, start_run, training_autocast, uses_bf16
from .config import RLConfig
from .grpo import gaussian_kl, group_advantages, grpo_loss, reward_metrics
from .policy import Steps, StepStats, all_steps, conditions, random_steps, set_trainable, step_stats
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


# ---- the run ---------------------------------------------------------------------------------------------------------
class RLTask(Task):
    """The loop's view of GRPO: each step's rollouts, rewards and prepared batch (steps 1-3 of the module docstring),
    then one loss per update (step 4)."""

    desc = "train-rl"

    def __init__(self, cfg: RLConfig, trainable: nn.Module, reference: NextStep | None, pipe, reward: RewardFn,
                 info: DistInfo):
        self.cfg, self.trainable, self.reference, self.pipe, self.reward, self.info = (cfg, trainable, reference,
                                                                                        pipe, reward, info)
        self.fsdp = info.enabled and cfg.run.parallel == "fsdp"  # the rollouts sample from a full copy
        self.autocast = training_autocast(cfg.run, info)
        self.logged: dict[str, float] = {}
        self.t_updates = 0.0

    def updates(self, step: int):
        cfg, info = self.cfg, self.info
        t0 = time.perf_counter()
        if self.fsdp:
            _sync_policy(self.trainable, self.pipe.model)
        r = roll(cfg, self.pipe, step, info)
        rewards = score(self.reward, r)
        self.logged = reward_metrics(global_rewards(cfg, rewards, info), cfg.group)
        self.logged["reward_edit" if r.edit else "reward_t2i"] = self.logged["reward_mean"]
        self.t_updates = time.perf_counter()
        self.logged["rollout_s"] = self.t_updates - t0
        with self.autocast:
            advantages = group_advantages(rewards, cfg.group, cfg.advantage_eps)
            batch = prepare(cfg, self.trainable, self.reference, r, advantages, step)
        names = [k for k in LOSS_METRICS[1:] if k != "kl" or self.reference is not None]
        for u in range(cfg.updates):
            with self.autocast:
                result = update_loss(cfg, self.trainable, batch, u)
            yield result.loss, {k: result.metrics.get(k, 0.0) for k in names}

    def metrics(self, seconds: float, checkpoint: bool) -> dict[str, float]:
        return {**self.logged, "update_s": time.perf_counter() - self.t_updates}

    def sample(self, ema: EMA | None, path: Path) -> None:
        """One image of each of the run's ``sample_prompts`` under the rollout settings (seed 0), side by side."""
        grids = self._pipeline(ema)
        if grids is not None:
            size = self.cfg.rollout.image_size
            images = grids.to(self.info.device)(self.cfg.sample_prompts, height=size, width=size, progress=False,
                                                generator=torch.Generator().manual_seed(0),
                                                **self.cfg.rollout.settings()).images
            save_png(grid_image(images), path)
        barrier(self.info)

    def export(self, ema: EMA | None, path: Path) -> Path:
        """A directory ``NextStepPipeline.from_pretrained`` loads: the trained weights with the base model's
        tokenizer, VAE and sampling defaults. A base model's distilled ``fast/`` head is not carried over: it was
        distilled from the weights before post-training."""
        pipe = self._pipeline(ema)
        if pipe is not None:
            pipe.save_pretrained(path)
        barrier(self.info)
        return path

    def _pipeline(self, ema: EMA | None):
        """The trained model (its EMA weights where there are some) in a pipeline like the base model's, without
        its distilled head, on the main process (None elsewhere); every process calls."""
        from ..pipeline import NextStepPipeline

        model = plain_copy(self.trainable, ema, "model", NextStep)
        p = self.pipe
        return None if model is None else NextStepPipeline(model, p.vae, p.tokenizer, p.defaults, p.format)


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
    if info.enabled and run.parallel == "fsdp":  # FSDP2 shards the trained model; rollouts sample from a full copy
        pipe.model = copy.deepcopy(model).requires_grad_(False)
    if run.activation_checkpointing:
        apply_activation_checkpointing(model, (DecoderLayer,))
    # the head's parts are called one by one (condition and time embeddings, velocity): it stays in the root's unit
    trainable = wrap(PolicyModule(model), info, run.parallel, (DecoderLayer,), uses_bf16(run, info))
    return fit(RLTask(cfg, trainable, reference, pipe, reward, info), cfg, trainable, out, ckpt, info,
               progress=progress)


@torch.no_grad()
def _sync_policy(trainable: nn.Module, policy: NextStep) -> None:
    """Copy the trained parameters, gathered from their FSDP2 shards, into the rollout model (every rank calls)."""
    own = dict(policy.named_parameters())
    for name, p in trainable.named_parameters():
        if p.requires_grad:  # a DTensor shard, or a parameter FSDP2 holds gathered since a forward without backward
            own[plain_key(name).removeprefix("model.")].copy_(p.full_tensor() if hasattr(p, "full_tensor") else p)
