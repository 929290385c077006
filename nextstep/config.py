"""Typed configuration for every part of NextStep (model, flow head, VAE, sampling) and named presets.

Reading and writing the official ``config.json`` schemas (NextStep-1, NextStep-1.1, the tokenizer VAE) is
``nextstep/official.py``; the ``from_official``/``to_official`` methods here call it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, InputError, MissingFileError
from .files import atomic_path
from .settings import MAX_PARALLEL, Settings


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        _check(isinstance(v, int) and not isinstance(v, bool) and v > 0,
               f"{type(obj).__name__}.{n} must be a positive integer, got {v!r}")


@dataclass
class TransformerConfig:
    """Qwen2-style decoder: RMSNorm, RoPE, GQA, SwiGLU, optional q/k/v and o biases."""

    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 320
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 4096
    qkv_bias: bool = True
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "max_position_embeddings")
        _check(self.num_heads % self.num_kv_heads == 0,
               f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        _check(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
        _check(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        _check(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")


@dataclass
class FlowHeadConfig:
    """AdaLN residual MLP that predicts the flow velocity of one image token."""

    width: int = 64
    depth: int = 2
    mlp_ratio: float = 1.0
    batch_mul: int = 4  # each token's loss is drawn this many times (different t and noise)
    frequency_dim: int = 256  # size of the sinusoidal time embedding

    def __post_init__(self) -> None:
        _positive(self, "width", "depth", "batch_mul", "frequency_dim")
        _check(self.mlp_ratio > 0, f"FlowHeadConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")
        _check(self.frequency_dim % 2 == 0, "FlowHeadConfig.frequency_dim must be even")


@dataclass
class VAEConfig:
    """Flux-style autoencoder (the image tokenizer) and how its latents are normalised.

    ``norm`` is the token-wise latent normalisation applied to the posterior mean: ``"layer_norm"`` normalises each
    ``norm_patch`` x ``norm_patch`` patch of latents (``z_channels * norm_patch**2`` values) without affine
    parameters; ``"none"`` leaves it alone.
    """

    resolution: int = 64
    in_channels: int = 3
    ch: int = 32
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    deterministic: bool = True
    norm: str = "layer_norm"
    norm_patch: int = 2
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        _positive(self, "resolution", "in_channels", "ch", "out_ch", "num_res_blocks", "z_channels", "norm_patch")
        _check(len(self.ch_mult) >= 1 and all(m > 0 for m in self.ch_mult),
               f"VAEConfig.ch_mult must be non-empty positive integers, got {self.ch_mult}")
        _check(self.ch % 32 == 0 and all((self.ch * m) % 32 == 0 for m in self.ch_mult),
               f"VAEConfig: ch * ch_mult must be multiples of 32 (GroupNorm with 32 groups), got ch={self.ch}")
        _check(self.norm in ("layer_norm", "none"), f"VAEConfig.norm must be 'layer_norm' or 'none', got {self.norm!r}")
        _check(self.scaling_factor != 0, "VAEConfig.scaling_factor must be non-zero")

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along each side (8 for ch_mult of length 4)."""
        return 2 ** (len(self.ch_mult) - 1)

    # official tokenizer schema (checkpoint.pt + config.json): nextstep/official.py
    @classmethod
    def from_official(cls, d: dict[str, Any], format: str = "v1") -> VAEConfig:
        from .official import vae_from_official
        return vae_from_official(d, format)

    def to_official(self) -> dict[str, Any]:
        from .official import vae_to_official
        return vae_to_official(self)


def valid_parallel(k: Any) -> bool:
    """Whether ``k`` can be a model's ``parallel_tokens`` (image tokens per backbone forward it is trained for)."""
    return isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= MAX_PARALLEL


