"""Samplers and guidance: exactness on analytic velocity fields, the time grid, parity of the reference SDE sampler
with the official FlowMatchingHead.sample (fixture official-v1-a), guidance branch layouts and formulas, bad input."""

from __future__ import annotations

import ast
import json
import re

import pytest
import torch

from nextstep.model.nextstep import NextStep
from nextstep.sampling import flow
from nextstep.sampling.flow import integrate, shift_times, time_grid
from nextstep.sampling.guidance import Guidance

TOL = 1e-5
SHIFTS = (1.0, 2.0, 3.2)


def counted(velocity):
    """Wrap a velocity field; the wrapper records the times it was called at (as floats)."""
    def f(x, t):
        assert t.dim() == 0, "velocity(x, t) gets a 0-d time"
        f.times.append(float(t))
        return velocity(x, t)
    f.times = []
    return f


def reference_grid(steps: int, shift: float, end: float) -> list[float]:
    """linspace(0, end, steps) shifted, in float64, written independently of the module."""
    return [(end * i / (steps - 1)) / (shift - (shift - 1) * (end * i / (steps - 1))) for i in range(steps)]


# ---------------------------------------------------------------------------------------------- analytic fields

@pytest.mark.parametrize("sampler", ["ode", "heun"])
@pytest.mark.parametrize("steps", [1, 2, 5, 17])
@pytest.mark.parametrize("shift", SHIFTS)
def test_constant_field_is_exact(sampler, steps, shift):
    g = torch.Generator().manual_seed(steps)
    x0, c = torch.randn(5, 7, generator=g), torch.randn(7, generator=g)
    v = counted(lambda x, t: c.expand_as(x))
    out = integrate(sampler, v, x0, steps, shift)
    assert (out - (x0 + c)).abs().max().item() <= 1e-6
    assert len(v.times) == flow.evaluations(sampler, steps) == (steps if sampler == "ode" else 2 * steps - 1)


@pytest.mark.parametrize("sampler", ["ode", "heun"])
@pytest.mark.parametrize("steps", [1, 3, 10, 25])
@pytest.mark.parametrize("shift", SHIFTS)
def test_point_mass_straight_lines_land_on_target(sampler, steps, shift):
    g = torch.Generator().manual_seed(100 + steps)
    x0, x1 = torch.randn(6, 9, generator=g), torch.randn(9, generator=g)
    v = counted(lambda x, t: (x1 - x) / (1 - t))
    out = integrate(sampler, v, x0, steps, shift)
    assert (out - x1).abs().max().item() <= TOL
    assert len(v.times) == flow.evaluations(sampler, steps)
    assert max(v.times) < 1  # the field is singular at t = 1; it is never evaluated there


def test_evaluation_times_follow_the_grid():
    steps, shift = 4, 2.0
    grid = reference_grid(steps + 1, shift, 1.0)
    v = counted(lambda x, t: torch.zeros_like(x))
    integrate("ode", v, torch.zeros(1, 2), steps, shift)
    assert v.times == pytest.approx(grid[:-1], abs=1e-6)
    v = counted(lambda x, t: torch.zeros_like(x))
    integrate("heun", v, torch.zeros(1, 2), steps, shift)
    # predictor at t_i, corrector at t_{i+1}, for every step but the last (plain Euler)
    expected = [t for i in range(steps - 1) for t in (grid[i], grid[i + 1])] + [grid[steps - 1]]
    assert v.times == pytest.approx(expected, abs=1e-6)


def test_ode_and_heun_convergence_orders():
    """Gaussian data N(m, s^2): the probability-flow ODE maps x0 to m + s * x0 exactly; Euler is first order and
    Heun second order (error ratio ~2 and ~4 when the steps double)."""
    m, s = torch.linspace(-1, 1, 8, dtype=torch.float64), 0.5

    def v(x, t):
        var = t * t * s * s + (1 - t) ** 2
        return (m + t * s * s / var * (x - t * m) - x) / (1 - t)

    x0 = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = m + s * x0
    for sampler, lo, hi in (("ode", 1.8, 2.2), ("heun", 3.5, 4.7)):
        for shift in (1.0, 2.0):
            errs = [(integrate(sampler, v, x0, n, shift) - exact).abs().max().item() for n in (16, 32, 64)]
            ratios = [errs[0] / errs[1], errs[1] / errs[2]]
            assert all(lo <= r <= hi for r in ratios), (sampler, shift, errs, ratios)
    assert (integrate("heun", v, x0, 64, 1.0) - exact).abs().max().item() < 1e-3  # measured 6.1e-4


