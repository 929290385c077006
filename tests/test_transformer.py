"""The decoder against Hugging Face's Qwen2, and the KV cache / padding invariants."""

from __future__ import annotations

import pytest
import torch

from nextstep.config import TransformerConfig
from nextstep.model.transformer import Transformer

CFG = TransformerConfig(vocab_size=100, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
                        intermediate_size=96, rms_norm_eps=1e-6, rope_theta=10000.0, qkv_bias=True, o_bias=False)


def random_transformer(seed: int = 0, cfg: TransformerConfig = CFG) -> Transformer:
    g = torch.Generator().manual_seed(seed)
    t = Transformer(cfg)
    with torch.no_grad():
        for name, p in t.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5 if p.dim() > 1 else 10))
    return t.eval()


@torch.no_grad()
def test_equals_transformers_qwen2():
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.Qwen2Config(
        vocab_size=CFG.vocab_size, hidden_size=CFG.hidden_size, num_hidden_layers=CFG.num_layers,
        num_attention_heads=CFG.num_heads, num_key_value_heads=CFG.num_kv_heads,
        intermediate_size=CFG.intermediate_size,
        rms_norm_eps=CFG.rms_norm_eps, rope_theta=CFG.rope_theta, max_position_embeddings=512)
    hf_cfg._attn_implementation = "sdpa"
    hf = transformers.Qwen2Model(hf_cfg).eval()
    ours = random_transformer(1)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert missing == ["embed_tokens.weight"] and unexpected == []
    x = torch.randn(2, 13, CFG.hidden_size, generator=torch.Generator().manual_seed(2))
    ref = hf(inputs_embeds=x).last_hidden_state
    assert (ours(x) - ref).abs().max().item() <= 1e-5
    # left padding: real positions agree with HF given the same mask
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0
    ref = hf(inputs_embeds=x, attention_mask=mask).last_hidden_state
    out = ours(x, attention_mask=mask)
    assert (out[mask.bool()] - ref[mask.bool()]).abs().max().item() <= 1e-5


@torch.no_grad()
def test_kv_cache_prefill_then_steps_equals_full_forward():
    t = random_transformer(3)
    x = torch.randn(3, 20, CFG.hidden_size, generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, :5] = 0  # row 1 is left padded
    mask[2, :2] = 0
    full = t(x, attention_mask=mask)
    cache = t.new_cache(batch=3, max_len=24)
    pieces = [t(x[:, :12], attention_mask=mask[:, :12], cache=cache)]
    for i in range(12, 20):
        pieces.append(t(x[:, i:i + 1], attention_mask=mask[:, i:i + 1], cache=cache))
    cached = torch.cat(pieces, 1)
    real = mask.bool()
    assert (cached[real] - full[real]).abs().max().item() <= 1e-5
    assert cache.length == 20


@torch.no_grad()
def test_left_padded_row_equals_unpadded_prompt():
    t = random_transformer(5)
    x = torch.randn(1, 9, CFG.hidden_size, generator=torch.Generator().manual_seed(6))
    alone = t(x)
    padded_x = torch.cat([torch.randn(1, 4, CFG.hidden_size), x], 1)
    mask = torch.tensor([[0] * 4 + [1] * 9])
    padded = t(padded_x, attention_mask=mask)
    assert (padded[:, 4:] - alone).abs().max().item() <= 1e-5
    # and through the cache, one token at a time after a padded prefill
    cache = t.new_cache(1, 13)
    out = [t(padded_x[:, :6], attention_mask=mask[:, :6], cache=cache)[:, 4:]]
    out += [t(padded_x[:, i:i + 1], cache=cache) for i in range(6, 13)]
    assert (torch.cat(out, 1) - alone).abs().max().item() <= 1e-5


def test_cache_overflow_is_a_clear_error():
    t = random_transformer(7)
    cache = t.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache full"):
        t(torch.randn(1, 5, CFG.hidden_size), cache=cache)


@torch.no_grad()
def test_bfloat16_attention_on_a_cpu_is_computed_in_float32():
    """The CPU's half-precision attention kernels are several times slower than float32 at decoding: the layer
    upcasts q, k, v and the mask (its output is the float32 attention of the bfloat16 inputs, rounded once)."""
    import torch.nn.functional as F

    from nextstep.model.transformer import apply_rope, rope_cos_sin

    t = random_transformer(5).to(torch.bfloat16)
    attn = t.layers[0].self_attn
    x = torch.randn(2, 7, CFG.hidden_size, generator=torch.Generator().manual_seed(6)).bfloat16()
    cos, sin = rope_cos_sin(torch.arange(7), CFG.head_dim, CFG.rope_theta, torch.bfloat16)
    out = attn(x, cos, sin, None)
    q = attn.q_proj(x).view(2, 7, 4, 16).transpose(1, 2)
    k = attn.k_proj(x).view(2, 7, 2, 16).transpose(1, 2)
    v = attn.v_proj(x).view(2, 7, 2, 16).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    assert torch.equal(out, attn.o_proj(ref.bfloat16().transpose(1, 2).reshape(2, 7, -1)))
