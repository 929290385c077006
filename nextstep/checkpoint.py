"""Weight files, model-agnostic: safetensors (single or sharded) and weights-only torch files read and written
safely, strict assignment into a module, atomic writes. Each model's key mapping lives beside the model
(``NextStep.from_pretrained``, ``VAE.from_pretrained``).

Loading never holds two copies of a model: modules are built on the ``meta`` device, the keys and shapes of every
file are checked against the module from the files' headers before any weight is read, and each tensor is then read
straight into its final tensor with plain reads, in file order (each file is read once, front to back). A dtype
cast or a move to another device goes through one bounded block at a time (``READ_BLOCK_BYTES``), so host memory
peaks at what the model holds plus one block. Nothing is memory-mapped: the pages of a mapped file stay resident
until the whole file is released, which for multi-gigabyte shards would add a shard to the peak (and the loaded
model would depend on the file staying unchanged).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import CheckpointError, MissingFileError
from .files import atomic_path

READ_BLOCK_BYTES = 16 << 20  # rows read (and cast, or moved to the device) at a time: the host's transient memory
MAX_HEADER_BYTES = 100 << 20  # the safetensors reference implementation's limit

# safetensors dtype names (the format's spec: little-endian, C order) -> torch
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def require_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"{what} directory not found: {p}")
    if not p.is_dir():
        raise MissingFileError(f"{what} path is not a directory: {p}")
    return p


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}")
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
            raise MissingFileError(f"shards named in {index} are missing: {missing}")
        return files
    if single.is_file():
        return [single]
    raise MissingFileError(f"no weights in {model_dir}: expected model.safetensors or model.safetensors.index.json")


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file, known from the file's header and not yet read."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte in the file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def read(self, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
             rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """A new tensor of ``dtype`` (default: the stored one) on ``device`` holding the stored tensor, or only rows
        ``[start, stop)`` of its first dimension; or that, written into the contiguous tensor ``out`` (whose dtype and
        device then apply). Read into the result directly when it is a CPU tensor of the stored dtype; otherwise
        through one CPU buffer of at most ``READ_BLOCK_BYTES`` (cast and moved with ``copy_``, which rounds exactly
        as ``Tensor.to``)."""
        n = self.shape[0] if self.shape else 1
        start, stop = rows if rows is not None else (0, n)
        if not 0 <= start <= stop <= n or (rows is not None and not self.shape):
            raise ValueError(f"rows {rows} out of range for a stored tensor of shape {self.shape}")
        shape = (stop - start, *self.shape[1:]) if self.shape else ()
        if out is None:
            out = torch.empty(shape, dtype=dtype or self.dtype, device=device)
        elif tuple(out.shape) != shape or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous tensor of shape {shape}, got {tuple(out.shape)}")
        if out.numel() == 0:
            return out
        out2 = out.view(stop - start, -1)  # (rows, elements per row)
        row_bytes = out2.shape[1] * self.dtype.itemsize
        direct = out.device.type == "cpu" and out.dtype == self.dtype
        step = min(stop - start, max(1, READ_BLOCK_BYTES // row_bytes))
        buffer = None if direct else torch.empty((step, out2.shape[1]), dtype=self.dtype)  # one per tensor, reused
        with open(self.path, "rb", buffering=0) as f:
            for i in range(0, stop - start, step):
                j = min(i + step, stop - start)
                block = out2[i:j] if direct else buffer[:j - i]
                _read_into(f, self.offset + (start + i) * row_bytes, block, self.path)
                if not direct:
                    out2[i:j].copy_(block)
        return out


def _read_into(f, position: int, block: torch.Tensor, path: Path) -> None:
    """Fill the contiguous CPU tensor ``block`` with the file's bytes from ``position`` on."""
    buf = memoryview(block.view(-1).view(torch.uint8).numpy())
    f.seek(position)
    done = 0
    while done < len(buf):  # a single read returns at most ~2 GiB on Linux
        got = f.readinto(buf[done:])
        if not got:
            raise CheckpointError(f"cannot read {path} as safetensors: the file ended at byte {position + done} "
                                  f"(was it truncated or rewritten while loading?)")
        done += got