@dataclass
class NextStepConfig:
    """The joint model: backbone + image projectors + flow head, and the image-token protocol ids."""

    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    head: FlowHeadConfig = field(default_factory=FlowHeadConfig)
    latent_channels: int = 16
    patch_size: int = 2
    base_image_grid_size: int = 32  # side of the 2-D position table (NextStep-1: 32)
    use_gen_pos_embed: bool = False
    boi_id: int = 757
    eoi_id: int = 758
    image_placeholder_id: int = 759
    pad_id: int = 755
    eos_id: int | None = 0
    lm_loss_weight: float = 0.01
    im_loss_weight: float = 1.0
    # Std of the Gaussian noise added to the tokens of the image being generated where they are read back as
    # inputs (training: every position of a generated image; sampling: each sampled token before it is fed back).
    # The flow loss's targets stay clean. Without it a small model learns to copy faint whole-image traces that
    # the VAE encoder (attention, GroupNorm) leaves in every token instead of reading the prompt (README, "Bundled
    # model"; benchmarks/shortcut.py measures it). 0 is the reference behaviour.
    context_noise: float = 0.0
    # Parallel decoding: the image tokens one hidden state is trained to predict (``NextStep.condition``'s
    # ``ahead``): a model with K > 1 can decode up to K tokens per backbone forward. 1: the reference model.
    parallel_tokens: int = 1
    # Width of parallel decoding's trained correction of the state after a draft (``NextStep.reread``; 0: none, the
    # ahead adapter's difference corrects it).
    reread_width: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.transformer, dict):
            self.transformer = TransformerConfig(**self.transformer)
        if isinstance(self.head, dict):
            self.head = FlowHeadConfig(**self.head)
        _positive(self, "latent_channels", "patch_size", "base_image_grid_size")
        v = self.transformer.vocab_size
        for name in ("boi_id", "eoi_id", "image_placeholder_id", "pad_id"):
            i = getattr(self, name)
            _check(isinstance(i, int) and 0 <= i < v, f"NextStepConfig.{name}={i!r} is outside the vocabulary [0, {v})")
        _check(self.lm_loss_weight >= 0 and self.im_loss_weight >= 0, "loss weights must be >= 0")
        _check(isinstance(self.context_noise, (int, float)) and 0 <= self.context_noise < float("inf"),
               f"NextStepConfig.context_noise must be a finite number >= 0, got {self.context_noise!r}")
        _check(valid_parallel(self.parallel_tokens), f"NextStepConfig.parallel_tokens must be an integer in "
                                                     f"[1, {MAX_PARALLEL}], got {self.parallel_tokens!r}")
        _check(isinstance(self.reread_width, int) and self.reread_width >= 0
               and (self.reread_width == 0 or self.parallel_tokens > 1),
               f"NextStepConfig.reread_width must be an integer >= 0, and 0 unless parallel_tokens > 1, got "
               f"{self.reread_width!r}")

    @property
    def token_dim(self) -> int:
        """Values per image token: latent channels x patch x patch (64 for NextStep-1)."""
        return self.latent_channels * self.patch_size**2

    def flow_rows(self, tokens: int) -> int:
        """The head conditions an image of ``tokens`` tokens gives in training (each drawn ``head.batch_mul`` times):
        one per token, and with ``parallel_tokens`` K > 1 one more per token t >= ahead - 1 for each ahead in 2..K."""
        return sum(max(tokens - a + 1, 0) for a in range(1, self.parallel_tokens + 1))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NextStepConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown NextStepConfig keys: {unknown}")
        return cls(**d)

    # ---- official config.json (the translation lives in nextstep/official.py) --------------------------------
    @classmethod
    def from_official(cls, d: dict[str, Any]) -> NextStepConfig:
        from .official import nextstep_from_official
        return nextstep_from_official(d)

    def to_official(self, schema: str = "v1") -> dict[str, Any]:
        from .official import nextstep_to_official
        return nextstep_to_official(self, schema)

    @classmethod
    def from_json_file(cls, path: str | Path) -> NextStepConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise MissingFileError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_official(d)


