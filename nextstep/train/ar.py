"""Training the autoregressive model (``nextstep train``): mixed text-to-image / edit / text batches.

One step: the plan names the global batch (deterministic in seed and step) -> this rank's contiguous slice ->
sequences (prompt protocol + guidance dropout) -> ``NextStep.loss`` with per-image head noise and global-count
normalisation (so any number of ranks computes the same update) -> AdamW with warmup + cosine, clipping, EMA.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from ..data.sequences import (BatchPlan, TrainBatch, build_example, collate, encode_samples, load_records,
                              save_records)
from ..config import SamplingConfig
from ..data.sources import open_source
from ..errors import TrainingError
from ..images import grid_image, save_png, to_pil
from ..model.flow_head import VelocityNet
from ..model.latents import token_grid
from ..model.nextstep import NextStep
from ..model.transformer import DecoderLayer
from ..model.vae import VAE
from ..prompt import check_special_ids
from ..tokenizer import Tokenizer
from .config import TrainConfig, to_dict
from .distributed import DistInfo, all_sum, apply_activation_checkpointing, barrier, wrap
from .state import (EMA, Progress, checkpoints, load_checkpoint, lr_at, make_optimizer, plain_copy, resume_point,
                    save_checkpoint, start_run, training_autocast)

# How the sample grids are drawn, and so the defaults every export carries (its generation_config.json): a freshly
# trained small model loads with the settings its grids were judged by, not the 14B model's 50 steps at guidance 7.5.
GRID_SAMPLING = SamplingConfig(num_inference_steps=20, guidance_scale=3.0)


class LossModule(nn.Module):
    """The unit that DDP / FSDP2 wrap: its forward is the model's training loss."""

    def __init__(self, model: NextStep):
        super().__init__()
        self.model = model

    def forward(self, batch: TrainBatch, normalizers: tuple[float, float]):
        gens = [torch.Generator().manual_seed(s) for s in batch.image_seeds]
        dev = self.model.device
        return self.model.loss(batch.input_ids.to(dev), [z.to(dev) for z in batch.latents] or None,
                               attention_mask=batch.attention_mask.to(dev),
                               image_loss_mask=batch.image_loss_mask.to(dev), generator=gens, normalizers=normalizers)


def batch_counts(batch: TrainBatch, placeholder: int, patch: int, batch_mul: int) -> tuple[float, float]:
    """(text positions in the CE sum, weighted head rows in the flow-loss sum), from the batch alone."""
    nxt_ids, nxt_mask = batch.input_ids[:, 1:], batch.attention_mask[:, 1:]
    text = float(((nxt_ids != placeholder) & (nxt_mask == 1)).sum())
    tokens = [math.prod(token_grid(tuple(z.shape[-2:]), patch)) for z in batch.latents]
    return text, float(sum(w * n for w, n in zip(batch.image_loss_mask.tolist(), tokens))) * batch_mul


def cache_key(cfg: TrainConfig) -> str:
    """Names the latent cache: a hash of the data recipe and the VAE's path."""
    data = to_dict(cfg.data)
    for later in ("backgrounds", "weights"):  # added later: unused, they leave the keys of older caches unchanged
        if not data[later]:
            del data[later]
    return hashlib.sha256(json.dumps([data, str(Path(cfg.vae).resolve())], sort_keys=True,
                                     default=str).encode()).hexdigest()[:12]


def prepare_records(cfg: TrainConfig, vae: VAE, out: Path, info: DistInfo, progress: bool):
    """Encode the dataset once (main rank) and cache it; every rank then reads the cache."""
    path = out / f"latents-{cache_key(cfg)}.safetensors"
    skipped = 0
    if info.is_main and not path.is_file():
        records, skipped = encode_samples(open_source(cfg.data), vae, cfg.data.bucket_sizes, progress=progress)
        if not records:
            raise ValueError(f"the dataset is empty: no readable samples ({skipped} unreadable)")
        save_records(records, path)
    barrier(info)
    return load_records(path), skipped


def build_model(cfg: TrainConfig, tok: Tokenizer) -> NextStep:
    if cfg.init_from:
        model = NextStep.from_pretrained(cfg.init_from)
        cfg.apply_overrides(model.config)
    else:
        model = NextStep(cfg.model_config()).init_weights(generator=torch.Generator().manual_seed(cfg.run.seed))
    check_special_ids(tok, model.config)
    vocab = model.config.transformer.vocab_size
    if len(tok) > vocab:
        raise ValueError(f"tokenizer has {len(tok)} tokens, more than the model's vocabulary {vocab}")
    return model.train()


