"""From samples to training batches: encoding images to latents once, the batch plan, and sequence building.

    sample (PIL) --encode_samples()--> Record (latents) --build_example()--> Example (ids + latents)
    --collate()--> TrainBatch (right-padded ids, mask, latents in placeholder order, per-image loss weights)

Which samples form the batch of step s is a pure function of (seed, s): resuming at step s continues exactly, and
any number of ranks sees the same global batch (rank r takes a contiguous slice).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..checkpoint import save_safetensors
from ..errors import DataError, SampleError
from ..images import fit_image, load_image
from ..model.latents import token_grid
from ..prompt import caption_ids, image_block_ids
from ..tokenizer import Tokenizer


@dataclass
class Record:
    """One encoded sample: t2i latents [target]; edit [source, target]; text []. Latents (C, h, w), scaled."""

    kind: str
    text: str
    latents: list[torch.Tensor]
    replay: bool = False  # replayed from the base's data (the source's "replay"): see TrainBatch.replayed

    @property
    def bucket(self) -> tuple[int, int] | None:
        return tuple(self.latents[-1].shape[-2:]) if self.latents else None


@dataclass
class Example:
    ids: list[int]
    latents: list[torch.Tensor]
    loss_weights: list[float]  # per image: 0 for an edit's source, 1 for a generated image
    replay: bool = False


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # (B, L) right padded
    attention_mask: torch.Tensor  # (B, L)
    latents: list[torch.Tensor]  # images in placeholder order
    image_loss_mask: torch.Tensor  # (n_images,)
    image_seeds: list[int]  # one seed per image for the flow head's noise
    num_samples: int
    num_tokens: int  # real tokens in the batch
    replayed: torch.Tensor | None = None  # (n_images,) bool: the image's sample is a replay (None: none is)


def nearest_bucket(h: int, w: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log space) to h / w."""
    r = np.log(h / w)
    return min(buckets, key=lambda b: abs(np.log(b[0] / b[1]) - r))


def encode_samples(source, vae, buckets: list[tuple[int, int]], batch_size: int = 64, progress: bool = True
                   ) -> tuple[list[Record], int]:
    """Encode every sample's images once (posterior mean, normalised and scaled). Unreadable samples are skipped;
    returns (records, number skipped)."""
    records: list[Record | None] = []
    pending: dict[tuple[int, int], list[tuple[int, int, torch.Tensor]]] = {}
    skipped = 0
    device = next(vae.parameters()).device

    def flush(size):
        items = pending.pop(size, [])
        if not items:
            return
        x = torch.stack([t for _, _, t in items]).to(device)
        with torch.no_grad():
            z = vae.scale(vae.encode(x).mode()).float().cpu()
        for (ri, slot, _), zi in zip(items, z):
            records[ri].latents[slot] = zi

    for i in tqdm(range(len(source)), disable=not progress, desc="encoding dataset", leave=False):
        try:
            s = source[i]
        except SampleError:
            skipped += 1
            continue
        images = {"t2i": ["image"], "edit": ["source", "target"], "text": []}[s["kind"]]
        text = s.get("caption", s.get("instruction", s.get("text", "")))
        if not images:
            records.append(Record("text", text, []))
            continue
        target = s[images[-1]]
        size = nearest_bucket(target.height, target.width, buckets)
        records.append(Record(s["kind"], text, [None] * len(images), bool(s.get("replay", False))))
        for slot, key in enumerate(images):
            pending.setdefault(size, []).append((len(records) - 1, slot, fit_image(load_image(s[key]), *size)))
        if len(pending[size]) >= batch_size:
            flush(size)
    for size in list(pending):
        flush(size)
    return [r for r in records if r is not None], skipped


def save_records(records: list[Record], path: Path) -> None:
    tensors = {f"{i}.{j}": z.contiguous() for i, r in enumerate(records) for j, z in enumerate(r.latents)}
    meta = [{"kind": r.kind, "text": r.text, "n": len(r.latents), **({"replay": True} if r.replay else {})}
            for r in records]
    save_safetensors(tensors or {"_empty": torch.zeros(1)}, path, metadata={"records": json.dumps(meta)})