def sde_by_hand(x0: list[list[float]], c: list[float], steps: int, shift: float) -> list[list[float]]:
    """The documented reference update with zero noise, in float64 Python: x += ((1 + t) c - x) dt, then c * 0.04."""
    ts = reference_grid(steps, shift, 1 - 0.04)
    out = []
    for row in x0:
        x = list(row)
        for ti, tj in zip(ts[:-1], ts[1:]):
            x = [xd + ((1 + ti) * cd - xd) * (tj - ti) for xd, cd in zip(x, c)]
        out.append([xd + cd * 0.04 for xd, cd in zip(x, c)])
    return out


@pytest.mark.parametrize("steps", [2, 3, 10, 50])
@pytest.mark.parametrize("shift", SHIFTS)
def test_sde_zero_noise_constant_field_matches_hand_computation(steps, shift):
    g = torch.Generator().manual_seed(7 * steps)
    x0, c = torch.randn(4, 6, generator=g), torch.randn(6, generator=g)
    log = []

    def velocity(x, t):
        log.append(("v", float(t)))
        return c.expand_as(x)

    def noise():
        log.append(("n", None))
        return torch.zeros(4, 6)

    out = integrate("sde", velocity, x0, steps, shift, noise)
    expected = torch.tensor(sde_by_hand(x0.double().tolist(), c.double().tolist(), steps, shift), dtype=torch.float64)
    assert (out.double() - expected).abs().max().item() <= TOL
    # steps velocity calls, steps - 1 noise draws, each draw after its velocity call, the last call without one
    assert [k for k, _ in log] == ["v", "n"] * (steps - 1) + ["v"]
    assert [t for k, t in log if k == "v"] == pytest.approx(reference_grid(steps, shift, 0.96), abs=1e-6)
    assert flow.evaluations("sde", steps) == steps


@pytest.mark.parametrize("steps", [2, 10, 50])
@pytest.mark.parametrize("shift", SHIFTS)
def test_fused_sde_is_the_reference_sde_to_float_rounding(steps, shift):
    """The pipeline's closed-form SDE step (flow.sde_fused) against the reference's arithmetic: the same draws in the
    same order, the same path to float32 rounding, with a field that depends on x and t."""
    g = torch.Generator().manual_seed(steps)
    x0, w = torch.randn(3, 8, generator=g), torch.randn(steps, 3, 8, generator=g)
    ts = flow.times("sde", steps, shift)
    field = lambda x, i: torch.tanh(x) * (1 + ts[i]) - 0.5 * x  # noqa: E731
    runs = []
    for fused in (False, True):
        draws = iter(w)
        runs.append(flow.run("sde", field, x0, ts, lambda draws=draws: next(draws), fused=fused))
    assert (runs[0] - runs[1]).abs().max().item() <= 1e-5
    assert (runs[0] - x0).abs().max().item() > 0.1  # it moved


def test_sde_point_mass_with_noise_lands_on_target():
    """With shift 1 the SDE ends at t = 0.96 + 0.04 = 1; on a point-mass field the final Euler step lands on x1, and
    the state before it should be ~ N(0.96 x1, 0.04^2) (Euler-Maruyama broadens it; measured std 0.055)."""
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(16, generator=g)
    before_last = {}

    def v(x, t):
        if abs(float(t) - 0.96) < 1e-6:
            before_last["x"] = x.clone()
        return (x1 - x) / (1 - t)

    x0 = torch.randn(256, 16, generator=g)
    out = integrate("sde", v, x0, 50, 1.0, lambda: torch.randn(256, 16, generator=g))
    err = (out - x1).abs()
    assert err.mean().item() < 1e-5 and err.max().item() < 1e-5  # measured 2e-8 / 2.4e-7
    r = before_last["x"] - 0.96 * x1
    assert abs(r.mean().item()) < 0.005  # measured -8e-4
    assert 0.04 < r.std().item() < 0.07  # measured 0.055