def read_safetensors_header(path: Path) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors file by key, in the order of their bytes in the file; only the header is read.
    A file that is not safetensors, or whose header promises bytes beyond its end (truncated), is a
    ``CheckpointError`` naming the file."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"cannot read {path} as safetensors: {why}")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes is shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise bad(f"a header of {n} bytes does not fit in the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise bad(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    data_start = 8 + n
    found = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"malformed entry for {key!r} ({type(e).__name__}: {e})") from None
        t = StoredTensor(path, dtype, shape, data_start + begin)
        if min(shape, default=0) < 0 or begin < 0 or end - begin != t.nbytes or data_start + end > size:
            raise bad(f"{key!r} ({info['dtype']} {list(shape)}) at bytes [{begin}, {end}) of the data does not fit "
                      f"a file of {size} bytes (truncated?)")
        found[key] = t
    return dict(sorted(found.items(), key=lambda kv: kv[1].offset))


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, StoredTensor]]:
    """(key, tensor not yet read) for every tensor of ``files``, file by file in byte order. All headers are read
    (and checked) first; a key in two files is an error."""
    headers = {f: read_safetensors_header(f) for f in files}
    seen: dict[str, Path] = {}
    for f, entries in headers.items():
        for k in entries:
            if k in seen:
                raise CheckpointError(f"{k} is stored twice: in {seen[k]} and in {f}")
            seen[k] = f
    for entries in headers.values():
        yield from entries.items()


def assign_state_dict(
    module: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor | StoredTensor]] | Mapping[str, torch.Tensor | StoredTensor],
    *,
    source: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    ignore: tuple[str, ...] = (),
    take: Callable[[str, torch.Tensor | StoredTensor], bool] | None = None,
) -> None:
    """Load ``tensors`` into ``module`` (possibly on ``meta``) by assignment, strictly.

    Every parameter and persistent buffer must be provided with the right shape; extra keys are errors unless
    listed in ``ignore``. All of it is checked before anything is read, and errors name the offending keys. Then
    each tensor is read (``StoredTensor``) or moved, in the order given, onto ``device``; floating tensors are cast
    to ``dtype`` when given, else to the module's dtype for them. ``take(key, tensor)`` may claim a tensor instead
    (returning True), e.g. to quantize a weight as it is read: the module's parameter for it is then left as it is.
    """
    expected = module.state_dict(keep_vars=True)
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    given: set[str] = set()
    unexpected: list[str] = []
    bad_shape: list[str] = []
    for k, t in items:
        if k not in expected:
            if k not in ignore:
                unexpected.append(k)
            continue
        given.add(k)
        if tuple(t.shape) != tuple(expected[k].shape):
            bad_shape.append(f"{k}: checkpoint {tuple(t.shape)} vs model {tuple(expected[k].shape)}")
    missing = sorted(set(expected) - given)
    problems = []
    if missing:
        problems.append(f"missing keys: {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short(sorted(unexpected))}")
    if bad_shape:
        problems.append("shape mismatches (does config.json match the weights?): " + "; ".join(bad_shape[:8]))
    if problems:
        raise CheckpointError(f"cannot load {source}: " + " | ".join(problems))

    loaded: dict[str, torch.Tensor] = {}
    taken: set[str] = set()
    for k, t in items:
        if k not in expected:
            continue
        if take is not None and take(k, t):
            taken.add(k)
            continue
        want = (dtype or expected[k].dtype) if t.dtype.is_floating_point else t.dtype
        loaded[k] = t.read(want, device) if isinstance(t, StoredTensor) else t.to(device=device, dtype=want)
    result = module.load_state_dict(loaded, strict=False, assign=True)
    assert set(result.missing_keys) == taken and not result.unexpected_keys, result  # checked above


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
