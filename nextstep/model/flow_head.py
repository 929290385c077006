"""The flow-matching head: a small AdaLN residual MLP that predicts the velocity of one image token.

Convention (rectified flow, as in the reference): t = 0 is pure noise, t = 1 is data,
x_t = t * x + (1 - t) * noise, and the network predicts the velocity dx_t/dt = x - noise.
The sampling loop lives in ``nextstep.sampling``; this module only holds the network and the training loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FlowHeadConfig
from ..sampling.noise import randn


def timestep_frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) raw times in [0, 1] (not scaled by 1000) -> (N, dim) = [cos | sin] sinusoidal features."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeEmbedding(nn.Module):
    def __init__(self, width: int, frequency_dim: int):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_frequencies(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """x + gate * MLP(LN(x) * (1 + scale) + shift), with (shift, scale, gate) from the conditioning."""

    def __init__(self, width: int, mlp_ratio: float):
        super().__init__()
        inner = int(width * mlp_ratio)
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, inner), nn.SiLU(), nn.Linear(inner, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.modulated(x, *self.adaLN_modulation(y).chunk(3, dim=-1))

    def modulated(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.modulated(x, *self.adaLN_modulation(y).chunk(2, dim=-1))

    def modulated(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class VelocityNet(nn.Module):
    """v(x_t, t, c): (N, token_dim), (N,), (N, cond_dim) -> (N, token_dim)."""

    def __init__(self, token_dim: int, cond_dim: int, cfg: FlowHeadConfig):
        super().__init__()
        self.time_embed = TimeEmbedding(cfg.width, cfg.frequency_dim)
        self.cond_embed = nn.Linear(cond_dim, cfg.width)
        self.input_proj = nn.Linear(token_dim, cfg.width)
        self.res_blocks = nn.ModuleList(ResBlock(cfg.width, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.width, token_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.velocity(x, self.time_embed(t) + self.cond_embed(c))

    def velocity(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (N, token_dim) and y = time_embed(t) + cond_embed(c) (N, width) -> (N, token_dim). Samplers compute
        the two embeddings once (per call and per token) instead of at every step."""
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)

    def modulation_layers(self) -> list[nn.Linear]:
        """The AdaLN modulation layers, blocks then the final layer: they read only y = time + condition."""
        return [b.adaLN_modulation[-1] for b in self.res_blocks] + [self.final_layer.adaLN_modulation[-1]]

    def modulations(self, y: torch.Tensor) -> list[torch.Tensor]:
        """Every AdaLN modulation for y (..., W), as :meth:`velocity_from_modulations` takes them: (shift, 1 + scale,
        gate) per block then (shift, 1 + scale) for the final layer. Called with all of a token's steps at once (y of
        shape (S, N, W)), each modulation layer reads its weights once per token instead of once per step (the layers
        stay modules, so quantized ones keep their kernels), and 1 + scale is formed once per token too."""
        sy = F.silu(y)
        mods = [m for layer in self.modulation_layers() for m in layer(sy).chunk(layer.out_features // sy.shape[-1],
                                                                                  dim=-1)]
        return [m + 1 if i % 3 == 1 else m for i, m in enumerate(mods)]  # a scale every third, the final one too

    def velocity_from_modulations(self, x: torch.Tensor, mods: Sequence[torch.Tensor]) -> torch.Tensor:
        """:meth:`velocity` with the modulations precomputed (``mods`` as :meth:`modulations` returns them): each
        modulation and residual in one fused multiply-add (``addcmul``), the same values to float rounding."""
        h = self.input_proj(x)
        for k, block in enumerate(self.res_blocks):
            shift, scale1, gate = mods[3 * k:3 * k + 3]
            h = torch.addcmul(h, gate, block.mlp(torch.addcmul(shift, block.in_ln(h), scale1)))
        final = self.final_layer
        return final.linear(torch.addcmul(mods[-2], final.norm_final(h), mods[-1]))

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Xavier linears, small time MLP, zeroed modulations and output (DiT/MAR initialisation)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, generator=generator)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02, generator=generator)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02, generator=generator)
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(p)


class FlowHead(nn.Module):
    """Holds the velocity network (``net``, the official key prefix) and the flow-matching loss per row."""

    def __init__(self, token_dim: int, cond_dim: int, cfg: FlowHeadConfig):
        super().__init__()
        self.token_dim = token_dim
        self.net = VelocityNet(token_dim, cond_dim, cfg)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, c)

    def draw(self, rows: int, generator: torch.Generator | None = None, device=None, dtype=torch.float32
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss's randomness for ``rows`` rows, in the reference's order: noise (rows, token_dim), then u
        (rows,)."""
        return randn((rows, self.token_dim), generator, device, dtype), randn((rows,), generator, device)

    def row_losses(self, target: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor, u: torch.Tensor,
                   velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Rectified-flow loss per row. target, noise (N, token_dim); cond (N, cond_dim); u (N,) standard normal.

        t = sigmoid(u) (logit-normal), x_t = t x + (1 - t) noise; returns (N,) mean squared velocity errors against
        the data's velocity target - noise, or against ``velocity(x_t, t)`` (N, token_dim) where given (a reference
        model's prediction: self-distillation)."""
        t = (1 / (1 + torch.exp(-u))).to(target)
        tt = t[:, None]
        x_t = tt * target + (1 - tt) * noise
        goal = target - noise if velocity is None else velocity(x_t, t)
        err = (self.net(x_t, t, cond).float() - goal.float()) ** 2
        return err.mean(dim=1)
