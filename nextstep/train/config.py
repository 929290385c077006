"""Training recipes as typed dataclasses, read from and written to JSON (``configs/*.json``).

Every field is checked in ``__post_init__``; an unknown key in a recipe file is an error that names it.
The resolved recipe is saved as ``OUT/config.json`` and in every checkpoint's ``trainer.json``, which ``--resume``
compares with the recipe in force: only the fields in ``MAY_CHANGE_ON_RESUME`` may differ.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..config import NextStepConfig, VAEConfig, _check, preset, valid_parallel
from ..errors import ConfigError, MissingFileError
from ..model.distilled_head import BRANCHES
from ..settings import MAX_PARALLEL

KINDS = ("t2i", "edit", "text")
# Fields that leave the trained weights as an uninterrupted run would have them (bookkeeping, and wrappers that do not
# change the math), plus the run's length: extending a run is what resuming is for (the cosine schedule then ends at
# the new run.steps). Everything else (model, data, seed, batch, precision, parallelism, EMA, optimiser, losses) is
# the run's identity: changing it on resume would silently train a different run.
RUN_MAY_CHANGE = ("run.out_dir", "run.steps", "run.log_every", "run.sample_every", "run.ckpt_every",
                  "run.keep_checkpoints", "run.export_every", "run.compile", "run.activation_checkpointing")


@dataclass
class DataConfig:
    """Where samples come from and how they become training sequences.

    ``source``: "folder" (``path`` = a directory with ``captions.jsonl``), "shards" (``path`` = a directory or glob
    of WebDataset-style ``.tar`` files) or "shapes" (the procedural shapes world, ``num_samples`` of them).
    The AR trainer encodes every image to latents once and trains from the cache (``OUT/latents-*.safetensors``).
    """

    source: str = "shapes"
    path: str | None = None
    num_samples: int = 10000
    image_size: int = 64
    buckets: list[list[int]] | None = None  # [[height, width], ...]; default: one square bucket of image_size
    mix: dict[str, float] = field(default_factory=lambda: {"t2i": 0.8, "edit": 0.2, "text": 0.0})
    caption_dropout: float = 0.1
    image_dropout: float = 0.1  # edits: drop the source image too (for image guidance)
    seed: int = 0
    backgrounds: float = 0.0  # shapes only: fraction of t2i samples on a black/gray background named in the caption
    weights: dict[str, float] = field(default_factory=dict)  # shapes only: {category or edit type: weight}, else 1

    def __post_init__(self) -> None:
        _check(self.source in ("folder", "shards", "shapes"),
               f"data.source must be 'folder', 'shards' or 'shapes', got {self.source!r}")
        _check(self.source == "shapes" or bool(self.path), f"data.path is required for source {self.source!r}")
        _check(self.num_samples > 0, f"data.num_samples must be > 0, got {self.num_samples}")
        _check(self.image_size > 0 and self.image_size % 16 == 0,
               f"data.image_size must be a positive multiple of 16, got {self.image_size}")
        for b in self.bucket_sizes:
            _check(len(b) == 2 and all(v > 0 and v % 16 == 0 for v in b),
                   f"data.buckets must be [height, width] pairs of multiples of 16, got {b}")
        _check(set(self.mix) <= set(KINDS), f"data.mix keys must be among {KINDS}, got {sorted(self.mix)}")
        _check(all(v >= 0 for v in self.mix.values()) and sum(self.mix.values()) > 0,
               f"data.mix weights must be >= 0 and not all zero, got {self.mix}")
        for name in ("caption_dropout", "image_dropout"):
            v = getattr(self, name)
            _check(0 <= v < 1, f"data.{name} must be in [0, 1), got {v}")
        _check(not isinstance(self.backgrounds, bool) and isinstance(self.backgrounds, (int, float))
               and 0 <= self.backgrounds <= 1, f"data.backgrounds must be a number in [0, 1], got {self.backgrounds!r}")
        self.backgrounds = float(self.backgrounds)  # 1 and 1.0 give the same latent cache
        _check(self.backgrounds == 0 or self.source == "shapes",
               f"data.backgrounds only applies to the shapes source, not {self.source!r}")
        _check(isinstance(self.weights, dict), f"data.weights must be an object, got {self.weights!r}")
        _check(not self.weights or self.source == "shapes",
               f"data.weights only applies to the shapes source, not {self.source!r}")
        from ..data.shapes import data_weights

        try:  # checked, and canonical: weights that give the same samples give the same latent cache
            self.weights = data_weights(self.weights)
        except ValueError as e:
            raise ConfigError(f"data.{e}") from None

    @property
    def bucket_sizes(self) -> list[tuple[int, int]]:
        return [tuple(b) for b in self.buckets] if self.buckets else [(self.image_size, self.image_size)]


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"optim.betas invalid: {self.betas}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")


@dataclass
class RunConfig:
    """What every training run shares: length, batch, precision, parallelism, logging and checkpoints."""

    out_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 32  # global batch (all ranks together)
    seed: int = 0
    precision: str = "fp32"  # "fp32", "bf16" (autocast), or "auto": bf16 where the device has it natively
    parallel: str = "ddp"  # "ddp" or "fsdp" (used when launched with torchrun on more than one process)
    activation_checkpointing: bool = False
    compile: bool = False
    ema_decay: float = 0.0  # 0 = no EMA
    log_every: int = 10
    sample_every: int = 0  # 0 = never
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    export_every: int = 0  # 0 = only at the end; else also OUT/exports/step_N (loadable model dirs)

    def __post_init__(self) -> None:
        _check(self.steps > 0, f"steps must be > 0, got {self.steps}")
        _check(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
        _check(self.precision in ("fp32", "bf16", "auto"),
               f"precision must be 'fp32', 'bf16' or 'auto', got {self.precision!r}")
        _check(self.parallel in ("ddp", "fsdp"), f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        _check(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("log_every", "sample_every", "ckpt_every", "export_every"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")


@dataclass
class LoraTrainConfig:
    """A recipe's ``lora`` section: train low-rank adapters (PEFT) on the frozen ``init_from`` model instead of the
    model itself. ``targets``: groups of linear layers (``nextstep.lora.TARGETS``): "attn" (q/k/v/o), "mlp"
    (gate/up/down), "head" (the flow head's linears), "projectors" (image in/out). The run's checkpoints hold the
    adapters and their optimizer only; ``OUT/final`` is the adapter directory, and ``export_merged`` also writes the
    base with the adapter merged in (float) to ``OUT/final-merged``. ``replay_targets``: the flow target of samples
    marked ``"replay": true`` (data replayed so that the adapter keeps what the base could do): "data" (their images,
    like any sample's) or "base" (the base model's own velocity at the same point: self-distillation, which holds the
    adapted model where the base was on them; one more forward of the base per step). ``replay_weight``: the flow
    loss weight of those samples' images (the others weigh 1)."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0  # drawn from the global RNG: with dropout, 2 processes do not give 1's result exactly
    targets: list[str] = field(default_factory=lambda: ["attn", "mlp"])
    export_merged: bool = False
    replay_targets: str = "data"
    replay_weight: float = 1.0

    def __post_init__(self) -> None:
        from ..lora import TARGETS

        _check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1,
               f"lora.rank must be an integer >= 1, got {self.rank!r}")
        _check(isinstance(self.alpha, (int, float)) and self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha!r}")
        _check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1,
               f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        _check(isinstance(self.targets, list) and bool(self.targets) and all(t in TARGETS for t in self.targets),
               f"lora.targets must be a non-empty list among {list(TARGETS)}, got {self.targets!r}")
        _check(self.replay_targets in ("data", "base"),
               f"lora.replay_targets must be 'data' or 'base', got {self.replay_targets!r}")
        _check(isinstance(self.replay_weight, (int, float)) and not isinstance(self.replay_weight, bool)
               and self.replay_weight > 0, f"lora.replay_weight must be > 0, got {self.replay_weight!r}")