def test_sde_samples_a_gaussian():
    """Data N(m, s^2): 8192 SDE samples (50 steps, shift 1) have the right mean and std per dimension."""
    m, s = torch.linspace(-1, 1, 8), 0.5

    def v(x, t):
        var = t * t * s * s + (1 - t) ** 2
        return (m + t * s * s / var * (x - t * m) - x) / (1 - t)

    g = torch.Generator().manual_seed(1)
    out = integrate("sde", v, torch.randn(8192, 8, generator=g), 50, 1.0, lambda: torch.randn(8192, 8, generator=g))
    assert (out.mean(0) - m).abs().max().item() < 0.025  # measured 0.007
    assert (out.std(0) - s).abs().max().item() < 0.04  # measured 0.013


def test_sde_with_shift_stops_short_of_one():
    """Reference behaviour kept: the grid is shifted but the last step stays 0.04, so with shift s > 1 the SDE ends at
    t = shift(0.96) + 0.04 < 1. On the point-mass field the result is x1 - (x1 - x) (1 - 0.04 / (1 - t_last))."""
    x1 = torch.full((3,), 2.0)
    seen = {}

    def v(x, t):
        seen["x"], seen["t"] = x.clone(), float(t)
        return (x1 - x) / (1 - t)

    out = integrate("sde", v, torch.zeros(2, 3), 10, 3.2, lambda: torch.zeros(2, 3))
    t_last = 0.96 / (3.2 - 2.2 * 0.96)
    assert seen["t"] == pytest.approx(t_last, abs=1e-6)
    assert (out - (seen["x"] + (x1 - seen["x"]) * 0.04 / (1 - t_last))).abs().max().item() <= TOL
    assert (out - x1).abs().min().item() > 0.01


# ----------------------------------------------------------------------------------------------------- time grid

@pytest.mark.parametrize("steps", [2, 5, 11])
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("end", [1.0, 0.96])
def test_time_grid(steps, shift, end):
    ts = time_grid(steps, shift, end)
    assert ts.shape == (steps,) and ts.dtype == torch.float32
    assert ts[0].item() == 0
    assert ts[-1].item() == pytest.approx(end / (shift - (shift - 1) * end), abs=1e-7)
    assert (ts[1:] > ts[:-1]).all()
    assert ts.tolist() == pytest.approx(reference_grid(steps, shift, end), abs=1e-6)
    if end == 1.0:
        assert ts[-1].item() == pytest.approx(1.0, abs=1e-7)


def test_shift_formula_values():
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    assert shift_times(t, 1.0).tolist() == t.tolist()
    # s = 3: t / (3 - 2t)
    assert shift_times(t, 3.0).tolist() == pytest.approx([0.0, 0.25 / 2.5, 0.5 / 2.0, 0.75 / 1.5, 1.0], abs=1e-12)
    assert shift_times(torch.tensor([0.5]), 3.2).item() == pytest.approx(0.5 / 2.1, abs=1e-7)
    # s > 1 spends the steps near the noise end: every interior time moves towards 0
    inner = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    assert (shift_times(inner, 2.0) < inner).all() and (shift_times(inner, 3.2) < shift_times(inner, 2.0)).all()


# ---------------------------------------------------------------------------------------- reference parity (SDE)

@pytest.fixture(scope="module")
def ref_meta(fixture):
    return json.loads((fixture / "reference.json").read_text())["tensors"]


@pytest.fixture(scope="module")
def model(fixture):
    return NextStep.from_pretrained(fixture / "model")


def parse_fm_sample(description: str) -> tuple[dict, list[str]]:
    kwargs = ast.literal_eval(re.search(r"\*\*(\{.*?\})", description).group(1))
    rows = re.search(r"c = cat of (.*?)\. RNG", description).group(1).split(", ")
    return kwargs, rows


FM_SAMPLE_CASES = ["cfg1", "cfg3", "cfg3_img1p5", "cfg3_shift3p2_20steps", "cfg1_noise_repeat1"]


def test_fm_sample_cases_all_covered(ref_meta):
    cases = sorted(k[len("out.fm_sample."):] for k in ref_meta if k.startswith("out.fm_sample."))
    assert cases == sorted(FM_SAMPLE_CASES)


