"""Resumable training state: atomic checkpoints (``torch.distributed.checkpoint``: sharded under FSDP, plain
otherwise), the LR schedule, EMA weights, metrics and progress.

A checkpoint is a directory ``OUT/checkpoints/step_XXXXXXX`` with the model + optimizer (+ EMA, + a trainer's own
modules and optimizers: the tokenizer's discriminator) state written by DCP, ``trainer.json`` (step, data position,
the resolved config) and ``rng_rank{r}.pt``. It is written under a temporary name and renamed when complete, so a
crash never leaves a half checkpoint that ``--resume`` would take.

Every rank writes its part into that one directory (``__{rank}_0.distcp`` under FSDP2), so all processes, on every
node, must see ``OUT`` (``start_run`` checks it). DCP records each tensor's global shape and which rank wrote which
piece, so a checkpoint resumes on any number of processes, and under FSDP2, DDP or one process alike: loading
re-splits the model, optimizer and EMA state for the ranks that load it. The data plan is global (batch ``step``
is the same whatever the rank count; each rank takes its slice), so only ``batch_size`` must stay divisible by the
process count. A rank without an ``rng_rank{r}.pt`` (more ranks than saved) keeps its global RNGs as they are:
the trainers draw their noise from generators seeded per image or per step, not from those.
"""

from __future__ import annotations

import json
import math
import random
import secrets
import shutil
import sys
import time
import warnings
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from tqdm.auto import tqdm

from ..errors import ConfigError, InputError, TrainingError
from ..files import atomic_path
from .config import from_dict, to_dict
from .distributed import DistInfo, all_sum, barrier, unwrap

CKPT_PREFIX = "step_"


