"""``nextstep info``: every figure checked against a model counted independently (instantiated modules, closed-form
counts from the config, real quantized state dicts, real KV caches), and no weight read to produce it."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from nextstep.checkpoint import read_json
from nextstep.cli import main
from nextstep.config import NextStepConfig
from nextstep.errors import InputError
from nextstep.info import TYPICAL_PROMPT, kv_cache_bytes, model_info
from nextstep.model.nextstep import NextStep
from nextstep.pipeline import NextStepPipeline, bundled_model_dir
from nextstep.quant import quantize_


@pytest.fixture(scope="module")
def bundled():
    return bundled_model_dir()


@pytest.fixture(scope="module")
def info(bundled):
    return model_info(bundled)


@pytest.fixture(scope="module")
def model(bundled):
    return NextStep.from_pretrained(bundled)


def backbone_formula(t) -> int:
    """Qwen2 decoder parameters from the config alone (q/k/v with bias, o and MLP without, two RMSNorms a layer)."""
    d, hd, h, kv = t.hidden_size, t.head_dim, t.num_heads, t.num_kv_heads
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d + (h * hd + 2 * kv * hd) * t.qkv_bias + d * t.o_bias
    mlp = 3 * d * t.intermediate_size + (2 * t.intermediate_size + d) * t.mlp_bias
    return t.num_layers * (attn + mlp + 2 * d) + d


def test_parameter_counts(info, model, bundled):
    p = info["parameters"]
    numel = lambda *mods: sum(x.numel() for m in mods for x in m.parameters())  # noqa: E731
    assert p["embeddings"] == numel(model.embed_tokens) == 512 * 256
    assert p["lm_head"] == numel(model.lm_head)
    assert p["backbone"] == numel(model.transformer) == backbone_formula(model.config.transformer)
    assert p["projectors"] == numel(model.image_in_projector, model.image_out_projector) == 64 * 256 + 256 + 256 * 257
    assert p["flow_head"] == numel(model.image_head)
    assert p["parallel_decoding"] == numel(model.image_ahead, model.image_reread) == \
        (320 * 512 + 512) + 512 + (512 * 256 + 256) + (640 * 1024 + 1024) + (1024 * 256 + 256)
    assert p["total"] == numel(model) == 7_635_008
    stored = load_file(str(bundled / "model.safetensors"))  # the file holds the same values, plus gen_pos_embed
    assert info["checkpoint"]["values"] == sum(t.numel() for t in stored.values())
    assert p["total"] == sum(t.numel() for k, t in stored.items() if k != "gen_pos_embed")
    assert info["checkpoint"]["tensors"] == len(stored)
    assert info["checkpoint"]["bytes"] == (bundled / "model.safetensors").stat().st_size

    from nextstep.model.vae import VAE
    vae = VAE.from_pretrained(bundled / "vae")
    assert info["vae"]["parameters"] == sum(x.numel() for x in vae.parameters())
    assert info["vae_weights_bytes"]["float32"] == sum(x.nbytes for x in vae.state_dict().values())


def test_weight_memory_equals_real_state_dicts(info, model):
    w = info["weights_bytes"]
    nbytes = lambda m: sum(t.nbytes for t in m.state_dict().values())  # noqa: E731
    assert w["float32"] == nbytes(model)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert w["bfloat16"] == nbytes(bf16)
    # the quantized state dicts hold exactly what a quantized model keeps (int8/e4m3 weights, float32 scales)
    assert w["int8+float32"] == nbytes(quantize_(copy.deepcopy(model), "int8"))
    assert w["int8+bfloat16"] == nbytes(quantize_(copy.deepcopy(bf16), "int8"))
    assert w["fp8+bfloat16"] == nbytes(quantize_(copy.deepcopy(bf16), "fp8"))
    assert w["fp8+float32"] == w["int8+float32"] < w["bfloat16"] < w["float32"]


def test_tied_embeddings_count_once(tmp_path, bundled):
    cfg = NextStepConfig.from_official(read_json(bundled / "config.json", "config"))
    cfg.transformer.tie_word_embeddings = True
    tied = NextStep(cfg).init_weights(generator=torch.Generator().manual_seed(0))
    tied.save_pretrained(tmp_path)
    shutil.copy(bundled / "tokenizer.json", tmp_path / "tokenizer.json")
    got = model_info(tmp_path, bundled / "vae")
    assert got["architecture"]["tied_embeddings"] is True
    assert got["parameters"]["lm_head"] == 0
    assert got["parameters"]["total"] == sum(x.numel() for x in tied.parameters()) == 7_635_008 - 512 * 256
    state = quantize_(tied, "int8").state_dict()  # lists the shared embedding twice: count its memory once
    assert got["weights_bytes"]["int8+float32"] == sum({t.data_ptr(): t.nbytes for t in state.values()}.values())


def test_kv_cache_and_positions_match_the_pipeline(info, bundled):
    pipe = NextStepPipeline.from_pretrained(bundled)
    settings = pipe.defaults.resolve(False)
    limit = pipe.model.config.transformer.max_position_embeddings
    by_size = {e["size"]: e for e in info["kv_cache"]["sizes"]}
    assert sorted(by_size) == [64, 256, 512, 1024]  # the native size joins the fixed ones
    for side, e in by_size.items():
        g = side // 16
        rows = pipe.prompt_rows(TYPICAL_PROMPT, (g, g), settings, edit=False)
        assert len(rows) == 2  # the bundled model guides by default: prompt and unconditional rows
        assert e["positions"] == max(map(len, rows)) + g * g
        assert e["fits"] == (e["positions"] <= limit)
        for label, n_rows in info["kv_cache"]["rows"].items():
            cache = pipe.model.transformer.new_cache(n_rows, e["positions"], dtype=torch.bfloat16, device="meta")
            real = sum(t.nbytes for t in (cache.k, cache.v, cache.valid, cache.slots, cache.cos, cache.sin))
            assert e["bytes"][label] == real == kv_cache_bytes(pipe.model.config, n_rows, e["positions"],
                                                                torch.bfloat16)
    assert info["kv_cache"]["rows"] == {"1 image, no guidance": 1, "1 image, guidance": 2, "4 images, guidance": 8}

    pos = info["positions"]
    side = pos["largest_square"]
    assert (pos["max_position_embeddings"], pos["native_size"], side) == (512, 64, 336)
    g = side // 16
    assert max(map(len, pipe.prompt_rows(TYPICAL_PROMPT, (g, g), settings, False))) + g * g <= limit
    with pytest.raises(InputError, match="exceeds the model's 512 positions"):  # one step larger: refused
        pipe(TYPICAL_PROMPT, height=side + 16, width=side + 16, num_inference_steps=2, progress=False)


def test_no_weight_is_read(bundled, monkeypatch, info):
    """Only the safetensors headers are read: every byte read from a weight file is counted."""
    import builtins

    real_open, read = builtins.open, {}

    class Counting:
        def __init__(self, f, name):
            self._f, self._name = f, name

        def read(self, *a):
            data = self._f.read(*a)
            read[self._name] = read.get(self._name, 0) + len(data)
            return data

        def readinto(self, buf):
            n = self._f.readinto(buf)
            read[self._name] = read.get(self._name, 0) + n
            return n

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def counting_open(file, *a, **kw):
        f = real_open(file, *a, **kw)
        return Counting(f, str(file)) if str(file).endswith((".safetensors", ".pt")) else f

    def refuse(*a, **kw):
        raise AssertionError("info loaded weights")

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr("nextstep.checkpoint.safe_open", refuse, raising=False)  # memory-mapped readers
    monkeypatch.setattr(torch, "load", refuse)
    assert model_info(bundled) == info
    weights = bundled / "model.safetensors"
    with real_open(weights, "rb") as f:
        header = 8 + int.from_bytes(f.read(8), "little")
    assert read == {str(weights): header}  # the header, not one byte more (12 MiB file)


def test_cli(capsys, info):
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == info
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "7.64M (7,635,008)" in text and "parallel decoding 1.21M" in text
    assert "largest square with this prompt 336x336" in text
    assert "exceeds the 512 positions" in text  # 512x512 and 1024x1024 do not fit the bundled model
    assert main(["info", "/nonexistent/model"]) == 2
    assert "model directory not found" in capsys.readouterr().err


# ---- LoRA training memory plan --------------------------------------------------------------------------------------
def test_lora_memory_plan_adds_up_and_counts_the_adapters(bundled):
    from nextstep.info import LORA_STATE_BYTES, lora_memory_info

    plan = lora_memory_info(bundled, rank=8, height=64, width=64, batch=4, dtype="float32")
    assert plan["total_bytes"] == sum(plan["bytes"].values())
    t = NextStepConfig.from_official(read_json(bundled / "config.json", "config")).transformer
    d, i, q, kv = t.hidden_size, t.intermediate_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    per_layer = (d + q) + 2 * (d + kv) + (q + d) + 2 * (d + i) + (i + d)  # q, k, v, o, gate, up, down
    assert plan["lora_parameters"] == 8 * t.num_layers * per_layer and plan["lora_layers"] == 7 * t.num_layers
    assert plan["bytes"]["lora"] == plan["lora_parameters"] * LORA_STATE_BYTES
    assert plan["bytes"]["base_weights"] == model_info(bundled)["weights_bytes"]["float32"]
    assert plan["sequence"]["image_tokens"] == 16 and plan["sequence"]["head_rows"] == 4 * 16 * 4


def test_lora_memory_plan_is_monotone_and_nextstep1_fits_24gb(capsys):
    from nextstep.config import preset
    from nextstep.info import lora_training_memory

    large = preset("nextstep-1-large")
    base = dict(rank=16, height=512, width=512, batch=1, quantize="int8", checkpointing=True)
    total = lambda **kw: lora_training_memory(large, **{**base, **kw})["total_bytes"]  # noqa: E731
    assert total() <= 24e9  # the target: NextStep-1 (14B), rank 16, int8 base, 512x512, batch 1
    assert total(rank=8) < total() < total(rank=32) < total(rank=64)
    assert total() < total(batch=2) < total(batch=4)
    assert total(height=256, width=256) < total() < total(height=768, width=768)
    assert total() < total(checkpointing=False)
    assert total() < total(quantize=None)
    assert total(targets=["attn"]) < total() < total(targets=["attn", "mlp", "head"])
    with pytest.raises(InputError, match="multiple of 16"):
        total(height=500)
    with pytest.raises(InputError, match="targets"):
        total(targets=["everything"])
    main(["info", "--preset", "nextstep-1-large", "--lora-rank", "16", "--train-size", "512x512", "--quantize", "int8",
          "--checkpointing"])
    out = capsys.readouterr().out
    assert "rank 16 on attn+mlp" in out and f"({total() / 1e9:.1f} GB)" in out
