"""Loading at scale: the block-wise safetensors reader equals the reference reader bit for bit (every dtype, rows,
any block size), a sharded checkpoint loads to exactly the weights of a single-file one, load-time quantization a
block at a time equals quantizing after loading, and host memory never holds a float copy of the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nextstep import checkpoint, quant
from nextstep.checkpoint import CheckpointError, StoredTensor, iter_safetensors, read_safetensors_header
from nextstep.config import NextStepConfig, TransformerConfig, preset
from nextstep.model.nextstep import NextStep


def _random(shape, dtype, g):
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**31)), min(info.max, 2**31 - 1)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)


@pytest.fixture(scope="module")
def every_dtype(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    dtypes = checkpoint.SAFETENSORS_DTYPES.values()
    tensors = {str(dt).removeprefix("torch."): _random((37, 5, 3), dt, g) for dt in dtypes}
    tensors.update({"scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "vector": torch.arange(1000.0)})
    path = tmp_path_factory.mktemp("st") / "all.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)  # compares NaNs and -0.0 too


@pytest.mark.parametrize("block", [1, 64, 1 << 20])  # bytes per read: less than a row, a few rows, everything
def test_reader_equals_safetensors_for_every_dtype(every_dtype, monkeypatch, block):
    path, tensors = every_dtype
    monkeypatch.setattr(checkpoint, "READ_BLOCK_BYTES", block)
    header = read_safetensors_header(path)
    assert header.keys() == tensors.keys()
    offsets = [t.offset for t in header.values()]
    assert offsets == sorted(offsets)  # byte order: a file is read front to back
    ref = load_file(str(path))
    for k, st in header.items():
        got = st.read()
        assert got.dtype == ref[k].dtype and got.shape == ref[k].shape, k
        assert torch.equal(_bytes(got), _bytes(ref[k])), k
        if st.shape and st.shape[0] > 7:
            assert torch.equal(_bytes(st.read(rows=(3, 7))), _bytes(ref[k][3:7])), k
        if ref[k].is_floating_point():  # a cast through blocks rounds exactly as Tensor.to
            for dt in (torch.float32, torch.bfloat16, torch.float16):
                assert torch.equal(st.read(dt), ref[k].to(dt)), (k, dt)


def test_reader_names_a_truncated_or_foreign_file(every_dtype, tmp_path):
    path, _ = every_dtype
    data = path.read_bytes()
    for name, content in [("short", data[:5]), ("cut", data[:-10]), ("huge-header", (10**9).to_bytes(8, "little")),
                          ("text", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")]:
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(CheckpointError, match=rf"cannot read .*{name}\.safetensors as safetensors"):
            read_safetensors_header(bad)
    with pytest.raises(ValueError, match="rows"):
        read_safetensors_header(path)["vector"].read(rows=(5, 1001))


def test_a_key_in_two_shards_is_an_error(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(CheckpointError, match="a is stored twice"):
        list(iter_safetensors([tmp_path / "x.safetensors", tmp_path / "y.safetensors"]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[NextStep, Path, Path]:
    """A random tiny model saved as one file and as many small shards."""
    m = NextStep(preset("tiny")).init_weights(generator=torch.Generator().manual_seed(1)).eval()
    root = tmp_path_factory.mktemp("tiny")
    m.save_pretrained(root / "single")
    m.save_pretrained(root / "sharded", max_shard_bytes=100_000)
    assert len(list((root / "sharded").glob("model-*.safetensors"))) >= 5
    return m, root / "single", root / "sharded"


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_sharded_checkpoint_loads_exactly_as_a_single_file(tiny, monkeypatch, dtype):
    model, single, sharded = tiny
    want = {k: v.to(dtype) if dtype else v for k, v in model.state_dict().items()}
    _same(NextStep.from_pretrained(single, dtype=dtype).state_dict(), want)
    monkeypatch.setattr(checkpoint, "READ_BLOCK_BYTES", 1000)  # many blocks per tensor as well
    _same(NextStep.from_pretrained(sharded, dtype=dtype).state_dict(), want)


def test_shape_errors_come_before_any_weight_is_read(tiny, tmp_path, monkeypatch):
    _, single, _ = tiny
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").symlink_to(single / "model.safetensors")
    cfg = json.loads((single / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] + 2}))
    reads = []
    monkeypatch.setattr(StoredTensor, "read", lambda self, *a, **k: reads.append(self))
    with pytest.raises(CheckpointError, match=r"shape mismatches.*mlp\.gate_proj\.weight"):
        NextStep.from_pretrained(bad)
    assert reads == []


@pytest.mark.parametrize("kind", quant.KINDS)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_quantized_loading_block_by_block_equals_quantizing_after_loading(tiny, monkeypatch, kind, dtype):
    """Block sizes far below a layer (3 rows of float32 at a time) change nothing: every step is per row."""
    _, _, sharded = tiny
    after = quant.quantize_(NextStep.from_pretrained(sharded, dtype=dtype), kind)
    monkeypatch.setattr(quant, "QUANT_BLOCK_BYTES", 3 * 4 * 128)
    monkeypatch.setattr(checkpoint, "READ_BLOCK_BYTES", 999)
    during = NextStep.from_pretrained(sharded, dtype=dtype, quantize=kind)
    _same(during.state_dict(), after.state_dict())
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        h_during, h_after = during(during.embed(ids)), after(after.embed(ids))
        assert torch.equal(h_during, h_after)
        assert torch.equal(during.logits(h_during), after.logits(h_after))


def _reference_quantize(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The formula of ``nextstep.quant`` on the whole tensor at once, with plain out-of-place ops."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)
    top = quant.INT8_MAX if kind == "int8" else quant.FP8_MAX
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    w = w / scale[:, None]
    if kind == "int8":
        return w.round().clamp(-quant.INT8_MAX, quant.INT8_MAX).to(torch.int8), scale
    return w.clamp(-quant.FP8_MAX, quant.FP8_MAX).to(quant.FP8).view(torch.uint8), scale


@pytest.mark.parametrize("kind", quant.KINDS)
@pytest.mark.parametrize("rows_per_block", [1, 10, 1000])
def test_block_wise_quantize_weight_equals_the_formula(monkeypatch, tmp_path, kind, rows_per_block):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(301, 77, generator=g) * torch.logspace(-3, 3, 301)[:, None]
    w[5] = 0  # an all-zero row keeps scale 1
    w[7] = -w[7].abs()  # a row whose largest magnitude is negative
    monkeypatch.setattr(quant, "QUANT_BLOCK_BYTES", 4 * 77 * rows_per_block)
    save_file({"w": w, "w16": w.bfloat16()}, str(tmp_path / "w.safetensors"))
    stored = read_safetensors_header(tmp_path / "w.safetensors")
    ref32, ref16 = _reference_quantize(w, kind), _reference_quantize(w.bfloat16(), kind)
    for got, want in [(quant.quantize_weight(w, kind), ref32), (quant.quantize_weight(stored["w"], kind), ref32),
                      (quant.quantize_weight(w.bfloat16(), kind), ref16),
                      (quant.quantize_weight(stored["w"], kind, torch.bfloat16), ref16),
                      (quant.quantize_weight(stored["w16"], kind), ref16)]:
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert got[0].dtype == (torch.int8 if kind == "int8" else torch.uint8)
    q, s = quant.quantize_weight(w, kind)
    assert s[5] == 1 and not q[5].any()


# ---- host memory (a fresh process; Linux: /proc/self/status and clear_refs) -----------------------------------
PEAK = r"""
import json, sys, torch
from nextstep.config import preset
from nextstep.model.nextstep import NextStep

