"""Rollouts: a group of images per prompt, sampled by the pipeline itself, with every head step recorded.

The pipeline samples as it always does (prefill, per-token decoding step, guidance rows, the "flow_sde" / "cps"
sampler); its ``observe`` hook hands over each token's head trajectory and the token as fed back to the backbone.
Each step i of a token is the Gaussian transition x_{i+1} ~ N(mean_i, std_i^2 I) with
``mean_i, std_i = flow.transition(sampler, x_i, v_i, ts, i, noise_level)`` and v_i the guided velocity at x_i: the
same function on the same inputs as the sampler, so the recorded means are the ones it drew around.

Images are prompt-major: image b belongs to prompt ``b // group`` (the pipeline's ``num_images_per_prompt`` layout).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image

from ..errors import InputError, SettingError
from ..images import fit_image, load_image
from ..sampling.flow import NEXTSTEP_11_SAMPLERS, min_steps, times, transition
from ..sampling.guidance import Guidance
from ..settings import Settings
from .policy import gaussian_log_prob


@dataclass(frozen=True)
class Prompt:
    """One rollout prompt: the text (an edit instruction when ``source`` is given), the input image of an edit, and
    what a built-in reward checks the image against (a shapes spec, ``nextstep.data.shapes``)."""

    text: str
    source: Image.Image | None = None
    spec: Mapping[str, Any] | None = None


@dataclass
class Rollout:
    """B = len(prompts) * group sampled images with their recorded head trajectories.

    T image tokens of ``grid``, S head steps per token, D = token_dim; tensors on the model's device, float32."""

    prompts: list[Prompt]
    group: int  # images per prompt
    settings: Settings  # the resolved sampling settings (sampler, steps, shift, guidance, noise level, ...)
    grid: tuple[int, int]
    ids: list[list[list[int]]]  # per image, the token ids of each guidance branch's prefill row (branch order)
    pad_id: int
    sources: torch.Tensor | None  # (B, C, h, w) input-image latents of edits (scaled as the backbone reads them)
    states: torch.Tensor  # (B, T, S + 1, D) x_0 (the start noise) .. x_S (before the token norm) of every token
    fed: torch.Tensor  # (B, T - 1, D) tokens as fed back to the backbone (context noise included)
    mean: torch.Tensor  # (B, T, S, D) mean of each step's transition
    std: torch.Tensor  # (S,) its standard deviation (0 for a deterministic step, e.g. the last "cps" step)
    log_prob: torch.Tensor  # (B, T, S) log-density of each step's sample under the sampling policy (0 where std 0)
    images: list[Image.Image]

    @property
    def edit(self) -> bool:
        return self.sources is not None

    @property
    def guidance(self) -> Guidance:
        """The guidance the images were sampled under."""
        return Guidance.from_settings(self.settings, self.edit)

    @property
    def times(self) -> torch.Tensor:
        """(S + 1,) the sampler's time grid, on the rollout's device."""
        s = self.settings
        return times(s.sampler, s.num_inference_steps, s.time_shift).to(self.states.device)

    @classmethod
    def concat(cls, parts: Sequence[Rollout]) -> Rollout:
        """One rollout of several made with the same settings and group size (e.g. one pipeline call each), in
        order."""
        first = parts[0]
        if any(p.group != first.group or p.settings != first.settings or p.grid != first.grid or p.edit != first.edit
               for p in parts):
            raise ValueError("rollouts to concatenate need the same group size, settings, grid and kind")

        def cat(name: str) -> torch.Tensor:
            return torch.cat([getattr(p, name) for p in parts])

        return replace(first, prompts=[q for p in parts for q in p.prompts], ids=[i for p in parts for i in p.ids],
                       sources=cat("sources") if first.edit else None, states=cat("states"), fed=cat("fed"),
                       mean=cat("mean"), log_prob=cat("log_prob"), images=[im for p in parts for im in p.images])

    def select(self, index: Sequence[int]) -> Rollout:
        """The rollout of images ``index`` only (a minibatch); ``prompts`` and ``group`` then describe one image
        each (group 1)."""
        idx = torch.as_tensor(list(index), dtype=torch.long, device=self.states.device)
        return replace(self, prompts=[self.prompts[i // self.group] for i in index], group=1,
                       ids=[self.ids[i] for i in index], sources=None if self.sources is None else self.sources[idx],
                       states=self.states[idx], fed=self.fed[idx], mean=self.mean[idx], log_prob=self.log_prob[idx],
                       images=[self.images[i] for i in index])


class _Recorder:
    """The pipeline's ``observe`` hook: keeps each token's (states, velocities, fed) as they come."""

    def __init__(self) -> None:
        self.states: list[torch.Tensor] = []  # per token (S + 1, B, D)
        self.velocities: list[torch.Tensor] = []  # per token (S, B, D)
        self.fed: list[torch.Tensor] = []  # per token (B, D)

    def __call__(self, states: torch.Tensor, velocities: torch.Tensor, fed: torch.Tensor) -> None:
        self.states.append(states)
        self.velocities.append(velocities)
        self.fed.append(fed)


def _is_edit(prompts: Sequence[Prompt], group: int) -> bool:
    """Whether the batch is an edit batch; InputError on an empty or mixed batch or a bad group size."""
    if not prompts:
        raise InputError("no prompts to roll out")
    edits = {p.source is not None for p in prompts}
    if len(edits) > 1:
        raise InputError("a rollout batch is all text-to-image or all edits (their guidance rows differ): split it")
    if not isinstance(group, int) or isinstance(group, bool) or group < 1:
        raise InputError(f"group must be an integer >= 1, got {group!r}")
    return edits.pop()


def check_policy(settings: Mapping[str, Any]) -> None:
    """SettingError unless rollouts can sample with ``settings`` (sampler, num_inference_steps, noise_level): a sampler
    whose steps are Gaussian transitions, with noise, and at least one random step."""
    sampler, steps = settings["sampler"], settings["num_inference_steps"]
    if sampler not in NEXTSTEP_11_SAMPLERS:
        raise SettingError("sampler", f"must be one of {NEXTSTEP_11_SAMPLERS} for rollouts (their steps are Gaussian "
                                      f"transitions), got {sampler!r}")
    if not settings["noise_level"] > 0:
        raise SettingError("noise_level", "must be > 0 for rollouts (at 0 every step is deterministic: nothing to "
                                          "train)")
    if steps < min_steps(sampler, stochastic=True):
        raise SettingError("num_inference_steps", f"must be >= {min_steps(sampler, stochastic=True)} for rollouts "
                                                  f"with the {sampler!r} sampler (its last step is deterministic), "
                                                  f"got {steps}")


def _transitions(settings: Settings, states: torch.Tensor, velocities: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """states (T, S + 1, B, D), velocities (T, S, B, D) -> (mean (T, S, B, D), std (S,)), step by step."""
    ts = times(settings.sampler, settings.num_inference_steps, settings.time_shift).to(states.device)
    means, stds = [], []
    for i in range(velocities.shape[1]):
        m, s = transition(settings.sampler, states[:, i], velocities[:, i], ts, i, settings.noise_level)
        means.append(m)
        stds.append(torch.as_tensor(s, dtype=torch.float32, device=states.device))
    return torch.stack(means, 1), torch.stack(stds)


@torch.no_grad()
def rollout(pipe, prompts: Sequence[Prompt], group: int, height: int, width: int,
            generator: torch.Generator | list[torch.Generator] | None = None, group_noise: bool = False,
            **settings: Any) -> Rollout:
    """Sample ``group`` images for each prompt with ``pipe`` (a ``NextStepPipeline``) and record their trajectories.

    ``settings``: sampling overrides as the pipeline takes them (``sampler`` "flow_sde" or "cps",
    ``num_inference_steps``, ``guidance_scale``, ``image_guidance_scale``, ``time_shift``, ``noise_level``, ...);
    the rest come from ``pipe.defaults``. ``generator``: one for the batch or one per prompt, as in the pipeline.
    ``group_noise``: the images of a prompt share their start and context noise (the pipeline's ``group_noise``), so
    they differ only by the steps whose log-probabilities are recorded."""
    edit = _is_edit(prompts, group)
    resolved = pipe.defaults.resolve(edit, **settings)
    check_policy(dataclasses.asdict(resolved))
    sources = [fit_image(load_image(p.source), height, width) for p in prompts] if edit else None
    record = _Recorder()
    out = pipe._generate([p.text for p in prompts], image=[p.source for p in prompts] if edit else None,
                         height=height, width=width, num_images_per_prompt=group, generator=generator, progress=False,
                         observe=record, group_noise=group_noise, **settings)
    states = torch.stack(record.states)  # (T, S + 1, B, D)
    mean, std = _transitions(resolved, states, torch.stack(record.velocities))
    states, mean = states.permute(2, 0, 1, 3), mean.permute(2, 0, 1, 3)  # (B, T, S + 1, D), (B, T, S, D)
    log_prob = torch.zeros(mean.shape[:-1], device=mean.device)  # (B, T, S); deterministic steps stay 0
    random = std > 0
    log_prob[:, :, random] = gaussian_log_prob(states[:, :, 1:][:, :, random], mean[:, :, random], std[random, None])
    per_prompt = [pipe.prompt_rows(p.text, out.grid, resolved, edit) for p in prompts]
    latents = None
    if edit:  # the pipeline's own encoding of the input images (one latent per prompt)
        latents = pipe.encode_latents(sources).repeat_interleave(group, 0)
    return Rollout(prompts=list(prompts), group=group, settings=resolved, grid=out.grid,
                   ids=[rows for rows in per_prompt for _ in range(group)], pad_id=pipe.tokenizer.special.pad,
                   sources=latents, states=states, fed=torch.stack(record.fed, 1)[:, :-1], mean=mean, std=std,
                   log_prob=log_prob, images=list(out.images))
