"""An explicit, preallocated key/value cache for prefill + one-token decoding steps."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for ``batch`` rows and up to ``max_len`` positions, with the RoPE tables of
    those positions.

    ``k``/``v``: (layers, B, kv_heads, max_len, head_dim), ``kv_heads`` the heads this process computes (under
    tensor parallelism its share, see ``nextstep.parallel``). ``valid``: (B, max_len) bool, False at left padding
    and unused slots. ``cos``/``sin``: (max_len, head_dim), the rotary tables of every slot, computed once.

    Writes go to device-tensor positions (``input_pos``, ``index_copy_``) and attention always reads all
    ``max_len`` slots under the mask, so a decoding step has static shapes and no host-side state: it can be
    compiled. ``length`` is a convenience for eager callers that append without naming positions (prefill,
    tests); writes at explicit ``input_pos`` (the decoding step) neither read nor advance it.
    """

    def __init__(self, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 rope: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.slots = torch.arange(max_len, device=device)
        self.cos, self.sin = rope
        self.length = 0

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def next_positions(self, t: int) -> torch.Tensor:
        """Slots for T tokens appended after ``length`` (eager use); advances ``length``."""
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {t} tokens > max_len {self.max_len}")
        pos = self.slots[self.length:self.length + t]
        self.length += t
        return pos

    def mark(self, input_pos: torch.Tensor, mask: torch.Tensor) -> None:
        """Record the (B, T) validity of the tokens written at slots ``input_pos`` (T,)."""
        if mask.shape[0] != self.batch:
            raise ValueError(f"cache holds {self.batch} rows, got {mask.shape[0]}")
        self.valid.index_copy_(1, input_pos, mask)

    def write(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, kv_heads, T, head_dim) keys/values at slots ``input_pos``; returns all slots of the layer."""
        self.k[layer].index_copy_(2, input_pos, k)
        self.v[layer].index_copy_(2, input_pos, v)
        return self.k[layer], self.v[layer]