@dataclass
class SamplingConfig:
    """Default generation settings of a model: the official defaults of its format (:meth:`for_format`: NextStep-1's
    or NextStep-1.1's), with the model directory's ``generation_config.json`` ``"nextstep"`` section on top (e.g. a
    small model tuned for fewer steps).

    The ``edit_*`` fields apply when an input image is given. :meth:`resolve` turns these defaults plus a call's
    overrides into validated :class:`Settings`; both modes are checked when the config is made (at model load)."""

    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.0
    guidance_schedule: str = "constant"
    num_inference_steps: int = 50
    time_shift: float = 1.0
    token_norm: bool = True
    sampler: str = "sde"
    # editing (an input image is given): the official NextStep-1-Large-Edit settings
    edit_guidance_scale: float = 7.5
    edit_image_guidance_scale: float = 2.0
    edit_time_shift: float = 3.2
    edit_negative_prompt: str = "Copy original image."
    noise_level: float = 0.8  # read by the 1.1 samplers
    parallel: int = 1  # image tokens per backbone forward: 1 (sequential) unless the model was trained for more
    # the image sizes ("WxH") the model was trained at; others are warned about (``size_warning``); empty: not known
    trained_sizes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from .sampling.flow import DISTILLED

        if isinstance(self.trained_sizes, str) or not all(
                isinstance(x, str) and re.fullmatch(r"[1-9]\d*x[1-9]\d*", x) for x in self.trained_sizes):
            raise ConfigError(f"sampling defaults: trained_sizes must be a list of sizes like \"64x64\" "
                              f"(WIDTHxHEIGHT), got {self.trained_sizes!r}")
        self.trained_sizes = tuple(self.trained_sizes)

        if self.sampler == DISTILLED:  # a distilled head is loaded on top of a model, never its default sampler
            raise ConfigError(f"sampling defaults: sampler {DISTILLED!r} names a distilled head's sampler; a model's "
                              f"default sampler must be one of its own head's")
        for edit in (False, True):
            try:
                self.resolve(edit)
            except InputError as e:
                raise ConfigError(f"sampling defaults{' for editing' if edit else ''}: {e}") from None

    def size_warning(self, width: int, height: int) -> str | None:
        """What to tell a caller who asks this model for ``width`` x ``height`` when it was trained at other sizes
        only (None: a trained size, or the trained sizes are not known)."""
        if not self.trained_sizes or f"{width}x{height}" in self.trained_sizes:
            return None
        return (f"this model was trained at {' and '.join(self.trained_sizes)} only: at {width}x{height} it may draw "
                f"noise rather than a picture")

    def resolve(self, edit: bool, **overrides: Any) -> Settings:
        """The settings of one call: ``overrides`` (any :class:`Settings` field; None means "the default") on top of
        the text-to-image or the editing defaults. Raises :class:`InputError` naming the first invalid value."""
        fields = {f.name: f for f in dataclasses.fields(Settings)}
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise TypeError(f"unknown sampling settings: {unknown}")
        base = {name: getattr(self, f"edit_{name}") if edit and hasattr(self, f"edit_{name}") else
                getattr(self, name, f.default) for name, f in fields.items()}  # a setting models leave: its default
        base.update({k: v for k, v in overrides.items() if v is not None})
        return Settings(**base)

    @classmethod
    def for_format(cls, version: str) -> SamplingConfig:
        """The official defaults of a checkpoint format. "v1": NextStep-1 (guidance 7.5, 50 steps, its SDE sampler,
        token norm on; editing 7.5 / 2.0, shift 3.2, "Copy original image."). "v1.1": the NextStep-1.1 inference
        script (guidance 7.5, 30 steps, the "flow_sde" sampler at noise level 0.8, token norm off; 1.1 is a
        text-to-image model, an edit keeps NextStep-1's edit guidance with the 1.1 sampler)."""
        if version == "v1":
            return cls()
        if version == "v1.1":
            return cls(num_inference_steps=30, sampler="flow_sde", token_norm=False, noise_level=0.8)
        raise ConfigError(f"unknown checkpoint format {version!r} (known: 'v1', 'v1.1')")

    @classmethod
    def from_model_dir(cls, path: str | Path) -> SamplingConfig:
        """The defaults of the model in ``path``: its format's (read from ``config.json``), then its
        ``generation_config.json``."""
        from .official import schema_of  # the config.json schema tells NextStep-1 from 1.1

        model_config = Path(path) / "config.json"
        base = cls.for_format(schema_of(_read_json(model_config)) if model_config.is_file() else "v1")
        f = Path(path) / "generation_config.json"
        if not f.is_file():
            return base
        try:
            section = json.loads(f.read_text()).get("nextstep", {})
        except (json.JSONDecodeError, AttributeError) as e:
            raise ConfigError(f"{f} is not a valid generation config: {e}") from None
        if not isinstance(section, dict):
            raise ConfigError(f"{f}: the 'nextstep' section must be a JSON object, got {section!r}")
        known = {x.name for x in dataclasses.fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ConfigError(f"{f}: unknown keys in the 'nextstep' section: {unknown}")
        try:
            return dataclasses.replace(base, **section)
        except ConfigError as e:
            raise ConfigError(f"{f}: {e}") from None

    def save(self, path: str | Path) -> None:
        f = Path(path) / "generation_config.json"
        d = json.loads(f.read_text()) if f.is_file() else {}
        d["nextstep"] = dataclasses.asdict(self)
        with atomic_path(f) as tmp:
            tmp.write_text(json.dumps(d, indent=2) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


# ---- named presets ----------------------------------------------------------------------------------------------

def _large() -> NextStepConfig:
    return NextStepConfig(
        transformer=TransformerConfig(vocab_size=152064, hidden_size=5120, num_layers=48, num_heads=40,
                                      num_kv_heads=8, head_dim=128, intermediate_size=13824, rms_norm_eps=1e-5,
                                      rope_theta=1_000_000.0, max_position_embeddings=32768, qkv_bias=True,
                                      o_bias=False),
        head=FlowHeadConfig(width=1536, depth=12, batch_mul=4),
        latent_channels=16, patch_size=2, base_image_grid_size=32,
        boi_id=151667, eoi_id=151668, image_placeholder_id=151669, pad_id=151665, eos_id=151643,
    )


def _tiny() -> NextStepConfig:
    """A CPU-sized model with the fixture's tokenizer layout (vocab 1024, special ids 755-759)."""
    return NextStepConfig(
        transformer=TransformerConfig(vocab_size=1024, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                                      head_dim=32, intermediate_size=320),
        head=FlowHeadConfig(width=64, depth=2, batch_mul=4),
    )


PRESETS = {"nextstep-1-large": _large, "tiny": _tiny}


def preset(name: str) -> NextStepConfig:
    """A named configuration: ``nextstep-1-large`` (14B, official layout) or ``tiny`` (CPU)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def num_params_estimate(cfg: NextStepConfig) -> int:
    """Parameter count from the config alone (no allocation), used by benchmarks and docs."""
    t, h = cfg.transformer, cfg.head
    d, kv = t.hidden_size, t.num_kv_heads * t.head_dim
    attn = d * t.num_heads * t.head_dim * 2 + d * kv * 2
    if t.qkv_bias:
        attn += t.num_heads * t.head_dim + 2 * kv
    if t.o_bias:
        attn += d
    mlp = 3 * d * t.intermediate_size
    if t.mlp_bias:
        mlp += 2 * t.intermediate_size + d
    layer = attn + mlp + 2 * d
    emb = t.vocab_size * d * (1 if t.tie_word_embeddings else 2)
    inner = int(h.width * h.mlp_ratio)
    head = (h.frequency_dim * h.width + h.width + h.width * h.width + h.width + d * h.width + h.width
            + cfg.token_dim * h.width + h.width
            + h.depth * (2 * h.width + 2 * h.width * inner + inner + h.width + 3 * h.width * h.width + 3 * h.width)
            + 2 * h.width * h.width + 2 * h.width + h.width * cfg.token_dim + cfg.token_dim)
    proj = cfg.token_dim * d + d + d * d + d
    return t.num_layers * layer + emb + d + head + proj