@dataclass
class TrainConfig:
    """``nextstep train``: the autoregressive model on mixed text-to-image / edit / text batches."""

    MAY_CHANGE_ON_RESUME: ClassVar[tuple[str, ...]] = (*RUN_MAY_CHANGE, "sample_prompts")
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    model: str | dict[str, Any] = "tiny"  # a preset name or a NextStepConfig dict
    init_from: str | None = None  # a model directory (official or ours) to fine-tune from
    vae: str = ""  # the VAE directory (required)
    tokenizer: str = ""  # directory with tokenizer.json (default: init_from)
    # None keeps the model config's value (the preset's, or init_from's checkpoint's); a number overrides it
    lm_loss_weight: float | None = None
    im_loss_weight: float | None = None
    batch_mul: int | None = None
    context_noise: float | None = None  # NextStepConfig.context_noise
    # NextStepConfig.parallel_tokens: K > 1 trains the model to decode K image tokens per backbone forward (with
    # init_from, a K = 1 model gains the zero-initialised parameters for it)
    parallel_tokens: int | None = None
    # train only these parameters (names or module prefixes, e.g. ["image_ahead"]); the rest stays frozen
    trainable: list[str] | None = None
    sample_prompts: list[str] = field(default_factory=lambda: ["a red circle", "a blue square above a green triangle"])
    lora: LoraTrainConfig | None = None  # train adapters on the frozen init_from model (see LoraTrainConfig)
    quantize: str | None = None  # with lora: the frozen base in "int8" or "fp8" weights (QLoRA-style)

    def __post_init__(self) -> None:
        _coerce(self, "run", RunConfig)
        _coerce(self, "data", DataConfig)
        _coerce(self, "optim", OptimConfig)
        _coerce(self, "lora", LoraTrainConfig)
        if self.lora is not None:
            _check(bool(self.init_from), "lora: adapters are trained on a base model: set init_from")
            _check(self.context_noise is None, "lora: context_noise is the base model's (an adapter samples with "
                                               "its base's config): leave it out")
        _check(self.quantize in (None, "int8", "fp8"), f"quantize must be 'int8' or 'fp8', got {self.quantize!r}")
        _check(self.quantize is None or self.lora is not None,
               "quantize: only a frozen base can be quantized: add a lora section (or train in float)")
        _check(bool(self.vae), "vae: the VAE directory is required (train one with `nextstep train-vae`)")
        _check(bool(self.tokenizer or self.init_from), "tokenizer: a directory with tokenizer.json is required")
        for name in ("lm_loss_weight", "im_loss_weight"):
            v = getattr(self, name)
            _check(v is None or v >= 0, f"{name} must be >= 0")
        _check(self.batch_mul is None or self.batch_mul >= 1, "batch_mul must be >= 1")
        _check(self.context_noise is None or self.context_noise >= 0, "context_noise must be >= 0")
        _check(self.parallel_tokens is None or valid_parallel(self.parallel_tokens),
               f"parallel_tokens must be an integer in [1, {MAX_PARALLEL}], got {self.parallel_tokens!r}")
        _check(self.trainable is None or (isinstance(self.trainable, list) and self.trainable
                                          and all(isinstance(t, str) and t for t in self.trainable)),
               f"trainable must be a non-empty list of parameter names or prefixes, got {self.trainable!r}")
        _check(self.trainable is None or self.lora is None, "lora trains its adapters only: leave trainable out")
        _check(self.parallel_tokens is None or self.lora is None,
               "lora: parallel_tokens adds parameters to the base model: train it without lora")
        if self.init_from is None:
            self.model_config()  # validate early

    def model_config(self) -> NextStepConfig:
        """The config of a model trained from scratch: ``model`` (a preset or a dict) with the recipe's overrides."""
        cfg = preset(self.model) if isinstance(self.model, str) else NextStepConfig.from_dict(dict(self.model))
        if self.parallel_tokens is not None:
            cfg.parallel_tokens = self.parallel_tokens
        return self.apply_overrides(cfg)

    def apply_overrides(self, cfg: NextStepConfig) -> NextStepConfig:
        """Set the fields the recipe gives explicitly on ``cfg`` (in place); a None leaves ``cfg``'s own value, so
        a model loaded with ``init_from`` keeps its checkpoint's loss weights, head batch and context noise."""
        for name in ("lm_loss_weight", "im_loss_weight", "context_noise"):
            if getattr(self, name) is not None:
                setattr(cfg, name, getattr(self, name))
        if self.batch_mul is not None:
            cfg.head.batch_mul = self.batch_mul
        return cfg


