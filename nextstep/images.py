"""Image conversions shared by generation, training and evaluation: files/PIL/tensors <-> [-1, 1] tensors."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .errors import InputError, MissingFileError
from .files import atomic_paths

ImageInput = Image.Image | str | os.PathLike | torch.Tensor
# Largest input image accepted, checked from the file header before anything is decoded (PIL's own bomb guard
# only warns below twice its limit): 8192 x 8192. The pipeline then resizes to the output size before encoding.
MAX_INPUT_PIXELS = 8192 * 8192


def _check_pixels(w: int, h: int, what: str) -> None:
    if w * h > MAX_INPUT_PIXELS:
        raise InputError(f"{what} is {w}x{h} = {w * h / 1e6:.0f} megapixels; the limit is "
                         f"{MAX_INPUT_PIXELS / 1e6:.0f} (8192x8192): downscale it first")


def _open(path: Path, what: str) -> Image.Image:
    """The image file ``path``, loaded: missing, too large (read from its header, before decoding) or unreadable is a
    clear error naming it as ``what``."""
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}")
    try:
        with Image.open(path) as im:
            _check_pixels(*im.size, f"{what} {path}")  # from the header: nothing decoded yet
            im.load()
            return im
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read {what} {path}: {e}") from None


def load_image(image: ImageInput) -> torch.Tensor:
    """A PIL image, a path, or a float tensor (3, H, W) / (1, 3, H, W) in [0, 1] -> (3, H, W) in [-1, 1]."""
    if isinstance(image, torch.Tensor):
        t = image[0] if image.dim() == 4 and image.shape[0] == 1 else image
        if t.dim() != 3 or t.shape[0] != 3:
            raise InputError(f"image tensors must be (3, H, W) in [0, 1], got shape {tuple(image.shape)}")
        _check_pixels(t.shape[2], t.shape[1], "the input image")
        return (t.float() - 0.5) / 0.5
    if isinstance(image, (str, os.PathLike)):
        image = _open(Path(image), "input image")
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, a path or a tensor, got {type(image).__name__}")
    _check_pixels(*image.size, "the input image")
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0
    return (t - 0.5) / 0.5


def _cover(h: int, w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The resize rule of inputs: (nh, nw, top, left) to resize an h x w picture to nh x nw, which covers
    height x width keeping the aspect ratio, then crop height x width from (top, left): the center."""
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    return nh, nw, (nh - height) // 2, (nw - width) // 2


def fit_image(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(3, H, W) -> (3, height, width): unchanged when the size matches; otherwise resized (bicubic, antialiased)
    to cover the target, keeping the aspect ratio, then center-cropped."""
    _, h, w = x.shape
    if (h, w) == (height, width):
        return x
    nh, nw, top, left = _cover(h, w, height, width)
    x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
    return x[:, top:top + height, left:left + width].clamp(-1, 1)


def load_mask(mask: ImageInput) -> torch.Tensor:
    """An edit mask in OpenAI's convention -> (H, W) bool, True where to edit: the pixels whose alpha is 0 (fully
    transparent). A PIL image or a path must carry alpha (an RGBA / LA PNG, or a palette with transparency); a
    tensor is the alpha channel itself, (H, W) or (1, H, W), or an RGBA image (4, H, W) / (1, 4, H, W), floats in
    [0, 1]. A mask with no alpha, or with no fully transparent pixel (nothing to edit), is an InputError."""
    if isinstance(mask, torch.Tensor):
        alpha, what = _tensor_alpha(mask), "the mask tensor"
    else:
        alpha, what = _image_alpha(mask)
    edit = alpha == 0
    if not edit.any():
        raise InputError(f"{what} has no fully transparent pixel (alpha 0), so nothing would be edited: make the "
                         f"area to edit fully transparent and leave the rest opaque")
    return edit


def _tensor_alpha(mask: torch.Tensor) -> torch.Tensor:
    t = mask[0] if mask.dim() == 4 and mask.shape[0] == 1 else mask
    if t.dim() == 3 and t.shape[0] in (1, 4):
        t = t[-1]  # the alpha channel of (1, H, W) or RGBA (4, H, W)
    if t.dim() != 2:
        raise InputError(f"a mask tensor is an alpha channel (H, W) or (1, H, W), or an RGBA image (4, H, W) or "
                         f"(1, 4, H, W), with alpha 0 where to edit; got shape {tuple(mask.shape)}")
    if not t.is_floating_point():
        raise InputError(f"a mask tensor holds floats in [0, 1] (alpha: 0 where to edit), got dtype {mask.dtype}")
    _check_pixels(t.shape[1], t.shape[0], "the mask tensor")
    if not bool(((t >= 0) & (t <= 1)).all()):
        raise InputError(f"mask tensor values must be in [0, 1] (alpha; 0 where to edit), got "
                         f"[{float(t.min()):g}, {float(t.max()):g}]")
    return t.cpu()


def _image_alpha(mask: Image.Image | str | os.PathLike) -> tuple[torch.Tensor, str]:
    """(H, W) uint8 alpha of a PIL image or an image file, and how to name it in errors."""
    if isinstance(mask, (str, os.PathLike)):
        what = f"mask image {mask}"
        return _image_alpha_of(_open(Path(mask), "mask image"), what), what
    if not isinstance(mask, Image.Image):
        raise TypeError(f"mask must be a PIL image, a path or a tensor, got {type(mask).__name__}")
    return _image_alpha_of(mask, "the mask image"), "the mask image"


def _image_alpha_of(im: Image.Image, what: str) -> torch.Tensor:
    _check_pixels(*im.size, what)
    if not im.has_transparency_data:
        raise InputError(f"{what} has no alpha channel (mode {im.mode}): masks follow OpenAI's convention, fully "
                         f"transparent pixels (alpha 0) mark where to edit; save it as a PNG with alpha (RGBA)")
    alpha = np.asarray(im.convert("RGBA").getchannel("A"), dtype=np.uint8)
    return torch.from_numpy(alpha.copy())


def fit_mask(edit: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(H, W) bool edit mask -> (height, width) bool, by the resize rule of :func:`fit_image` (so it stays aligned with
    the input image): unchanged when the size matches; otherwise resized (bilinear) and center-cropped, a pixel in the
    mask wherever a masked pixel contributes to it, so resampling never shrinks the area to edit."""
    h, w = edit.shape
    if (h, w) == (height, width):
        return edit
    nh, nw, top, left = _cover(h, w, height, width)
    x = F.interpolate(edit[None, None].float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    return x[0, 0, top:top + height, left:left + width] > 0


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """Decoder output (~[-1, 1]) -> [0, 1]."""
    return (pixels / 2 + 0.5).clamp(0, 1)


def to_pil(images01: torch.Tensor) -> list[Image.Image]:
    arr = (images01.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def grid_image(images: list[Image.Image]) -> Image.Image:
    """Images of one size pasted on a near-square sheet, row by row."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * w, (i // cols) * h))
    return sheet


def save_png(image: Image.Image, path: Path) -> None:
    """Write atomically (no partial file on failure; permissions from the umask)."""
    save_pngs([image], [path])


def save_pngs(images: list[Image.Image], paths: list[Path]) -> None:
    """Write several PNGs: all of them or, if any write fails, none."""
    with atomic_paths([Path(p) for p in paths]) as temps:
        for image, tmp in zip(images, temps):
            image.save(tmp, format="PNG")