def train(cfg: TrainConfig, *, resume: bool = False, info: DistInfo | None = None, progress: bool = True) -> Path:
    """Run (or resume) training; returns the exported model directory ``OUT/final``."""
    info = info or DistInfo()
    run = cfg.run
    out = start_run(run, info)
    ckpt = resume_point(out, cfg, resume, info)
    tok = Tokenizer.from_pretrained(cfg.tokenizer or cfg.init_from)
    vae = VAE.from_pretrained(cfg.vae, device=info.device)
    records, skipped = prepare_records(cfg, vae, out, info, progress)
    plan = BatchPlan(records, cfg.data.mix, cfg.data.seed)
    model = build_model(cfg, tok).to(info.device)
    if info.is_main:
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    bf16 = run.precision == "bf16"
    if run.activation_checkpointing:
        apply_activation_checkpointing(model, (DecoderLayer,))
    trainable = wrap(LossModule(model), info, run.parallel, (DecoderLayer, VelocityNet), bf16)
    if run.compile:
        model.transformer.compile()
    optimizer = make_optimizer(trainable, cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay)
    ema = EMA(trainable, run.ema_decay) if run.ema_decay > 0 else None

    start = load_checkpoint(ckpt, trainable, optimizer, ema, info)["step"] if ckpt else 0
    bar = Progress(out, run.steps, start, info, "train", show=progress)
    if skipped:
        bar.write(f"skipped {skipped} unreadable samples while encoding the dataset")
    autocast = training_autocast(run, info)
    per_rank = run.batch_size // info.world
    cfg_m = model.config
    try:
        for step in range(start, run.steps):
            t0 = time.perf_counter()
            slots = plan.step(step, run.batch_size)[info.rank * per_rank:(info.rank + 1) * per_rank]
            examples = [build_example(records[i], tok, cfg_m.patch_size, s, cfg.data.caption_dropout,
                                      cfg.data.image_dropout) for i, s in slots]
            batch = collate(examples, tok.special.pad, [s for _, s in slots])
            counts = all_sum([*batch_counts(batch, cfg_m.image_placeholder_id, cfg_m.patch_size, cfg_m.head.batch_mul),
                              batch.num_tokens], info)
            normalizers = (max(counts[0], 1) / info.world, max(counts[1], 1e-8) / info.world)
            lr = lr_at(step, cfg.optim.lr, cfg.optim.warmup_steps, run.steps, cfg.optim.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast:
                out_loss = trainable(batch, normalizers)
            loss_val, lm_val, im_val = all_sum([out_loss.loss.item(), out_loss.lm_loss.item(),
                                                out_loss.im_loss.item()], info)
            if not all(map(_finite, (loss_val, lm_val, im_val))):
                last = checkpoints(out)
                raise TrainingError(f"non-finite loss at step {step} (lm {lm_val}, image {im_val}); stopping. "
                                    f"Last good checkpoint: {last[-1] if last else 'none'}")
            out_loss.loss.backward()
            grad_norm = (torch.nn.utils.clip_grad_norm_(trainable.parameters(), cfg.optim.grad_clip)
                         if cfg.optim.grad_clip > 0 else torch.tensor(0.0))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(trainable)
            dt = time.perf_counter() - t0
            done = step + 1
            metrics = {"step": done, "loss": loss_val / info.world, "lm_loss": lm_val / info.world,
                       "im_loss": im_val / info.world, "lr": lr, "grad_norm": float(grad_norm),
                       "samples/s": run.batch_size / dt, "tokens/s": counts[2] / dt}
            bar.step(metrics, log=run.log_every > 0 and (done % run.log_every == 0 or done == run.steps))
            if run.sample_every and done % run.sample_every == 0:
                _sample_grid(cfg, trainable, ema, vae, tok, out / "samples" / f"step_{done:07d}.png", info)
            if run.ckpt_every and done % run.ckpt_every == 0 or done == run.steps:
                save_checkpoint(out, done, trainable, optimizer, ema,
                                {"config": to_dict(cfg), "data_position": done}, info, run.keep_checkpoints)
            if run.export_every and done % run.export_every == 0 and done != run.steps:
                export(cfg, trainable, ema, vae, tok, out / "exports" / f"step_{done:07d}", info)
    finally:
        bar.close()
    return export(cfg, trainable, ema, vae, tok, out / "final", info)


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def _sample_grid(cfg: TrainConfig, trainable, ema, vae, tok, path: Path, info: DistInfo) -> None:
    from ..pipeline import NextStepPipeline

    model = plain_copy(trainable, ema, "model", NextStep)
    if model is None:
        return
    height, width = cfg.data.bucket_sizes[0]
    pipe = NextStepPipeline(model.to(info.device), vae, tok, defaults=GRID_SAMPLING)
    out = pipe(cfg.sample_prompts, height=height, width=width, generator=torch.Generator().manual_seed(0),
               progress=False, output_type="pt")
    save_png(grid_image(to_pil(out.images)), path)


def export(cfg: TrainConfig, trainable, ema, vae: VAE, tok: Tokenizer, final: Path, info: DistInfo) -> Path:
    """Write ``final`` so that ``NextStepPipeline.from_pretrained(final)`` loads it: weights, tokenizer, vae/, and
    the sample grids' settings as its sampling defaults (generation_config.json)."""
    model = plain_copy(trainable, ema, "model", NextStep)
    if model is not None:
        model.save_pretrained(final)
        GRID_SAMPLING.save(final)
        tok.save_pretrained(final)
        vae.save_pretrained(final / "vae")
    barrier(info)
    return final
