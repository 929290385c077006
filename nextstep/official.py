"""The official on-disk config schemas: NextStep-1 and NextStep-1.1 ``config.json``, and the tokenizer VAE's.

Three spellings of the same model fields exist in the wild (see ``shared/fixtures/FORMATS.md``):
NextStep-1 (``fm_head_*``, ``latent_*``, ``im_loss_weight``), NextStep-1.1 (``genloss_*``, ``image_size``,
``patch_size``, ``num_channels``, ``image_loss_weight``) and the training code. :func:`nextstep_from_official` reads
all of them. A key it does not understand is an error, and so is an option this implementation does not have;
Hugging Face bookkeeping keys are accepted and training-only keys of the official trainer are accepted with a
warning naming them.
"""

from __future__ import annotations

import warnings
from typing import Any

from .config import FlowHeadConfig, NextStepConfig, TransformerConfig, VAEConfig, _check
from .errors import ConfigError

# ---- NextStep-1 / 1.1 model config.json --------------------------------------------------------------------------
# Keys of official configs that carry no meaning for the model math: Hugging Face bookkeeping (accepted
# silently) and training-only knobs of the official trainer (accepted with a warning that names them).
BOOKKEEPING_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache", "pretraining_tp",
    "initializer_range", "attention_dropout", "_name_or_path", "pad_token_id_added", "auto_map",
    "output_attentions", "output_hidden_states", "return_dict", "max_window_layers", "use_sliding_window",
    "sliding_window", "bos_token_id",  # no BOS is used: prompts follow the tokenizer (Qwen2 has none)
})
TRAINING_ONLY_KEYS = frozenset({
    "noise_strength", "create_kwargs", "genloss_type", "genloss_net_arch", "genloss_num_sampling_steps",
    "image_feature_layer", "image_encoder_name", "image_decoder_arch", "hw_aspect_ratios_ids",
    "use_token_length_weight", "vae_name_or_path",
})


# (official key, alternative keys, our path). First present spelling wins; two different values is an error.
_ALIASES: list[tuple[tuple[str, ...], str]] = [
    (("fm_head_dim", "genloss_width"), "head.width"),
    (("fm_head_layers", "genloss_depth"), "head.depth"),
    (("fm_head_mlp_ratio",), "head.mlp_ratio"),
    (("fm_head_batch_mul", "genloss_batch_mul"), "head.batch_mul"),
    (("latent_channels", "num_channels"), "latent_channels"),
    (("latent_patch_size", "patch_size"), "patch_size"),
    (("im_loss_weight", "image_loss_weight"), "im_loss_weight"),
    (("lm_loss_weight",), "lm_loss_weight"),
    (("base_image_grid_size",), "base_image_grid_size"),
    (("use_gen_pos_embed",), "use_gen_pos_embed"),
    (("boi",), "boi_id"),
    (("eoi",), "eoi_id"),
    (("image_placeholder_id",), "image_placeholder_id"),
    (("pad_token_id",), "pad_id"),
    (("eos_token_id",), "eos_id"),
    (("context_noise",), "context_noise"),
    (("parallel_tokens",), "parallel_tokens"),
    (("reread_width",), "reread_width"),
    (("vocab_size",), "transformer.vocab_size"),
    (("hidden_size",), "transformer.hidden_size"),
    (("num_hidden_layers",), "transformer.num_layers"),
    (("num_attention_heads",), "transformer.num_heads"),
    (("num_key_value_heads",), "transformer.num_kv_heads"),
    (("head_dim",), "transformer.head_dim"),
    (("intermediate_size",), "transformer.intermediate_size"),
    (("rms_norm_eps",), "transformer.rms_norm_eps"),
    (("rope_theta",), "transformer.rope_theta"),
    (("max_position_embeddings",), "transformer.max_position_embeddings"),
    (("attention_bias",), "transformer.qkv_bias"),
    (("o_attention_bias",), "transformer.o_bias"),
    (("mlp_bias",), "transformer.mlp_bias"),
    (("tie_word_embeddings",), "transformer.tie_word_embeddings"),
]


V11_KEYS = ("genloss_width", "genloss_depth", "genloss_batch_mul", "num_channels", "patch_size", "image_size",
            "image_loss_weight")  # NextStep-1.1 model-card names (NextStep-1 spells them fm_head_*, latent_*)


