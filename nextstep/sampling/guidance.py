"""Classifier-free guidance, defined once: which branches are batched, in what order, and how they combine.

Branch rows are stacked along the batch: ``[cond; uncond_text; uncond_all]`` (each block n rows).
    cond        the prompt (with the input image when editing)
    uncond_text the input image with the negative prompt (only with image guidance)
    uncond_all  the negative prompt alone
Combination (the reference's formulas):
    text only:  v = u + s_t (c - u)                         rows [cond; uncond_all] (no input image)
                                                            rows [cond; uncond_text] (editing)
    with image: v = u2 + s_i (u1 - u2) + s_t (c - u1)       rows [cond; uncond_text; uncond_all]
Every combination of scales >= 0 is valid, including image guidance without text guidance and scales < 1.
When editing with text guidance only, the unconditional branch keeps the input image (the reference drops it):
that is the three-branch formula at s_i = 1, so the result is continuous in the image scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .flow import DISTILLED

if TYPE_CHECKING:
    from ..settings import Settings

SCHEDULES = ("constant", "linear", "rising")


def image_blocks(branches: tuple[str, ...]) -> int:
    """How many of the leading row blocks of ``branches`` carry the input image of an edit (cond, uncond_text)."""
    return sum(b != "uncond_all" for b in branches)


@dataclass(frozen=True)
class Guidance:
    text_scale: float = 1.0
    image_scale: float = 1.0
    has_image: bool = False
    schedule: str = "constant"

    def __post_init__(self) -> None:
        for name in ("text_scale", "image_scale"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v != v or v < 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"guidance schedule must be one of {SCHEDULES}, got {self.schedule!r}")

    @classmethod
    def from_settings(cls, settings: Settings, edit: bool, head_branches: str = "cond") -> Guidance:
        """The guidance of a call with these settings (``edit``: an input image is given). A distilled head learnt its
        teacher's guidance: it reads the conditional branch alone (``head_branches`` "cond"), or every branch its
        teacher guided with ("all"; the settings hold the teacher's scales) without combining them itself."""
        if settings.sampler == DISTILLED and head_branches == "cond":
            return cls(has_image=edit)
        return cls(settings.guidance_scale, settings.image_guidance_scale, has_image=edit,
                   schedule=settings.guidance_schedule)

    @property
    def use_image(self) -> bool:
        return self.has_image and self.image_scale != 1.0

    @property
    def branches(self) -> tuple[str, ...]:
        """Names of the stacked row blocks, in order."""
        if self.use_image:
            return ("cond", "uncond_text", "uncond_all")
        if self.text_scale != 1.0:
            return ("cond", "uncond_text") if self.has_image else ("cond", "uncond_all")
        return ("cond",)

    def scales_at(self, k: int, total: int) -> tuple[float, float]:
        """(text, image) scales for image token k of ``total``.
            "constant"  s_k = s
            "linear"    decays from s to 1 (NextStep-1, after Muse): s_k = 1 + (s - 1) (total - k) / total
            "rising"    NextStep-1.1's "linear": s_k = max(s / 2, 1 + (s - 1) k / total), rising to s"""
        s_t, s_i = self.text_scale, self.image_scale
        if self.schedule == "constant":
            return s_t, s_i
        if self.schedule == "rising":
            return max(s_t / 2, 1 + (s_t - 1) * k / total), max(s_i / 2, 1 + (s_i - 1) * k / total)
        frac = (total - k) / total
        return 1 + (s_t - 1) * frac, 1 + (s_i - 1) * frac

    def combine(self, v: torch.Tensor, text: float, image: float) -> torch.Tensor:
        """(len(branches) * n, D) stacked velocities -> (n, D) guided velocity."""
        parts = v.chunk(len(self.branches), dim=0)
        if len(parts) == 1:
            return parts[0]
        if len(parts) == 2:
            c, u = parts
            return u + text * (c - u)
        c, u1, u2 = parts
        return u2 + image * (u1 - u2) + text * (c - u1)
