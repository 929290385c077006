"""Helpers shared by the test modules: seeded generators, differences, PSNR, and teacher-forced parity runs."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

# Parity with the official code, per token and per component. The official code agrees with itself to about 2e-6
# (cached against uncached decoding); kernels of other instruction sets (AVX2, AVX-512, none) differ from each other
# by a few 1e-6 on one token. A teacher-forced token (its context the reference's own tokens) sees only that: measured
# at most 7e-6 under ATEN_CPU_CAPABILITY=avx512, avx2 and default (`python scripts/parity_report.py`, docs/numerics.md).
TOKEN_TOL = 3e-5
# Free-running runs compound those differences (the random fixture models roughly double a difference per token: a
# 3e-6 first token grows to 1e-3 by the 16th under ATEN_CPU_CAPABILITY=default), so whole runs are compared as
# pictures, as the official fixtures prescribe: PSNR >= 30 dB, where a wrong schedule, guidance formula, prompt
# layout or noise order lands near 10-15 dB.
MIN_PSNR = 30.0


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def psnr01(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two decoder outputs in [-1, 1], compared as [0, 1] pixels."""
    a, b = (a.float() / 2 + 0.5).clamp(0, 1), (b.float() / 2 + 0.5).clamp(0, 1)
    return 10 * math.log10(1 / max(((a - b) ** 2).mean().item(), 1e-20))


@contextmanager
def teacher_forced(monkeypatch, reference_tokens: torch.Tensor):
    """Inside the block every token the pipeline's full head samples is recorded, and the reference's token at that
    position is fed back in its place: each sampled token then depends on the reference's context only, so float
    differences do not compound from token to token. Yields the list of sampled tokens, one (rows, token_dim) tensor
    per position; ``reference_tokens`` is (rows, total, token_dim)."""
    from nextstep import pipeline
    from nextstep.sampling.token import TokenSampler

    sampled: list[torch.Tensor] = []

    class Forced(TokenSampler):
        def __call__(self, cond, scales, noise):
            x = super().__call__(cond, scales, noise)
            sampled.append(x.clone())
            return reference_tokens[:, len(sampled) - 1].to(x)

    with monkeypatch.context() as m:
        m.setattr(pipeline, "TokenSampler", Forced)
        yield sampled


def forced_diffs(sampled: list[torch.Tensor], reference_tokens: torch.Tensor) -> list[float]:
    """The largest difference at each token position between teacher-forced samples and the reference."""
    assert len(sampled) == reference_tokens.shape[1], (len(sampled), reference_tokens.shape)
    return [maxdiff(x, reference_tokens[:, k]) for k, x in enumerate(sampled)]
