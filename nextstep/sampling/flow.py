"""Integrators of a velocity field over a (shifted) time grid. Model-free: they see only the field.

Convention: t = 0 is noise, t = 1 is data; the field gives dx/dt for x (N, D). ``shift`` s >= 1 warps the grid as
t' = t / (s - (s - 1) t), spending more steps near the noise end.

Two ways in:
    ``integrate(sampler, velocity, x0, steps, shift, noise)`` for any ``velocity(x, t)`` (t a 0-d float tensor);
    ``run(sampler, field, x0, ts, noise)`` with the grid ``ts = times(sampler, steps, shift)`` made once by the
    caller and ``field(x, i)`` = the velocity at time ``ts[i]``: a caller that precomputes per-time features (the
    flow head's time embeddings, ``sampling.token``) indexes them by ``i``.

Samplers:
    "sde"      the NextStep-1 reference sampler: Euler-Maruyama on the score form of the rectified-flow SDE
               (drift (1 + t) v - x, diffusion sqrt(2 (1 - t))) over linspace(0, 1 - 0.04, steps) shifted,
               then one deterministic Euler step of 0.04. ``steps`` velocity evaluations and ``steps - 1`` noise
               draws, the arithmetic in the reference's order, so seeded runs reproduce it.
    "ode"      Euler on the probability-flow ODE over ``steps`` intervals ending exactly at t = 1.
    "heun"     Heun's second-order method (Euler last step, as in EDM): about 2x the evaluations per step and far
               fewer steps for the same error.
    "flow_sde" NextStep-1.1's default (official ``sde_type="sde"``, after Flow-GRPO): with x0 = x - v t (the noise
               end) and x1 = x + v (1 - t) (the data end) of the straight path through x, sigma = 1 - t, h = t' - t,
                   std = noise_level * sqrt(sigma / (1 - sigma)) (sigma = 1 at t = 0 uses 1 - sigma_max instead,
                         sigma_max = the last grid time before 1, as the official code writes it)
                   x' = x0 (1 - t') + x1 t' - std^2 h / (2 sigma) x0  +  std sqrt(h) w.
    "cps"      NextStep-1.1's coefficients-preserving sampler (``sde_type="cps"``, Flow-CPS):
                   std = (1 - t') sin(noise_level pi / 2),   x' = x0 sqrt((1 - t')^2 - std^2) + x1 t' + std w.
    Both 1.1 samplers walk linspace(0, 1, steps + 1)[:-1] shifted, then 1: ``steps`` velocity evaluations, each
    followed by one draw w ~ N(0, I) (1 + steps draws per token with the start), so seeded runs reproduce the
    official 1.1 code. Their steps are exact Gaussian transitions: :func:`transition` gives the mean and standard
    deviation of x' given x (what RL post-training needs for log-probabilities).
"""

from __future__ import annotations

import math
from collections.abc import Callable

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
    if sampler in NEXTSTEP_11_SAMPLERS:  # as the 1.1 code builds it: the shifted grid without its end, then 1
        return torch.cat([shift_times(torch.linspace(0, 1, steps + 1)[:-1], shift), torch.ones(1)])
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


def sde_fused(field: Field, x: torch.Tensor, ts: torch.Tensor, noise: Noise) -> torch.Tensor:
    """:func:`sde_reference` in closed form: its variance (1 - t)^2 + t (1 - t) is 1 - t, so the drift is
    (1 + t) v - x and a step is x' = (1 - dt) x + (1 + t) dt v + sqrt(2 (1 - t) dt) w, with its three coefficients
    computed on the host: three tensor operations per step instead of about twenty. The same values up to float
    rounding, the same noise draws in the same order (the pipeline's default; ``exact=True`` keeps the reference)."""
    t = ts.tolist()
    for i in range(len(t) - 1):
        dt = t[i + 1] - t[i]
        v = field(x, i)
        x = torch.add(x * (1 - dt), v, alpha=(1 + t[i]) * dt).add_(noise(), alpha=math.sqrt(2 * (1 - t[i]) * dt))
    return x + field(x, len(t) - 1) * REFERENCE_LAST_STEP


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


