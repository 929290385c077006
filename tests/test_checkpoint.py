"""Checkpoint I/O: official-format save/load round trips, sharding, dtype, tied embeddings, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nextstep.checkpoint import CheckpointError
from nextstep.config import ConfigError, NextStepConfig, preset
from nextstep.errors import MissingFileError
from nextstep.model.nextstep import NextStep


@pytest.fixture(scope="module")
def model_dir(fixtures_dir) -> Path:
    return fixtures_dir / "official-v1-a" / "model"


@pytest.fixture(scope="module")
def model(model_dir):
    return NextStep.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def official_keys(fixtures_dir) -> set[str]:
    lines = (fixtures_dir / "official-v1-a" / "model_state_dict_keys.txt").read_text().splitlines()
    return {ln.split()[0] for ln in lines if ln.strip()}


def _copy(model_dir: Path, dst: Path) -> Path:
    """A writable copy of the fixture model directory (the fixture itself is read-only)."""
    dst.mkdir(parents=True)
    for f in model_dir.iterdir():
        shutil.copyfile(f, dst / f.name)
    return dst


def _saved_keys(path: Path) -> set[str]:
    keys: set[str] = set()
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            keys |= set(fh.keys())
    return keys


def _assert_identical(a: NextStep, b: NextStep) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


# ---- loading the fixture -----------------------------------------------------------------------------------

def test_load_fixture_matches_file(model, model_dir):
    raw = load_file(str(model_dir / "model.safetensors"))
    sd = model.state_dict()
    assert sd["transformer.layers.1.mlp.down_proj.weight"].shape == (128, 320)
    for k, v in raw.items():
        if k == "gen_pos_embed":
            continue
        ours = "transformer." + k if k.startswith(("layers.", "norm.")) else k
        assert torch.equal(sd[ours], v), k
    assert len(sd) == len(raw) - 1


def test_loaded_model_is_materialised_and_in_eval(model):
    assert not model.training and not any(m.training for m in model.modules())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert not t.is_meta, name
        assert t.device.type == "cpu", name


def test_from_pretrained_builds_on_meta(model_dir, monkeypatch):
    devices = []
    orig_init = NextStep.__init__

    def spy(self, config):
        devices.append(torch.empty(0).device.type)  # the default device in effect during construction
        orig_init(self, config)
        devices.append(self.embed_tokens.weight.device.type)

    monkeypatch.setattr(NextStep, "__init__", spy)
    m = NextStep.from_pretrained(model_dir)
    assert devices == ["meta", "meta"]
    assert not any(p.is_meta for p in m.parameters())


def test_load_bf16(model, model_dir):
    mb = NextStep.from_pretrained(model_dir, dtype=torch.bfloat16)
    sb, sf = mb.state_dict(), model.state_dict()
    for k in sf:
        assert sb[k].dtype == torch.bfloat16, k
        assert torch.equal(sb[k], sf[k].to(torch.bfloat16)), k
    assert mb.dtype == torch.bfloat16 and not mb.training


# ---- saving ------------------------------------------------------------------------------------------------

def test_save_load_single_file(model, tmp_path, official_keys):
    out = tmp_path / "m"
    model.save_pretrained(out)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert _saved_keys(out) == official_keys  # official names, gen_pos_embed included, no "transformer."
    _assert_identical(model, NextStep.from_pretrained(out))

    cfg_json = json.loads((out / "config.json").read_text())
    for k in ("fm_head_dim", "fm_head_layers", "fm_head_batch_mul", "latent_channels", "latent_patch_size",
              "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "boi", "eoi",
              "image_placeholder_id", "pad_token_id", "attention_bias", "o_attention_bias"):
        assert k in cfg_json, k
    assert cfg_json["fm_head_dim"] == 64 and cfg_json["latent_channels"] == 16 and cfg_json["boi"] == 757
    assert NextStepConfig.from_official(cfg_json) == model.config


def test_saved_gen_pos_embed_matches_official(model, model_dir, tmp_path):
    model.save_pretrained(tmp_path / "m")
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))["gen_pos_embed"]
    ref = load_file(str(model_dir / "model.safetensors"))["gen_pos_embed"]
    assert ours.shape == ref.shape == (1, 1024, 128)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_save_load_sharded(model, tmp_path, official_keys):
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_bytes=600_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == official_keys
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    for f in shards:  # every key is in the shard the index names
        with safe_open(str(f), framework="pt") as fh:
            assert all(index["weight_map"][k] == f.name for k in fh.keys())
    total = sum(t.numel() * t.element_size() for f in shards for t in load_file(str(f)).values())
    assert index["metadata"]["total_size"] == total
    _assert_identical(model, NextStep.from_pretrained(out))

    # re-saving unsharded into the same directory removes the stale shards and index
    model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    _assert_identical(model, NextStep.from_pretrained(out))


def test_bf16_checkpoint_is_cast_on_load(model, model_dir, tmp_path):
    mb = NextStep.from_pretrained(model_dir, dtype=torch.bfloat16)
    mb.save_pretrained(tmp_path / "bf16")
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), framework="pt") as fh:
        assert fh.get_tensor("embed_tokens.weight").dtype == torch.bfloat16
    up = NextStep.from_pretrained(tmp_path / "bf16")  # default: the model's float32
    same = NextStep.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    for k, v in model.state_dict().items():
        assert up.state_dict()[k].dtype == torch.float32, k
        assert torch.equal(up.state_dict()[k], v.to(torch.bfloat16).float()), k
        assert torch.equal(same.state_dict()[k], v.to(torch.bfloat16)), k


def test_tied_embeddings_round_trip(tmp_path):
    cfg = preset("tiny")
    cfg.transformer.tie_word_embeddings = True
    m = NextStep(cfg).init_weights(generator=torch.Generator().manual_seed(0))
    assert m.lm_head.weight is m.embed_tokens.weight
    m.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in _saved_keys(tmp_path / "tied")
    loaded = NextStep.from_pretrained(tmp_path / "tied")
    assert loaded.config.transformer.tie_word_embeddings is True
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert torch.equal(loaded.embed_tokens.weight, m.embed_tokens.weight)
    assert torch.equal(loaded.lm_head.weight, m.lm_head.weight)
    _assert_identical(m, loaded)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(loaded.logits(loaded(loaded.embed(ids))), m.eval().logits(m(m.embed(ids))))
    # still tied after a bf16 load
    lb = NextStep.from_pretrained(tmp_path / "tied", dtype=torch.bfloat16)
    assert lb.lm_head.weight is lb.embed_tokens.weight and lb.lm_head.weight.dtype == torch.bfloat16


# ---- errors ------------------------------------------------------------------------------------------------

def test_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        NextStep.from_pretrained(tmp_path / "nowhere")


def test_dir_without_config(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        NextStep.from_pretrained(d)


def test_dir_without_weights(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        NextStep.from_pretrained(d)


def test_index_names_missing_shard(model, tmp_path):
    d = tmp_path / "sharded"
    model.save_pretrained(d, max_shard_bytes=600_000)
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        NextStep.from_pretrained(d)


def test_corrupt_index(model, tmp_path):
    d = tmp_path / "sharded"
    model.save_pretrained(d, max_shard_bytes=600_000)
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="index"):
        NextStep.from_pretrained(d)


def _rewrite(d: Path, edit) -> None:
    sd = load_file(str(d / "model.safetensors"))
    edit(sd)
    (d / "model.safetensors").unlink()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_missing_key_is_named(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path / "m")
    _rewrite(d, lambda sd: sd.pop("layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys: transformer\.layers\.1\.self_attn\.k_proj\.bias"):
        NextStep.from_pretrained(d)


def test_extra_key_is_named(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path / "m")
    _rewrite(d, lambda sd: sd.__setitem__("layers.0.self_attn.q_norm.weight", torch.ones(32)))
    with pytest.raises(CheckpointError, match=r"unexpected keys: .*layers\.0\.self_attn\.q_norm\.weight"):
        NextStep.from_pretrained(d)


def test_gen_pos_embed_is_optional(model_dir, tmp_path, model):
    d = _copy(model_dir, tmp_path / "m")
    _rewrite(d, lambda sd: sd.pop("gen_pos_embed"))
    _assert_identical(model, NextStep.from_pretrained(d))


def test_config_contradicting_weights(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").unlink()
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 256}))
    with pytest.raises(CheckpointError) as e:
        NextStep.from_pretrained(d)
    msg = str(e.value)
    assert "shape" in msg and "mlp.gate_proj.weight" in msg and "(320, 128)" in msg and "(256, 128)" in msg


def test_untied_config_for_tied_weights(tmp_path):
    cfg = preset("tiny")
    cfg.transformer.tie_word_embeddings = True
    NextStep(cfg).save_pretrained(tmp_path / "tied")
    c = json.loads((tmp_path / "tied" / "config.json").read_text())
    (tmp_path / "tied" / "config.json").write_text(json.dumps({**c, "tie_word_embeddings": False}))
    with pytest.raises(CheckpointError, match="missing keys: lm_head.weight"):
        NextStep.from_pretrained(tmp_path / "tied")


def test_corrupt_config_json(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path / "m")
    (d / "config.json").unlink()
    (d / "config.json").write_text('{"hidden_size": 128, ')
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        NextStep.from_pretrained(d)
    (d / "config.json").unlink()
    (d / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match="JSON object"):
        NextStep.from_pretrained(d)


def test_unsupported_config_option(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").unlink()
    (d / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"type": "yarn", "factor": 4.0}}))
    with pytest.raises(ConfigError, match="rope_scaling"):
        NextStep.from_pretrained(d)


@pytest.mark.parametrize("size", [7, 100_000])
def test_corrupt_weights_file_is_named(model_dir, tmp_path, size):
    d = _copy(model_dir, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()[:size]
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors as safetensors"):
        NextStep.from_pretrained(d)


def test_path_is_a_file(model_dir):
    with pytest.raises(MissingFileError, match="config.json"):
        NextStep.from_pretrained(model_dir / "config.json")


def test_written_files_respect_the_umask(tmp_path):
    """Images, weights, JSON and caches get 0666 minus the umask (a bare mkstemp file would stay 0600), and a set of
    PNGs is written whole or not at all."""
    import os

    from PIL import Image

    from nextstep.checkpoint import save_safetensors, write_json
    from nextstep.images import save_png, save_pngs

    old = os.umask(0o022)
    try:
        save_png(Image.new("RGB", (4, 4)), tmp_path / "a.png")
        save_safetensors({"x": torch.zeros(2)}, tmp_path / "w.safetensors")
        write_json({"a": 1}, tmp_path / "c.json")
        for name in ("a.png", "w.safetensors", "c.json"):
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    finally:
        os.umask(old)

    class Broken:
        def save(self, *a, **k):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pngs([Image.new("RGB", (4, 4)), Broken()], [tmp_path / "x_0.png", tmp_path / "x_1.png"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "c.json", "w.safetensors"]  # no x_*, no temps


@pytest.mark.parametrize("fixture", ["official-v1-a", "official-v11-a"])
def test_pipeline_save_pretrained_loads_back_the_same_pipeline(fixtures_dir, tmp_path, fixture):
    """``NextStepPipeline.save_pretrained`` writes what ``from_pretrained`` reads: the same weights, format, sampling
    defaults and tokenizer, so the same images for a seed."""
    from nextstep.pipeline import NextStepPipeline

    root = fixtures_dir / fixture
    pipe = NextStepPipeline.from_pretrained(root / "model", root / "vae")
    again = NextStepPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "saved"))
    _assert_identical(pipe.model, again.model)
    a, b = pipe.vae.state_dict(), again.vae.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    same = (pipe.format, pipe.defaults, pipe.tokenizer.special)
    assert (again.format, again.defaults, again.tokenizer.special) == same
    images = [p("a red circle", height=32, width=32, num_inference_steps=2, generator=torch.Generator().manual_seed(3),
                progress=False, output_type="pt").images for p in (pipe, again)]
    assert torch.equal(*images)
