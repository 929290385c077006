"""Image metrics: PSNR (any value range; the one PSNR of the package) and SSIM on images in [0, 1] (Gaussian
window, as in Wang et al. 2004)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    """(B, ...) images with values in [0, peak] -> (B,) PSNR in dB over all values of each image: inf for identical
    images, nan for images with no values. Computed in the inputs' floating dtype, at least float32 (pass uint8
    pixels as float64 to keep their squared errors exact). To compare only some pixels, select them first."""
    dtype = torch.promote_types(torch.result_type(a, b), torch.float32)
    mse = (a.to(dtype) - b.to(dtype)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(peak**2 / mse)


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-x**2 / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] -> (B,) mean SSIM over channels and valid window positions."""
    c = a.shape[1]
    win = min(window, a.shape[-1], a.shape[-2])
    g = _gaussian(win, sigma * win / window).to(a.device)
    k = (g[:, None] * g[None, :]).expand(c, 1, win, win)
    a, b = a.float(), b.float()

    def blur(x):
        return F.conv2d(x, k, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def mean_finite(values: torch.Tensor) -> float:
    v = values[torch.isfinite(values)]
    return float(v.mean()) if v.numel() else math.inf
