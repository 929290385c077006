"""Prompt(s) to pixels: text-to-image and image editing with NextStep.

Reading order of ``NextStepPipeline.__call__``:
    1. check the request; 2. lay out the guidance branches and build their token ids (``prompt.py``);
    3. encode input images with the VAE (editing); 4. prefill the backbone into a preallocated KV cache;
    5. for each image token in raster order: condition the flow head on the last hidden state, integrate its
       velocity (``sampling.flow``) under guidance (``sampling.guidance``), feed the token back for one step;
    6. unpatchify the tokens and decode them with the VAE.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .checkpoint import require_dir
from .config import SamplingConfig
from .images import ImageInput, fit_image, load_image, to_pil, to_unit
from .model.latents import unpatchify
from .model.nextstep import NextStep
from .model.vae import VAE
from .prompt import caption_ids, generation_suffix_ids, left_pad
from .sampling.flow import SAMPLERS, integrate
from .sampling.guidance import SCHEDULES, Guidance
from .tokenizer import Tokenizer

OUTPUT_TYPES = ("pil", "pt", "np")
TOKEN_NORM_EPS = 1e-6


@dataclass
class PipelineOutput:
    images: list[Image.Image] | torch.Tensor | np.ndarray
    tokens: torch.Tensor  # (B, h*w, token_dim) sampled image tokens, B = prompts x images per prompt
    grid: tuple[int, int]  # token grid (rows, cols)
    thoughts: list[str] | None = None  # self-CoT text per prompt (think=True)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: encode, prefill, backbone, head, decode


def bundled_model_dir() -> Path | None:
    """The small model shipped inside the package, when there is one."""
    d = Path(__file__).parent / "assets" / "model"
    return d if (d / "config.json").is_file() else None


class Stopwatch:
    """Accumulates wall time per named phase (synchronising CUDA so GPU work is charged to its phase)."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)

    def __call__(self, name: str):
        return _Phase(self, name)


class _Phase:
    def __init__(self, watch: Stopwatch, name: str):
        self.watch, self.name = watch, name

    def __enter__(self):
        _sync()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        _sync()
        self.watch.totals[self.name] += time.perf_counter() - self.t0


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class NoiseSource:
    """Gaussian noise for n images per prompt. One generator draws for the whole batch at once (independent noise
    for every image); a list gives each prompt its own generator, so a prompt's images do not depend on what else
    is in the batch. A single prompt with one generator draws exactly as the reference's seeded global RNG."""

    def __init__(self, generator: torch.Generator | Sequence[torch.Generator] | None, prompts: int, per_prompt: int,
                 dim: int, device: torch.device):
        if isinstance(generator, Sequence):
            if len(generator) != prompts:
                raise ValueError(f"got {len(generator)} generators for {prompts} prompts")
        self.generator, self.prompts, self.per_prompt, self.dim, self.device = generator, prompts, per_prompt, dim, device

    def __call__(self) -> torch.Tensor:
        if isinstance(self.generator, Sequence):
            return torch.cat([self._draw(self.per_prompt, g) for g in self.generator])
        return self._draw(self.prompts * self.per_prompt, self.generator)

    def _draw(self, n: int, g: torch.Generator | None) -> torch.Tensor:
        gen_device = g.device if g is not None else torch.device("cpu")
        return torch.randn(n, self.dim, generator=g, device=gen_device).to(self.device)


