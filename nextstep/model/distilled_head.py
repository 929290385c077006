"""A few-step flow head, distilled from a model's own head and guidance (``nextstep distill-head``).

The teacher samples a token by integrating its guided velocity over many steps, on two or three guidance branches.
The student reads the conditional branch only and predicts the *average* velocity over a whole step:

    u(x_t, t, d, c) ~ (x_{t+d} - x_t) / d     along the teacher's guided probability-flow path

so that 1, 2 or 4 Euler steps of size d land where the teacher's many small steps land. It is the teacher's
``VelocityNet`` (same shapes, initialised from it) with one more input: the step size d, embedded like the time and
added to the AdaLN conditioning (that embedding starts at zero, so the untrained student is the teacher's conditional
head). A distilled head is saved on its own (``head_config.json`` + ``head.safetensors``, a few MB) and names the
model it belongs to by a fingerprint of that model's config and the means of its norm weights; loading it onto
another model fails.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import assign_state_dict, iter_safetensors, read_json, require_dir, save_safetensors, write_json
from ..config import FlowHeadConfig, SamplingConfig
from ..errors import CheckpointError, ConfigError, MissingFileError, SettingError
from ..sampling.flow import DISTILLED
from ..settings import Settings
from .flow_head import FlowHead, TimeEmbedding, VelocityNet

CONFIG_FILE = "head_config.json"
WEIGHTS_FILE = "head.safetensors"
KIND = "nextstep-distilled-head"
# the settings a call with the distilled head may choose
FAST_MODE_CHOICES = ("num_inference_steps", "token_norm", "parallel")
BRANCHES = ("cond", "all")  # what a student reads: the conditional branch, or every branch its teacher guides with
OTHER_BRANCHES = ("uncond_text", "uncond_all")  # the branches besides "cond" ("all"), zeros where a call has none


@dataclass(frozen=True)
class DistilledHeadConfig:
    """What a distilled head is, what it belongs to and what it was distilled for (saved as ``head_config.json``).

    ``guidance_scale`` / ``time_shift``: the teacher's text-to-image settings; ``edit_*``: its editing settings
    (text and image guidance). The student reproduces the teacher at exactly these settings; other scales need
    another distillation. ``steps``: the default number of student steps; ``trained_steps``: the step counts it was
    trained for (others work, less well)."""

    token_dim: int
    cond_dim: int
    head: FlowHeadConfig
    base_model: str  # how the base model was named when distilling (a path or hub id), for people
    fingerprint: str  # model_fingerprint() of the base model, for the loader
    norm_means: tuple[float, ...]  # norm_means() of the base model, for the loader
    guidance_scale: float
    edit_guidance_scale: float
    edit_image_guidance_scale: float
    time_shift: float = 1.0
    edit_time_shift: float = 1.0
    negative_prompt: str = ""  # the teacher's unconditional text (its edit negative prompt)
    steps: int = 2
    trained_steps: tuple[int, ...] = (1, 2, 4)
    method: str = "trajectory"
    teacher: dict[str, Any] = field(default_factory=dict)  # the teacher's sampler and steps, for the record
    branches: str = "cond"  # "cond": the conditional branch only (one backbone row per image); "all": every branch

    def settings(self, defaults: SamplingConfig, edit: bool, **overrides: Any) -> Settings:
        """The settings of a call with this head: its steps (default: ``steps``), the teacher settings it was
        distilled for, the model's ``defaults`` for the rest; an override asking for other teacher settings, or for
        a setting the head does not read, is a SettingError naming it."""
        teacher = dict(guidance_scale=self.edit_guidance_scale if edit else self.guidance_scale,
                       image_guidance_scale=self.edit_image_guidance_scale if edit else 1.0,
                       time_shift=self.edit_time_shift if edit else self.time_shift, guidance_schedule="constant",
                       sampler=DISTILLED, negative_prompt=self.negative_prompt if edit else "")
        base = defaults.resolve(edit, token_norm=overrides.get("token_norm"), parallel=overrides.get("parallel"))
        held = {**dataclasses.asdict(base), **teacher}  # what a call with this head samples at (its steps aside)
        for name, asked in overrides.items():
            if name not in held:
                raise TypeError(f"unknown sampling setting {name!r}")
            if asked is None or name in FAST_MODE_CHOICES or asked == held[name]:
                continue
            if name in teacher:
                raise SettingError(name, f"is {held[name]!r} for the distilled head "
                                         f"({'editing' if edit else 'text-to-image'}): it reproduces its teacher "
                                         f"there and cannot sample at {asked!r}; leave it out, or sample without "
                                         f"fast mode")
            raise SettingError(name, "is not read by the distilled head (its steps are deterministic, its guidance "
                                     "learnt): leave it out in fast mode")
        steps = overrides.get("num_inference_steps") or self.steps
        return dataclasses.replace(base, num_inference_steps=steps, **teacher)

    @classmethod
    def read(cls, path: str | os.PathLike) -> DistilledHeadConfig:
        """The config of the distilled head in directory ``path`` (no weights read)."""
        d = require_dir(path, "distilled head")
        return cls.from_dict(read_json(d / CONFIG_FILE, "distilled head config"), str(d / CONFIG_FILE))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["trained_steps"] = list(self.trained_steps)
        d["norm_means"] = list(self.norm_means)
        return {"kind": KIND, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> DistilledHeadConfig:
        d = dict(d)
        if d.pop("kind", None) != KIND:
            raise CheckpointError(f"{source} is not a distilled head config (no \"kind\": \"{KIND}\")")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CheckpointError(f"{source}: unknown keys {unknown}")
        try:
            d["head"] = FlowHeadConfig(**d["head"])
            d["trained_steps"] = tuple(d.get("trained_steps", (1, 2, 4)))
            d["norm_means"] = tuple(d["norm_means"])
            return cls(**d)
        except (TypeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{source} is not a valid distilled head config: {e}") from None


def split_branches(rows: torch.Tensor, branches: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked guidance rows (copies * N, D), branch by branch in ``branches`` order -> the conditional rows (N, D)
    and the other branches' (N, 2, D) in ``OTHER_BRANCHES`` order, zeros for a branch ``branches`` has not: what a
    head of ``branches`` "all" reads (:meth:`DistilledHead.condition`), in distillation and in sampling alike."""
    blocks = dict(zip(branches, rows.chunk(len(branches))))
    cond = blocks["cond"]
    return cond, torch.stack([blocks.get(b, torch.zeros_like(cond)) for b in OTHER_BRANCHES], 1)