def kib(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field + ":")).split()[1]) * 1024

with torch.device("meta"):  # torch's one-time set-up of the meta device (~75 MB), whatever the checkpoint
    NextStep(preset("tiny"))
open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
before = kib("VmRSS")
target = sys.argv[2]
model = (NextStep.from_pretrained(sys.argv[1], quantize="int8") if target == "int8" else
         NextStep.from_pretrained(sys.argv[1], dtype=getattr(torch, target)))
print(json.dumps({"grew": kib("VmHWM") - before}))
"""


@pytest.fixture(scope="module")
def mid_checkpoint(tmp_path_factory) -> tuple[Path, int]:
    """~200 MB of float32 in one file (a loader that keeps the pages of the file it reads shows at once)."""
    cfg = NextStepConfig(transformer=TransformerConfig(vocab_size=8192, hidden_size=1024, num_layers=3, num_heads=8,
                                                       num_kv_heads=2, head_dim=128, intermediate_size=2816))
    out = tmp_path_factory.mktemp("mid")
    NextStep(cfg).save_pretrained(out)
    return out, (out / "model.safetensors").stat().st_size


@pytest.mark.slow  # three fresh processes
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_host_memory_never_holds_a_float_copy(mid_checkpoint):
    """Growth of the peak resident set while loading ~200 MB of float32, against the file's size. What the model
    holds: float32 1.0x, bfloat16 0.5x, int8 0.27x (embeddings stay float32); measured 0.98x, 0.65x and 0.63x (one
    read block, one block's quantization temporaries, fbgemm packing a layer, allocator slack). The memory-mapped
    loader this replaced kept the float pages of the file it read until it had read all of it: 1.47x and 2.02x for
    bfloat16 and int8 (float32 0.02x: its weights were the file's pages, read on first use)."""
    path, size = mid_checkpoint
    bounds = {"float32": 1.1, "bfloat16": 1.0, "int8": 0.9}
    for target, bound in bounds.items():
        res = subprocess.run([sys.executable, "-c", PEAK, str(path), target], capture_output=True, text=True,
                             check=True)
        grew = json.loads(res.stdout)["grew"]
        assert grew / size < bound, (target, grew / size, bound)
