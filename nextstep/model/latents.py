"""The latent grid layout: patchify/unpatchify between VAE latents and image tokens, and 2-D position tables.

An image of H x W pixels is encoded by an f8 VAE into latents [C, H/8, W/8]; each p x p patch of latents is one
token of ``C * p * p`` values, flattened in (c, pi, pj) order, and tokens follow raster order over the
(H/8/p) x (W/8/p) token grid. This module is the only place that knows that layout.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F


def token_grid(latent_hw: tuple[int, int], patch: int) -> tuple[int, int]:
    """Token grid (rows, cols) of a latent of size ``latent_hw``; raises if it is not divisible by ``patch``."""
    h, w = latent_hw
    if h % patch or w % patch:
        raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {patch}")
    return h // patch, w // patch


def patchify(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, (h/p)*(w/p), C*p*p) tokens in raster order, values ordered (c, pi, pj)."""
    b, c, h, w = latents.shape
    gh, gw = token_grid((h, w), patch)
    x = latents.reshape(b, c, gh, patch, gw, patch)
    x = torch.einsum("bchpwq->bhwcpq", x)  # (B, gh, gw, C, p, p)
    return x.reshape(b, gh * gw, c * patch * patch)


def unpatchify(tokens: torch.Tensor, grid_hw: tuple[int, int], patch: int) -> torch.Tensor:
    """(B, gh*gw, C*p*p) tokens -> (B, C, gh*p, gw*p) latents; the inverse of :func:`patchify`."""
    b, n, d = tokens.shape
    gh, gw = grid_hw
    if gh * gw != n:
        raise ValueError(f"{n} tokens do not fill a {gh}x{gw} grid")
    if d % (patch * patch):
        raise ValueError(f"token size {d} is not divisible by patch*patch={patch * patch}")
    c = d // (patch * patch)
    x = tokens.reshape(b, gh, gw, c, patch, patch)
    x = torch.einsum("bhwcpq->bchpwq", x)  # (B, C, gh, p, gw, p)
    return x.reshape(b, c, gh * patch, gw * patch)


def token_mask(pixels: torch.Tensor, grid_hw: tuple[int, int], margin: int = 0) -> torch.Tensor:
    """(B, H, W) bool pixel mask -> (B, gh*gw) bool in raster order: True for each token of which any pixel is in
    the mask (a token covers (H/gh) x (W/gw) pixels, 16 x 16 for an f8 VAE with 2x2 patches), and for every token
    within ``margin`` tokens of one (Chebyshev distance: the 8 neighbours for 1)."""
    b, h, w = pixels.shape
    gh, gw = grid_hw
    if h % gh or w % gw:
        raise ValueError(f"a {h}x{w} pixel mask does not split into a {gh}x{gw} token grid")
    touched = pixels.reshape(b, gh, h // gh, gw, w // gw).any(dim=4).any(dim=2)  # (B, gh, gw)
    if margin:
        touched = F.max_pool2d(touched[:, None].float(), 2 * margin + 1, stride=1, padding=margin)[:, 0] > 0
    return touched.reshape(b, gh * gw)


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) float64 positions -> (M, dim) = [sin | cos] with MAE frequencies 1 / 10000^(i / (dim/2))."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1, 1).to(torch.float64) * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


@lru_cache(maxsize=64)
def sincos_2d_table(dim: int, rows: int, cols: int) -> torch.Tensor:
    """(rows*cols, dim) float32 MAE-style 2-D table in raster order for an actual ``rows`` x ``cols`` grid.

    The first half of the channels encodes the column, the second half the row (as in the reference, whose
    ``meshgrid(w, h)`` puts w first). For rows == cols == G it equals the reference's G x G table.
    Cached per grid (sampling asks for it at every image token): treat the result as read-only.
    """
    if dim % 4:
        raise ValueError(f"position table needs a hidden size divisible by 4, got {dim}")
    r = torch.arange(rows, dtype=torch.float64).repeat_interleave(cols)  # row of each raster index
    c = torch.arange(cols, dtype=torch.float64).repeat(rows)  # column of each raster index
    return torch.cat([_sincos_1d(dim // 2, c), _sincos_1d(dim // 2, r)], dim=1).float()
