"""The one training loop of every trainer (AR model, tokenizer, head distillation, RL post-training).

A trainer supplies a :class:`Task`: its data and its loss (``updates``), plus what it samples and exports. ``fit``
owns the rest: the optimizer and its LR schedule, the non-finite check, gradient clipping and the gradient norm, EMA,
metrics, sample grids, atomic checkpoints (resume included) and exports.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from ..errors import TrainingError
from .config import to_dict
from .distributed import DistInfo, all_sum
from .state import EMA, Progress, checkpoints, load_checkpoint, lr_at, make_optimizer, save_checkpoint


class Task:
    """A trainer's part of the loop. ``desc`` names its progress bar; ``extra`` holds (module, optimizer) pairs that
    it trains itself and that the checkpoints carry too (the tokenizer's discriminator)."""

    desc = "train"
    trained_only = False  # checkpoints and EMA hold the trained parameters only (a LoRA run: not its frozen base)
    extra: Mapping[str, tuple[nn.Module, torch.optim.Optimizer]] = MappingProxyType({})

    def updates(self, step: int) -> Iterator[tuple[torch.Tensor, dict[str, float]]]:
        """The losses of step ``step``, one per optimizer update (most trainers make one), each with the metrics to
        log. Values are this process's: the loop sums them over processes and divides by the process count, then
        averages over the updates. The loop steps the optimizer before it asks for the next one."""
        raise NotImplementedError

    def metrics(self, seconds: float, checkpoint: bool) -> dict[str, float]:
        """Metrics of the step just made beyond its losses (throughput, rewards); ``checkpoint``: it is saved."""
        return {}

    def sample(self, ema: EMA | None, path: Path) -> None:
        """Draw the run's sample grid to ``path`` (every process calls)."""
        raise NotImplementedError(f"{type(self).__name__} draws no sample grids")

    def export(self, ema: EMA | None, path: Path) -> Path:
        """Write the trained weights (the EMA's where there are some) as a loadable directory; all processes call."""
        raise NotImplementedError


def fit(task: Task, cfg, trainable: nn.Module, out: Path, ckpt: Path | None, info: DistInfo, *, progress: bool = True,
        notes: Iterable[str] = ()) -> Path:
    """Train ``trainable`` (the wrapped module the task's losses come from) for ``cfg.run.steps`` steps with AdamW
    (``cfg.optim``), from the checkpoint ``ckpt`` when resuming; returns the final export ``OUT/final``. ``notes``:
    lines to print once the progress bar is up."""
    run, opt = cfg.run, cfg.optim
    params = [p for p in trainable.parameters() if p.requires_grad]  # FSDP2: the shards (listed before any forward)
    optimizer = make_optimizer(trainable, opt.lr, opt.betas, opt.weight_decay)
    ema = EMA(trainable, run.ema_decay, task.trained_only) if run.ema_decay > 0 else None
    start = load_checkpoint(ckpt, trainable, optimizer, ema, info, task.extra, task.trained_only)["step"] if ckpt \
        else 0
    bar = Progress(out, run.steps, start, info, task.desc, show=progress)
    for line in notes:
        bar.write(line)
    try:
        for step in range(start, run.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, opt.lr, opt.warmup_steps, run.steps, opt.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            made = []  # each update's metrics
            for u, (loss, parts) in enumerate(task.updates(step)):
                values = all_sum([float(torch.as_tensor(v).detach()) for v in (loss, *parts.values())], info)
                named = dict(zip(["loss", *parts], (v / info.world for v in values)))
                if not all(map(math.isfinite, values)):
                    last = checkpoints(out)
                    raise TrainingError(f"non-finite loss at step {step}, update {u} ({named}); stopping. "
                                        f"Last good checkpoint: {last[-1] if last else 'none'}")
                loss.backward()
                # before clipping; every process holds the all-reduced gradient, so its norm is the global one
                named["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, opt.grad_clip or math.inf))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(trainable)
                made.append(named)
            done = step + 1
            seconds = time.perf_counter() - t0
            checkpoint = run.ckpt_every and done % run.ckpt_every == 0 or done == run.steps
            metrics = {"step": done, **{k: sum(m[k] for m in made) / len(made) for k in made[0]}, "lr": lr,
                       "samples/s": run.batch_size / seconds, **task.metrics(seconds, checkpoint)}
            bar.step(metrics, log=checkpoint or run.log_every > 0 and done % run.log_every == 0)
            if run.sample_every and done % run.sample_every == 0:
                task.sample(ema, out / "samples" / f"step_{done:07d}.png")
            if checkpoint:
                save_checkpoint(out, done, trainable, optimizer, ema, {"config": to_dict(cfg), "data_position": done},
                                info, run.keep_checkpoints, task.extra, task.trained_only)
            if run.export_every and done % run.export_every == 0 and done != run.steps:
                task.export(ema, out / "exports" / f"step_{done:07d}")
    finally:
        bar.close()
    return task.export(ema, out / "final")