def load_records(path: Path) -> list[Record]:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["records"])
        return [Record(m["kind"], m["text"], [f.get_tensor(f"{i}.{j}") for j in range(m["n"])],
                       m.get("replay", False)) for i, m in enumerate(meta)]


class BatchPlan:
    """Draws the global batch of each step: a bucket (weighted by its size), then for each slot a kind by the mix
    ratios (among kinds present in the bucket) and a sample uniformly. Deterministic in (seed, step)."""

    def __init__(self, records: list[Record], mix: dict[str, float], seed: int):
        if not records:
            raise DataError("the dataset is empty: no readable samples")
        self.seed = seed
        pools: dict[tuple, dict[str, list[int]]] = {}
        for i, r in enumerate(records):
            pools.setdefault(r.bucket, {}).setdefault(r.kind, []).append(i)
        self.groups = []  # (bucket, kinds, probs, pools)
        weights = []
        for bucket, by_kind in sorted(pools.items(), key=lambda kv: str(kv[0])):
            kinds = [k for k in by_kind if mix.get(k, 0) > 0]
            if not kinds:
                continue
            p = np.array([mix[k] for k in kinds], dtype=np.float64)
            self.groups.append((bucket, kinds, p / p.sum(), [np.array(by_kind[k]) for k in kinds]))
            weights.append(sum(len(by_kind[k]) for k in kinds))
        if not self.groups:
            raise DataError(f"no samples of the kinds the mix asks for ({mix})")
        self.group_p = np.array(weights, dtype=np.float64) / sum(weights)

    def step(self, step: int, batch_size: int) -> list[tuple[int, int]]:
        """[(record index, per-slot seed)] for the global batch of ``step``."""
        rng = np.random.default_rng([self.seed, step])
        _, kinds, p, pools = self.groups[rng.choice(len(self.groups), p=self.group_p)]
        out = []
        for _slot in range(batch_size):
            k = rng.choice(len(kinds), p=p)
            out.append((int(pools[k][rng.integers(len(pools[k]))]), int(rng.integers(2**62))))
        return out


def build_example(rec: Record, tok: Tokenizer, patch: int, seed: int, caption_dropout: float,
                  image_dropout: float) -> Example:
    """The token sequence of one record (the prompt protocol of ``prompt.py``), with guidance dropout."""
    rng = np.random.default_rng(seed)
    if rec.kind == "text":
        eos = [tok.special.eos] if tok.special.eos is not None else []
        return Example(tok.encode(rec.text) + eos, [], [])
    text = "" if rng.random() < caption_dropout else rec.text
    target = rec.latents[-1]
    grid = token_grid(tuple(target.shape[-2:]), patch)
    body = image_block_ids(tok, grid)  # the image to generate: area, boi, placeholders, eoi
    if rec.kind == "edit" and rng.random() >= image_dropout:
        src = rec.latents[0]
        ids = caption_ids(tok, text, [token_grid(tuple(src.shape[-2:]), patch)]) + body
        return Example(ids, [src, target], [0.0, 1.0], rec.replay)
    return Example(caption_ids(tok, text) + body, [target], [1.0], rec.replay)


def collate(examples: list[Example], pad_id: int, seeds: list[int]) -> TrainBatch:
    n = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    latents, weights, image_seeds, replayed = [], [], [], []
    for i, (e, s) in enumerate(zip(examples, seeds)):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
        latents += e.latents
        weights += e.loss_weights
        image_seeds += [s + j for j in range(len(e.latents))]
        replayed += [e.replay] * len(e.latents)
    return TrainBatch(ids, mask, latents, torch.tensor(weights), image_seeds, len(examples), int(mask.sum()),
                      torch.tensor(replayed, dtype=torch.bool) if any(replayed) else None)
