"""Integrators of a velocity field over a (shifted) time grid. Model-free: they see only ``velocity(x, t)``.

Convention: t = 0 is noise, t = 1 is data; ``velocity(x, t)`` takes x (N, D) and a 0-d float tensor t and returns
dx/dt (N, D). ``shift`` s >= 1 warps the grid as t' = t / (s - (s - 1) t), spending more steps near the noise end.

Samplers:
    "sde"  the NextStep-1 reference sampler: Euler-Maruyama on the score form of the rectified-flow SDE
           (drift (1 + t) v - x, diffusion sqrt(2 (1 - t))) over linspace(0, 1 - 0.04, steps) shifted,
           then one deterministic Euler step of 0.04. ``steps`` velocity evaluations and ``steps - 1`` noise
           draws, the arithmetic in the reference's order, so seeded runs reproduce it.
    "ode"  Euler on the probability-flow ODE over ``steps`` intervals ending exactly at t = 1.
    "heun" Heun's second-order method (Euler last step, as in EDM): about 2x the evaluations per step and far
           fewer steps for the same error.
"""

from __future__ import annotations

from typing import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Noise = Callable[[], torch.Tensor]

REFERENCE_LAST_STEP = 0.04


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    return t / (shift - (shift - 1) * t)


def time_grid(steps: int, shift: float = 1.0, end: float = 1.0) -> torch.Tensor:
    """``steps`` float32 points from 0 to ``end`` (inclusive), shifted."""
    return shift_times(torch.linspace(0, end, steps), shift)


def sde_reference(velocity: Velocity, x: torch.Tensor, steps: int, shift: float, noise: Noise) -> torch.Tensor:
    """NextStep-1's sampler. ``noise()`` returns a fresh N(0, I) tensor shaped like ``x``; it is called after each
    velocity evaluation but the last (``steps - 1`` times)."""
    ts = time_grid(steps, shift, 1 - REFERENCE_LAST_STEP)
    for ti, tj in zip(ts[:-1], ts[1:]):
        dt = tj - ti
        v = velocity(x, ti)
        t = ti.expand(x.shape[0]).to(x)[:, None]  # (N, 1)
        # score of the linear path, written as in the reference: (t v - x) / var, var = (1-t)^2 + t (1-t)
        score = (t * v - x) / ((1 - t) ** 2 - t * -1 * (1 - t))
        drift = v + (1 - t) * score
        dw = noise() * torch.sqrt(dt)
        x = x + drift * dt + torch.sqrt(2 * (1 - t)) * dw
    return x + velocity(x, ts[-1]) * REFERENCE_LAST_STEP


def ode_euler(velocity: Velocity, x: torch.Tensor, steps: int, shift: float, noise: Noise | None = None
              ) -> torch.Tensor:
    ts = time_grid(steps + 1, shift)
    for ti, tj in zip(ts[:-1], ts[1:]):
        x = x + velocity(x, ti) * (tj - ti)
    return x


def ode_heun(velocity: Velocity, x: torch.Tensor, steps: int, shift: float, noise: Noise | None = None
             ) -> torch.Tensor:
    ts = time_grid(steps + 1, shift)
    for i, (ti, tj) in enumerate(zip(ts[:-1], ts[1:])):
        v = velocity(x, ti)
        x_next = x + v * (tj - ti)
        if i < steps - 1:  # trapezoidal correction; the last step stays Euler (the field may be singular at t=1)
            x_next = x + (v + velocity(x_next, tj)) * ((tj - ti) / 2)
        x = x_next
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"sde": sde_reference, "ode": ode_euler, "heun": ode_heun}


def evaluations(sampler: str, steps: int) -> int:
    """Velocity evaluations per sampled token."""
    return 2 * steps - 1 if sampler == "heun" else steps


def integrate(sampler: str, velocity: Velocity, x0: torch.Tensor, steps: int, shift: float = 1.0,
              noise: Noise | None = None) -> torch.Tensor:
    """Carry x0 (N, D) at t = 0 to t = 1 with the named sampler."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    if not isinstance(steps, int) or steps < (2 if sampler == "sde" else 1):
        raise ValueError(f"{sampler!r} needs steps >= {2 if sampler == 'sde' else 1}, got {steps!r}")
    if shift <= 0:
        raise ValueError(f"time shift must be > 0, got {shift}")
    if sampler == "sde" and noise is None:
        raise ValueError("the 'sde' sampler needs a noise source")
    return SAMPLERS[sampler](velocity, x0, steps, shift, noise)
