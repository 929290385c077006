"""Sample sources for training: a folder + JSONL, WebDataset-style tar shards, or the procedural shapes world.

Every source is indexable and returns plain sample dicts with PIL images:
    {"kind": "t2i", "image": PIL, "caption": str}
    {"kind": "edit", "source": PIL, "target": PIL, "instruction": str}
    {"kind": "text", "text": str}
plus ``"replay": True`` on a sample replayed from what the model was trained on before (a folder line's
``"replay": true``): a LoRA recipe with ``"replay_targets": "base"`` trains those towards the base model's outputs.
A sample that cannot be read raises ``SampleError``; callers skip it and count it, never crash.

Folder layout: ``ROOT/captions.jsonl``, one JSON object per line, paths relative to ROOT:
    {"image": "a.png", "caption": "..."}
    | {"source": "s.png", "target": "t.png", "instruction": "..."}
    | {"text": "..."}
Shard layout (WebDataset convention: files grouped by the key before the first dot):
    KEY.png|jpg|jpeg|webp + KEY.txt (t2i) | KEY.src.png + KEY.tgt.png + KEY.txt (edit) | KEY.txt alone (text)
"""

from __future__ import annotations

import glob
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from ..errors import DataError, MissingFileError, SampleError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


def _open_image(data: bytes | Path, what: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise SampleError(f"cannot read image {what}: {e}") from None


class FolderSource:
    def __init__(self, root: str | Path, index: str = "captions.jsonl"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingFileError(f"data directory not found: {self.root}")
        path = self.root / index
        if not path.is_file():
            raise MissingFileError(f"{path} not found: a folder source needs a {index} with one sample per line")
        self.records: list[dict[str, Any] | str] = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
                rec["kind"] = _kind_of(rec)
                self.records.append(rec)
            except ValueError as e:
                self.records.append(f"{path}:{n}: malformed record ({e})")  # kept so it is counted when read
        if not self.records:
            raise DataError(f"{path} holds no samples")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        if isinstance(rec, str):
            raise SampleError(rec)
        kind = rec["kind"]
        if kind == "t2i":
            sample = {"kind": kind, "image": self._image(rec["image"]), "caption": str(rec["caption"])}
        elif kind == "edit":
            sample = {"kind": kind, "source": self._image(rec["source"]), "target": self._image(rec["target"]),
                      "instruction": str(rec["instruction"])}
        else:
            sample = {"kind": "text", "text": str(rec["text"])}
        if rec.get("replay", False) is not False:
            if rec["replay"] is not True:
                raise SampleError(f"{self.root / 'captions.jsonl'}: sample {i}: \"replay\" must be true or false, "
                                  f"got {rec['replay']!r}")
            sample["replay"] = True
        return sample

    def _image(self, rel: str) -> Image.Image:
        p = self.root / rel
        if not p.is_file():
            raise SampleError(f"image file not found: {p}")
        return _open_image(p, str(p))


def _kind_of(rec: dict[str, Any]) -> str:
    if {"source", "target", "instruction"} <= set(rec):
        return "edit"
    if {"image", "caption"} <= set(rec):
        return "t2i"
    if "text" in rec:
        return "text"
    raise ValueError(f"needs image+caption, source+target+instruction, or text; has {sorted(rec)}")


class TarShardSource:
    def __init__(self, pattern: str | Path):
        p = Path(pattern)
        files = sorted(p.glob("*.tar")) if p.is_dir() else sorted(Path(f) for f in glob.glob(str(pattern)))
        if not files:
            raise MissingFileError(f"no .tar shards found at {pattern}")
        self.samples: list[tuple[Path, str, dict[str, tarfile.TarInfo]]] = []
        for f in files:
            try:
                with tarfile.open(f) as tar:
                    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
                    for m in tar.getmembers():
                        if m.isfile() and "." in Path(m.name).name:
                            key, ext = _split_key(m.name)
                            groups.setdefault(key, {})[ext.lower()] = m
            except tarfile.TarError as e:
                raise DataError(f"cannot read shard {f}: {e}") from None
            self.samples += [(f, k, g) for k, g in groups.items()]
        if not self.samples:
            raise DataError(f"the shards at {pattern} hold no samples")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, key, members = self.samples[i]
        try:
            with tarfile.open(path) as tar:
                read = {ext: tar.extractfile(m).read() for ext, m in members.items()}
        except (tarfile.TarError, OSError, AttributeError) as e:
            raise SampleError(f"cannot read {key} from {path}: {e}") from None
        text = read.get("txt", b"").decode("utf-8", errors="replace").strip()
        src = next((read[e] for e in (f"src.{x}" for x in IMAGE_EXTS) if e in read), None)
        tgt = next((read[e] for e in (f"tgt.{x}" for x in IMAGE_EXTS) if e in read), None)
        img = next((read[e] for e in IMAGE_EXTS if e in read), None)
        if src is not None and tgt is not None:
            return {"kind": "edit", "source": _open_image(src, f"{path}:{key}.src"),
                    "target": _open_image(tgt, f"{path}:{key}.tgt"), "instruction": text}
        if img is not None:
            return {"kind": "t2i", "image": _open_image(img, f"{path}:{key}"), "caption": text}
        if text:
            return {"kind": "text", "text": text}
        raise SampleError(f"{path}:{key} has neither an image nor text ({sorted(read)})")


def _split_key(name: str) -> tuple[str, str]:
    """"dir/KEY.src.png" -> ("dir/KEY", "src.png")."""
    d, _, base = name.rpartition("/")
    key, ext = base.split(".", 1)
    return (f"{d}/{key}" if d else key), ext


class ShapesSource:
    """The procedural shapes world (``nextstep.data.shapes``) as a source."""

    def __init__(self, num_samples: int, seed: int, size: int, mix: dict[str, float], backgrounds: float = 0.0,
                 weights: dict[str, float] | None = None):
        from .shapes import ShapesDataset

        self.ds = ShapesDataset(num_samples, seed, size=size, mix={k: v for k, v in mix.items() if k != "text"},
                                backgrounds=backgrounds, weights=weights)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.ds[i]


def open_source(cfg) -> FolderSource | TarShardSource | ShapesSource:
    """The source a ``DataConfig`` names."""
    if cfg.source == "folder":
        return FolderSource(cfg.path)
    if cfg.source == "shards":
        return TarShardSource(cfg.path)
    return ShapesSource(cfg.num_samples, cfg.seed, cfg.image_size, cfg.mix, cfg.backgrounds, cfg.weights)