@dataclass
class VAETrainConfig:
    """``nextstep train-vae``: the image tokenizer with the paper's robustness recipe."""

    MAY_CHANGE_ON_RESUME: ClassVar[tuple[str, ...]] = RUN_MAY_CHANGE
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, weight_decay=0.0, warmup_steps=50))
    vae: dict[str, Any] = field(default_factory=dict)  # VAEConfig fields (defaults: ch 32, f8, 16 channels)
    init_from: str | None = None
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    kl_weight: float = 1e-6  # only for a non-deterministic posterior
    noise_gamma: float = 0.3  # latent noise perturbation: + U(0, gamma) * N(0, 1)
    perceptual_weight: float = 0.0
    perceptual_weights: str | None = None  # VGG16 ``features`` state dict supplied by the user
    disc_weight: float = 0.0
    disc_start: int = 0  # step from which the patch discriminator is trained and used
    holdout: int = 64  # held-out images for PSNR / SSIM
    train_encoder: bool = True  # False: fine-tune the decoder only (latents, and models trained on them, stay valid)

    def __post_init__(self) -> None:
        _coerce(self, "run", RunConfig)
        _coerce(self, "data", DataConfig)
        _coerce(self, "optim", OptimConfig)
        self.vae_config()  # validate
        for name in ("l1_weight", "mse_weight", "kl_weight", "noise_gamma", "perceptual_weight", "disc_weight"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _check(self.perceptual_weight == 0 or bool(self.perceptual_weights),
               "perceptual_weight > 0 needs perceptual_weights: a VGG16 features state dict (never downloaded)")
        _check(self.disc_start >= 0 and self.holdout >= 0, "disc_start and holdout must be >= 0")
        _check(self.train_encoder or self.init_from is not None,
               "train_encoder: false fine-tunes the decoder of an existing VAE: set init_from")
        for name in ("sample_every", "compile", "activation_checkpointing"):
            _check(not getattr(self.run, name), f"run.{name} is not supported by train-vae")

    def vae_config(self) -> VAEConfig:
        return VAEConfig(**self.vae)


DISTILL_METHODS = ("trajectory", "shortcut")


@dataclass
class DistillConfig:
    """``nextstep distill-head``: a few-step flow head, guidance included, distilled from a model's own head.

    The backbone, the teacher head and the VAE stay frozen. Training conditions come from ``data`` (its images
    teacher-forced through the backbone) and, for a fraction ``policy_fraction`` of its prompts, from the model's own
    samples of them instead (``policy_steps`` steps of its default sampler): the states the student meets when
    sampling. For every condition the teacher integrates its guided velocity (the model's sampling defaults, or
    ``guidance_scale`` & co. given here) over ``teacher_steps`` Euler steps of the probability-flow ODE; the student
    learns the jumps of that path for each of ``trained_steps`` (``method``: "trajectory" regresses them directly,
    "shortcut" only the finest and builds each coarser jump from two of its own finer ones)."""

    MAY_CHANGE_ON_RESUME: ClassVar[tuple[str, ...]] = RUN_MAY_CHANGE
    run: RunConfig = field(default_factory=lambda: RunConfig(steps=2000, batch_size=512, ckpt_every=200))
    data: DataConfig = field(default_factory=lambda: DataConfig(num_samples=1000, mix={"t2i": 0.7, "edit": 0.3}))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.0, warmup_steps=50))
    model: str | None = None  # the base model directory (default: the bundled model)
    vae: str | None = None  # default: the model's vae/
    method: str = "trajectory"
    teacher_steps: int = 32  # Euler steps of the teacher's guided ODE (a power of 2, a multiple of every trained step)
    trained_steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    steps: int = 2  # the head's default number of steps
    student_depth: int | None = None  # residual blocks of the student (default: the teacher's; more start as identity)
    policy_fraction: float = 0.5
    policy_steps: int = 10
    holdout: int = 1024  # tokens kept out of training, to measure the student against the teacher
    tokens_per_image: int | None = None  # keep this many random tokens of each image (default: all)
    # the student reads every guidance branch its teacher guides with ("all": the unconditional state guidance depends
    # on; the bundled head, about half the distance to the teacher) or the conditional branch alone ("cond": one
    # backbone row per image in fast mode)
    branches: str = "all"
    # the teacher's settings; None: the base model's sampling defaults
    guidance_scale: float | None = None
    edit_guidance_scale: float | None = None
    edit_image_guidance_scale: float | None = None
    time_shift: float | None = None
    edit_time_shift: float | None = None

    def __post_init__(self) -> None:
        _coerce(self, "run", RunConfig)
        _coerce(self, "data", DataConfig)
        _coerce(self, "optim", OptimConfig)
        _check(self.method in DISTILL_METHODS, f"method must be one of {DISTILL_METHODS}, got {self.method!r}")
        _check(self.branches in BRANCHES, f"branches must be one of {list(BRANCHES)}, got {self.branches!r}")
        k = self.teacher_steps
        _check(isinstance(k, int) and k >= 1 and k & (k - 1) == 0,
               f"teacher_steps must be a power of 2, got {k!r}")
        self.trained_steps = sorted(set(self.trained_steps))
        _check(bool(self.trained_steps) and all(isinstance(s, int) and s >= 1 and k % s == 0 and s & (s - 1) == 0
                                                for s in self.trained_steps),
               f"trained_steps must be powers of 2 dividing teacher_steps {k}, got {self.trained_steps}")
        _check(self.steps in self.trained_steps,
               f"steps {self.steps} must be one of trained_steps {self.trained_steps}")
        _check(0 <= self.policy_fraction <= 1, f"policy_fraction must be in [0, 1], got {self.policy_fraction}")
        _check(self.policy_steps >= 2, f"policy_steps must be >= 2, got {self.policy_steps}")
        _check(self.holdout >= 0, f"holdout must be >= 0, got {self.holdout}")
        _check(self.student_depth is None or self.student_depth >= 1, "student_depth must be >= 1")
        _check(self.tokens_per_image is None or self.tokens_per_image >= 1, "tokens_per_image must be >= 1")
        _check(self.data.mix.get("text", 0) == 0, "data.mix: text-only samples have no image to distill on")
        for name in ("ema_decay", "compile", "activation_checkpointing", "sample_every", "export_every"):
            _check(not getattr(self.run, name), f"run.{name} is not supported by distill-head (the student is small "
                                                f"and exported once, to OUT/final)")