NORM_TOLERANCE = 1e-3  # how far a model's norm means may be from the recorded ones (dtype rounding, not training)


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of a base model's architecture (its config): what a head's shapes and conditions depend on.
    ``parallel_tokens`` and ``reread_width`` are left out: a model fine-tuned for parallel decoding with its base
    frozen (the recipe's ``trainable``, ``nextstep train-reread``) keeps its base's heads and adapters, and its norm
    means tell a changed base apart."""
    config = dataclasses.asdict(model.config)
    config.pop("parallel_tokens", None)
    config.pop("reread_width", None)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def base_mismatch(fingerprint: str, means: list[float] | tuple[float, ...], model: nn.Module) -> str | None:
    """Why ``model`` is not the base recorded as (``fingerprint``, ``means``) (:func:`model_fingerprint`,
    :func:`norm_means`): its architecture or its trained weights; None when it is."""
    mine, now = model_fingerprint(model), norm_means(model)
    if fingerprint != mine:
        return f"architecture fingerprint {fingerprint}, this model's is {mine}"
    if len(now) != len(means):
        return f"{len(means)} normalisation layers, this model has {len(now)}"
    gap = max((abs(a - b) for a, b in zip(now, means)), default=0.0)
    return None if gap <= NORM_TOLERANCE else f"its normalisation weights differ from this model's by up to {gap:.3g}"


def norm_means(model: nn.Module) -> list[float]:
    """The mean of every normalisation scale (each RMSNorm / LayerNorm weight of the backbone and the head, in name
    order): which trained weights a model holds. Norms are never quantized, and a mean moves by about 1e-4 when the
    same checkpoint is loaded in float32, bfloat16 or float16 (a hash of the values would not survive the rounding),
    while two trainings differ by far more."""
    return [float(t.detach().to("cpu", torch.float64).mean()) for name, t in sorted(model.named_parameters())
            if name.endswith(("norm.weight", "_ln.weight"))]  # parameters: a state_dict would unpack int8 weights


class DistilledHead(nn.Module):
    """u(x, t, d, c): (N, token_dim), (N,), (N,), (N, cond_dim) -> (N, token_dim) average velocity over [t, t + d]."""

    def __init__(self, config: DistilledHeadConfig):
        super().__init__()
        self.config = config
        self.net = VelocityNet(config.token_dim, config.cond_dim, config.head)
        self.step_embed = TimeEmbedding(config.head.width, config.head.frequency_dim)
        if config.branches not in BRANCHES:
            raise ConfigError(f"branches must be one of {BRANCHES}, got {config.branches!r}")
        # "all": the other branches' conditions (uncond_text, uncond_all; zeros where absent), added to the AdaLN input
        self.other_embed = (nn.Linear(len(OTHER_BRANCHES) * config.cond_dim, config.head.width, bias=False)
                            if config.branches == "all" else None)

    @classmethod
    def from_teacher(cls, teacher: FlowHead, config: DistilledHeadConfig,
                     generator: torch.Generator | None = None) -> DistilledHead:
        """A student equal to the teacher's conditional velocity: its weights, and a step embedding that adds 0
        (its first layer drawn from ``generator``). A student deeper than the teacher (``config.head.depth``) gets
        the teacher's blocks first, then blocks whose zero gates make them identities until trained."""
        student = cls(config).to(next(teacher.parameters()).device)
        student.net.init_weights(generator)  # blocks beyond the teacher's depth start as identities (zero gates)
        missing, unexpected = student.net.load_state_dict(teacher.net.state_dict(), strict=False)
        if unexpected or any(not k.startswith("res_blocks.") for k in missing):
            raise ConfigError(f"the student's head {config.head} does not extend the teacher's: missing {missing}, "
                             f"unexpected {unexpected}")
        nn.init.normal_(student.step_embed.mlp[0].weight, std=0.02, generator=generator)
        nn.init.zeros_(student.step_embed.mlp[0].bias)
        nn.init.zeros_(student.step_embed.mlp[2].weight)
        nn.init.zeros_(student.step_embed.mlp[2].bias)
        if student.other_embed is not None:
            nn.init.zeros_(student.other_embed.weight)
        return student

    def forward(self, x: torch.Tensor, t: torch.Tensor, d: torch.Tensor, c: torch.Tensor,
                other: torch.Tensor | None = None) -> torch.Tensor:
        net = self.net
        return net.velocity(x, net.time_embed(t) + self.step_embed(d) + self.condition(c, other))

    def condition(self, c: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        """The AdaLN input's condition part: ``c`` (N, D) the conditional branch's condition, ``other`` (N, 2, D)
        the other branches' (``OTHER_BRANCHES``, zeros where absent; read by a student of ``branches`` "all")."""
        y = self.net.cond_embed(c)
        if self.other_embed is not None:
            if other is None:
                raise ValueError("this distilled head reads every guidance branch: pass the other branches' conditions")
            y = y + self.other_embed(other.flatten(-2))
        return y

    # ---- files ---------------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_safetensors(state, out / WEIGHTS_FILE, metadata={"kind": KIND})
        write_json(self.config.to_dict(), out / CONFIG_FILE)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, model: nn.Module | None = None, *,
                        dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> DistilledHead:
        """Load a distilled head; with ``model`` given, check that it belongs to that model (shapes, fingerprint)
        and raise :class:`CheckpointError` naming the mismatch."""
        d = require_dir(path, "distilled head")
        config = DistilledHeadConfig.read(d)
        if model is not None:
            check_belongs(config, model, str(d))
        with torch.device("meta"):
            head = cls(config)
        weights = d / WEIGHTS_FILE
        if not weights.is_file():
            raise MissingFileError(f"distilled head weights not found: {weights}")
        assign_state_dict(head, iter_safetensors([weights]), source=str(weights), dtype=dtype, device=device)
        return head.eval()


def check_belongs(config: DistilledHeadConfig, model: nn.Module, source: str) -> None:
    """CheckpointError unless the head at ``source`` fits ``model``: token and condition sizes, then the base
    model's architecture and trained weights (fingerprint and norm means)."""
    mc = model.config
    problems = []
    if config.token_dim != mc.token_dim:
        problems.append(f"token size {config.token_dim} vs the model's {mc.token_dim}")
    if config.cond_dim != mc.transformer.hidden_size:
        problems.append(f"condition size {config.cond_dim} vs the model's hidden size {mc.transformer.hidden_size}")
    if problems:
        raise CheckpointError(f"distilled head {source} does not fit this model: " + "; ".join(problems))
    why = base_mismatch(config.fingerprint, config.norm_means, model)
    if why is not None:
        raise CheckpointError(f"distilled head {source} belongs to another model: it was distilled from "
                              f"{config.base_model!r} ({why}). Distill a head for this model with "
                              f"`nextstep distill-head`.")
