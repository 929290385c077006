"""Config schemas: the official config.json spellings, round trips, refusals, presets and parameter counts."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from nextstep.config import (
    ConfigError,
    FlowHeadConfig,
    NextStepConfig,
    TransformerConfig,
    VAEConfig,
    num_params_estimate,
    preset,
)
from nextstep.model.nextstep import NextStep


@pytest.fixture(scope="module")
def official(fixtures_dir) -> dict:
    return json.loads((fixtures_dir / "official-v1-a" / "model" / "config.json").read_text())


@pytest.fixture(scope="module")
def official_vae(fixtures_dir) -> dict:
    return json.loads((fixtures_dir / "official-v1-a" / "vae" / "config.json").read_text())


def _v11_dict(official: dict) -> dict:
    """The fixture config respelled as a NextStep-1.1 model card would spell it."""
    d = copy.deepcopy(official)
    for old, new in [("fm_head_dim", "genloss_width"), ("fm_head_layers", "genloss_depth"),
                     ("fm_head_batch_mul", "genloss_batch_mul"), ("latent_channels", "num_channels"),
                     ("latent_patch_size", "patch_size"), ("im_loss_weight", "image_loss_weight")]:
        d[new] = d.pop(old)
    d.pop("latent_size")
    d["image_size"] = 64  # latent side of a 512 px image; 32 tokens per side with patch 2
    return d


def _no_warnings(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args)


# ---- reading the official schemas ----------------------------------------------------------------------------

def test_from_official_reads_fixture(official):
    cfg = _no_warnings(NextStepConfig.from_official, official)
    t, h = cfg.transformer, cfg.head
    shape = (t.vocab_size, t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.head_dim)
    assert shape == (1024, 128, 2, 4, 2, 32)
    assert t.intermediate_size == 320
    assert t.rms_norm_eps == 1e-6 and t.rope_theta == 1e6
    assert t.qkv_bias is True and t.o_bias is False and t.mlp_bias is False and t.tie_word_embeddings is False
    assert (h.width, h.depth, h.batch_mul) == (64, 2, 4)
    assert (cfg.boi_id, cfg.eoi_id, cfg.image_placeholder_id, cfg.pad_id) == (757, 758, 759, 755)
    assert cfg.eos_id == 0
    assert (cfg.latent_channels, cfg.patch_size, cfg.token_dim) == (16, 2, 64)
    assert cfg.im_loss_weight == 1.0 and cfg.lm_loss_weight == 0.01
    assert cfg.use_gen_pos_embed is False and cfg.base_image_grid_size == 32
    # the fixture is the tiny preset written in the official schema
    assert cfg == preset("tiny")


def test_from_json_file_reads_fixture(fixtures_dir, official):
    cfg = NextStepConfig.from_json_file(fixtures_dir / "official-v1-a" / "model" / "config.json")
    assert cfg == NextStepConfig.from_official(official)


def test_v11_spelling_reads_to_same_fields(official):
    d = _v11_dict(official)
    assert "fm_head_dim" not in d and d["genloss_width"] == 64
    cfg = _no_warnings(NextStepConfig.from_official, d)
    ref = NextStepConfig.from_official(official)
    assert cfg.head == ref.head
    assert (cfg.latent_channels, cfg.patch_size, cfg.im_loss_weight) == (16, 2, 1.0)
    assert cfg.base_image_grid_size == 32  # image_size 64 latents / patch 2
    assert cfg == ref

    # non-default values really come from the new names
    d.update(genloss_width=96, genloss_depth=3, genloss_batch_mul=2, num_channels=8, patch_size=1,
             image_loss_weight=0.5, image_size=48)
    cfg = NextStepConfig.from_official(d)
    assert (cfg.head.width, cfg.head.depth, cfg.head.batch_mul) == (96, 3, 2)
    assert (cfg.latent_channels, cfg.patch_size, cfg.token_dim, cfg.im_loss_weight) == (8, 1, 8, 0.5)
    assert cfg.base_image_grid_size == 48  # patch 1: one token per latent


def test_training_only_keys_warn_by_name(official):
    d = _v11_dict(official)
    d.update(noise_strength=0.0, create_kwargs={"snr_type": "lognorm"}, attention_use_qk_norm=False)
    with pytest.warns(UserWarning) as rec:
        cfg = NextStepConfig.from_official(d)
    msgs = " ".join(str(w.message) for w in rec)
    assert "noise_strength" in msgs and "create_kwargs" in msgs
    assert "attention_use_qk_norm" not in msgs  # false is simply our behaviour
    assert cfg == NextStepConfig.from_official(official)


def test_bookkeeping_keys_are_silent(official):
    d = dict(official)
    assert {"architectures", "torch_dtype", "transformers_version"} <= set(d)
    d.update(architectures=["NextStepForCausalLM"], torch_dtype="bfloat16", transformers_version="4.55.0",
             _name_or_path="stepfun-ai/NextStep-1-Large")
    _no_warnings(NextStepConfig.from_official, d)


def test_same_value_in_two_spellings_is_accepted(official):
    d = dict(official, genloss_width=64, image_loss_weight=1)  # 1 == 1.0
    assert _no_warnings(NextStepConfig.from_official, d) == NextStepConfig.from_official(official)


# ---- writing the official schemas --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "nextstep-1-large"])
@pytest.mark.parametrize("schema", ["v1", "v1.1"])
def test_to_official_round_trip(name, schema):
    cfg = preset(name)
    d = cfg.to_official(schema)
    json.loads(json.dumps(d))  # plain JSON
    if schema == "v1":
        assert d["fm_head_dim"] == cfg.head.width and d["latent_channels"] == cfg.latent_channels
        assert "genloss_width" not in d and "num_channels" not in d
    else:
        assert d["genloss_width"] == cfg.head.width and d["num_channels"] == cfg.latent_channels
        assert "fm_head_dim" not in d and "latent_channels" not in d
    back = _no_warnings(NextStepConfig.from_official, d)
    assert back == cfg


def test_to_official_round_trip_non_default_fields():
    cfg = NextStepConfig(
        transformer=TransformerConfig(vocab_size=600, hidden_size=96, num_layers=3, num_heads=6, num_kv_heads=3,
                                      head_dim=16, intermediate_size=200, rms_norm_eps=1e-5, rope_theta=5e5,
                                      max_position_embeddings=1000, qkv_bias=False, o_bias=True, mlp_bias=True,
                                      tie_word_embeddings=True),
        head=FlowHeadConfig(width=48, depth=3, mlp_ratio=2.0, batch_mul=2),
        latent_channels=4, patch_size=1, base_image_grid_size=20, use_gen_pos_embed=True,
        boi_id=500, eoi_id=501, image_placeholder_id=502, pad_id=503, eos_id=7,
        lm_loss_weight=0.1, im_loss_weight=2.0, context_noise=0.4)
    for schema in ("v1", "v1.1"):
        assert NextStepConfig.from_official(cfg.to_official(schema)) == cfg
    assert "context_noise" not in preset("tiny").to_official()  # our extension: absent unless used
    with pytest.raises(ConfigError, match="schema"):
        cfg.to_official("v2")


# ---- refusals ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("update, match", [
    ({"my_new_key": 1}, "my_new_key"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"attention_use_qk_norm": True}, "attention_use_qk_norm"),
    ({"genloss_width": 128}, "genloss_width"),  # fm_head_dim says 64
    ({"num_attention_heads": 3, "head_dim": 32}, "num_kv_heads"),
    ({"image_placeholder_id": 1024}, "image_placeholder_id=1024"),
    ({"boi": -1}, "boi_id=-1"),
    ({"genloss_type": "diffusion"}, "genloss_type"),
    ({"use_mlp_before_lm_head": True}, "use_mlp_before_lm_head=true is not supported"),
])
def test_from_official_refuses(official, update, match):
    with pytest.raises(ConfigError, match=match):
        NextStepConfig.from_official({**official, **update})


def test_duplicate_field_error_names_both_keys(official):
    with pytest.raises(ConfigError) as e:
        NextStepConfig.from_official({**official, "genloss_width": 128})
    assert "fm_head_dim" in str(e.value) and "genloss_width" in str(e.value) and "128" in str(e.value)
    with pytest.raises(ConfigError, match="latent_patch_size"):
        NextStepConfig.from_official({**official, "patch_size": 1})
    # true is not the same as 1
    with pytest.raises(ConfigError):
        NextStepConfig.from_official({**_v11_dict(official), "num_channels": True, "latent_channels": 1})


def test_from_json_file_errors(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 128,')
    with pytest.raises(ConfigError, match="not valid JSON"):
        NextStepConfig.from_json_file(bad)
    bad.write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match="JSON object.*list"):
        NextStepConfig.from_json_file(bad)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        NextStepConfig.from_json_file(tmp_path / "nope.json")


def test_dataclass_validation():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        TransformerConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ConfigError, match="head_dim"):
        TransformerConfig(head_dim=31)
    with pytest.raises(ConfigError, match="hidden_size"):
        TransformerConfig(hidden_size=0)
    with pytest.raises(ConfigError, match="pad_id=2000"):
        NextStepConfig(pad_id=2000)
    with pytest.raises(ConfigError, match="width"):
        FlowHeadConfig(width=0)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="context_noise"):
            NextStepConfig(context_noise=bad)
    with pytest.raises(ConfigError, match="unknown NextStepConfig keys.*'bogus'"):
        NextStepConfig.from_dict({"bogus": 1})
    cfg = preset("tiny")
    assert NextStepConfig.from_dict(cfg.to_dict()) == cfg


# ---- presets and parameter counts --------------------------------------------------------------------------

def test_large_preset_values():
    cfg = preset("nextstep-1-large")
    t, h = cfg.transformer, cfg.head
    assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.head_dim) == (5120, 48, 40, 8, 128)
    assert t.intermediate_size == 13824 and t.vocab_size == 152064
    assert t.qkv_bias is True and t.o_bias is False
    assert t.rms_norm_eps == 1e-5 and t.rope_theta == 1e6
    assert (h.width, h.depth) == (1536, 12)
    assert (cfg.latent_channels, cfg.patch_size, cfg.token_dim) == (16, 2, 64)
    assert (cfg.boi_id, cfg.eoi_id, cfg.image_placeholder_id, cfg.pad_id, cfg.eos_id) == (
        151667, 151668, 151669, 151665, 151643)
    # presets are fresh objects: mutating one does not leak into the next
    cfg.head.width = 1
    assert preset("nextstep-1-large").head.width == 1536


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError) as e:
        preset("nextstep-2")
    msg = str(e.value)
    assert "nextstep-2" in msg and "nextstep-1-large" in msg and "tiny" in msg


def _numel(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())  # tied parameters are counted once


def test_num_params_estimate_tiny_matches_model():
    model = NextStep(preset("tiny"))
    assert num_params_estimate(preset("tiny")) == _numel(model) == 719552


@pytest.mark.parametrize("change", [
    {"tie_word_embeddings": True}, {"o_bias": True}, {"qkv_bias": False}, {"mlp_bias": True},
    {"mlp_ratio": 2.0}, {"frequency_dim": 64}, {"patch_size": 1},
])
def test_num_params_estimate_variants(change):
    cfg = preset("tiny")
    for k, v in change.items():
        target = cfg.transformer if hasattr(cfg.transformer, k) else cfg.head if hasattr(cfg.head, k) else cfg
        setattr(target, k, v)
    with torch.device("meta"):
        model = NextStep(cfg)
    assert num_params_estimate(cfg) == _numel(model)


def test_num_params_estimate_large_matches_meta_model():
    cfg = preset("nextstep-1-large")
    with torch.device("meta"):
        model = NextStep(cfg)
    total = _numel(model)
    assert num_params_estimate(cfg) == total
    assert 14.0e9 < total < 15.0e9
    assert 150e6 < _numel(model.image_head) < 165e6


# ---- the VAE config ----------------------------------------------------------------------------------------

def test_vae_from_official_fixture(official_vae):
    cfg = VAEConfig.from_official(official_vae)
    assert cfg.norm == "layer_norm" and cfg.norm_patch == 2
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels, cfg.downsample) == (32, (1, 2, 4, 4), 2, 16, 8)
    assert cfg.scaling_factor == 1.0 and cfg.shift_factor == 0.0
    assert VAEConfig.from_official(cfg.to_official()) == cfg


def test_vae_norm_fn_spelling(official_vae):
    d = {k: v for k, v in official_vae.items() if k not in ("encoder_norm", "psz")}
    d.update(psz=1, norm_fn="layer_norm", norm_level="channel", scaling_factor=1, shift_factor=0)
    cfg = VAEConfig.from_official(d)
    assert cfg.norm == "layer_norm" and cfg.norm_patch == 1
    assert VAEConfig.from_official(cfg.to_official()) == cfg
    # the two spellings describe different normalisations; never the same config
    assert cfg != VAEConfig.from_official(official_vae)


def test_vae_encoder_norm_off(official_vae):
    cfg = VAEConfig.from_official({**official_vae, "encoder_norm": False})
    assert cfg.norm == "none"
    assert VAEConfig.from_official(cfg.to_official()) == cfg


@pytest.mark.parametrize("update, match", [
    ({"foo": 1}, "foo"),
    ({"norm_fn": "layer_norm", "norm_level": "patch"}, "norm_level 'patch'"),
    ({"norm_fn": "group_norm"}, "group_norm"),
    ({"norm_fn": "none", "encoder_norm": True}, "contradicts"),
    ({"ch": 48}, "multiples of 32"),
    ({"scaling_factor": 0}, "scaling_factor"),
])
def test_vae_from_official_refuses(official_vae, update, match):
    with pytest.raises(ConfigError, match=match):
        VAEConfig.from_official({**official_vae, **update})


def test_vae_round_trip_non_default():
    cfg = VAEConfig(ch=64, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, scaling_factor=0.5, shift_factor=0.1,
                    norm="layer_norm", norm_patch=1, norm_eps=1e-5)
    d = cfg.to_official()
    json.loads(json.dumps(d))
    assert VAEConfig.from_official(d) == cfg