@dataclass
class RereadConfig:
    """``nextstep train-reread``: parallel decoding's correction of the state after a draft (``NextStep.reread``),
    learnt from the model's own parallel decodes. The model stays frozen; a correction it has is replaced.

    Targets: the prompts of ``data`` (captions; edits with their instructions and source images) decoded with
    ``parallel`` = the model's ``parallel_tokens`` at its sampling defaults, a fraction ``fast_fraction`` of them in
    fast mode (the model's distilled head; 0 for a model without one). Wherever the decoder corrects a state it
    records that state, the state before the draft, the draft and the token drawn for it, and the state after the
    token itself (one more forward, ``NextStepPipeline.recording_rereads``). The correction, an MLP of ``width``
    (default twice the hidden size), learns to move the one to the other: the squared distance, summed over the
    state's values, averaged over the rows."""

    MAY_CHANGE_ON_RESUME: ClassVar[tuple[str, ...]] = RUN_MAY_CHANGE
    run: RunConfig = field(default_factory=lambda: RunConfig(steps=3000, batch_size=512, ckpt_every=500))
    data: DataConfig = field(default_factory=lambda: DataConfig(num_samples=2000, mix={"t2i": 0.7, "edit": 0.3}))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0, warmup_steps=100,
                                                                   min_lr_ratio=0.05, grad_clip=0.0))
    model: str | None = None  # the model directory (default: the bundled model); trained for parallel decoding
    vae: str | None = None  # default: the model's vae/
    width: int | None = None  # the correction's hidden width (default: 2 x the model's hidden size)
    fast_fraction: float = 0.5  # prompts decoded in fast mode (needs the model's distilled head)
    prompts_per_call: int = 16
    holdout: int = 64  # prompts kept out of training: their rows measure the correction

    def __post_init__(self) -> None:
        _coerce(self, "run", RunConfig)
        _coerce(self, "data", DataConfig)
        _coerce(self, "optim", OptimConfig)
        _check(self.width is None or isinstance(self.width, int) and self.width >= 1,
               f"width must be a positive integer, got {self.width!r}")
        _check(0 <= self.fast_fraction <= 1, f"fast_fraction must be in [0, 1], got {self.fast_fraction}")
        _check(isinstance(self.prompts_per_call, int) and self.prompts_per_call >= 1,
               f"prompts_per_call must be a positive integer, got {self.prompts_per_call!r}")
        _check(self.holdout >= 0, f"holdout must be >= 0, got {self.holdout}")


def _coerce(obj: Any, name: str, cls: type) -> None:
    v = getattr(obj, name)
    if isinstance(v, dict):
        setattr(obj, name, from_dict(cls, v, prefix=f"{name}."))


def from_dict(cls: type, d: dict[str, Any], prefix: str = ""):
    """Build dataclass ``cls`` from ``d``; unknown keys are an error naming them."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix or cls.__name__} must be a JSON object, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown keys in {prefix or cls.__name__}: {[prefix + k for k in unknown]}")
    return cls(**d)


def load_recipe(path: str | Path, cls: type):
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"training config not found: {path}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    return from_dict(cls, d)


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
