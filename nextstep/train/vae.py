"""Training the image tokenizer (``nextstep train-vae``) with NextStep-1's robustness recipe.

Loss = L1 + MSE (+ small KL for a stochastic posterior) (+ VGG perceptual, weights supplied by the user)
(+ PatchGAN hinge loss after ``disc_start``). The decoder learns from latents perturbed by U(0, gamma) * N(0, 1)
(noise perturbation) on top of the encoder's token-wise normalisation, which is what lets the autoregressive model's
slightly-off tokens still decode cleanly. Held-out PSNR / SSIM are written to ``OUT/eval.json``.
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict

from ..data.sources import open_source
from ..errors import DataError, SampleError
from ..eval.metrics import mean_finite, psnr, ssim
from ..images import fit_image, load_image
from ..model.vae import VAE, ResnetBlock
from .config import VAETrainConfig, to_dict
from .distributed import DistInfo, barrier, unwrap, wrap
from .loop import Task, fit
from .losses import PatchDiscriminator, VGGPerceptual, hinge_d_loss, hinge_g_loss
from .state import make_optimizer, plain_copy, resume_point, start_run, training_autocast, uses_bf16

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
            raise DataError("the dataset is empty")
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
            raise DataError("no readable images in this batch: is the dataset made of images?")
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


class VAETask(Task):
    """The loop's view of tokenizer training: each step's images, their reconstruction losses (+ the adversarial
    loss from ``disc_start``), and the discriminator's own update after the tokenizer's."""

    desc = "train-vae"

    def __init__(self, cfg: VAETrainConfig, trainable: nn.Module, pool: ImagePool, info: DistInfo):
        self.cfg, self.trainable, self.pool, self.info = cfg, trainable, pool, info
        self.autocast = training_autocast(cfg.run, info)
        per_rank = cfg.run.batch_size // info.world
        self.rank_slice = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
        if cfg.disc_weight > 0:
            with torch.random.fork_rng():  # a private seed, like the VAE's: the same start on any process count
                torch.manual_seed(cfg.run.seed)
                disc = PatchDiscriminator().to(info.device)
            disc = wrap(disc, info, "ddp", (), False)
            d_opt = make_optimizer(disc, cfg.optim.lr, cfg.optim.betas, 0.0)
            # Adam's state made now: DCP makes it at the first save otherwise, and the run would depend on when that is
            get_state_dict(disc, d_opt)
            self.extra = {"disc": (disc, d_opt)}

    def updates(self, step: int):
        x, seeds = self.pool.batch(step, self.cfg.run.batch_size, self.rank_slice)
        x = x.to(self.info.device)
        use_disc = "disc" in self.extra and step >= self.cfg.disc_start
        with self.autocast:
            loss, parts, recon = self.trainable(x, seeds)
            if use_disc:  # the discriminator's weights held fixed: this loss trains the tokenizer only
                d = unwrap(self.extra["disc"][0])
                fixed = {n: p.detach() for n, p in d.named_parameters()}
                parts["g_adv"] = hinge_g_loss(torch.func.functional_call(d, fixed, (recon,)))
                loss = loss + self.cfg.disc_weight * parts["g_adv"]
        yield loss, parts
        if use_disc:  # after the tokenizer's update: the discriminator's own
            disc, d_opt = self.extra["disc"]
            with self.autocast:
                d_loss = hinge_d_loss(disc(x), disc(recon.detach()))
            d_loss.backward()
            d_opt.step()
            d_opt.zero_grad(set_to_none=True)

    def export(self, ema, path: Path) -> Path:
        vae = plain_copy(self.trainable, ema, "vae", VAE)
        if vae is not None:
            vae.save_pretrained(path)
        barrier(self.info)
        return path


def train(cfg: VAETrainConfig, *, resume: bool = False, info: DistInfo | None = None, progress: bool = True) -> Path:
    """Run (or resume) tokenizer training; returns the exported VAE directory ``OUT/final``; its held-out PSNR /
    SSIM go to ``OUT/eval.json``."""
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
    trainable = wrap(VAELoss(vae, cfg, perceptual), info, run.parallel, (ResnetBlock,), uses_bf16(run, info))
    final = fit(VAETask(cfg, trainable, pool, info), cfg, trainable, out, ckpt, info, progress=progress)
    if info.is_main:
        if pool.skipped:
            print(f"skipped {pool.skipped} unreadable samples", file=sys.stderr)
        held = pool.heldout()
        if held is not None:
            (out / "eval.json").write_text(json.dumps(evaluate(VAE.from_pretrained(final), held), indent=2))
    barrier(info)
    return final
