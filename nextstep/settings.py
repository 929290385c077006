"""The sampling settings of one generation call, each declared once: a field of :class:`Settings` with its spec (type,
bounds or choices, CLI flag, the server's request field, help). The CLI's flags, the server's request schema, its
request mapping and ``/health`` defaults and the RL rollout checks derive from ``SPECS``; :func:`check` is the one
validation. A new setting is a field here (with a default unless ``SamplingConfig`` gives each model its own) and the
code that reads it. The server applies stricter operational limits on top (``serve.limits``).
"""

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import SettingError
from .sampling.flow import DISTILLED, SAMPLERS, min_steps
from .sampling.guidance import SCHEDULES

MAX_GUIDANCE_SCALE = 100.0  # beyond this guidance only amplifies noise; a larger value is surely a typo
MAX_INFERENCE_STEPS = 1000
MAX_TIME_SHIFT = 100.0
MAX_PARALLEL = 64  # image tokens per backbone forward; a model decodes at most its config's parallel_tokens


@dataclass(frozen=True)
class Spec:
    """One setting: what values it takes and what it is called on each surface."""

    name: str  # the Settings field, and the pipeline's argument
    type: type  # int, float, str or bool
    help: str
    flag: str | None = None  # the CLI's flag (a bool gets --flag / --no-flag)
    api: str | None = None  # the server's request field; None: not in the API
    lo: float | None = None  # a number's bounds (both required for numbers)
    hi: float | None = None
    lo_open: bool = False  # lo itself excluded
    choices: tuple[str, ...] | None = None
    edit_only: bool = False  # read only when an input image is given

    def problem(self, v: Any) -> str | None:
        """What is wrong with ``v`` as this setting's value (None: nothing), as the rest of a sentence."""
        if self.choices is not None:
            return None if v in self.choices else f"must be one of {list(self.choices)}, got {v!r}"
        if self.type in (bool, str):
            kind = "true or false" if self.type is bool else "a string"
            return None if isinstance(v, self.type) else f"must be {kind}, got {v!r}"
        ok = isinstance(v, int) and not isinstance(v, bool) if self.type is int else _is_number(v)
        if ok and (v > self.lo or v == self.lo and not self.lo_open) and v <= self.hi:
            return None
        return f"must be {'an integer' if self.type is int else 'a number'} in {self.interval}, got {v!r}"

    @property
    def interval(self) -> str:
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"


def setting(help: str, *, default: Any = dataclasses.MISSING, **spec: Any):
    """A :class:`Settings` field with its spec (the :class:`Spec` fields besides name and type)."""
    return field(default=default, metadata={"spec": dict(help=help, **spec)})


@dataclass(frozen=True)
class Settings:
    """Every sampling setting of one generation call, resolved from the model's defaults and the caller's overrides
    (:meth:`SamplingConfig.resolve`) and validated here, in one place."""

    guidance_scale: float = setting("text guidance scale", flag="--cfg", api="guidance_scale",
                                    lo=0, hi=MAX_GUIDANCE_SCALE)
    image_guidance_scale: float = setting("image guidance scale", flag="--image-cfg", api="image_guidance_scale",
                                          lo=0, hi=MAX_GUIDANCE_SCALE, edit_only=True)
    guidance_schedule: str = setting("guidance schedule over the image tokens", flag="--schedule",
                                     choices=SCHEDULES)
    num_inference_steps: int = setting("flow steps per image token", flag="--steps", api="steps",
                                       lo=1, hi=MAX_INFERENCE_STEPS)
    time_shift: float = setting("time shift of the flow's time grid (> 1: more steps near the noise end)",
                                flag="--shift", api="time_shift", lo=0, lo_open=True, hi=MAX_TIME_SHIFT)
    sampler: str = setting(f"flow sampler ({DISTILLED!r}: the distilled few-step head, as fast mode)",
                           flag="--sampler", api="sampler", choices=(*sorted(SAMPLERS), DISTILLED))
    token_norm: bool = setting("re-normalise each sampled token", flag="--token-norm")
    noise_level: float = setting("noise level of the 1.1 samplers flow_sde and cps", flag="--noise-level",
                                 api="noise_level", lo=0, hi=1)
    negative_prompt: str = setting("negative prompt", flag="--negative", api="negative_prompt", default="")
    parallel: int = setting("image tokens per backbone forward (1: sequential; more needs a model trained for "
                            "parallel decoding, up to its parallel_tokens; fewer forwards, more head calls: faster "
                            "where the backbone dominates, e.g. fast mode)", flag="--parallel", api="parallel",
                            lo=1, hi=MAX_PARALLEL, default=1)

    def __post_init__(self) -> None:
        check({name: getattr(self, name) for name in SPEC})


SPECS: tuple[Spec, ...] = tuple(Spec(f.name, typing.get_type_hints(Settings)[f.name], **f.metadata["spec"])
                                for f in dataclasses.fields(Settings))
SPEC: dict[str, Spec] = {s.name: s for s in SPECS}


def check(values: Mapping[str, Any]) -> None:
    """Raise :class:`SettingError` for the first invalid value of ``values`` (setting name -> value): each against its
    spec, and the steps against the sampler's fewest when both are given."""
    for name, v in values.items():
        if (problem := SPEC[name].problem(v)) is not None:
            raise SettingError(name, problem)
    sampler, steps = values.get("sampler"), values.get("num_inference_steps")
    if sampler is not None and steps is not None and steps < min_steps(sampler):
        raise SettingError("num_inference_steps", f"must be >= {min_steps(sampler)} for the {sampler!r} sampler, "
                                                  f"got {steps}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
