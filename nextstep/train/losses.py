"""Extra losses for tokenizer training: a VGG16 perceptual distance (weights supplied by the user, never
downloaded) and a PatchGAN discriminator with the hinge loss."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MissingFileError

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_TAPS = (3, 8, 15, 22, 29)  # after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (torchvision indices)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGPerceptual(nn.Module):
    """Mean squared distance of channel-normalised VGG16 features (LPIPS without learned weights).

    ``weights``: a file holding torchvision's ``vgg16().features`` state dict (keys ``N.weight`` or
    ``features.N.weight``), as ``.pth`` (weights only) or ``.safetensors``."""

    def __init__(self, weights: str | Path):
        super().__init__()
        layers: list[nn.Module] = []
        ch = 3
        for v in VGG16_LAYOUT:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(ch, v, 3, padding=1), nn.ReLU()]
                ch = v
        self.features = nn.Sequential(*layers)
        self.features.load_state_dict(_read_vgg(Path(weights)))
        self.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y (B, 3, H, W) in [-1, 1] -> scalar distance."""
        h = torch.cat([x, y]).add(1).div(2).sub(self.mean).div(self.std)
        total = h.new_zeros(())
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in VGG16_TAPS:
                fx, fy = F.normalize(h, dim=1).chunk(2)
                total = total + (fx - fy).pow(2).sum(1).mean()
            if i == VGG16_TAPS[-1]:
                break
        return total


def _read_vgg(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise MissingFileError(f"perceptual loss weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("features."): v for k, v in sd.items() if not k.startswith("classifier.")}


class PatchDiscriminator(nn.Module):
    """A small PatchGAN: (B, 3, H, W) in [-1, 1] -> (B, 1, H/8, W/8) real/fake logits."""

    def __init__(self, ch: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = ch
        for _ in range(layers - 1):
            mods += [nn.Conv2d(c, c * 2, 4, 2, 1), nn.GroupNorm(32, c * 2), nn.LeakyReLU(0.2)]
            c *= 2
        mods.append(nn.Conv2d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()