@torch.no_grad()
@pytest.mark.parametrize("case", FM_SAMPLE_CASES)
def test_sde_matches_reference_fm_sample(case, model, ref, ref_meta, one_thread):
    kwargs, rows = parse_fm_sample(ref_meta[f"out.fm_sample.{case}"]["description"])
    cfg, cfg2 = kwargs["cfg"], kwargs["cfg2"]
    steps, shift, r = kwargs["num_sampling_steps"], kwargs.get("timesteps_shift", 1.0), kwargs["noise_repeat"]
    c = torch.cat([ref[name] for name in rows])
    g = Guidance(text_scale=cfg, image_scale=cfg2, has_image=(cfg2 != 1))
    # the reference's cfg_mult = 1 + (cfg > 1) + (cfg2 > 1) blocks of rows, laid out as our branches
    assert len(g.branches) == len(rows) == 1 + (cfg > 1) + (cfg2 > 1)
    B = c.shape[0] // len(g.branches)
    assert B == 2

    def noise():
        return torch.randn(r, 64).repeat(B // r, 1)

    def velocity(x, t):
        v = model.image_head(torch.cat([x] * len(g.branches)), t.expand(c.shape[0]).to(c), c).float()
        return g.combine(v, cfg, cfg2)

    torch.manual_seed(1234)
    x = integrate("sde", velocity, noise(), steps, shift, noise)
    expected = ref[f"out.fm_sample.{case}"]
    assert x.shape == expected.shape
    diff = (x - expected).abs().max().item()
    assert diff <= TOL, (case, diff)


# -------------------------------------------------------------------------------------------------------- guidance

def expected_layout(text: float, image: float, has_image: bool) -> tuple[str, ...]:
    if has_image and image != 1:
        return ("cond", "uncond_text", "uncond_all")
    if text != 1:
        return ("cond", "uncond_text") if has_image else ("cond", "uncond_all")
    return ("cond",)


@pytest.mark.parametrize("text", [0.0, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("image", [0.0, 1.0, 1.5])
@pytest.mark.parametrize("has_image", [False, True])
def test_guidance_layout_and_combination(text, image, has_image):
    g = Guidance(text_scale=text, image_scale=image, has_image=has_image)
    layout = expected_layout(text, image, has_image)
    assert g.branches == layout
    n, d = 3, 5
    blocks = {"cond": torch.full((n, d), 2.0) + torch.arange(d),
              "uncond_text": torch.full((n, d), -1.0) + 0.5 * torch.arange(n)[:, None],
              "uncond_all": torch.full((n, d), 0.25)}
    stacked = torch.cat([blocks[b] for b in layout])
    out = g.combine(stacked, text, image)
    c, u1, u2 = blocks["cond"], blocks["uncond_text"], blocks["uncond_all"]
    if len(layout) == 1:
        want = c
    elif len(layout) == 2:
        u = blocks[layout[1]]
        want = u + text * (c - u)
    else:
        want = u2 + image * (u1 - u2) + text * (c - u1)
    assert out.shape == (n, d)
    assert (out - want).abs().max().item() <= 1e-6
    # spot values by hand (first row, first column): c = 2, u1 = -1, u2 = 0.25
    two = (-1.0 + text * 3.0) if has_image else (0.25 + text * 1.75)
    by_hand = {1: 2.0, 2: two, 3: 0.25 + image * -1.25 + text * 3.0}[len(layout)]
    assert out[0, 0].item() == pytest.approx(by_hand, abs=1e-6)


@pytest.mark.parametrize("kwargs", [{"text_scale": -0.5}, {"image_scale": -1.0}, {"text_scale": float("nan")},
                                    {"image_scale": float("nan")}, {"text_scale": "3"}])
def test_guidance_bad_scales_raise(kwargs):
    with pytest.raises(ValueError, match="scale"):
        Guidance(**kwargs)


def test_guidance_unknown_schedule_raises():
    with pytest.raises(ValueError, match="schedule"):
        Guidance(text_scale=3.0, schedule="cosine")


@pytest.mark.parametrize("has_image", [False, True])
def test_guidance_schedules(has_image):
    total = 16
    lin = Guidance(text_scale=3.0, image_scale=1.5, has_image=has_image, schedule="linear")
    assert lin.scales_at(0, total) == pytest.approx((3.0, 1.5))
    for k in range(total):
        frac = (total - k) / total
        assert lin.scales_at(k, total) == pytest.approx((1 + 2.0 * frac, 1 + 0.5 * frac), abs=1e-12)
    text = [lin.scales_at(k, total)[0] for k in range(total)]
    assert all(a > b for a, b in zip(text, text[1:]))
    assert lin.scales_at(total - 1, total) == pytest.approx((1 + 2.0 / 16, 1 + 0.5 / 16))
    # a scale below 1 rises towards 1
    assert Guidance(text_scale=0.5, schedule="linear").scales_at(8, 16)[0] == pytest.approx(0.75)
    const = Guidance(text_scale=3.0, image_scale=1.5, has_image=has_image)
    assert const.schedule == "constant"
    assert all(const.scales_at(k, total) == (3.0, 1.5) for k in range(total))


# ------------------------------------------------------------------------------------------------------ bad input

def zero_velocity(x, t):
    return torch.zeros_like(x)


@pytest.mark.parametrize("sampler, steps, shift, noise, match", [
    ("euler", 4, 1.0, None, "sampler must be one of .*, got 'euler'"),
    ("ode", 0, 1.0, None, r"num_inference_steps must be an integer in \[1, "),
    ("heun", -2, 1.0, None, r"num_inference_steps must be an integer in \[1, "),
    ("ode", 2.0, 1.0, None, r"num_inference_steps must be an integer in \[1, "),
    ("sde", 1, 1.0, torch.zeros, r"num_inference_steps must be >= 2 for the 'sde' sampler"),
    ("ode", 4, 0.0, None, r"time_shift must be a number in \(0, "),
    ("heun", 4, -1.0, None, r"time_shift must be a number in \(0, "),
    ("sde", 4, 1.0, None, "needs a noise source"),
])
def test_integrate_bad_arguments(sampler, steps, shift, noise, match):
    with pytest.raises(ValueError, match=match):
        integrate(sampler, zero_velocity, torch.zeros(1, 2), steps, shift, noise)


def test_edit_guidance_is_continuous_in_the_image_scale():
    """With an input image, text guidance alone keeps the image in the unconditional branch, so the result at
    image_scale = 1 equals the three-branch formula's limit (no jump)."""
    n, d = 2, 4
    c, u1, u2 = torch.randn(n, d), torch.randn(n, d), torch.randn(n, d)
    at_one = Guidance(3.0, 1.0, has_image=True).combine(torch.cat([c, u1]), 3.0, 1.0)
    near = Guidance(3.0, 1.0 + 1e-6, has_image=True).combine(torch.cat([c, u1, u2]), 3.0, 1.0 + 1e-6)
    assert (at_one - near).abs().max().item() <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("case", [c for c in FM_SAMPLE_CASES if "noise_repeat1" not in c])
def test_token_sampler_matches_reference_fm_sample(case, model, ref, ref_meta, one_thread):
    """The pipeline's own path (TokenSampler: embeddings computed once, noise drawn as one block) gives the
    reference sampler's numbers (cases whose noise rows are independent, i.e. noise_repeat == rows)."""
    from nextstep.config import SamplingConfig
    from nextstep.sampling.noise import NoiseSource
    from nextstep.sampling.token import TokenSampler

    kwargs, rows = parse_fm_sample(ref_meta[f"out.fm_sample.{case}"]["description"])
    cfg, cfg2 = kwargs["cfg"], kwargs["cfg2"]
    c = torch.cat([ref[name] for name in rows])
    g = Guidance(text_scale=cfg, image_scale=cfg2, has_image=(cfg2 != 1))
    settings = SamplingConfig().resolve(False, sampler="sde", num_inference_steps=kwargs["num_sampling_steps"],
                                        time_shift=kwargs.get("timesteps_shift", 1.0), token_norm=False)
    sample = TokenSampler(model.image_head, g, settings, c.shape[0], c.device, c.dtype)
    torch.manual_seed(1234)
    noise = NoiseSource(None, 1, c.shape[0] // len(g.branches), 64, c.device).block(sample.draws)
    x = sample(c, (cfg, cfg2), noise)
    diff = (x - ref[f"out.fm_sample.{case}"]).abs().max().item()
    assert diff <= TOL, (case, diff)
