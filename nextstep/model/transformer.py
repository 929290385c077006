"""Qwen2-style decoder over input embeddings: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

The arithmetic follows the reference (Hugging Face Llama/Qwen2 code) operation by operation, so that outputs agree
to float rounding: RMSNorm in float32, RoPE frequencies in float32, attention through
``scaled_dot_product_attention`` with an additive mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TransformerConfig
from .kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(T,) integer positions -> cos, sin of shape (T, head_dim) (halves repeated, as in Llama)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
                                / head_dim))
    freqs = positions[:, None].float() * inv_freq  # (T, head_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        # the heads this module computes: all of them, or this rank's share once ``nextstep.parallel`` has split
        # the projections (it divides both counts by the tensor-parallel degree)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor | None,
                cache: KVCache | None = None, layer: int = 0, input_pos: torch.Tensor | None = None
                ) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, D)
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.write(layer, input_pos, k, v)  # (B, KV, S, hd)
        dtype = q.dtype
        if q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
            # PyTorch's half-precision attention on a CPU is 4-10x slower than float32 for one query row (a decode
            # step), upcasting included (benchmarks/packing.py, 90 to 1,100 keys)
            q, k, v = q.float(), k.float(), v.float()
            bias = None if bias is None else bias.float()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None and t > 1,
                                             enable_gqa=self.num_heads != self.num_kv_heads).to(dtype)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, d, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, bias, cache=None, layer=0, input_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias, cache, layer, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_bias(key_valid: torch.Tensor, key_slots: torch.Tensor, q_slots: torch.Tensor, dtype: torch.dtype
                   ) -> torch.Tensor:
    """Additive mask (B, 1, T, S): 0 where key slot j <= query slot i and key j is valid, else the dtype's min.

    ``key_valid`` (B, S); ``key_slots`` (S,) = arange(S); ``q_slots`` (T,). Device tensors only (no host sync).
    Rows whose keys are all masked (queries at left padding) end up uniform, never NaN; their outputs are unused.
    """
    causal = key_slots[None, :] <= q_slots[:, None]  # (T, S)
    allowed = causal[None] & key_valid[:, None, :]  # (B, T, S)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


class Transformer(nn.Module):
    """Decoder stack + final norm. Input: embeddings (B, T, D); output: normalised hidden states (B, T, D)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        p = self.norm.weight
        dtype, device = dtype or p.dtype, device or p.device
        rope = rope_cos_sin(torch.arange(max_len, device=device), self.config.head_dim, self.config.rope_theta, dtype)
        kv_heads = self.layers[0].self_attn.num_kv_heads  # this rank's share under tensor parallelism
        return KVCache(self.config.num_layers, batch, max_len, kv_heads, self.config.head_dim,
                       rope, dtype=dtype, device=device)

    def forward(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """``attention_mask`` (B, T): 1 for real tokens, 0 for (left) padding. With ``cache``, the T tokens are
        written at slots ``input_pos`` (T,) (a device tensor: the compiled decoding step passes it), or appended
        after ``cache.length`` when it is None.

        The RoPE position of a token is its slot in the sequence (cache), padding included, as in the reference.
        RoPE only sees differences of positions, so the constant offset that left padding adds to a row cancels:
        a padded row equals the same prompt unpadded (to float rounding).
        """
        b, t, _ = embeds.shape
        mask = (torch.ones(b, t, dtype=torch.bool, device=embeds.device) if attention_mask is None
                else attention_mask.to(device=embeds.device, dtype=torch.bool))
        if cache is not None:
            if input_pos is None:
                input_pos = cache.next_positions(t)
            cache.mark(input_pos, mask)
            bias = attention_bias(cache.valid, cache.slots, input_pos, embeds.dtype)
            cos, sin = cache.cos[input_pos], cache.sin[input_pos]
        else:
            slots = torch.arange(t, device=embeds.device)
            bias = None if bool(mask.all()) else attention_bias(mask, slots, slots, embeds.dtype)
            cos, sin = rope_cos_sin(slots, self.config.head_dim, self.config.rope_theta, embeds.dtype)
        h = embeds
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, bias, cache, i, input_pos)
        return self.norm(h)
