"""Integrators of a velocity field over a (shifted) time grid. Model-free: they see only the field.

Convention: t = 0 is noise, t = 1 is data; the field gives dx/dt for x (N, D). ``shift`` s >= 1 warps the grid as
t' = t / (s - (s - 1) t), spending more steps near the noise end.

Two ways in:
    ``integrate(sampler, velocity, x0, steps, shift, noise)`` for any ``velocity(x, t)`` (t a 0-d float tensor);
    ``run(sampler, field, x0, ts, noise)`` with the grid ``ts = times(sampler, steps, shift)`` made once by the
    caller and ``field(x, i)`` = the velocity at time ``ts[i]``: a caller that precomputes per-time features (the
    flow head's time embeddings, ``sampling.token``) indexes them by ``i``.

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

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # velocity(x, t)
Field = Callable[[torch.Tensor, int], torch.Tensor]  # field(x, i): the velocity at time ts[i]
Noise = Callable[[], torch.Tensor]

REFERENCE_LAST_STEP = 0.04


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    return t / (shift - (shift - 1) * t)


def time_grid(steps: int, shift: float = 1.0, end: float = 1.0) -> torch.Tensor:
    """``steps`` float32 points from 0 to ``end`` (inclusive), shifted."""
    return shift_times(torch.linspace(0, end, steps), shift)


def times(sampler: str, steps: int, shift: float) -> torch.Tensor:
    """The time grid a sampler walks for ``steps`` steps (float32, on the CPU; move it once per call)."""
    if sampler == "sde":
        return time_grid(steps, shift, 1 - REFERENCE_LAST_STEP)
    return time_grid(steps + 1, shift)


def sde_reference(field: Field, x: torch.Tensor, ts: torch.Tensor, noise: Noise) -> torch.Tensor:
    """NextStep-1's sampler. ``noise()`` returns a fresh N(0, I) tensor shaped like ``x``; it is called after each
    velocity evaluation but the last (``steps - 1`` times)."""
    for i in range(len(ts) - 1):
        ti, dt = ts[i], ts[i + 1] - ts[i]
        v = field(x, i)
        t = ti.expand(x.shape[0]).to(x)[:, None]  # (N, 1)
        # score of the linear path, written as in the reference: (t v - x) / var, var = (1-t)^2 + t (1-t)
        score = (t * v - x) / ((1 - t) ** 2 - t * -1 * (1 - t))
        drift = v + (1 - t) * score
        dw = noise() * torch.sqrt(dt)
        x = x + drift * dt + torch.sqrt(2 * (1 - t)) * dw
    return x + field(x, len(ts) - 1) * REFERENCE_LAST_STEP


def ode_euler(field: Field, x: torch.Tensor, ts: torch.Tensor, noise: Noise | None = None) -> torch.Tensor:
    for i in range(len(ts) - 1):
        x = x + field(x, i) * (ts[i + 1] - ts[i])
    return x


def ode_heun(field: Field, x: torch.Tensor, ts: torch.Tensor, noise: Noise | None = None) -> torch.Tensor:
    steps = len(ts) - 1
    for i in range(steps):
        dt = ts[i + 1] - ts[i]
        v = field(x, i)
        x_next = x + v * dt
        if i < steps - 1:  # trapezoidal correction; the last step stays Euler (the field may be singular at t=1)
            x_next = x + (v + field(x_next, i + 1)) * (dt / 2)
        x = x_next
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"sde": sde_reference, "ode": ode_euler, "heun": ode_heun}


def min_steps(sampler: str) -> int:
    """Fewest steps the sampler accepts."""
    return 2 if sampler == "sde" else 1


def evaluations(sampler: str, steps: int) -> int:
    """Velocity evaluations per sampled token."""
    return 2 * steps - 1 if sampler == "heun" else steps


def noise_draws(sampler: str, steps: int) -> int:
    """Gaussian draws per sampled token after the starting point x0."""
    return steps - 1 if sampler == "sde" else 0


def check(sampler: str, steps: int, shift: float) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    if not isinstance(steps, int) or steps < min_steps(sampler):
        raise ValueError(f"{sampler!r} needs steps >= {min_steps(sampler)}, got {steps!r}")
    if shift <= 0:
        raise ValueError(f"time shift must be > 0, got {shift}")


def run(sampler: str, field: Field, x0: torch.Tensor, ts: torch.Tensor, noise: Noise | None = None) -> torch.Tensor:
    """Carry x0 (N, D) at t = 0 to t = 1 with the named sampler over the grid ``ts`` (from :func:`times`)."""
    if sampler == "sde" and noise is None:
        raise ValueError(f"the {sampler!r} sampler needs a noise source")
    return SAMPLERS[sampler](field, x0, ts, noise)


def integrate(sampler: str, velocity: Velocity, x0: torch.Tensor, steps: int, shift: float = 1.0,
              noise: Noise | None = None) -> torch.Tensor:
    """Carry x0 (N, D) at t = 0 to t = 1 with the named sampler, for any ``velocity(x, t)``."""
    check(sampler, steps, shift)
    ts = times(sampler, steps, shift)
    return run(sampler, lambda x, i: velocity(x, ts[i]), x0, ts, noise)