class NextStepPipeline:
    def __init__(self, model: NextStep, vae: VAE, tokenizer: Tokenizer, defaults: SamplingConfig | None = None):
        self.defaults = defaults or SamplingConfig()  # what a call uses for the settings it leaves at None
        self.model = model.eval()
        self.vae = vae.eval()
        self.tokenizer = tokenizer
        s, c = tokenizer.special, model.config
        if (s.boi, s.eoi, s.placeholder) != (c.boi_id, c.eoi_id, c.image_placeholder_id):
            raise ValueError(f"tokenizer special ids (boi {s.boi}, eoi {s.eoi}, placeholder {s.placeholder}) differ "
                             f"from the model config ({c.boi_id}, {c.eoi_id}, {c.image_placeholder_id})")
        if vae.config.z_channels != c.latent_channels:
            raise ValueError(f"VAE has {vae.config.z_channels} latent channels, the model expects {c.latent_channels}")

    # ---- loading --------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike | None = None, vae_dir: str | os.PathLike | None = None,
                        *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> "NextStepPipeline":
        """``model_dir`` holds config.json, weights and tokenizer.json (default: the bundled model). The VAE comes
        from ``vae_dir``, else the model's ``vae/`` subdirectory."""
        if model_dir is None:
            model_dir = bundled_model_dir()
            if model_dir is None:
                raise FileNotFoundError("no bundled model in this installation: pass a model directory "
                                        "(e.g. NextStep-1-Large) and its VAE (e.g. NextStep-1-f8ch16-Tokenizer)")
        model_dir = require_dir(model_dir, "model")
        if vae_dir is None:
            vae_dir = model_dir / "vae"
            if not vae_dir.is_dir():
                raise FileNotFoundError(f"{model_dir} has no vae/ subdirectory: pass the VAE directory explicitly")
        model = NextStep.from_pretrained(model_dir, dtype=dtype, device=device)
        vae = VAE.from_pretrained(vae_dir, dtype=dtype, device=device)
        return cls(model, vae, Tokenizer.from_pretrained(model_dir), SamplingConfig.from_model_dir(model_dir))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "NextStepPipeline":
        self.model.to(device=device, dtype=dtype)
        self.vae.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def size_multiple(self) -> int:
        """Pixels per image token along a side (16 for an f8 VAE with 2x2 patches)."""
        return self.vae.config.downsample * self.model.config.patch_size

    # ---- the call -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | None = None,
        image: ImageInput | list[ImageInput] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        image_guidance_scale: float | None = None,
        guidance_schedule: str | None = None,
        num_inference_steps: int | None = None,
        time_shift: float | None = None,
        token_norm: bool | None = None,
        sampler: str | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        progress: bool = True,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        positive_prompt: str | None = None,
        think: bool = False,
        max_think_tokens: int = 64,
    ) -> PipelineOutput:
        d, edit = self.defaults, image is not None  # settings left at None take the model's defaults
        if guidance_scale is None:
            guidance_scale = d.edit_guidance_scale if edit else d.guidance_scale
        if image_guidance_scale is None:
            image_guidance_scale = d.edit_image_guidance_scale if edit else d.image_guidance_scale
        if time_shift is None:
            time_shift = d.edit_time_shift if edit else d.time_shift
        if negative_prompt is None and edit:
            negative_prompt = d.edit_negative_prompt
        guidance_schedule = guidance_schedule or d.guidance_schedule
        num_inference_steps = d.num_inference_steps if num_inference_steps is None else num_inference_steps
        token_norm = d.token_norm if token_norm is None else token_norm
        sampler = sampler or d.sampler
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        images = self._check(prompts, image, num_images_per_prompt, num_inference_steps, sampler, output_type,
                             guidance_schedule, time_shift)
        height, width = self._size(height, width, images)
        grid = (height // self.size_multiple, width // self.size_multiple)
        guidance = Guidance(guidance_scale, image_guidance_scale, has_image=images is not None,
                            schedule=guidance_schedule)
        source = [fit_image(x, height, width) for x in images] if images is not None else None

        clock = Stopwatch()
        thoughts = None
        captions = [p if not positive_prompt else f"{p} {positive_prompt}" for p in prompts]
        cond_ids = [caption_ids(self.tokenizer, c, [grid] if source is not None else []) for c in captions]
        if think:
            cond_ids, thoughts = self._think(cond_ids, source, max_think_tokens, generator)
        rows = self._rows(cond_ids, negative_prompt or "", grid, guidance, num_images_per_prompt)
        with clock("encode"):
            latents = self._encode(source, guidance, num_images_per_prompt) if source is not None else None
        tokens = self._generate(rows, latents, grid, guidance, len(prompts), num_images_per_prompt,
                                num_inference_steps, time_shift, token_norm, sampler, generator, progress, callback,
                                clock)
        with clock("decode"):
            pixels = to_unit(self.decode(tokens, grid))
        return PipelineOutput(images=self._format(pixels, output_type), tokens=tokens, grid=grid, thoughts=thoughts,
                              timings=dict(clock.totals))

    # ---- steps ----------------------------------------------------------------------------------------------------
    def _check(self, prompts, image, n, steps, sampler, output_type, schedule, shift):
        if not prompts:
            raise ValueError("prompt list is empty")
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {n!r}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
        if sampler == "sde" and steps < 2:
            raise ValueError("the 'sde' sampler needs num_inference_steps >= 2")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"guidance_schedule must be one of {SCHEDULES}, got {schedule!r}")
        if not shift > 0:
            raise ValueError(f"time_shift must be > 0, got {shift!r}")
        if image is None:
            return None
        images = [image] if not isinstance(image, list) else image
        if len(images) == 1 and len(prompts) > 1:
            images = images * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} input images for {len(prompts)} prompts (give one, or one per prompt)")
        return [load_image(x) for x in images]

    def _size(self, height, width, images) -> tuple[int, int]:
        m = self.size_multiple
        if height is None and width is None and images is not None:
            height, width = images[0].shape[-2:]
            if height % m or width % m:
                raise ValueError(f"input image is {width}x{height}, not a multiple of {m}: pass height and width "
                                 f"(it is then resized to cover them and center-cropped)")
        default = m * self.model.config.base_image_grid_size  # the model's native size (512 for NextStep-1)
        height = default if height is None else height
        width = default if width is None else width
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % m:
                raise ValueError(f"{name} must be a positive multiple of {m}, got {v!r}")
        return height, width

    def _rows(self, cond_ids: list[list[int]], negative: str, grid, guidance: Guidance, n: int) -> list[list[int]]:
        """Token ids of every row, branch blocks stacked: [cond; uncond_text; uncond_all], each prompt x n."""
        neg = caption_ids(self.tokenizer, negative)
        blocks = {"cond": cond_ids,
                  "uncond_text": [caption_ids(self.tokenizer, "<image>" + negative, [grid])] * len(cond_ids),
                  "uncond_all": [neg] * len(cond_ids)}
        suffix = generation_suffix_ids(self.tokenizer, grid)
        return [ids + suffix for b in guidance.branches for ids in blocks[b] for _ in range(n)]

    def _encode(self, source: list[torch.Tensor], guidance: Guidance, n: int) -> list[torch.Tensor]:
        """Latents for each image block in row order (rows of branches that carry the image)."""
        x = torch.stack(source).to(self.device, self.vae.encoder.conv_in.weight.dtype)
        z = self.vae.scale(self.vae.encode(x).mode())  # (P, C, h, w)
        per_row = [z[i] for i in range(len(source)) for _ in range(n)]
        carriers = sum(b in ("cond", "uncond_text") for b in guidance.branches)
        return per_row * carriers

    def _prefill(self, rows: list[list[int]], latents, extra: int):
        batch = left_pad(rows, self.tokenizer.special.pad)
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        limit = self.model.config.transformer.max_position_embeddings
        if ids.shape[1] + extra > limit:
            raise ValueError(f"prompt ({ids.shape[1]} tokens) + image ({extra} tokens) exceeds the model's "
                             f"{limit} positions: use a smaller size or a shorter prompt")
        cache = self.model.new_cache(ids.shape[0], ids.shape[1] + extra)
        hidden = self.model(self.model.embed(ids, latents), attention_mask=mask, cache=cache)
        return hidden[:, -1], cache

    def _generate(self, rows, latents, grid, guidance: Guidance, prompts: int, n: int, steps: int, shift: float,
                  token_norm: bool, sampler: str, generator, progress: bool, callback, clock: "Stopwatch"
                  ) -> torch.Tensor:
        model = self.model
        total = grid[0] * grid[1]
        d = model.config.token_dim
        with clock("prefill"):
            h, cache = self._prefill(rows, latents, total)
        noise = NoiseSource(generator, prompts, n, d, self.device)
        copies = len(guidance.branches)
        tokens = torch.empty(prompts * n, total, d, device=self.device)
        for k in tqdm(range(total), disable=not progress, desc="image tokens", leave=False):
            cond = model.condition(h, torch.full((h.shape[0],), k, device=self.device), grid)  # (rows, D)
            s_text, s_img = guidance.scales_at(k, total)

            def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                v = model.image_head(torch.cat([x] * copies).to(cond.dtype), t.expand(cond.shape[0]).to(cond), cond)
                return guidance.combine(v.float(), s_text, s_img)

            with clock("head"):
                x = integrate(sampler, velocity, noise(), steps, shift, noise)
                if token_norm:
                    x = F.layer_norm(x, x.shape[-1:], None, None, TOKEN_NORM_EPS)
            tokens[:, k] = x
            if callback is not None:
                callback(k + 1, total, tokens[:, : k + 1])
            if k + 1 < total:
                with clock("backbone"):
                    if model.config.context_noise > 0:  # read back as in training (NextStepConfig.context_noise)
                        x = x + model.config.context_noise * noise()
                    e = model.embed_image_tokens(x.to(model.dtype))[:, None]  # (n, 1, D)
                    h = model(torch.cat([e] * copies), cache=cache)[:, -1]
        return tokens

    def _think(self, cond_ids, source, max_tokens: int, generator):
        """Self-CoT: let the model write after each prompt until it starts an image; returns extended ids + text."""
        model, s = self.model, self.tokenizer.special
        stop = {s.boi, s.image_area, model.config.eos_id}
        latents = self._encode(source, Guidance(), 1) if source is not None else None
        batch = left_pad(cond_ids, s.pad)
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        cache = model.new_cache(len(cond_ids), ids.shape[1] + max_tokens)
        h = model(model.embed(ids, latents), attention_mask=mask, cache=cache)[:, -1]
        written: list[list[int]] = [[] for _ in cond_ids]
        done = torch.zeros(len(cond_ids), dtype=torch.bool, device=self.device)
        g = generator[0] if isinstance(generator, Sequence) else generator
        for _ in range(max_tokens):
            probs = torch.softmax(model.logits(h).float(), -1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=g if g is None or g.device.type == "cpu" else None)[:, 0]
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if t in stop:
                        done[i] = True
                    else:
                        written[i].append(t)
            if bool(done.all()):
                break
            h = model(model.embed(nxt.to(self.device)[:, None]), attention_mask=(~done).long()[:, None],
                      cache=cache)[:, -1]
        text = [self.tokenizer.decode(w) for w in written]
        return [c + w for c, w in zip(cond_ids, written)], text

    def decode(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, h*w, token_dim) tokens -> (B, 3, H, W) decoder output in about [-1, 1] (not clamped)."""
        z = unpatchify(tokens, grid, self.model.config.patch_size)
        return self.vae.decode(self.vae.unscale(z)).float()

    @staticmethod
    def _format(pixels01: torch.Tensor, output_type: str):
        if output_type == "pt":
            return pixels01.cpu()
        if output_type == "np":
            return pixels01.permute(0, 2, 3, 1).cpu().numpy()
        return to_pil(pixels01)
