"""Sampling ONE image token from the backbone's condition: the flow head's guided velocity integrated over time.

This is the seam where other ways of producing a token plug in: a distilled few-step head, a compiled or
CUDA-graphed head, multi-token prediction. A ``TokenSampler`` is made once per generation call (the time grid and
the head's time embeddings of that grid are computed then, on the model's device); each call samples one token from
its (rows, D) condition, computing the head's condition embedding once for all steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import Settings
from ..model.distilled_head import DistilledHead, split_branches
from ..model.flow_head import FlowHead
from .flow import noise_draws, run, shift_times, times
from .guidance import Guidance

TOKEN_NORM_EPS = 1e-6


class TokenSampler:
    """Samples image tokens with ``head`` under ``guidance`` and the call's ``settings`` (sampler, steps, shift,
    token norm)."""

    def __init__(self, head: FlowHead, guidance: Guidance, settings: Settings, rows: int, device: torch.device,
                 dtype: torch.dtype, exact: bool = True, trace: bool = False):
        """``rows``: condition rows per token (guidance branches x images). ``exact=False`` (the pipeline's default):
        compute all steps' AdaLN modulations of a token at once (they depend only on the condition and the step
        time: each modulation layer's weights are read once per token, not once per step) and the "sde" step in
        closed form (``flow.sde_fused``); the same values up to float rounding, not bit for bit. ``trace``: keep
        each call's head trajectory in ``self.trace`` (RL post-training)."""
        self.head, self.guidance, self.settings, self.rows = head, guidance, settings, rows
        self.batched = not exact
        self.tracing = trace
        # Set by each call when tracing: (states (E + 1, n, token_dim): the x of each of the E velocity evaluations,
        # then the result before the token norm; velocities (E, n, token_dim): the guided velocity at each). For the
        # Gaussian samplers state i is x at ts[i].
        self.trace: tuple[torch.Tensor, torch.Tensor] | None = None
        self.copies = len(guidance.branches)
        self.ts = times(settings.sampler, settings.num_inference_steps, settings.time_shift).to(device)
        # One (rows, width) block per grid time, made once per call. Each is computed on ``rows`` equal rows, not
        # as one (S, width) table: the math library rounds a matrix product differently for 1-3 rows than for more,
        # and reproducing the reference bit for bit needs the same layout. t is rounded to the head's dtype first.
        t = self.ts.to(dtype)
        self.time_emb = [head.net.time_embed(t[i].expand(rows)) for i in range(len(t))]
        if self.batched:
            self.time_stack = torch.stack(self.time_emb)  # (S, rows, width): the batched path adds a token's condition

    @staticmethod
    def central(k: int) -> bool:
        """Whether sequential decoding draws image token k from the centre of its noise: never with the full head."""
        return False

    @property
    def draws(self) -> int:
        """Noise vectors of (rows, token_dim) one token consumes: the start x0, then the sampler's own."""
        return 1 + noise_draws(self.settings.sampler, self.settings.num_inference_steps)

    def __call__(self, cond: torch.Tensor, scales: tuple, noise: torch.Tensor) -> torch.Tensor:
        """cond (copies * n, D) stacked guidance branches; noise (draws, n, token_dim) -> token (n, token_dim).
        Several tokens in one call (parallel decoding): cond (copies * T * n, D), each branch's rows token by token,
        noise (draws, T * n, token_dim), the scales floats or (T * n, 1) tensors -> (T * n, token_dim)."""
        net, guidance, copies = self.head.net, self.guidance, self.copies
        cond_emb = net.cond_embed(cond)  # (copies * n, width), the same at every step
        text, image = scales
        tokens = cond.shape[0] // self.rows
        if self.batched:  # (S, rows, W) -> every step's modulations at once, then split by step
            mods = list(zip(*(m.unbind(0) for m in net.modulations(tile(self.time_stack, tokens) + cond_emb))))

        states: list[torch.Tensor] = []
        velocities: list[torch.Tensor] = []

        def field(x: torch.Tensor, i: int) -> torch.Tensor:
            xs = torch.cat([x] * copies).to(cond.dtype)
            if self.batched:
                v = net.velocity_from_modulations(xs, mods[i])
            else:
                v = net.velocity(xs, tile(self.time_emb[i], tokens) + cond_emb)
            v = guidance.combine(v.float(), text, image)
            if self.tracing:
                states.append(x)
                velocities.append(v)
            return v

        rest = iter(noise[1:])
        x = run(self.settings.sampler, field, noise[0], self.ts, lambda: next(rest), self.settings.noise_level,
                fused=self.batched)
        if self.tracing:
            self.trace = (torch.stack(states + [x]), torch.stack(velocities))
        if self.settings.token_norm:
            x = F.layer_norm(x, x.shape[-1:], None, None, TOKEN_NORM_EPS)
        return x


class FewStepSampler:
    """Samples image tokens with a distilled head (``model.distilled_head.DistilledHead``): ``steps`` Euler steps of
    its average velocity over the (shifted) grid, one head row per image (the guidance is distilled into the head),
    conditioned on the conditional rows, or on every guidance branch's for a head that reads them all
    (``branches`` "all"). Deterministic given the start noise: one draw per token."""

    draws = 1

    @staticmethod
    def central(k: int) -> bool:
        """Whether sequential decoding draws image token k (raster order) from the centre of its noise (start x0 = 0,
        the head's central token for its condition): every second token, from the second. The other half keep their
        noise, and with it the images' variety (``benchmarks/diversity.py``); the distilled head's noisiest starts
        cost it accuracy (docs/fast-mode.md: six seeds of ``nextstep eval shapes --fast``, 84.9 -> 87.7 overall at 4
        steps with the one-branch head bundled then). Parallel decoding at K = 2 draws its drafted tokens without
        noise: the same ones but for the image's last. Every token still consumes its noise, so the others draw the
        noise they would draw without this."""
        return k % 2 == 1

    def __init__(self, head: DistilledHead, settings: Settings, rows: int, device: torch.device, dtype: torch.dtype,
                 branches: tuple[str, ...] = ("cond",)):
        self.head, self.settings, self.rows, self.branches = head, settings, rows, branches
        self.ts = fewstep_times(settings.num_inference_steps, settings.time_shift).to(device)  # (S + 1,)
        t, d = self.ts[:-1].to(dtype), (self.ts[1:] - self.ts[:-1]).to(dtype)
        net, n = head.net, rows // len(branches)
        # (S, n, width): each step's time + step-size embedding, made once per call
        self.step_emb = torch.stack([net.time_embed(t[i].expand(n)) + head.step_embed(d[i].expand(n))
                                     for i in range(len(d))])

    def __call__(self, cond: torch.Tensor, scales: tuple, noise: torch.Tensor) -> torch.Tensor:
        """cond (copies * n, D) rows branch by branch; noise (1, n, token_dim) -> token (n, token_dim); or T tokens'
        (copies * T * n) rows in one call. ``scales`` is unused."""
        net = self.head.net
        if self.head.other_embed is not None:  # (T * n, D) and the other branches' (T * n, 2, D)
            cond, other = split_branches(cond, self.branches)
        else:
            cond, other = cond[:cond.shape[0] // len(self.branches)], None
        # every step's AdaLN modulations at once (they depend on the condition and the step only): each modulation
        # layer reads its weights once per token, not once per step
        step_emb = tile(self.step_emb, cond.shape[0] // self.step_emb.shape[1])
        mods = list(zip(*(m.unbind(0) for m in net.modulations(step_emb + self.head.condition(cond, other)))))
        x = noise[0]
        for i in range(len(self.step_emb)):
            u = net.velocity_from_modulations(x.to(cond.dtype), mods[i]).float()
            x = x + u * (self.ts[i + 1] - self.ts[i])
        if self.settings.token_norm:
            x = F.layer_norm(x, x.shape[-1:], None, None, TOKEN_NORM_EPS)
        return x


def tile(emb: torch.Tensor, tokens: int) -> torch.Tensor:
    """A time embedding made for one token's rows (..., rows, W) -> for ``tokens`` tokens' rows in one call (every
    row of it is the same)."""
    return emb if tokens == 1 else torch.cat([emb] * tokens, -2)


def fewstep_times(steps: int, shift: float) -> torch.Tensor:
    """The distilled head's grid: ``steps`` equal steps from 0 to 1, shifted as the teacher's grid was (float32)."""
    return shift_times(torch.linspace(0, 1, steps + 1), shift)
