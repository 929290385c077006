"""Training the image tokenizer (``nextstep train-vae``) with NextStep-1's robustness recipe.

Loss = L1 + MSE (+ small KL for a stochastic posterior) (+ VGG perceptual, weights supplied by the user)
(+ PatchGAN hinge loss after ``disc_start``). The decoder learns from latents perturbed by U(0, gamma) * N(0, 1)
(noise perturbation) on top of the encoder's token-wise normalisation, which is what lets the autoregressive model's
slightly-off tokens still decode cleanly. Held-out PSNR / SSIM are written to ``OUT/eval.json``.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.sources import SampleError, open_source
from ..errors import TrainingError
from ..eval.metrics import mean_finite, psnr, ssim
from ..images import fit_image, load_image
from ..model.vae import VAE, ResnetBlock
from .config import VAETrainConfig, to_dict
from .distributed import DistInfo, all_sum, barrier, wrap
from .losses import PatchDiscriminator, VGGPerceptual, hinge_d_loss, hinge_g_loss
from .state import (EMA, Progress, checkpoints, load_checkpoint, lr_at, make_optimizer, plain_state_dict,
                    resume_point, save_checkpoint, start_run)

IMAGE_KEYS = {"t2i": ("image",), "edit": ("source", "target"), "text": ()}


class VAELoss(nn.Module):
    """The unit DDP / FSDP wrap: reconstruction losses of a batch of images (B, 3, H, W) in [-1, 1]."""

    def __init__(self, vae: VAE, cfg: VAETrainConfig, perceptual: VGGPerceptual | None):
        super().__init__()
        self.vae, self.cfg, self.perceptual = vae, cfg, perceptual

    def forward(self, x: torch.Tensor, seeds: list[int]):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        with nullcontext() if self.cfg.train_encoder else torch.no_grad():
            post = self.vae.encode(x)
        det = self.vae.config.deterministic
        z = post.mode() if det else torch.cat([post_i for post_i in _per_image_samples(post, gens)])
        z = torch.cat([self.vae.perturb(zi[None], self.cfg.noise_gamma, g) for zi, g in zip(z, gens)])
        recon = self.vae.decode(z)
        parts = {"l1": (recon - x).abs().mean(), "mse": (recon - x).pow(2).mean()}
        loss = self.cfg.l1_weight * parts["l1"] + self.cfg.mse_weight * parts["mse"]
        if not det and self.cfg.kl_weight > 0:
            parts["kl"] = 0.5 * (post.mean.pow(2) + post.logvar.exp() - 1 - post.logvar).flatten(1).sum(1).mean()
            loss = loss + self.cfg.kl_weight * parts["kl"]
        if self.perceptual is not None:
            parts["perceptual"] = self.perceptual(recon, x)
            loss = loss + self.cfg.perceptual_weight * parts["perceptual"]
        return loss, parts, recon


def _per_image_samples(post, gens):
    for i, g in enumerate(gens):
        mean, std = post.mean[i:i + 1], post.std[i:i + 1]
        yield mean + std * torch.randn(mean.shape, generator=g).to(mean)


class ImagePool:
    """Images of a source fitted to one size; batches drawn deterministically from (seed, step)."""

    def __init__(self, source, size: tuple[int, int], holdout: int, seed: int):
        self.source, self.size, self.seed = source, size, seed
        n = len(source)
        if n == 0:
            raise ValueError("the dataset is empty")
        self.holdout = list(range(min(holdout, max(n - 1, 0))))
        self.train = np.arange(len(self.holdout), n)
        self.skipped = 0

    def load(self, i: int, pick: int) -> torch.Tensor | None:
        try:
            s = self.source[i]
        except SampleError:
            self.skipped += 1
            return None
        keys = IMAGE_KEYS[s["kind"]]
        if not keys:
            return None
        return fit_image(load_image(s[keys[pick % len(keys)]]), *self.size)

    def batch(self, step: int, size: int, rank_slice: slice) -> tuple[torch.Tensor, list[int]]:
        rng = np.random.default_rng([self.seed, step])
        picks = [(int(self.train[rng.integers(len(self.train))]), int(rng.integers(2**62))) for _ in range(size)]
        images, seeds = [], []
        for i, s in picks[rank_slice]:
            x = self.load(i, s)
            if x is not None:
                images.append(x)
                seeds.append(s)
        if not images:
            raise ValueError("no readable images in this batch: is the dataset made of images?")
        return torch.stack(images), seeds

    def heldout(self) -> torch.Tensor | None:
        xs = [x for x in (self.load(i, 0) for i in self.holdout) if x is not None]
        return torch.stack(xs) if xs else None


def evaluate(vae: VAE, images: torch.Tensor, batch: int = 32) -> dict[str, float]:
    """Held-out reconstruction quality of the posterior mean: PSNR (dB) and SSIM, on [0, 1] pixels."""
    vae.eval()
    ps, ss = [], []
    with torch.no_grad():
        for x in images.split(batch):
            x = x.to(next(vae.parameters()).device)
            r = vae.decode(vae.encode(x).mode())
            a, b = (x / 2 + 0.5).clamp(0, 1), (r / 2 + 0.5).clamp(0, 1)
            ps.append(psnr(b, a).cpu())
            ss.append(ssim(b, a).cpu())
    return {"psnr": mean_finite(torch.cat(ps)), "ssim": float(torch.cat(ss).mean()), "images": len(images)}


def train(cfg: VAETrainConfig, *, resume: bool = False, info: DistInfo | None = None, progress: bool = True) -> Path:
    """Run (or resume) tokenizer training; returns the exported VAE directory ``OUT/final``."""
    info = info or DistInfo()
    run = cfg.run
    out = start_run(run, info)
    ckpt = resume_point(out, cfg, resume, info)
    pool = ImagePool(open_source(cfg.data), cfg.data.bucket_sizes[0], cfg.holdout, cfg.data.seed)
    if cfg.init_from:
        vae = VAE.from_pretrained(cfg.init_from)
    else:
        with torch.random.fork_rng():  # the default initialisers draw from the global RNG: seed a private copy
            torch.manual_seed(run.seed)
            vae = VAE(cfg.vae_config())
    vae = vae.to(info.device).train()
    if not cfg.train_encoder:  # decoder-only fine-tuning: the encoder (and so every cached latent) stays as it is
        vae.encoder.requires_grad_(False)
    perceptual = VGGPerceptual(cfg.perceptual_weights).to(info.device) if cfg.perceptual_weight > 0 else None
    if info.is_main:
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    bf16 = run.precision == "bf16"
    trainable = wrap(VAELoss(vae, cfg, perceptual), info, run.parallel, (ResnetBlock,), bf16)
    optimizer = make_optimizer(trainable, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay)
    disc = d_opt = None
    if cfg.disc_weight > 0:
        disc = wrap(PatchDiscriminator().to(info.device), info, "ddp", (), False)
        d_opt = make_optimizer(disc, cfg.optim.lr, cfg.optim.betas, 0.0)
    ema = EMA(trainable, run.ema_decay) if run.ema_decay > 0 else None

    def load(path: Path) -> dict:
        if disc is not None and (path / "disc.pt").is_file():
            disc.load_state_dict(torch.load(path / "disc.pt", weights_only=True))
        return load_checkpoint(path, trainable, optimizer, ema, info)

    start = load(ckpt)["step"] if ckpt else 0
    bar = Progress(out, run.steps, start, info, "train-vae", show=progress)
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    per_rank = run.batch_size // info.world
    rank_slice = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
    try:
        for step in range(start, run.steps):
            t0 = time.perf_counter()
            x, seeds = pool.batch(step, run.batch_size, rank_slice)
            x = x.to(info.device)
            lr = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, run.steps, cfg.optim.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            use_disc = disc is not None and step >= cfg.disc_start
            with autocast:
                loss, parts, recon = trainable(x, seeds)
                if use_disc:
                    parts["g_adv"] = hinge_g_loss(disc(recon))
                    loss = loss + cfg.disc_weight * parts["g_adv"]
            values = all_sum([loss.item()] + [v.item() for v in parts.values()], info)
            if not all(v == v and abs(v) != float("inf") for v in values):
                last = checkpoints(out)
                raise TrainingError(f"non-finite loss at step {step} ({dict(zip(parts, values[1:]))}); stopping. "
                                    f"Last good checkpoint: {last[-1] if last else 'none'}")
            loss.backward()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if use_disc:
                with autocast:
                    d_loss = hinge_d_loss(disc(x), disc(recon.detach()))
                d_loss.backward()
                d_opt.step()
                d_opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(trainable)
            done = step + 1
            metrics = {"step": done, "loss": values[0] / info.world, "lr": lr,
                       **{k: v / info.world for k, v in zip(parts, values[1:])},
                       "samples/s": run.batch_size / (time.perf_counter() - t0)}
            bar.step(metrics, log=run.log_every > 0 and (done % run.log_every == 0 or done == run.steps))
            if run.ckpt_every and done % run.ckpt_every == 0 or done == run.steps:
                path = save_checkpoint(out, done, trainable, optimizer, ema,
                                       {"config": to_dict(cfg), "data_position": done}, info, run.keep_checkpoints)
                if disc is not None and info.is_main:
                    torch.save(disc.state_dict(), path / "disc.pt")
    finally:
        bar.close()
    if pool.skipped:
        bar.write(f"skipped {pool.skipped} unreadable samples")
    return export(trainable, ema, vae.config, pool, out, info)


def _plain_vae(trainable: nn.Module, ema: EMA | None, config) -> VAE | None:
    """A plain CPU copy of the (EMA) VAE weights on the main rank; every rank must call (FSDP gathers)."""
    state = plain_state_dict(trainable, ema, "vae")
    if state is None:
        return None
    vae = VAE(config)
    vae.load_state_dict(state)
    return vae.eval()


def export(trainable, ema, config, pool: ImagePool, out: Path, info: DistInfo) -> Path:
    """``OUT/final`` (a VAE directory) and ``OUT/eval.json`` (held-out PSNR / SSIM)."""
    vae = _plain_vae(trainable, ema, config)
    final = out / "final"
    if vae is not None:
        vae.save_pretrained(final)
        held = pool.heldout()
        if held is not None:
            (out / "eval.json").write_text(json.dumps(evaluate(vae, held), indent=2))
    barrier(info)
    return final