def start_run(run, info: DistInfo) -> Path:
    """Check the run against the process count and create its output directory (seen by every process)."""
    if run.batch_size % info.world:
        raise ConfigError(f"batch_size {run.batch_size} is not divisible by the {info.world} processes")
    out = Path(run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_shared_dir(out, info)
    if run.precision == "bf16" and not native_bf16(info.device):
        _say(f"precision bf16: this {info.device.type} has no native bfloat16 (on a CPU: AVX512-BF16 or AMX) and "
             f"emulates it, several times slower than fp32; \"auto\" picks bf16 only where it is native", info)
    return out


def check_shared_dir(out: Path, info: DistInfo) -> None:
    """Raise on every rank unless all processes see the same directory ``out``: rank 0 creates a file of a fresh name
    there and each rank looks for it. Checkpoints and the latent cache are written into ``out`` by several ranks,
    so on several nodes it must be on a filesystem they all mount at the same path; on a node-local disk each node
    would keep a part of every checkpoint, and the run could not be resumed."""
    if not info.enabled:
        return
    name = [f".shared-check-{secrets.token_hex(8)}"]
    dist.broadcast_object_list(name, src=0)
    marker = out / name[0]
    if info.is_main:
        marker.touch()
    barrier(info)
    blind = int(all_sum([0.0 if marker.exists() else 1.0], info)[0])
    barrier(info)
    if info.is_main:
        marker.unlink()
    if blind:
        raise RuntimeError(f"run.out_dir {out} is not shared by all {info.world} processes: {blind} of them do not "
                           f"see the file rank 0 created there. Every rank writes its part of each checkpoint into "
                           f"out_dir: on several nodes, put it on a filesystem all of them mount at the same path "
                           f"(NFS, Lustre, GPFS, ...)")


def resume_point(out: Path, recipe, resume: bool, info: DistInfo) -> Path | None:
    """The checkpoint to continue from: the newest complete one with ``resume``, None for a fresh start.

    Without ``resume`` an existing run is an error (nothing is overwritten); with it and no checkpoint the run starts
    fresh and says so. ``recipe`` (a TrainConfig / VAETrainConfig) must equal the one the checkpoint was trained with
    except in its class's ``MAY_CHANGE_ON_RESUME`` fields: those changes, and the list of what may change, are said;
    any other change is a ``ConfigError`` naming each field old -> new. Checked before anything expensive is built."""
    found = checkpoints(out)
    if found and not resume:
        raise InputError(f"{out} already holds checkpoints: pass --resume to continue, or use a new out_dir")
    if not found:
        if resume:
            _say(f"--resume: no checkpoint in {out / 'checkpoints'}: starting fresh", info)
        return None
    ckpt = found[-1]
    trainer = json.loads((ckpt / "trainer.json").read_text())
    allowed = type(recipe).MAY_CHANGE_ON_RESUME
    changes = recipe_changes(_saved_recipe(ckpt, trainer["config"], type(recipe)), recipe)
    refused = [name for name in changes if not any(name == a or name.startswith(a + ".") for a in allowed)]
    if refused:
        lines = "".join(f"\n  {name}: {_show(changes[name][0])} -> {_show(changes[name][1])}" for name in refused)
        raise ConfigError(f"cannot resume {out} from {ckpt.name}: the recipe differs from the checkpoint's in fields "
                          f"that must not change on resume:{lines}\nRestore them, or train a new run in another "
                          f"out_dir (init_from can start it from this run's exported weights). Fields that may "
                          f"change on resume: {', '.join(allowed)}")
    if recipe.run.steps < trainer["step"]:
        raise ConfigError(f"run.steps {recipe.run.steps} is below the step of the checkpoint to resume ({ckpt}): "
                          f"set run.steps (or --steps) to {trainer['step']} or more")
    said = ", ".join(f"{n} {_show(a)} -> {_show(b)}" for n, (a, b) in changes.items()) or "none"
    _say(f"resuming {out} from step {trainer['step']} ({ckpt.name}); recipe changes: {said}\n"
         f"fields that may change on resume: {', '.join(allowed)} (any other change is refused)", info)
    return ckpt


_ABSENT = object()


def recipe_changes(old, new) -> dict[str, tuple[Any, Any]]:
    """{dotted field name: (old value, new value)} for each field where two recipes differ (nested objects such as
    ``data.mix`` compared key by key)."""
    out: dict[str, tuple[Any, Any]] = {}

    def walk(a, b, name: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in [*a, *(k for k in b if k not in a)]:
                walk(a.get(k, _ABSENT), b.get(k, _ABSENT), f"{name}.{k}" if name else k)
        elif a != b:
            out[name] = (a, b)

    walk(to_dict(old), to_dict(new), "")
    return out


def _saved_recipe(ckpt: Path, saved: dict[str, Any], cls: type):
    """The recipe in a checkpoint's trainer.json, read as this version reads recipes (defaults for keys it lacks)."""
    try:
        return from_dict(cls, saved)
    except ConfigError as e:
        raise ConfigError(f"{ckpt / 'trainer.json'}: the recipe this checkpoint was trained with does not load ({e}): "
                          f"resume it with the nextstep version that wrote it, or start a new out_dir") from None


def _show(v: Any) -> str:
    return "(absent)" if v is _ABSENT else json.dumps(v, default=str)


def _say(text: str, info: DistInfo) -> None:
    if info.is_main:
        print(text, file=sys.stderr, flush=True)


def trim_metrics(path: Path, step: int) -> None:
    """Keep only the records of steps <= ``step`` in a metrics JSONL, rewritten atomically: a run killed after
    logging steps it had not checkpointed logs them again when resumed from ``step``, and each step must appear once.
    A line that does not parse (a write cut off by the kill) goes too."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if (s := _logged_step(line)) is not None and s <= step]
    if len(kept) == len(lines):
        return
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


def _logged_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def lr_at(step: int, base: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to ``base`` over ``warmup`` steps, then cosine decay to ``base * min_ratio`` at ``total``."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, lr: float, betas, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms and embeddings' 1-D parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=tuple(betas))


class EMA:
    """Exponential moving average of the parameters (elementwise, so it works on FSDP shards too).

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so the random initial weights do not
    linger in the average of a short run (with a fixed 0.999, 22% of them remain after 1500 steps)."""

    def __init__(self, model: nn.Module, decay: float, trained_only: bool = False):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()
                       if p.requires_grad or not trained_only}
        self.shadow["_updates"] = torch.zeros((), dtype=torch.float64)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        n = float(self.shadow["_updates"])
        decay = min(self.decay, (1 + n) / (10 + n))
        for name, p in model.named_parameters():
            if p.requires_grad:  # frozen parameters keep their value (exactly)
                self.shadow[name].lerp_(p.detach(), 1 - decay)
        self.shadow["_updates"] += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.shadow.items() if k != "_updates"}


def rng_state() -> dict[str, Any]:
    """Every global RNG's state as tensors, ints and lists (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": list(random.getstate()[1]), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos,
                                                             has_gauss, gauss],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate((3, tuple(s["python"]), None))
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


def checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    d = out_dir / "checkpoints"
    done = [p for p in d.glob(f"{CKPT_PREFIX}*") if (p / "trainer.json").is_file()] if d.is_dir() else []
    return sorted(done, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def _options(trained_only: bool) -> StateDictOptions | None:
    """``trained_only``: the model's part of a checkpoint is its trained parameters (a LoRA run's adapters), not the
    frozen base, which the run loads again from its recipe."""
    return StateDictOptions(ignore_frozen_params=True, strict=False) if trained_only else None


def _checkpoint_state(model: nn.Module, optimizer, ema: EMA | None, extra: Mapping, trained_only: bool = False
                      ) -> dict[str, Any]:
    """What a checkpoint holds: the model (its trained parameters only with ``trained_only``) and its optimizer, the
    EMA, and each of ``extra``'s {name: (module, optimizer)} pairs as ``name`` and ``name_optim``; keys named without
    the wrappers' prefixes (DDP's ``module.``)."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(trained_only))
    if trained_only:
        model_sd = _only_trained(model, model_sd)
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema.state_dict()
    for name, (module, opt) in extra.items():
        state[name], state[f"{name}_optim"] = get_state_dict(module, opt)
    return state


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer, ema: EMA | None,
                    trainer: dict[str, Any], info: DistInfo, keep: int, extra: Mapping | None = None,
                    trained_only: bool = False) -> Path:
    final = out_dir / "checkpoints" / f"{CKPT_PREFIX}{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(info)
    state = _checkpoint_state(model, optimizer, ema, extra or {}, trained_only)
    with warnings.catch_warnings():  # DCP warns that it runs without a process group: intended on one process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng_rank{info.rank}.pt")
    barrier(info)
    if info.is_main:
        (tmp / "trainer.json").write_text(json.dumps({**trainer, "step": step}, indent=2, default=str))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer, ema: EMA | None, info: DistInfo,
                    extra: Mapping | None = None, trained_only: bool = False) -> dict[str, Any]:
    """Restore model, optimizer, EMA, ``extra``'s pairs and this rank's RNG from ``path``; returns its trainer.json.
    A part this run needs that the checkpoint lacks is a ``TrainingError`` naming it."""
    extra = extra or {}
    state = _checkpoint_state(model, optimizer, ema, extra, trained_only)
    saved = {key.split(".")[0] for key in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata}
    missing = [name for name in state if name not in saved]
    if missing:
        raise TrainingError(f"cannot resume from {path}: it holds no {', '.join(missing)} state, which this run "
                            f"trains (it holds {', '.join(sorted(saved))}). Resume with the recipe it was written "
                            f"with, or start a new out_dir")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(trained_only))
    for name, (module, opt) in extra.items():
        set_state_dict(module, opt, model_state_dict=state[name], optim_state_dict=state[f"{name}_optim"])
    rng = path / f"rng_rank{info.rank}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((path / "trainer.json").read_text())


def full_state_dict(model: nn.Module, trained_only: bool = False) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict, of the trained parameters only with ``trained_only`` (every rank must call; FSDP
    gathers)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=trained_only))
    return _only_trained(model, state) if trained_only else state


def _only_trained(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without the buffers (a quantized base's int8 weights and scales), which ``ignore_frozen_params``
    keeps: the entries of parameters that require grad."""
    trained = {plain_key(n) for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trained}


def plain_key(key: str) -> str:
    """A parameter name without the wrappers' parts: DDP's ``module.`` prefix, activation checkpointing's
    ``_checkpoint_wrapped_module.`` and ``torch.compile``'s ``_orig_mod.`` (FSDP2 keeps names as they are)."""
    return key.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "").removeprefix("module.")


def plain_state_dict(trainable: nn.Module, ema: EMA | None, owner: str) -> dict[str, torch.Tensor] | None:
    """The unsharded CPU weights of the model held as attribute ``owner`` of the wrapped loss module (``"model"``,
    ``"vae"``), named as that model names them; the EMA weights instead where there are some. Other attributes
    (e.g. a frozen perceptual network) are left out. Every rank must call (FSDP gathers); None except on rank 0."""
    prefix = owner + "."

    def mine(items):
        return {plain_key(k).removeprefix(prefix): v for k, v in items if plain_key(k).startswith(prefix)}

    state = mine(full_state_dict(trainable).items())
    if ema is not None:
        state.update(mine((k, (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu())
                          for k, v in ema.weights().items()))
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    return state


def plain_copy(trainable: nn.Module, ema: EMA | None, owner: str, cls: type[nn.Module]) -> nn.Module | None:
    """A plain CPU ``cls(config)`` holding the weights of the wrapped module ``owner`` (its EMA weights where there
    are some), in eval mode, on the main rank; None elsewhere. Every rank must call (FSDP gathers)."""
    state = plain_state_dict(trainable, ema, owner)
    if state is None:
        return None
    module = cls(getattr(unwrap(trainable), owner).config)
    module.load_state_dict(state)
    return module.eval()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX.
    Elsewhere (e.g. a CPU with AVX2 only) PyTorch emulates it, several times slower than float32 (docs/training.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def uses_bf16(run, info: DistInfo) -> bool:
    """Whether the run trains in bf16: ``run.precision`` "bf16", or "auto" where the device computes it natively."""
    return run.precision == "bf16" or (run.precision == "auto" and native_bf16(info.device))


def training_autocast(run, info: DistInfo):
    """The forward's precision context: bf16 autocast where the run trains in bf16 (``uses_bf16``), except under
    FSDP2, whose mixed-precision policy casts instead (``distributed.wrap``)."""
    fsdp = info.enabled and run.parallel == "fsdp"
    return torch.autocast(info.device.type, dtype=torch.bfloat16) if uses_bf16(run, info) and not fsdp \
        else nullcontext()


class Progress:
    """Progress bar, metrics JSONL and (when installed) TensorBoard, on the main rank only. Records after ``start``
    (logged by an earlier attempt that did not checkpoint them) are dropped from both."""

    def __init__(self, out_dir: Path, total: int, start: int, info: DistInfo, desc: str, show: bool = True):
        self.info = info
        self.bar = tqdm(total=total, initial=start, desc=desc, disable=not (info.is_main and show),
                        dynamic_ncols=True)
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        self.t0 = time.perf_counter()
        if info.is_main:
            trim_metrics(self.path, start)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start + 1)
            except ImportError:
                pass

    def step(self, metrics: dict[str, float], log: bool) -> None:
        if not self.info.is_main:
            return
        self.bar.update(1)
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "samples/s", "tokens/s")})
        if log:
            with self.path.open("a") as f:
                f.write(json.dumps({**metrics, "time": round(time.perf_counter() - self.t0, 3)}) + "\n")
            if self.tb is not None:
                for k, v in metrics.items():
                    if k != "step":
                        self.tb.add_scalar(k, v, int(metrics["step"]))

    def write(self, text: str) -> None:
        """A log line on stderr (shown with or without the bar)."""
        if self.info.is_main:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
