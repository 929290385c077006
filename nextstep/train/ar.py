"""Training the autoregressive model (``nextstep train``): mixed text-to-image / edit / text batches.

One step: the plan names the global batch (deterministic in seed and step) -> this rank's contiguous slice ->
sequences (prompt protocol + guidance dropout) -> ``NextStep.loss`` with per-image head noise and global-count
normalisation (so any number of ranks computes the same update) -> AdamW with warmup + cosine, clipping, EMA.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from ..config import NextStepConfig, SamplingConfig
from ..data.sequences import BatchPlan, TrainBatch, build_example, collate, encode_samples, load_records, save_records
from ..data.sources import open_source
from ..errors import CheckpointError, ConfigError, DataError
from ..images import grid_image, save_png, to_pil
from ..model.flow_head import VelocityNet
from ..model.latents import token_grid
from ..model.nextstep import NextStep
from ..model.transformer import DecoderLayer
from ..model.vae import VAE
from ..prompt import check_special_ids
from ..tokenizer import Tokenizer
from .config import TrainConfig, to_dict
from .distributed import DistInfo, all_sum, apply_activation_checkpointing, barrier, unwrap, wrap
from .loop import Task, fit
from .state import full_state_dict, plain_copy, plain_key, resume_point, start_run, training_autocast, uses_bf16

# How the sample grids are drawn, and so the defaults every export carries (its generation_config.json): a freshly
# trained small model loads with the settings its grids were judged by, not the 14B model's 50 steps at guidance 7.5.
GRID_SAMPLING = SamplingConfig(num_inference_steps=20, guidance_scale=3.0)
TRAINING_ADAPTER = "default"  # the adapter's name inside the model while a LoRA run trains it (PEFT's default)


class LossModule(nn.Module):
    """The unit that DDP / FSDP2 wrap: its forward is the model's training loss. ``base``: a context in which the
    model computes its base (``lora.adapters_disabled``): the replayed images of a batch then take the base's
    velocities as their flow targets (``NextStep.loss``'s ``base_targets``)."""

    def __init__(self, model: NextStep, base=None):
        super().__init__()
        self.model = model
        self.base = base

    def forward(self, batch: TrainBatch, normalizers: tuple[float, float]):
        gens = [torch.Generator().manual_seed(s) for s in batch.image_seeds]
        dev = self.model.device
        return self.model.loss(batch.input_ids.to(dev), [z.to(dev) for z in batch.latents] or None,
                               attention_mask=batch.attention_mask.to(dev),
                               image_loss_mask=batch.image_loss_mask.to(dev), generator=gens, normalizers=normalizers,
                               **({"base_targets": self._replayed(batch), "base": self.base} if self.base is not None
                                  and batch.latents else {}))

    @staticmethod
    def _replayed(batch: TrainBatch) -> torch.Tensor:
        """(n_images,) bool, all False where none is replayed: the base's forward then still runs, as it does on
        the other ranks (under FSDP2 each forward gathers the layers' shards: every rank must make the same calls)."""
        if batch.replayed is not None:
            return batch.replayed
        return torch.zeros(len(batch.latents), dtype=torch.bool)


def batch_counts(batch: TrainBatch, config: NextStepConfig) -> tuple[float, float]:
    """(text positions in the CE sum, weighted head rows in the flow-loss sum), from the batch alone."""
    nxt_ids, nxt_mask = batch.input_ids[:, 1:], batch.attention_mask[:, 1:]
    text = float(((nxt_ids != config.image_placeholder_id) & (nxt_mask == 1)).sum())
    rows = [config.flow_rows(math.prod(token_grid(tuple(z.shape[-2:]), config.patch_size))) for z in batch.latents]
    return text, float(sum(w * r for w, r in zip(batch.image_loss_mask.tolist(), rows))) * config.head.batch_mul


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
            raise DataError(f"the dataset is empty: no readable samples ({skipped} unreadable)")
        save_records(records, path)
    barrier(info)
    return load_records(path), skipped


def build_model(cfg: TrainConfig, tok: Tokenizer) -> NextStep:
    if cfg.init_from:
        model = NextStep.from_pretrained(cfg.init_from)
        cfg.apply_overrides(model.config)
        if cfg.parallel_tokens is not None:
            model.enable_parallel(cfg.parallel_tokens, torch.Generator().manual_seed(cfg.run.seed))
    else:
        model = NextStep(cfg.model_config()).init_weights(generator=torch.Generator().manual_seed(cfg.run.seed))
    if cfg.trainable is not None:  # the rest stays frozen: exactly as loaded
        trained = {t: [p for n, p in model.named_parameters() if n == t or n.startswith(t + ".")]
                   for t in cfg.trainable}
        if unknown := [t for t, ps in trained.items() if not ps]:
            raise ConfigError(f"trainable: {unknown[0]!r} names no parameter of the model (e.g. image_ahead, "
                              f"transformer.layers.5, image_head)")
        model.requires_grad_(False)
        for ps in trained.values():
            for p in ps:
                p.requires_grad_(True)
    check_special_ids(tok, model.config)
    vocab = model.config.transformer.vocab_size
    if len(tok) > vocab:
        raise CheckpointError(f"tokenizer has {len(tok)} tokens, more than the model's vocabulary {vocab}")
    return model.train()


class ARTask(Task):
    """The loop's view of AR training: the plan's batch of each step, sliced for this process, and its loss."""

    def __init__(self, cfg: TrainConfig, trainable: nn.Module, records, tok: Tokenizer, vae: VAE, info: DistInfo):
        self.cfg, self.trainable, self.records, self.tok, self.vae, self.info = cfg, trainable, records, tok, vae, info
        self.plan = BatchPlan(records, cfg.data.mix, cfg.data.seed)
        self.autocast = training_autocast(cfg.run, info)
        self.tokens = 0.0

    def updates(self, step: int):
        run, info, cfg_m = self.cfg.run, self.info, unwrap(self.trainable).model.config
        per_rank = run.batch_size // info.world
        slots = self.plan.step(step, run.batch_size)[info.rank * per_rank:(info.rank + 1) * per_rank]
        examples = [build_example(self.records[i], self.tok, cfg_m.patch_size, s, self.cfg.data.caption_dropout,
                                  self.cfg.data.image_dropout) for i, s in slots]
        batch = collate(examples, self.tok.special.pad, [s for _, s in slots])
        weight = self.cfg.lora.replay_weight if self.cfg.lora is not None else 1.0
        if weight != 1.0 and batch.replayed is not None:
            batch.image_loss_mask = batch.image_loss_mask * torch.where(batch.replayed, weight, 1.0)
        counts = all_sum([*batch_counts(batch, cfg_m), batch.num_tokens], info)
        self.tokens = counts[2]
        with self.autocast:
            out = self.trainable(batch, (max(counts[0], 1) / info.world, max(counts[1], 1e-8) / info.world))
        yield out.loss, {"lm_loss": out.lm_loss, "im_loss": out.im_loss}

    def metrics(self, seconds: float, checkpoint: bool) -> dict[str, float]:
        return {"tokens/s": self.tokens / seconds}

    def sample(self, ema, path: Path) -> None:
        pipe = self._pipeline(ema)
        if pipe is not None:
            height, width = self.cfg.data.bucket_sizes[0]
            out = pipe.to(self.info.device)(self.cfg.sample_prompts, height=height, width=width, progress=False,
                                            generator=torch.Generator().manual_seed(0), output_type="pt")
            save_png(grid_image(to_pil(out.images)), path)

    def export(self, ema, path: Path) -> Path:
        """A directory ``NextStepPipeline.from_pretrained`` loads, with the grids' settings as its defaults."""
        pipe = self._pipeline(ema)
        if pipe is not None:
            pipe.save_pretrained(path)
        barrier(self.info)
        return path

    @property
    def defaults(self) -> SamplingConfig:
        """The sampling defaults of the run's grids and exports: the grids' settings, and the sizes trained at (other
        sizes warn when the exported model is used)."""
        sizes = tuple(f"{w}x{h}" for h, w in self.cfg.data.bucket_sizes)
        return dataclasses.replace(GRID_SAMPLING, trained_sizes=sizes)

    def _pipeline(self, ema):
        """The trained model (its EMA weights where there are some) with the run's tokenizer and VAE, on the main
        process (None elsewhere); every process calls."""
        from ..pipeline import NextStepPipeline

        model = plain_copy(self.trainable, ema, "model", NextStep)
        return None if model is None else NextStepPipeline(model, self.vae, self.tok, defaults=self.defaults)


class LoraTask(ARTask):
    """AR training of LoRA adapters on a frozen base: the same data and loss; checkpoints hold the adapters and
    their optimizer; exports are adapter directories (``nextstep.lora``)."""

    trained_only = True

    def __init__(self, *args, identity, peft_config):
        super().__init__(*args)
        self.identity, self.peft_config = identity, peft_config

    def export(self, ema, path: Path) -> Path:
        from .. import lora

        state = full_state_dict(self.trainable, trained_only=True)
        if ema is not None:
            state.update((k, (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu())
                         for k, v in ema.weights().items())
        state = {_adapter_key(k): v for k, v in state.items()}
        if self.info.is_main:
            lora.save_adapter(path, state, self.peft_config, self.identity)
            if self.cfg.lora.export_merged and path.name == "final":
                self._export_merged(path, path.with_name("final-merged"))
        barrier(self.info)
        return path

    def _export_merged(self, adapter: Path, out: Path) -> None:
        """The float base (``init_from``) with the adapter merged in, as a model directory of its own."""
        from ..lora import Adapters, merge_and_unload
        from ..pipeline import NextStepPipeline

        base = NextStep.from_pretrained(self.cfg.init_from)
        Adapters(base).load(adapter)
        NextStepPipeline(merge_and_unload(base), self.vae, self.tok, defaults=self.defaults).save_pretrained(out)

    def sample(self, ema, path: Path) -> None:
        """The grid from the model being trained (the EMA's adapter weights swapped in meanwhile), on the main rank."""
        from ..pipeline import NextStepPipeline

        if not self.info.is_main:
            return
        model = unwrap(self.trainable).model
        params = {n: p for n, p in self.trainable.named_parameters() if p.requires_grad}
        saved = {n: p.detach().clone() for n, p in params.items()} if ema is not None else {}
        try:
            with torch.no_grad():
                for n in saved:
                    params[n].copy_(ema.shadow[n])
            pipe = NextStepPipeline(model, self.vae, self.tok, defaults=self.defaults)
            height, width = self.cfg.data.bucket_sizes[0]
            out = pipe(self.cfg.sample_prompts, height=height, width=width, progress=False,
                       generator=torch.Generator().manual_seed(0), output_type="pt")
            save_png(grid_image(to_pil(out.images)), path)
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    params[n].copy_(v)
            model.train()


def _adapter_key(key: str) -> str:
    """A trained parameter's name (wrappers' parts and all) -> PEFT's saved name: ``model.X.lora_A.default.weight``
    -> ``X.lora_A.weight``."""
    return plain_key(key).removeprefix("model.").replace(f".{TRAINING_ADAPTER}.", ".")


def build_lora_model(cfg: TrainConfig, tok: Tokenizer):
    """The frozen base (``init_from``, quantized per the recipe) with fresh adapters (drawn from the run's seed, the
    same on every rank), its identity and PEFT config."""
    from .. import lora

    base = NextStep.from_pretrained(cfg.init_from, quantize=cfg.quantize)
    identity = lora.AdapterIdentity.of(base, cfg.init_from, cfg.lora.targets, cfg.quantize)  # before the overrides
    cfg.apply_overrides(base.config)  # the loss weights and head batch: training only
    check_special_ids(tok, base.config)
    peft_config = lora.lora_config(cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets, base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        lora.inject(peft_config, base, TRAINING_ADAPTER)
    return base.train(), identity, peft_config


def train(cfg: TrainConfig, *, resume: bool = False, info: DistInfo | None = None, progress: bool = True) -> Path:
    """Run (or resume) training; returns the exported model directory ``OUT/final``."""
    info = info or DistInfo()
    run = cfg.run
    out = start_run(run, info)
    ckpt = resume_point(out, cfg, resume, info)
    tok = Tokenizer.from_pretrained(cfg.tokenizer or cfg.init_from)
    vae = VAE.from_pretrained(cfg.vae, device=info.device)
    records, skipped = prepare_records(cfg, vae, out, info, progress)
    base = None
    if cfg.lora is not None:
        from .. import lora

        if info.enabled and cfg.run.parallel == "fsdp" and cfg.run.sample_every:
            raise ConfigError("lora with parallel fsdp draws no sample grids (the base is sharded): set "
                              "run.sample_every to 0, or use parallel ddp")
        model, identity, peft_config = build_lora_model(cfg, tok)
        model = model.to(info.device)
        if cfg.lora.replay_targets == "base":
            if not any(r.replay for r in records):
                raise ConfigError('lora.replay_targets "base": no sample of the dataset is marked "replay": true '
                                  "(a folder line's flag; scripts/concept_dataset.py --replay marks its replay)")
            base = functools.partial(lora.adapters_disabled, model)
    else:
        model = build_model(cfg, tok).to(info.device)
    if info.is_main:
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    if run.activation_checkpointing:
        apply_activation_checkpointing(model, (DecoderLayer,))
    trainable = wrap(LossModule(model, base), info, run.parallel, (DecoderLayer, VelocityNet), uses_bf16(run, info))
    if run.compile:
        model.transformer.compile()
    notes = [f"skipped {skipped} unreadable samples while encoding the dataset"] if skipped else []
    task = (ARTask(cfg, trainable, records, tok, vae, info) if cfg.lora is None
            else LoraTask(cfg, trainable, records, tok, vae, info, identity=identity, peft_config=peft_config))
    return fit(task, cfg, trainable, out, ckpt, info, progress=progress, notes=notes)
