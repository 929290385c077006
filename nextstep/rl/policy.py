"""The policy's log-probabilities: per head step, recomputed under the current weights, differentiable.

A rollout's step i of token k is x_{i+1} ~ N(mean, std^2 I) with mean a function of the guided velocity at x_i.
``step_stats`` recomputes the means of chosen (token, step) pairs under the model's current weights: the backbone
teacher-forced over the prompt rows and the tokens fed back during sampling (one forward, no cache), ``condition()``
at every image position, the head's velocity at the recorded states for every guidance branch, combined as the
pipeline combines them, and ``flow.transition``. The std depends only on the time grid, so it is the rollout's.

Which weights get gradients is the caller's choice: ``set_trainable(model, "head" | "head+last_layers" | "all")``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import ConfigError
from ..model.nextstep import NextStep
from ..sampling.flow import transition
from ..train.conditions import teacher_forced

if TYPE_CHECKING:
    from .rollout import Rollout

PARAMETER_SETS = ("head", "head+last_layers", "all")
_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I) summed over the last dim: x, mean (..., D); std broadcastable to them (> 0) ->
    (...)."""
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    # torch.distributions.Normal.log_prob's arithmetic, term for term
    return (-((x - mean) ** 2) / (2 * std ** 2) - torch.log(std) - _LOG_SQRT_2PI).sum(-1)


@dataclass(frozen=True)
class Steps:
    """P chosen (token, step) pairs of a rollout: the steps a loss is computed on."""

    token: torch.Tensor  # (P,) long, raster index of the image token
    step: torch.Tensor  # (P,) long, head step (x at ts[step] -> x at ts[step + 1])

    def __len__(self) -> int:
        return self.token.shape[0]


def all_steps(rollout: Rollout) -> Steps:
    """Every stochastic step of every token (deterministic steps, std 0, carry no log-probability)."""
    tokens = rollout.states.shape[1]
    steps = torch.nonzero(rollout.std > 0)[:, 0].cpu()
    grid_t, grid_s = torch.meshgrid(torch.arange(tokens), steps, indexing="ij")
    return Steps(grid_t.flatten(), grid_s.flatten())


def random_steps(rollout: Rollout, count: int, generator: torch.Generator | None = None) -> Steps:
    """``count`` distinct pairs of :func:`all_steps`, drawn uniformly (all of them when count >= their number),
    in (token, step) order."""
    every = all_steps(rollout)
    if count < 1:
        raise ConfigError(f"count must be >= 1, got {count}")
    if count >= len(every):
        return every
    pick = torch.randperm(len(every), generator=generator)[:count].sort().values
    return Steps(every.token[pick], every.step[pick])


@dataclass
class StepStats:
    """A rollout's chosen steps under some weights: B images, P pairs, D = token_dim."""

    log_prob: torch.Tensor  # (B, P) log-density of the recorded sample x_{i+1}
    mean: torch.Tensor  # (B, P, D) the transition's mean
    std: torch.Tensor  # (P, 1) its standard deviation


def conditions(model: NextStep, rollout: Rollout) -> torch.Tensor:
    """The flow head's condition for every image token of every guidance row, the backbone teacher-forced over the
    prompt rows and the tokens fed back: (copies * B, T, D) rows branch-major ([cond; uncond...], images within),
    the pipeline's layout."""
    return teacher_forced(model, rollout.ids, rollout.pad_id, rollout.guidance.branches, rollout.sources,
                          rollout.fed, rollout.grid)


def _guided_velocity(model: NextStep, rollout: Rollout, cond: torch.Tensor, x: torch.Tensor, steps: Steps
                     ) -> torch.Tensor:
    """The pipeline's guided head velocity at states x (B, P, D) of the chosen pairs -> (B, P, D) float32."""
    net, guidance = model.image_head.net, rollout.guidance
    copies, (b, p, d) = len(guidance.branches), x.shape
    token, step = steps.token.to(cond.device), steps.step.to(cond.device)
    t = rollout.times[step].to(model.dtype)  # (P,)
    y = net.cond_embed(cond[:, token]) + net.time_embed(t)  # (copies * B, P, W)
    v = net.velocity(torch.cat([x] * copies).to(model.dtype).flatten(0, 1), y.flatten(0, 1)).float()
    total = rollout.states.shape[1]
    scales = torch.tensor([guidance.scales_at(k, total) for k in steps.token.tolist()], device=x.device)  # (P, 2)
    text, image = (scales[:, j].expand(b, p).reshape(-1, 1) for j in (0, 1))
    return guidance.combine(v, text, image).view(b, p, d)


def step_stats(model: NextStep, rollout: Rollout, steps: Steps, cond: torch.Tensor | None = None) -> StepStats:
    """Log-probabilities and means of the chosen steps under ``model``'s current weights (differentiable in every
    parameter that requires grad). ``cond``: :func:`conditions` when already computed (a frozen backbone gives the
    same conditions at every update)."""
    cond = conditions(model, rollout) if cond is None else cond
    s = rollout.settings
    token, step = steps.token.to(rollout.states.device), steps.step.to(rollout.states.device)
    x, x_next = rollout.states[:, token, step], rollout.states[:, token, step + 1]  # (B, P, D)
    v = _guided_velocity(model, rollout, cond, x, steps)
    mean, std = transition(s.sampler, x, v, rollout.times[:, None], step, s.noise_level)  # std (P, 1)
    return StepStats(gaussian_log_prob(x_next, mean, std), mean, std)


def _last_layers(model: NextStep, count: int) -> list[nn.Module]:
    layers = model.transformer.layers
    if not 1 <= count <= len(layers):
        raise ConfigError(f"last_layers must be in [1, {len(layers)}], got {count}")
    return [model.image_out_projector, model.transformer.norm, *layers[len(layers) - count:]]


def set_trainable(model: NextStep, which: str, last_layers: int = 1) -> list[nn.Parameter]:
    """Let only the named parameter set require grad; returns its parameters (for the optimiser).
        "head"             the flow head
        "head+last_layers" the head, the condition projection, the final norm and the last ``last_layers`` backbone
                           layers
        "all"              every parameter"""
    if which not in PARAMETER_SETS:
        raise ConfigError(f"parameter set must be one of {PARAMETER_SETS}, got {which!r}")
    if which == "all":
        modules: list[nn.Module] = [model]
    else:
        modules = [model.image_head] + (_last_layers(model, last_layers) if which == "head+last_layers" else [])
    model.requires_grad_(False)
    for m in modules:
        m.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]
