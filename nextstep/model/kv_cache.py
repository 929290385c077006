"""An explicit, preallocated key/value cache for prefill + one-token decoding steps."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for ``batch`` rows and up to ``max_len`` positions.

    ``k``/``v``: (layers, B, kv_heads, max_len, head_dim). ``valid``: (B, max_len) bool, False at left padding
    and unused slots. ``length`` is the number of filled slots (the same for every row; padding is masked).

    Attention always reads all ``max_len`` slots under the mask: shapes stay static from step to step (what
    torch.compile and CUDA graphs want), and the arithmetic is the reference's (its ``StaticCache``) exactly.
    """

    def __init__(self, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.length = 0

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def reserve(self, mask: torch.Tensor) -> int:
        """Claim slots for T new tokens with (B, T) validity ``mask``; returns the first slot."""
        b, t = mask.shape
        if b != self.batch:
            raise ValueError(f"cache holds {self.batch} rows, got {b}")
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {t} tokens > max_len {self.max_len}")
        start = self.length
        self.valid[:, start:start + t] = mask
        return start

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, kv_heads, T, head_dim) keys/values at ``start``; returns all max_len slots of the layer."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer], self.v[layer]

    def commit(self, t: int) -> None:
        self.length += t
