"""Weight files, model-agnostic: safetensors (single or sharded) and weights-only torch files read and written
safely, strict assignment into a module, atomic writes. Each model's key mapping lives beside the model
(``NextStep.from_pretrained``, ``VAE.from_pretrained``).

Loading never holds two copies of a model: modules are built on the ``meta`` device and the tensors read from
the file (memory-mapped by safetensors) are assigned in place, cast to the requested dtype one at a time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .files import atomic_path


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or does not match the model it is loaded into."""


def require_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} directory not found: {p}")
    if not p.is_dir():
        raise NotADirectoryError(f"{what} path is not a directory: {p}")
    return p


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of a directory: ``model.safetensors`` or the shards named by its index."""
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"shards named in {index} are missing: {missing}")
        return files
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no weights in {model_dir}: expected model.safetensors or model.safetensors.index.json")


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        try:
            fh = safe_open(str(f), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
            raise CheckpointError(f"cannot read {f} as safetensors: {e}") from None
        with fh:
            for k in fh.keys():
                yield k, fh.get_tensor(k)


def assign_state_dict(
    module: nn.Module,
    tensors: Iterator[tuple[str, torch.Tensor]] | dict[str, torch.Tensor],
    *,
    source: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    ignore: tuple[str, ...] = (),
) -> None:
    """Load ``tensors`` into ``module`` (possibly on ``meta``) by assignment, strictly.

    Every parameter and persistent buffer must be provided with the right shape; extra keys are errors unless
    listed in ``ignore``. Errors name the offending keys. Floating tensors are cast to ``dtype`` when given.
    """
    expected = module.state_dict(keep_vars=True)
    items = tensors.items() if isinstance(tensors, dict) else tensors
    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    bad_shape: dict[str, str] = {}
    for k, t in items:
        if k not in expected:
            if k not in ignore:
                unexpected.append(k)
            continue
        if tuple(t.shape) != tuple(expected[k].shape):
            bad_shape[k] = f"{k}: checkpoint {tuple(t.shape)} vs model {tuple(expected[k].shape)}"
            continue
        if t.is_floating_point():
            loaded[k] = t.to(device=device, dtype=dtype or expected[k].dtype)
        else:
            loaded[k] = t.to(device=device)
    missing = sorted(set(expected) - set(loaded) - set(bad_shape))
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short(sorted(unexpected))}")
    if bad_shape:
        problems.append("shape mismatches (does config.json match the weights?): "
                        + "; ".join(list(bad_shape.values())[:8]))
    if problems:
        raise CheckpointError(f"cannot load {source}: " + " | ".join(problems))
    module.load_state_dict(loaded, strict=True, assign=True)


def _short(keys: list[str], n: int = 12) -> str:
    return ", ".join(keys[:n]) + (f" ... and {len(keys) - n} more" if len(keys) > n else "")


def save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Atomic write (see ``files.atomic_path``)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)


def write_json(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, what: str) -> dict[str, Any]:
    require_file(path, what)
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def load_torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict saved with ``torch.save``, loaded safely (no pickled code runs)."""
    require_file(path, "checkpoint")
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"cannot read {path} as a weights-only torch checkpoint: {e}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a plain state dict of tensors")
    return sd


def save_safetensors_sharded(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int | None = None) -> None:
    """``out/model.safetensors``, or with ``max_shard_bytes`` the ``model-0000i-of-0000n.safetensors`` shards plus
    ``model.safetensors.index.json`` as Hugging Face writes them; stale weight files of an earlier save go first."""
    shards = _split_shards(state, max_shard_bytes)
    for stale in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        stale.unlink()
    if len(shards) == 1:
        save_safetensors(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, out / "model.safetensors.index.json")


def _split_shards(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [state]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards
