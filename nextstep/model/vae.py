"""The image tokenizer: a Flux-style convolutional VAE with 8x downsampling and 16 latent channels.

Images are float tensors in [-1, 1] of shape (B, 3, H, W). The encoder turns them into a diagonal Gaussian over
latents of shape (B, z_channels, H / f, W / f) with f = ``config.downsample``; the posterior mean is normalised
token-wise (a parameter-free layer norm over each ``norm_patch`` x ``norm_patch`` patch of latents). The decoder
maps latents back to images of roughly [-1, 1] (no clamp).

Parameter names follow the official checkpoint (``encoder.down.{i}.block.{j}.conv1``, ``decoder.up.{i}.upsample``,
``*.mid.attn_1.q``, ...) so an official ``checkpoint.pt`` loads without renaming.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nextstep.checkpoint import (
    assign_state_dict,
    iter_safetensors,
    load_torch_state_dict,
    read_json,
    require_dir,
    require_file,
    safetensors_files,
    save_safetensors,
    write_json,
)
from nextstep.config import VAEConfig

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


# ---- building blocks --------------------------------------------------------------------------------------------

def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), elementwise. Without autograd (inference) ``x`` is overwritten by ``F.silu`` (the same to float
    rounding): every caller passes a fresh intermediate, and a large image's decode then allocates (and, for tensors
    past the allocator's mmap threshold, page-faults) one tensor fewer per activation (``benchmarks/vae_decode.py``)."""
    return x * torch.sigmoid(x) if torch.is_grad_enabled() else F.silu(x, inplace=True)


def _residual(skip: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """skip + h, written into ``h`` (a fresh intermediate) without autograd: the same bits, one allocation fewer."""
    return skip + h if torch.is_grad_enabled() else h.add_(skip)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Two 3x3 convolutions, each after GroupNorm + swish, added to a (1x1-projected if needed) skip."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, H, W) -> (B, C_out, H, W)
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return _residual(x if self.nin_shortcut is None else self.nin_shortcut(x), h)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, channels as the feature dimension, residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    @staticmethod
    def _to_sequence(t: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, 1, H*W, C)
        b, c, h, w = t.shape
        return t.reshape(b, 1, c, h * w).transpose(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) -> (B, C, H, W)
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (self._to_sequence(proj(n)) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)  # x first: the sum keeps its layout (for one image the product is NCHW)


class Downsample(nn.Module):
    """Halve H and W: zero-pad one pixel on the right and bottom, then a 3x3 convolution with stride 2."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour 2x, then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock, attention, ResnetBlock at the lowest resolution (channels unchanged)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C, h, w) -> (B, C, h, w)
        return self.block_2(self.attn_1(self.block_1(x)))


def _res_chain(in_channels: int, out_channels: int, num_blocks: int) -> nn.ModuleList:
    chans = [in_channels] + [out_channels] * num_blocks
    return nn.ModuleList(ResnetBlock(a, b) for a, b in zip(chans[:-1], chans[1:]))


class DownLevel(nn.Module):
    """One encoder resolution level: ResnetBlocks (``block``), then a ``downsample`` unless it is the last level."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, downsample: bool) -> None:
        super().__init__()
        self.block = _res_chain(in_channels, out_channels, num_blocks)
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C_in, H, W) -> (B, C_out, H/2, W/2), or (B, C_out, H, W) at the last level
        for blk in self.block:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    """One decoder resolution level: ResnetBlocks (``block``), then an ``upsample`` unless it is level 0."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, upsample: bool) -> None:
        super().__init__()
        self.block = _res_chain(in_channels, out_channels, num_blocks)
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, C_in, H, W) -> (B, C_out, 2H, 2W), or (B, C_out, H, W) at level 0
        for blk in self.block:
            x = blk(x)
        return x if self.upsample is None else self.upsample(x)


# ---- encoder / decoder ------------------------------------------------------------------------------------------

class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2 * z_channels, H/f, W/f): mean channels, then log-variance."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        ch, mult = config.ch, config.ch_mult
        in_mult = (1,) + mult
        self.conv_in = nn.Conv2d(config.in_channels, ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        for i, m in enumerate(mult):
            self.down.append(DownLevel(ch * in_mult[i], ch * m, config.num_res_blocks, i < len(mult) - 1))
        top = ch * mult[-1]
        self.mid = MidBlock(top)
        self.norm_out = _group_norm(top)
        self.conv_out = nn.Conv2d(top, 2 * config.z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, in_channels, H, W) -> (B, 2z, H/f, W/f)
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f). ``up[i]`` works at level i (0 = full size)."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        ch, mult = config.ch, config.ch_mult
        top = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, top, kernel_size=3, padding=1)
        self.mid = MidBlock(top)
        levels: list[UpLevel] = []
        block_in = top
        for i in reversed(range(len(mult))):
            levels.append(UpLevel(block_in, ch * mult[i], config.num_res_blocks + 1, i > 0))
            block_in = ch * mult[i]
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = _group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: (B, z_channels, h, w) -> (B, out_ch, h*f, w*f)
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(swish(self.norm_out(h)))


# ---- posterior --------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Posterior:
    """Diagonal Gaussian over latents. ``mean`` and ``logvar``: (B, z_channels, h, w); logvar clamped to [-30, 20].

    With ``deterministic`` the standard deviation is zero, so ``sample`` returns the mean, but it still draws the
    noise (as the reference does), so a generator passed in advances exactly as in the stochastic case.
    """

    mean: torch.Tensor
    logvar: torch.Tensor
    deterministic: bool = False

    def __post_init__(self) -> None:
        self.logvar = self.logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    @property
    def std(self) -> torch.Tensor:
        """(B, z, h, w): exp(logvar / 2), or zeros when deterministic."""
        if self.deterministic:
            return torch.zeros_like(self.mean)
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        """(B, z, h, w): the mean."""
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, z, h, w): mean + std * N(0, 1); the noise is drawn even when deterministic."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise


# ---- the autoencoder --------------------------------------------------------------------------------------------

class VAE(nn.Module):
    """Encoder + decoder + latent normalisation, loadable from the official ``checkpoint.pt`` layout."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    # -- shapes and checks --
    def _param_dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def _check_image(self, x: torch.Tensor, multiple: int, why: str) -> None:
        c = self.config
        if x.dim() != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"VAE expects images of shape (B, {c.in_channels}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % multiple or w % multiple:
            fix = f"{max(h // multiple, 1) * multiple}x{max(w // multiple, 1) * multiple}"
            raise ValueError(f"VAE image size {h}x{w} is not a multiple of {multiple} ({why}); "
                             f"resize or crop it, e.g. to {fix}")

    # -- encoding --
    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Raw encoder output. x: (B, 3, H, W) in [-1, 1] -> (B, 2z, H/f, W/f) = [mean | logvar], not normalised."""
        self._check_image(x, self.config.downsample, "the VAE downsampling factor")
        return self.encoder(x.to(self._param_dtype()))

    def normalize(self, mean: torch.Tensor) -> torch.Tensor:
        """Token-wise latent normalisation of (B, z, h, w) latents; same shape out, each patch ~ zero mean, unit var.

        With ``norm == "layer_norm"`` every ``p x p`` patch (p = ``norm_patch``, the z*p*p values in (c, p, q)
        order) gets a parameter-free layer norm with eps ``norm_eps``; with ``norm == "none"`` it is the identity.
        """
        c = self.config
        if c.norm == "none":
            return mean
        p = c.norm_patch
        b, z, h, w = mean.shape
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not divisible by the normalisation patch {p}")
        t = mean.reshape(b, z, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h/p, w/p, z, p, p)
        t = F.layer_norm(t.reshape(b, h // p, w // p, z * p * p), (z * p * p,), eps=c.norm_eps)
        t = t.reshape(b, h // p, w // p, z, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, z, h/p, p, w/p, p)
        return t.reshape(b, z, h, w)

    def encode(self, x: torch.Tensor) -> Posterior:
        """x: (B, 3, H, W) in [-1, 1] -> Posterior with normalised mean and raw (clamped) logvar, (B, z, H/f, W/f)."""
        c = self.config
        self._check_image(x, c.downsample, "the VAE downsampling factor")
        if c.norm == "layer_norm":
            self._check_image(x, c.downsample * c.norm_patch,
                              f"downsampling {c.downsample} x latent normalisation patch {c.norm_patch}")
        moments = self.encode_moments(x)  # (B, 2z, h, w)
        mean, logvar = moments.chunk(2, dim=1)
        return Posterior(self.normalize(mean), logvar, deterministic=self.config.deterministic)

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> model space: (z - shift_factor) * scaling_factor (any shape)."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        """Model space -> latent: z / scaling_factor + shift_factor (any shape); inverse of ``scale``."""
        return z / self.config.scaling_factor + self.config.shift_factor

    # -- decoding --
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, z_channels, h, w) unscaled latents -> (B, out_ch, h*f, w*f), roughly [-1, 1], not clamped."""
        c = self.config
        if z.dim() != 4 or z.shape[1] != c.z_channels:
            raise ValueError(f"VAE.decode expects latents of shape (B, {c.z_channels}, h, w), got {tuple(z.shape)}")
        return self.decoder(z.to(self._param_dtype()))

    # -- training --
    def perturb(self, z: torch.Tensor, gamma: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise perturbation: z + s * N(0, 1) with s ~ U(0, gamma) drawn once per sample. z: (B, ...) -> same.

        ``gamma == 0`` returns ``z`` itself and draws nothing.
        """
        if gamma < 0:
            raise ValueError(f"perturbation strength gamma must be >= 0, got {gamma}")
        if gamma == 0:
            return z
        shape = (z.shape[0],) + (1,) * (z.dim() - 1)  # (B, 1, 1, 1)
        s = gamma * torch.rand(shape, generator=generator, device=z.device, dtype=z.dtype)
        noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        return z + s * noise

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, gamma: float = 0.0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, Posterior]:
        """x: (B, 3, H, W) in [-1, 1] -> (reconstruction (B, out_ch, H, W), posterior). Used for training."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        z = self.perturb(z, gamma, generator)
        return self.decode(z), posterior

    # -- files --
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu", format: str = "v1") -> VAE:
        """Load a VAE directory: ``config.json`` (official schema) + ``model.safetensors`` (ours) or
        ``checkpoint.pt`` (official). Returns the model in eval mode on ``device`` (cast to ``dtype`` if given).
        ``format``: the release whose default applies to a config without normalisation keys (see
        ``official.vae_from_official``)."""
        root = require_dir(path, "VAE")
        config = VAEConfig.from_official(read_json(root / "config.json", "VAE config.json"), format)
        with torch.device("meta"):
            model = cls(config)
        if (root / "model.safetensors").is_file() or (root / "model.safetensors.index.json").is_file():
            files = safetensors_files(root)
            tensors = iter_safetensors(files)
            source = ", ".join(str(f) for f in files)
        else:
            ckpt = require_file(root / "checkpoint.pt", "VAE weights (checkpoint.pt or model.safetensors)")
            tensors, source = load_torch_state_dict(ckpt), str(ckpt)
        assign_state_dict(model, tensors, source=source, dtype=dtype, device=device)
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` (official schema) and ``model.safetensors`` into the directory ``path``."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        save_safetensors(self.state_dict(), root / "model.safetensors", metadata={"format": "pt"})
        write_json(self.config.to_official(), root / "config.json")
