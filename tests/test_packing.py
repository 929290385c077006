"""oneDNN-prepacked linears (nextstep.packing): the same numbers as nn.Linear, fresh weights every context."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nextstep import packing
from nextstep.packing import packed_linears


def _mlp(dtype):
    torch.manual_seed(0)
    # large enough to be packed in float32 too (PACK_MIN_FLOAT32 weights)
    return nn.Sequential(nn.Linear(384, 512), nn.SiLU(), nn.Linear(512, 256, bias=False)).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 8])
def test_packed_linears_compute_what_nn_linear_computes(dtype, rows):
    net = _mlp(dtype)
    x = torch.randn(rows, 3, 384).to(dtype)
    with torch.no_grad():
        plain = net(x)
        with packed_linears(net):
            if packing.available(dtype):
                assert "forward" in net[0].__dict__  # the layer really is patched inside the context
            packed = net(x)
        assert "forward" not in net[0].__dict__  # and restored on exit
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(packed.float(), plain.float(), atol=tol, rtol=tol)


def test_a_weight_changed_between_contexts_is_read_fresh_and_nesting_is_harmless():
    net = _mlp(torch.float32)
    x = torch.randn(4, 384)
    with torch.no_grad():
        with packed_linears(net):
            before = net(x)
        net[0].weight.data += 0.5  # as PEFT fuses an adapter: .data, which bumps no version counter
        with packed_linears(net), packed_linears(net[0]):
            after = net(x)
        assert "forward" not in net[0].__dict__
        torch.testing.assert_close(after, net[2](F.silu(F.linear(x, net[0].weight, net[0].bias))), atol=1e-5,
                                   rtol=1e-5)
    assert not torch.allclose(before, after)


def test_gradients_and_the_size_limit_fall_back_to_the_plain_kernel(monkeypatch):
    net = _mlp(torch.float32).train()
    x = torch.randn(4, 384, requires_grad=True)
    with packed_linears(net):
        net(x).sum().backward()  # a gradient needed: F.linear, so backward works
    assert x.grad is not None and net[0].weight.grad is not None
    monkeypatch.setattr(packing, "PACK_LIMIT_BYTES", 0)
    with packed_linears(net):
        assert "forward" not in net[0].__dict__


def test_the_pipeline_packs_by_default_and_exact_stays_unpacked(monkeypatch, bundled_pipe):
    seen = []
    real = packing._forward

    def spy(module, packed, x):
        seen.append(module)
        return real(module, packed, x)

    monkeypatch.setattr(packing, "_forward", spy)
    kw = dict(num_inference_steps=3, guidance_scale=2.0, output_type="pt", progress=False)
    exact = bundled_pipe._generate("a red circle", generator=torch.Generator().manual_seed(0), exact=True, **kw)
    assert not seen
    fast = bundled_pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw)
    # every default call packs, on a CPU with oneDNN: the backbone's layers and the head's
    assert bundled_pipe.model.transformer.layers[0].mlp.down_proj in seen
    assert bundled_pipe.model.image_head.net.res_blocks[0].adaLN_modulation[1] in seen
    assert bundled_pipe.model.image_head.net.final_layer.linear not in seen  # 64 x 256: faster plain in float32
    # the same image to float rounding (the head's batched modulations and the packed kernels)
    torch.testing.assert_close(fast.tokens, exact.tokens, atol=1e-4, rtol=0)  # measured: 5e-6


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_entering_the_context_reads_no_quantized_weight(monkeypatch, kind):
    """Quantized layers are left to their own kernels, and entering the context does not read their ``.weight``: a
    dequantized copy made on every access (it cost int8 calls 1.1-1.25x on ns34m, made for every layer per call)."""
    from nextstep.quant import QuantizedLinear, quantize_

    net = quantize_(_mlp(torch.float32), kind)
    reads = []
    monkeypatch.setattr(QuantizedLinear, "weight", property(lambda self: reads.append(self) or torch.zeros(1)))
    x = torch.randn(4, 384)
    with torch.no_grad():
        plain = net(x)
        with packed_linears(net):
            assert "forward" not in net[0].__dict__
            packed = net(x)
    assert not reads
    torch.testing.assert_close(packed, plain, atol=0, rtol=0)
