"""PyTorch's own distributed engine, applied from outside the model: process group from torchrun's environment,
DDP or FSDP2 (``fully_shard``) wrapping, activation checkpointing and compile.

The caller (a training entry point) reads the environment through :func:`init_from_env`; library code never does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_from_env(device_type: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1): the one place a process group is started, for
    training and for tensor-parallel inference. ``device_type`` is the device the caller asked for ("cpu": gloo, even
    on a GPU host; "cuda": nccl, one GPU per local rank); None: CUDA when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if device_type is None else device_type == "cuda"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum floats over ranks (float64 on the wire, so counts stay exact)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def apply_activation_checkpointing(model: nn.Module, block_types: tuple[type, ...]) -> None:
    """Recompute each block's activations in the backward pass (non-reentrant checkpointing)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing as apply

    apply(model, check_fn=lambda m: isinstance(m, block_types))


def wrap(model: nn.Module, info: DistInfo, strategy: str, shard_types: tuple[type, ...], bf16: bool) -> nn.Module:
    """DDP or FSDP2 around ``model`` when running on several processes; the model itself is unchanged."""
    if not info.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.local_rank] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
          else MixedPrecisionPolicy())
    for m in model.modules():
        if isinstance(m, shard_types):
            fully_shard(m, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module behind a DDP wrapper (FSDP2 and compile keep it in place)."""
    return getattr(model, "module", model)