def schema_of(d: dict[str, Any]) -> str:
    """"v1.1" for a config.json in NextStep-1.1's spelling, else "v1" (NextStep-1's, which ours also writes)."""
    return "v1.1" if isinstance(d, dict) and any(k in d for k in V11_KEYS) else "v1"


def _same_value(a: Any, b: Any) -> bool:
    """Equal as config values: 1 == 1.0, but a bool only equals a bool (true is not 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b


def nextstep_from_official(d: dict[str, Any]) -> NextStepConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"config.json must hold a JSON object, got {type(d).__name__}")
    d = dict(d)
    values: dict[str, Any] = {}
    for keys, ours in _ALIASES:
        present = [(k, d.pop(k)) for k in keys if k in d]
        if not present:
            continue
        first = present[0][1]
        if any(not _same_value(first, v) for _, v in present[1:]):
            raise ConfigError(f"config.json gives different values for the same field {ours}: {dict(present)}")
        values[ours] = present[0][1]

    # Options we do not implement must be refused, never ignored.
    act = d.pop("hidden_act", "silu")
    _check(act == "silu", f"config.json: hidden_act={act!r} is not supported (only 'silu')")
    rope_scaling = d.pop("rope_scaling", None)
    _check(rope_scaling is None, f"config.json: rope_scaling={rope_scaling!r} is not supported (only null)")
    qk_norm = d.pop("attention_use_qk_norm", False)
    _check(not qk_norm, "config.json: attention_use_qk_norm=true is not supported")
    mlp_before = d.pop("use_mlp_before_lm_head", False)
    _check(not mlp_before, "config.json: use_mlp_before_lm_head=true is not supported (no before_lm_head MLP here)")
    genloss_type = d.get("genloss_type")
    _check(genloss_type in (None, "flow_matching", "fm"),
           f"config.json: genloss_type={genloss_type!r} is not supported (flow matching only)")
    image_size = d.pop("image_size", None)
    latent_size = d.pop("latent_size", None)
    if "base_image_grid_size" not in values:
        # NextStep-1 uses a 32-wide table whatever latent_size says; 1.1 cards set image_size (latent side).
        patch = int(values.get("patch_size", NextStepConfig.patch_size))
        values["base_image_grid_size"] = 32 if image_size is None else int(image_size) // patch
    del latent_size  # informational only (the side of the training latent); positions follow the real grid

    unknown = sorted(k for k in d if k not in BOOKKEEPING_KEYS | TRAINING_ONLY_KEYS)
    if unknown:
        raise ConfigError(f"config.json has keys this loader does not understand: {unknown}")
    training_only = sorted(k for k in d if k in TRAINING_ONLY_KEYS and d[k] is not None)
    if training_only:
        warnings.warn(f"config.json: ignoring training-only keys of the official trainer: {training_only}",
                      stacklevel=3)

    tcfg: dict[str, Any] = {}
    hcfg: dict[str, Any] = {}
    top: dict[str, Any] = {}
    for path, v in values.items():
        if path.startswith("transformer."):
            tcfg[path.split(".", 1)[1]] = v
        elif path.startswith("head."):
            hcfg[path.split(".", 1)[1]] = v
        else:
            top[path] = v
    if "head_dim" not in tcfg and "hidden_size" in tcfg and "num_heads" in tcfg:
        tcfg["head_dim"] = tcfg["hidden_size"] // tcfg["num_heads"]
    return NextStepConfig(transformer=TransformerConfig(**tcfg), head=FlowHeadConfig(**hcfg), **top)


def nextstep_to_official(cfg: NextStepConfig, schema: str = "v1") -> dict[str, Any]:
    _check(schema in ("v1", "v1.1"), f"schema must be 'v1' or 'v1.1', got {schema!r}")
    t, h = cfg.transformer, cfg.head
    out: dict[str, Any] = {
        "architectures": ["NextStep"],
        "model_type": "nextstep",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads,
        "head_dim": t.head_dim,
        "intermediate_size": t.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": t.max_position_embeddings,
        "attention_bias": t.qkv_bias,
        "o_attention_bias": t.o_bias,
        "mlp_bias": t.mlp_bias,
        "tie_word_embeddings": t.tie_word_embeddings,
        "boi": cfg.boi_id,
        "eoi": cfg.eoi_id,
        "image_placeholder_id": cfg.image_placeholder_id,
        "pad_token_id": cfg.pad_id,
        "eos_token_id": cfg.eos_id,
        "lm_loss_weight": cfg.lm_loss_weight,
        "use_gen_pos_embed": cfg.use_gen_pos_embed,
        "base_image_grid_size": cfg.base_image_grid_size,
        "fm_head_mlp_ratio": h.mlp_ratio,
    }
    if cfg.context_noise:  # our extension; written only when used so official-format files stay unchanged
        out["context_noise"] = cfg.context_noise
    if cfg.parallel_tokens > 1:  # ours too: a model trained for parallel decoding (``NextStep.condition``)
        out["parallel_tokens"] = cfg.parallel_tokens
    if cfg.reread_width:  # ours: parallel decoding's trained correction (``NextStep.reread``)
        out["reread_width"] = cfg.reread_width
    if schema == "v1":
        out.update(fm_head_dim=h.width, fm_head_layers=h.depth, fm_head_batch_mul=h.batch_mul,
                   latent_channels=cfg.latent_channels, latent_patch_size=cfg.patch_size,
                   im_loss_weight=cfg.im_loss_weight)
    else:
        out.update(genloss_width=h.width, genloss_depth=h.depth, genloss_batch_mul=h.batch_mul,
                   num_channels=cfg.latent_channels, patch_size=cfg.patch_size,
                   image_loss_weight=cfg.im_loss_weight)
    return out


# ---- the tokenizer VAE: config.json beside checkpoint.pt ------------------------------------------------------
_VAE_OFFICIAL = ("resolution", "in_channels", "ch", "out_ch", "ch_mult", "num_res_blocks", "z_channels",
                 "scaling_factor", "shift_factor", "deterministic")


def vae_from_official(d: dict[str, Any], format: str = "v1") -> VAEConfig:
    """A tokenizer ``config.json`` -> VAEConfig. Without any normalisation key, NextStep-1's code normalises nothing
    while NextStep-1.1's applies a layer norm over the channels at each latent position (its defaults
    ``encoder_norm=True, psz=1``): ``format`` ("v1" or "v1.1", the model's release) picks which."""
    _check(format in ("v1", "v1.1"), f"format must be 'v1' or 'v1.1', got {format!r}")
    d = dict(d)
    kw: dict[str, Any] = {k: d.pop(k) for k in _VAE_OFFICIAL if k in d}
    # Two spellings of the latent normalisation (FORMATS.md): encoder_norm + psz, or norm_fn/norm_level.
    encoder_norm = d.pop("encoder_norm", None)
    psz = d.pop("psz", None)
    norm_fn = d.pop("norm_fn", None)
    norm_level = d.pop("norm_level", None)
    if norm_fn is not None:
        _check(norm_fn in ("layer_norm", "none", None),
               f"vae config: unsupported norm_fn {norm_fn!r} (supported: 'layer_norm', 'none')")
        _check(norm_level in (None, "channel"),
               f"vae config: unsupported norm_level {norm_level!r} (supported: 'channel')")
        _check(encoder_norm is None or bool(encoder_norm) == (norm_fn == "layer_norm"),
               f"vae config: encoder_norm={encoder_norm!r} contradicts norm_fn={norm_fn!r}")
        kw["norm"] = norm_fn
    elif encoder_norm is not None:
        kw["norm"] = "layer_norm" if encoder_norm else "none"
    else:
        kw["norm"] = "layer_norm" if format == "v1.1" else "none"
    kw["norm_patch"] = int(psz) if psz else 1
    for k in ("norm_eps",):
        if k in d:
            kw[k] = d.pop(k)
    if d:
        raise ConfigError(f"vae config.json has keys this loader does not understand: {sorted(d)}")
    return VAEConfig(**kw)


def vae_to_official(cfg: VAEConfig) -> dict[str, Any]:
    out = {k: getattr(cfg, k) for k in _VAE_OFFICIAL}
    out["ch_mult"] = list(cfg.ch_mult)
    out["encoder_norm"] = cfg.norm == "layer_norm"
    out["psz"] = cfg.norm_patch
    if cfg.norm_eps != 1e-6:
        out["norm_eps"] = cfg.norm_eps
    return out