def flow_sde_transition(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                        noise_level: float, sigma_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One "flow_sde" step from x (N, D) at time t with velocity v: (mean (N, D), std (0-d)) of x' at t_next.
    ``sigma_max`` is the grid's last time before 1 (see the module docstring)."""
    x0, x1 = x - v * t, x + v * (1 - t)
    sigma, h = 1 - t, t_next - t
    std = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    return x0 * (1 - t_next) + x1 * t_next - std ** 2 * h / (2 * sigma) * x0, std * torch.sqrt(h)


def cps_transition(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, noise_level: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One "cps" step from x (N, D) at time t with velocity v: (mean (N, D), std (0-d)) of x' at t_next."""
    x0, x1 = x - v * t, x + v * (1 - t)
    std = (1 - t_next) * math.sin(noise_level * math.pi / 2)
    return x0 * torch.sqrt((1 - t_next) ** 2 - std ** 2) + x1 * t_next, std


def transition(sampler: str, x: torch.Tensor, v: torch.Tensor, ts: torch.Tensor, i: int, noise_level: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the Gaussian step i (x at ``ts[i]`` -> x' at ``ts[i + 1]``) of a 1.1
    sampler, given the (guided) velocity v at x; x' = mean + std * w with w ~ N(0, I)."""
    if sampler == "flow_sde":
        return flow_sde_transition(x, v, ts[i], ts[i + 1], noise_level, ts[-2])
    if sampler == "cps":
        return cps_transition(x, v, ts[i], ts[i + 1], noise_level)
    raise ValueError(f"{sampler!r} has no Gaussian transitions; these do: {NEXTSTEP_11_SAMPLERS}")


def _gaussian_steps(sampler: str):
    def sample(field: Field, x: torch.Tensor, ts: torch.Tensor, noise: Noise, noise_level: float = 0.8
               ) -> torch.Tensor:
        for i in range(len(ts) - 1):
            mean, std = transition(sampler, x, field(x, i), ts, i, noise_level)
            x = mean + std * noise()  # drawn after the velocity evaluation, as the 1.1 code does
        return x
    return sample


NEXTSTEP_11_SAMPLERS = ("flow_sde", "cps")
STOCHASTIC = ("sde",) + NEXTSTEP_11_SAMPLERS  # samplers that draw noise after the start
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"sde": sde_reference, "ode": ode_euler, "heun": ode_heun,
                                                    "flow_sde": _gaussian_steps("flow_sde"),
                                                    "cps": _gaussian_steps("cps")}
DEFAULT_NOISE_LEVEL = 0.8  # NextStep-1.1's
# Not an integrator: the name under which settings ask for a distilled few-step head (``sampling.token.FewStepSampler``)
DISTILLED = "distilled"


def min_steps(sampler: str, stochastic: bool = False) -> int:
    """Fewest steps the sampler accepts; with ``stochastic``, fewest that include a random step (the last "sde" and
    "cps" steps are deterministic)."""
    return 2 if sampler == "sde" or stochastic and sampler == "cps" else 1


def evaluations(sampler: str, steps: int) -> int:
    """Velocity evaluations per sampled token."""
    return 2 * steps - 1 if sampler == "heun" else steps


def noise_draws(sampler: str, steps: int) -> int:
    """Gaussian draws per sampled token after the starting point x0."""
    if sampler in NEXTSTEP_11_SAMPLERS:
        return steps
    return steps - 1 if sampler == "sde" else 0


def run(sampler: str, field: Field, x0: torch.Tensor, ts: torch.Tensor, noise: Noise | None = None,
        noise_level: float = DEFAULT_NOISE_LEVEL, fused: bool = False) -> torch.Tensor:
    """Carry x0 (N, D) at t = 0 to t = 1 with the named sampler over the grid ``ts`` (from :func:`times`).
    ``noise_level`` is read by the 1.1 samplers only; ``fused`` runs "sde" as :func:`sde_fused`."""
    if sampler in STOCHASTIC and noise is None:
        raise ValueError(f"the {sampler!r} sampler needs a noise source")
    if fused and sampler == "sde":
        return sde_fused(field, x0, ts, noise)
    if sampler in NEXTSTEP_11_SAMPLERS:
        return SAMPLERS[sampler](field, x0, ts, noise, noise_level)
    return SAMPLERS[sampler](field, x0, ts, noise)


def integrate(sampler: str, velocity: Velocity, x0: torch.Tensor, steps: int, shift: float = 1.0,
              noise: Noise | None = None, noise_level: float = DEFAULT_NOISE_LEVEL) -> torch.Tensor:
    """Carry x0 (N, D) at t = 0 to t = 1 with the named sampler, for any ``velocity(x, t)``; the arguments are
    checked as the settings of the same names are (``nextstep.settings``)."""
    from ..settings import check  # the settings' one validation (it imports this module)

    check(dict(sampler=sampler, num_inference_steps=steps, time_shift=shift, noise_level=noise_level))
    ts = times(sampler, steps, shift)
    return run(sampler, lambda x, i: velocity(x, ts[i]), x0, ts, noise, noise_level)
