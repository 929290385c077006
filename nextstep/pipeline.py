"""Prompt(s) to pixels: text-to-image and image editing with NextStep.

Reading order of ``NextStepPipeline._generate`` (what ``__call__`` runs):
    1. check the request; 2. lay out the guidance branches and build their token ids (``prompt.py``);
    3. encode input images with the VAE (editing); 4. prefill the backbone into a preallocated KV cache;
    5. for each image token in raster order: condition the flow head on the last hidden state, integrate its
       velocity (``sampling.flow``) under guidance (``sampling.guidance``), feed the token back for one step;
    6. unpatchify the tokens and decode them with the VAE.
A masked edit (``mask=``) feeds the input image's own tokens in step 5 away from the mask (``KeptTokens``), and in
step 6 pastes the input's pixels back outside the mask (``paste_outside``).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import hub
from .checkpoint import read_json, require_dir
from .config import SamplingConfig
from .errors import CheckpointError, InputError, MissingFileError, SettingError, SizeWarning
from .images import ImageInput, fit_image, fit_mask, load_image, load_mask, to_pil, to_unit
from .model.distilled_head import DistilledHead
from .model.kv_cache import KVCache
from .model.latents import patchify, token_mask, unpatchify
from .model.nextstep import NextStep
from .model.vae import VAE
from .official import schema_of
from .packing import packed_linears
from .prompt import caption_ids, check_special_ids, generation_suffix_ids, left_pad, require_prompt
from .quant import quantize_, quantized_kind
from .sampling.flow import DISTILLED
from .sampling.guidance import Guidance, image_blocks
from .sampling.noise import NoiseSource
from .sampling.token import FewStepSampler, TokenSampler
from .settings import Settings
from .think import think as self_cot
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

OUTPUT_TYPES = ("pil", "pt", "np", "latent")
LoraSpec = str | os.PathLike | tuple[str | os.PathLike, float]  # a LoRA adapter directory, or (directory, scale)
FAST_HEAD_DIR = "fast"  # a model directory's own distilled head, loaded with it
# A masked edit also generates the tokens within this many tokens of the mask (their pixels outside the mask are still
# the input's): a VAE token encodes its neighbours' pixels too, so a kept neighbour still shows the old object and pulls
# the model back to copying it (benchmarks/masked_edits.py; docs/api.md#masked-editing has the numbers).
MASK_MARGIN = 1


@dataclass
class PipelineOutput:
    images: list[Image.Image] | torch.Tensor | np.ndarray
    tokens: torch.Tensor  # (B, h*w, token_dim) sampled image tokens, B = prompts x images per prompt
    grid: tuple[int, int]  # token grid (rows, cols)
    thoughts: list[str] | None = None  # self-CoT text per prompt (think=True)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase (timings=True): encode, prefill,
    #                                                          backbone, head, decode


@dataclass
class KeptTokens:
    """The image tokens a masked edit takes from its input image instead of sampling them."""

    tokens: torch.Tensor  # (B, h*w, token_dim) the input image's tokens at the output grid, one row per image drawn
    keep: torch.Tensor  # (B, h*w) bool: True where a token is the input's (no pixel in the mask or its margin)

    def __post_init__(self):
        self.every_row = self.keep.all(dim=0).tolist()  # per token: kept in every row (then the head is skipped)

    def merge(self, k: int, sampled: torch.Tensor) -> torch.Tensor:
        """Token k of every row: the input's where kept, else ``sampled`` (B, token_dim)."""
        return torch.where(self.keep[:, k, None], self.tokens[:, k], sampled)


COMPILE_NOTICE = ("nextstep: compiling the per-token step with torch.compile (once; the first image token takes a "
                  "while, up to a minute or more)")
CPU_COMPILE_NOTE = "; on a CPU the eager step is faster (docs/results.md#generation-speed)"


class _FirstCallNotice:
    """A function that prints ``notice`` to stderr before its first call (where ``torch.compile`` compiles)."""

    def __init__(self, fn: Callable, notice: str):
        self.fn, self.notice = fn, notice

    def __call__(self, *args, **kwargs):
        if self.notice:
            tqdm.write(self.notice, file=sys.stderr)
            self.notice = ""
        return self.fn(*args, **kwargs)


def bundled_model_dir() -> Path | None:
    """The small model shipped inside the package, when there is one."""
    d = Path(__file__).parent / "assets" / "model"
    return d if (d / "config.json").is_file() else None


class Stopwatch:
    """Accumulates wall time per named phase when enabled (synchronising CUDA so GPU work is charged to its phase);
    disabled, a phase costs nothing and forces no synchronisation."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.totals: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        _sync()
        t0 = time.perf_counter()
        yield
        _sync()
        self.totals[name] += time.perf_counter() - t0


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class NextStepPipeline:
    def __init__(self, model: NextStep, vae: VAE, tokenizer: Tokenizer, defaults: SamplingConfig | None = None,
                 format: str = "v1", head: DistilledHead | None = None):
        """``format``: the checkpoint's release, "v1" (NextStep-1) or "v1.1" (NextStep-1.1): 1.1 prompts start with
        the tokenizer's BOS token when it has one. ``from_pretrained`` reads it from the model's config.json.
        ``head``: a distilled few-step head of this model (``fast=True`` samples with it)."""
        if format not in ("v1", "v1.1"):
            raise InputError(f"format must be 'v1' or 'v1.1', got {format!r}")
        self.format = format
        self.defaults = defaults or SamplingConfig.for_format(format)  # what a call uses for settings left at None
        self.model = model.eval()
        self.vae = vae.eval()
        self.tokenizer = tokenizer
        check_special_ids(tokenizer, model.config)
        if vae.config.z_channels != model.config.latent_channels:
            raise CheckpointError(f"VAE has {vae.config.z_channels} latent channels, the model expects "
                             f"{model.config.latent_channels}")
        if self.defaults.parallel > model.config.parallel_tokens:
            raise CheckpointError(f"the generation config's parallel={self.defaults.parallel} is more image tokens per "
                                  f"forward than the model was trained for (parallel_tokens="
                                  f"{model.config.parallel_tokens})")
        self.head = head
        self._adapters = None  # nextstep.lora.Adapters once a LoRA adapter is loaded
        self._decode_step = self.decode_step  # replaced by a compiled version in compile()
        self._cache_bucket = 1  # KV-cache lengths are rounded up to a multiple of this (compile(): fewer shapes)
        self._rereads: list | None = None  # recording_rereads()

    # ---- loading --------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike | None = None, vae_dir: str | os.PathLike | None = None,
                        *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                        torch_dtype: torch.dtype | None = None, quantize: str | None = None,
                        head: str | os.PathLike | None = None, tp_mesh: DeviceMesh | None = None,
                        lora: LoraSpec | list[LoraSpec] | None = None) -> NextStepPipeline:
        """``model_dir`` holds config.json, weights and tokenizer.json (default: the bundled model); a Hugging Face
        Hub id such as ``"stepfun-ai/NextStep-1.1"`` is fetched into (or read from) the hub cache. The VAE comes
        from ``vae_dir`` (a directory or hub id), else the model's ``vae/`` subdirectory. ``torch_dtype`` is
        accepted as another name for ``dtype`` (the diffusers spelling). ``quantize`` ("int8" or "fp8") quantizes
        the model's linear layers while loading (``nextstep.quant``); the VAE stays in ``dtype``. ``head``: the
        directory of a distilled few-step head of this model (``nextstep distill-head``), used by ``fast=True``
        (default: the model directory's ``fast/`` subdirectory when there is one, as in the bundled model); one
        distilled from another model is refused (:class:`~nextstep.checkpoint.CheckpointError`). ``tp_mesh``
        (a 1-D ``DeviceMesh``; every rank of it makes this call) splits the backbone's layers over its ranks, each
        rank reading only its share of the weights (``nextstep.parallel``); with the same generator seed every rank
        draws the same images. ``lora``: a LoRA adapter directory of this model, a ``(DIR, scale)`` pair, or a list of
        them, loaded with :meth:`load_lora` (all active)."""
        if torch_dtype is not None:
            if dtype is not None and dtype != torch_dtype:
                raise InputError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree: give one")
            dtype = torch_dtype
        if model_dir is None:
            model_dir = bundled_model_dir()
            if model_dir is None:
                raise MissingFileError("no bundled model in this installation: pass a model directory "
                                        "(e.g. NextStep-1-Large) and its VAE (e.g. NextStep-1-f8ch16-Tokenizer)")
        model_dir = require_dir(hub.resolve(model_dir, "model"), "model")
        if vae_dir is not None:
            vae_dir = hub.resolve(vae_dir, "VAE")
        if vae_dir is None:
            vae_dir = model_dir / "vae"
            if not vae_dir.is_dir():
                raise MissingFileError(f"{model_dir} has no vae/ subdirectory: pass the VAE directory explicitly")
        loras = [] if lora is None else [lora] if isinstance(lora, (str, os.PathLike, tuple)) else list(lora)
        if tp_mesh is not None and loras:
            raise InputError("lora and tp_mesh cannot be combined yet: tensor parallelism splits the layers an "
                             "adapter adds to")
        if tp_mesh is not None:
            if quantize is not None:
                raise InputError(f"quantize={quantize!r} and tp_mesh cannot be combined: tensor parallelism splits "
                                 f"float linear layers")
            from .parallel import load_model

            model = load_model(model_dir, mesh=tp_mesh, dtype=dtype, device=device)
        else:
            model = NextStep.from_pretrained(model_dir, dtype=dtype, device=device, quantize=quantize)
        fmt = schema_of(read_json(model_dir / "config.json", "model config.json"))
        vae = VAE.from_pretrained(vae_dir, dtype=dtype, device=device, format=fmt)
        pipe = cls(model, vae, Tokenizer.from_pretrained(model_dir), SamplingConfig.from_model_dir(model_dir), fmt)
        for spec in loras:  # checked against the base model before a distilled head is attached
            path, scale = spec if isinstance(spec, tuple) else (spec, 1.0)
            pipe.load_lora(path, scale=scale)
        if head is not None:
            return pipe.load_head(head, dtype=dtype)
        if (model_dir / FAST_HEAD_DIR).is_dir():  # the model's own head: a stale one must not stop the model loading
            try:
                pipe.load_head(model_dir / FAST_HEAD_DIR, dtype=dtype)
            except CheckpointError as e:
                warnings.warn(f"{e}; fast mode is off until a matching head is loaded", stacklevel=2)
        return pipe

    # ---- LoRA adapters (nextstep.lora) -----------------------------------------------------------------------------
    def load_lora(self, path: str | os.PathLike, scale: float = 1.0, name: str | None = None) -> NextStepPipeline:
        """Load the LoRA adapter directory ``path`` (``nextstep train`` with a ``lora`` section writes one) under
        ``name`` (default: the directory's name; another run's ``final`` beside a loaded one: ``RUN-final``) and
        make it active with ``scale``, alongside the adapters already active. An adapter trained on another base
        model is a :class:`~nextstep.errors.CheckpointError`."""
        from .lora import Adapters

        if self._adapters is None:
            self._adapters = Adapters(self.model)
        self._adapters.load(path, name=name, scale=scale)
        return self

    def set_lora(self, adapters: str | list[str] | dict[str, float] | None) -> NextStepPipeline:
        """Choose the active adapters among those loaded: a name, a list of names (scale 1) or {name: scale};
        None or {} samples with the base model alone. Nothing is reloaded: switching costs next to nothing."""
        if adapters is None:
            adapters = {}
        elif isinstance(adapters, str):
            adapters = {adapters: 1.0}
        elif not isinstance(adapters, dict):
            adapters = dict.fromkeys(adapters, 1.0)
        if self._adapters is None:
            if adapters:
                raise InputError(f"no LoRA adapter is loaded, so none named {', '.join(map(repr, adapters))}: "
                                 f"load one with load_lora(DIR)")
            return self
        self._adapters.set(adapters)
        return self

    @property
    def loras(self) -> dict[str, float]:
        """The active LoRA adapters: {name: scale}."""
        return {} if self._adapters is None else dict(self._adapters.active)

    @property
    def lora_names(self) -> list[str]:
        """Every LoRA adapter loaded, active or not."""
        return [] if self._adapters is None else list(self._adapters.loaded)

    def fuse_lora(self) -> NextStepPipeline:
        """Merge the active adapters into the model's weights (sampling then costs what the base costs); a host copy
        of each changed weight is kept for :meth:`unfuse_lora`. Refused on a quantized model."""
        if self._adapters is None:
            raise InputError("no LoRA adapter is loaded: nothing to fuse")
        self._adapters.fuse()
        return self

    def unfuse_lora(self) -> NextStepPipeline:
        """Restore the weights :meth:`fuse_lora` changed, bit for bit."""
        if self._adapters is None:
            raise InputError("no LoRA adapter is fused")
        self._adapters.unfuse()
        return self

    def unload_lora(self) -> NextStepPipeline:
        """Remove every LoRA adapter (unfusing first): the model is the base model again."""
        if self._adapters is not None:
            self._adapters.unload()
            self._adapters = None
        return self

    def load_head(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> NextStepPipeline:
        """Load the distilled head in ``path`` for ``fast=True`` (checked against this pipeline's model). On a
        quantized model (``quantize=``) the head's linear layers are quantized the same way: with one condition row
        per token the few-step head reads all its weights for every token, so float weights would keep most of
        its cost."""
        head = DistilledHead.from_pretrained(path, self.model, dtype=dtype or self.model.dtype, device=self.device)
        kind = quantized_kind(self.model)
        self.head = head if kind is None else quantize_(head, kind)
        return self

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the model directory that :meth:`from_pretrained` loads back as this pipeline: ``config.json`` (the
        schema of this pipeline's format) and safetensors, the tokenizer, ``vae/``, the sampling defaults
        (``generation_config.json``) and the distilled head in ``fast/`` when there is one. A quantized model is
        refused (``NextStep.save_pretrained``): save the float model and quantize when loading."""
        from .checkpoint import write_json

        if self._adapters is not None:
            raise InputError("LoRA adapters are loaded: save_pretrained writes the base model only. Unload them "
                             "first (unload_lora()); a model with an adapter merged in is what a LoRA recipe's "
                             "\"export_merged\": true writes (OUT/final-merged)")
        out = Path(path)
        self.model.save_pretrained(out)
        write_json(self.model.config.to_official(self.format), out / "config.json")
        self.tokenizer.save_pretrained(out)
        self.vae.save_pretrained(out / "vae")
        self.defaults.save(out)
        if self.head is not None:
            self.head.save_pretrained(out / FAST_HEAD_DIR)
        return out

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> NextStepPipeline:
        for m in (self.model, self.vae, self.head):
            if m is not None:
                m.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def size_multiple(self) -> int:
        """Pixels per image token along a side (16 for an f8 VAE with 2x2 patches)."""
        return self.vae.config.downsample * self.model.config.patch_size

    def compile(self, cache_bucket: int = 256, announce: bool = True, **options) -> NextStepPipeline:
        """Compile the per-token backbone step with ``torch.compile`` (``options`` are passed on). The step has
        static shapes and keeps its position on the device, so one compilation serves every token; KV caches are
        then sized in multiples of ``cache_bucket`` slots, so prompts of different lengths share a compilation
        (a new one comes with a new batch layout or a longer bucket). Masked slots change no output beyond float
        rounding. CUDA graphs (``mode="reduce-overhead"``) additionally need a cache reused across calls: not yet.
        Compiling happens in the first call that draws an image, and takes a while (48 s on a 2-core CPU for the
        bundled model): with ``announce`` that call says so on stderr, once. On a CPU the compiled step is slower
        than the eager one, whose linear layers run on oneDNN-packed weights (``nextstep.packing``; on the "ns34m"
        workload the compiled backbone took 2-5x eager's time with guidance, docs/results.md): the notice says so."""
        if not isinstance(cache_bucket, int) or cache_bucket < 1:
            raise InputError(f"cache_bucket must be a positive integer, got {cache_bucket!r}")
        self._cache_bucket = cache_bucket
        step = torch.compile(self.decode_step, fullgraph=True, dynamic=False, **options)
        notice = COMPILE_NOTICE + (CPU_COMPILE_NOTE if self.device.type == "cpu" else "")
        self._decode_step = _FirstCallNotice(step, notice) if announce else step
        return self

    # ---- the call -------------------------------------------------------------------------------------------------
    def __call__(self, prompt: str | list[str], image: ImageInput | list[ImageInput] | None = None,
                 height: int | None = None, width: int | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 progress: bool = True, callback: Callable[[int, int, torch.Tensor], None] | None = None,
                 positive_prompt: str | None = None, think: bool = False, max_think_tokens: int = 64,
                 timings: bool = False, fast: bool = False, mask: ImageInput | list[ImageInput] | None = None,
                 **settings: Any) -> PipelineOutput:
        """``settings``: the sampling settings by name (``nextstep.settings.Settings``: ``guidance_scale``,
        ``image_guidance_scale``, ``guidance_schedule``, ``num_inference_steps``, ``time_shift``, ``sampler``,
        ``token_norm``, ``noise_level``, ``negative_prompt``); those left out or None take the model's defaults
        (``self.defaults``; the edit defaults when ``image`` is given). ``timings=True`` fills
        ``PipelineOutput.timings`` (it synchronises the device at each phase). ``fast=True`` (or
        ``sampler="distilled"``) samples with the distilled head (``head=`` in ``from_pretrained``):
        ``num_inference_steps`` (default: the head's) steps on the conditional branch alone, at the guidance it was
        distilled for.
        ``mask`` (with ``image``; one, or one per input image) edits only part of the input, in OpenAI's convention: an
        image of the input's size whose fully transparent pixels (alpha 0) mark where to edit (``images.load_mask``
        reads PIL images, paths and tensors); it is resized with the input when the output size differs. The tokens
        with a pixel in the mask, and those within ``MASK_MARGIN`` tokens of one, are generated; the others are the
        input image's own (fed back, never sampled); the output's pixels outside the mask are the input's, exactly. A
        mask covering the whole image gives the unmasked edit."""
        return self._generate(prompt, image, height, width, num_images_per_prompt, generator, output_type, progress,
                              callback, positive_prompt, think, max_think_tokens, timings, fast, mask, **settings)

    @torch.no_grad()
    def _generate(self, prompt, image=None, height=None, width=None, num_images_per_prompt=1, generator=None,
                  output_type="pil", progress=True, callback=None, positive_prompt=None, think=False,
                  max_think_tokens=64, timings=False, fast=False, mask=None, *, exact: bool = False,
                  observe: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
                  prompt_length: int | None = None, group_noise: bool = False, mask_margin: int = MASK_MARGIN,
                  **settings: Any) -> PipelineOutput:
        """``__call__`` with the library's own hooks.
        ``exact=True`` keeps the reference implementation's arithmetic in the flow head (bit-for-bit reproduction of
        the official pipeline, about 2x slower per head step), in the linear layers and in the VAE decode; the
        default computes each token's AdaLN modulations in one product and, on a CPU, runs the linear layers on
        oneDNN-prepacked weights (``nextstep.packing``) and decodes channels-last: the same values up to float
        rounding. ``observe(states, velocities, fed)`` is called after
        each image token with its head trajectory (``TokenSampler.trace``) and the token as fed back to the
        backbone, (n, token_dim) with context noise (the last token: as sampled); RL post-training records them.
        ``prompt_length`` left-pads every prompt row to that many tokens instead of to the longest: with the same
        number of rows, each row's numbers then do not depend on the other prompts of the call (the server's
        reproducible mode; without it a batch matches each prompt alone to float rounding only; int8 weights on CPU
        still quantize a call's activations with one shared range).
        ``group_noise=True``: the ``num_images_per_prompt`` images of a prompt share each token's start noise and
        context noise and differ only by the sampler's step noise (identical with a deterministic sampler). RL
        rollouts use it: every difference within a group is then one the policy's log-probability accounts for.
        ``mask_margin``: a masked edit generates the tokens within this many tokens of the mask too (default
        ``MASK_MARGIN``; 0 keeps every token with no pixel in the mask: the benchmark's comparison)."""
        settings = self.resolve_settings(image is not None, fast, **settings)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        images = self._check(prompts, image, num_images_per_prompt, output_type)
        masks = self._check_masks(mask, images, observe, mask_margin)
        height, width = self._size(height, width, images)
        grid = (height // self.size_multiple, width // self.size_multiple)
        guidance = self.guidance(settings, images is not None)
        source = [fit_image(x, height, width) for x in images] if images is not None else None
        # (B, H, W) True where to edit, one per image drawn (a prompt's images in a row, as the noise rows)
        region = (torch.stack([fit_mask(m, height, width) for m in masks]).repeat_interleave(num_images_per_prompt, 0)
                  if masks is not None else None)

        clock = Stopwatch(timings)
        thoughts = None
        captions = [p if not positive_prompt else f"{p} {positive_prompt}" for p in prompts]
        cond_ids = [self._caption(c, [grid] if source is not None else []) for c in captions]
        z = None  # (P, C, h, w) latents of the input images, encoded once
        if think:
            with clock("encode"):
                z = self.encode_latents(source) if source is not None else None
            latents = self.image_rows(z, Guidance(), 1) if z is not None else None
            cond_ids, thoughts = self_cot(self.model, self.tokenizer, cond_ids, latents, max_think_tokens, generator)
        rows = self._rows(cond_ids, settings.negative_prompt, grid, guidance, num_images_per_prompt)
        self._check_length(rows, grid, prompt_length, captions, settings, images is not None)  # before encoding
        if (untrained := self.defaults.size_warning(width, height)) is not None:
            warnings.warn(untrained, SizeWarning, stacklevel=3)  # the caller's line: __call__ -> _generate -> here
        with clock("encode"):  # (timed even when there is nothing left to encode: out.timings has every phase)
            if z is None and source is not None:
                z = self.encode_latents(source)
        latents = self.image_rows(z, guidance, num_images_per_prompt) if z is not None else None
        kept = None
        if region is not None:  # the input's tokens at the output grid, kept where no pixel is in the mask
            inputs = patchify(z, self.model.config.patch_size).float().repeat_interleave(num_images_per_prompt, 0)
            kept = KeptTokens(inputs, ~token_mask(region, grid, mask_margin).to(self.device))
        noise = NoiseSource(generator, len(prompts), num_images_per_prompt, self.model.config.token_dim, self.device,
                            group_noise)
        # packed linears where the code runs eagerly: a compiled step keeps its own kernels (patching its layers for
        # each call would make it recompile at every call)
        compiled = self._decode_step != self.decode_step  # (== on bound methods: the same function and instance)
        packed = (self.model.image_head, self.head) if compiled else (self.model, self.head)
        with contextlib.nullcontext() if exact else packed_linears(*packed):
            tokens = self._sample_tokens(rows, latents, grid, settings, guidance, noise, progress, callback, clock,
                                         exact, observe, prompt_length, kept)
        if output_type == "latent":  # (B, C, h, w) in the model's latent space, not decoded
            images = unpatchify(tokens, grid, self.model.config.patch_size)
        else:
            with clock("decode"):
                pixels = self.decode(tokens, grid, exact)
                if region is not None:
                    pixels = paste_outside(pixels, torch.stack(source).repeat_interleave(num_images_per_prompt, 0),
                                           region)
                images = self._format(to_unit(pixels), output_type)
        return PipelineOutput(images=images, tokens=tokens, grid=grid, thoughts=thoughts, timings=dict(clock.totals))

    # ---- steps ----------------------------------------------------------------------------------------------------
    def _check(self, prompts, image, n, output_type) -> list[torch.Tensor] | None:
        if not prompts:
            raise InputError("prompt list is empty")
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings")
        for p in prompts:
            require_prompt(p)
        if not isinstance(n, int) or n < 1:
            raise InputError(f"num_images_per_prompt must be an integer >= 1, got {n!r}")
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if image is None:
            return None
        images = [image] if not isinstance(image, list) else image
        if len(images) == 1 and len(prompts) > 1:
            images = images * len(prompts)
        if len(images) != len(prompts):
            raise InputError(f"got {len(images)} input images for {len(prompts)} prompts (give one, or one per prompt)")
        return [load_image(x) for x in images]

    def _check_masks(self, mask, images: list[torch.Tensor] | None, observe, margin) -> list[torch.Tensor] | None:
        """Each input image's mask as (H, W) bool, True where to edit (``images.load_mask``); None without a mask."""
        if mask is None:
            return None
        if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
            raise InputError(f"mask_margin must be an integer >= 0 (tokens), got {margin!r}")
        if images is None:
            raise InputError("mask needs an input image: it marks where to edit the image (alpha 0) and is given with "
                             "image=")
        if observe is not None:
            raise InputError("observe= records sampled tokens; a masked edit copies some of its tokens from the input "
                             "instead: not available with mask")
        masks = [load_mask(m) for m in (mask if isinstance(mask, list) else [mask])]
        if len(masks) == 1 and len(images) > 1:
            masks = masks * len(images)
        if len(masks) != len(images):
            raise InputError(f"got {len(masks)} masks for {len(images)} input images (give one, or one per image)")
        for i, (m, x) in enumerate(zip(masks, images)):
            if m.shape != x.shape[-2:]:
                which = f"input image {i}" if len(images) > 1 else "the input image"
                raise InputError(f"the mask is {m.shape[1]}x{m.shape[0]} but {which} is {x.shape[2]}x{x.shape[1]}: "
                                 f"a mask has its input image's size (when the output size differs, both are resized "
                                 f"by the same rule)")
        return masks

    def _size(self, height, width, images) -> tuple[int, int]:
        m = self.size_multiple
        if height is None and width is None and images is not None:
            height, width = images[0].shape[-2:]
            if height % m or width % m:
                raise InputError(f"input image is {width}x{height}, not a multiple of {m}: pass height and width "
                                 f"(it is then resized to cover them and center-cropped)")
        default = m * self.model.config.base_image_grid_size  # the model's native size (512 for NextStep-1)
        height = default if height is None else height
        width = default if width is None else width
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % m:
                raise InputError(f"{name} must be a positive multiple of {m}, got {v!r}")
        return height, width

    def resolve_settings(self, edit: bool, fast: bool = False, **overrides) -> Settings:
        """The settings a call with these overrides runs with: the distilled head's with ``fast`` (or sampler
        "distilled"), else the model's defaults under the overrides; an InputError says what is wrong."""
        if fast or overrides.get("sampler") == DISTILLED:
            settings = self.distilled_settings(edit, **overrides)
        else:
            settings = self.defaults.resolve(edit, **overrides)
        if settings.parallel > (most := self.model.config.parallel_tokens):
            raise SettingError("parallel", f"must be at most {most} for this model: it decodes at most {most} image "
                                           f"token(s) per backbone forward (train one for more with a recipe's "
                                           f"parallel_tokens), got {settings.parallel}")
        return settings

    def distilled_settings(self, edit: bool, **overrides) -> Settings:
        """The settings of a call with the distilled head: its steps (default: the head's), the teacher settings it
        was distilled for; an override that asks for other guidance, shift or sampler is an InputError."""
        if self.head is None:
            raise InputError("fast mode needs a distilled head: load one with from_pretrained(..., head=DIR) or "
                             "pipe.load_head(DIR) (CLI: --head DIR), or make one with `nextstep distill-head`")
        return self.head.config.settings(self.defaults, edit, **overrides)

    def guidance(self, settings: Settings, edit: bool) -> Guidance:
        """The guidance branches a call with these settings builds (in fast mode: the ones its distilled head reads)."""
        return Guidance.from_settings(settings, edit, self.head.config.branches
                                      if settings.sampler == DISTILLED and self.head is not None else "cond")

    def prompt_rows(self, prompt: str, grid: tuple[int, int], settings: Settings, edit: bool) -> list[list[int]]:
        """Token ids of every row a call prefills for ``prompt`` drawing one image of ``grid`` tokens (the prompt,
        then one row per other guidance branch): the model's positions must hold the longest plus the image."""
        guidance = self.guidance(settings, edit)
        return self._rows([self._caption(prompt, [grid] if edit else [])], settings.negative_prompt, grid, guidance, 1)

    def largest_square(self, prompt: str, settings: Settings, edit: bool, max_side: int | None = None) -> int:
        """The side in pixels of the largest square image a call for ``prompt`` can draw within the model's
        positions (its longest prompt row, with an edit's input image at the output size, plus the image's tokens),
        at most ``max_side``; 0 when no size fits. The advice of the pipeline's and the server's size errors."""
        m, limit = self.size_multiple, self.model.config.transformer.max_position_embeddings
        lo, hi = 0, math.isqrt(limit) if max_side is None else min(math.isqrt(limit), max_side // m)  # tokens a side

        def fits(g: int) -> bool:
            return max(map(len, self.prompt_rows(prompt, (g, g), settings, edit))) + g * g <= limit

        while lo < hi:  # what a row holds grows with the grid: the largest fitting side by bisection
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return lo * m

    def _check_length(self, rows: list[list[int]], grid: tuple[int, int], prompt_length: int | None = None,
                      captions: list[str] = (), settings: Settings | None = None, edit: bool = False) -> None:
        longest, tokens = max(len(r) for r in rows), grid[0] * grid[1]
        if prompt_length is not None:
            if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or prompt_length < longest:
                raise InputError(f"prompt_length must be an integer >= the longest prompt row ({longest} tokens "
                                 f"here), got {prompt_length!r}")
            longest = prompt_length
        limit = self.model.config.transformer.max_position_embeddings
        if longest + tokens > limit:
            side = min((self.largest_square(c, settings, edit) for c in set(captions)), default=0) if settings else 0
            advice = (f"use a smaller size (at most {side}x{side} with this prompt) or a shorter prompt" if side else
                      "no size fits this prompt: shorten it")
            raise InputError(f"{'prompt and input image' if edit else 'prompt'} ({longest} tokens) + image ({tokens} "
                             f"tokens) exceeds the model's {limit} positions: {advice}")

    def _caption(self, text: str, grids: list[tuple[int, int]] = ()) -> list[int]:
        return caption_ids(self.tokenizer, text, grids, bos=self.format == "v1.1")

    def _rows(self, cond_ids: list[list[int]], negative: str, grid, guidance: Guidance, n: int) -> list[list[int]]:
        """Token ids of every row, branch blocks stacked: [cond; uncond_text; uncond_all], each prompt x n."""
        blocks = {"cond": cond_ids,
                  "uncond_text": [self._caption(negative, [grid])] * len(cond_ids),  # image + negative
                  "uncond_all": [self._caption(negative)] * len(cond_ids)}
        suffix = generation_suffix_ids(self.tokenizer, grid)
        return [ids + suffix for b in guidance.branches for ids in blocks[b] for _ in range(n)]

    def encode_latents(self, source: list[torch.Tensor]) -> torch.Tensor:
        """Input images (each (3, H, W) in [-1, 1], already at the output size) -> (P, C, h, w) scaled VAE latents."""
        x = torch.stack(source).to(self.device, self.vae.encoder.conv_in.weight.dtype)
        return self.vae.scale(self.vae.encode(x).mode())

    @staticmethod
    def image_rows(z: torch.Tensor, guidance: Guidance, n: int) -> list[torch.Tensor]:
        """(P, C, h, w) latents -> one per image block in row order: the ``n`` images of each prompt, for every
        guidance branch that carries the image."""
        per_row = [z[i] for i in range(z.shape[0]) for _ in range(n)]
        return per_row * image_blocks(guidance.branches)

    def _prefill(self, rows: list[list[int]], latents, extra: int, length: int | None = None
                 ) -> tuple[torch.Tensor, KVCache]:
        """Run the prompts into a fresh cache sized for ``extra`` more tokens; returns the last hidden states
        (rows, 1, D): the (B, 1, D) layout the reference feeds to the output projector (with 4+ rows the math library
        rounds a (B, D) view differently, and the difference grows over the image)."""
        batch = left_pad(rows, self.tokenizer.special.pad, length)
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        limit = self.model.config.transformer.max_position_embeddings
        size = -(-(ids.shape[1] + extra) // self._cache_bucket) * self._cache_bucket  # rounded up to the bucket
        cache = self.model.new_cache(ids.shape[0], min(size, limit))
        hidden = self.model(self.model.embed(ids, latents), attention_mask=mask, cache=cache)
        return hidden[:, -1:], cache

    def decode_step(self, tokens: torch.Tensor, input_pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed sampled tokens (n, T, token_dim) back, once per guidance branch, at slots ``input_pos`` (T,): the hot
        backbone step, T = 1 sequentially, a group of T under parallel decoding -> hidden states (copies * n, T, D).
        Static shapes, no host state: compilable."""
        model = self.model
        e = model.embed_image_tokens(tokens.to(model.dtype))  # (n, T, D)
        copies = cache.batch // tokens.shape[0]
        return model(torch.cat([e] * copies), cache=cache, input_pos=input_pos)

    def _sample_tokens(self, rows, latents, grid, settings: Settings, guidance: Guidance, noise: NoiseSource,
                       progress: bool, callback, clock: Stopwatch, exact: bool = False, observe=None,
                       prompt_length: int | None = None, kept: KeptTokens | None = None) -> torch.Tensor:
        """The image tokens (B, h*w, token_dim) in raster order; with ``kept`` (a masked edit) the tokens it keeps are
        the input's, fed back like sampled ones. Every token draws its noise whether sampled or kept, so a generated
        token gets the noise it would get in an unmasked run with the same generator."""
        model, device = self.model, self.device
        total = grid[0] * grid[1]
        with clock("prefill"):
            h, cache = self._prefill(rows, latents, total, prompt_length)
        if settings.sampler == DISTILLED:
            if observe is not None or exact:
                raise InputError(f"{'observe=' if observe is not None else 'exact=True'} is about the full head: "
                                 f"not available in fast mode")
            sample = FewStepSampler(self.head, settings, len(rows), device, model.dtype, guidance.branches)
        else:
            sample = TokenSampler(model.image_head, guidance, settings, len(rows), device, model.dtype,
                                  exact=exact, trace=observe is not None)
        context_noise = model.config.context_noise  # read back as in training (NextStepConfig.context_noise)
        index = torch.arange(total, device=device)  # (total,) raster index of each token, for the position table
        slots = torch.arange(total, device=device) + cache.length  # the cache slot of each token fed back
        tokens = torch.empty(noise.rows, total, model.config.token_dim, device=device)
        eps: list[torch.Tensor] = []  # each token's noise, drawn in raster order whatever the decoding order

        def noise_of(k: int) -> torch.Tensor:  # (draws [+ 1 context], n, token_dim)
            while len(eps) <= k:
                context = context_noise > 0 and len(eps) + 1 < total  # the last token is never fed back
                # with group_noise the start and context noise are a prompt's
                eps.append(noise.block(sample.draws + context, shared=(0, -1) if context else (0,)))
            return eps[k]

        def fed(k: int, x: torch.Tensor) -> torch.Tensor:  # token k as the backbone reads it
            return x + context_noise * noise_of(k)[-1] if context_noise > 0 and k + 1 < total else x

        def draw(states: torch.Tensor, ks: list[int], prev: torch.Tensor | None = None, ahead: int = 1,
                 central: int = 0) -> list[torch.Tensor]:
            """Consecutive tokens ``ks`` (each (n, token_dim)), token ks[i] from the hidden state states[:, i] (rows,
            T, D), ``ahead`` tokens before it, in one head call (``prev``: with one token and ahead > 1, the token
            before it as fed back). The first ``central`` of them are drawn without noise (the flow started at the
            centre of its noise: the central token for the condition; parallel decoding's drafts and their tokens)."""
            n = noise.rows
            es = [noise_of(k) for k in ks]
            out = [kept.tokens[:, k] if kept is not None and kept.every_row[k] else None for k in ks]
            todo = [i for i, x in enumerate(out) if x is None]  # the input's token in every row: no head call
            if not todo:
                return out
            ts = [ks[i] for i in todo]
            if len(todo) == len(ks):  # slices: no index tensor made per token (a host-to-device copy on a GPU)
                hidden, where = states, index[ks[0]:ks[-1] + 1]
            else:  # a masked edit keeps some of them
                hidden, where = states[:, todo], index[ts]
            if prev is not None:
                prev = torch.cat([prev] * (hidden.shape[0] // n))[:, None]
            # (rows, T, D) -> (copies * T * n, D): branch by branch, token by token
            cond = model.condition(hidden, where.expand(hidden.shape[0], len(ts)), grid, prev, ahead)
            cond = cond[:sample.rows].unflatten(0, (-1, n)).transpose(1, 2).flatten(0, 2)
            scales = [guidance.scales_at(k, total) for k in ts]
            if any(sc != scales[0] for sc in scales):  # a guidance schedule: (T * n, 1) per row
                scales = tuple(torch.tensor(sc, device=device).repeat_interleave(n)[:, None] for sc in zip(*scales))
            else:
                scales = scales[0]
            e = [es[i][:sample.draws] if i >= central else torch.zeros_like(es[i][:sample.draws]) for i in todo]
            e = e[0] if len(e) == 1 else torch.cat(e, 1)  # one token (sequential): a view, no copy
            with clock("head"):
                x = sample(cond, scales, e).unflatten(0, (-1, n))
            for j, i in enumerate(todo):
                out[i] = kept.merge(ks[i], x[j]) if kept is not None else x[j]
            return out

        def forward(xs: list[torch.Tensor], k: int) -> torch.Tensor:  # fed tokens at slots k.. -> hidden (rows, T, D)
            with clock("backbone"):
                return self._decode_step(torch.stack(xs, 1), slots[k:k + len(xs)].clone(), cache)

        def reread(before: torch.Tensor, after: torch.Tensor, drafted: torch.Tensor, k: int, xs: list[torch.Tensor]
                   ) -> torch.Tensor:  # the state after the last draft, corrected toward the token drawn for it
            # (xs: the tokens drawn for the group's drafts, from token k on)
            reads = [fed(k + i, x) for i, x in enumerate(xs)]
            copies = after.shape[0] // noise.rows
            drafted, token = torch.cat([drafted] * copies)[:, None], torch.cat([reads[-1]] * copies)[:, None]
            if self._rereads is not None:  # with the state after the tokens themselves: the next forward rewrites
                self._rereads.append((before, after, drafted, token, forward(reads, k)[:, -1:]))  # their slots alike
            return model.reread(before, after, drafted, token)

        bar = tqdm(total=total, disable=not progress, desc="image tokens", leave=False)

        def done(k: int, x: torch.Tensor) -> None:
            tokens[:, k] = x
            bar.update()
            if callback is not None:
                callback(k + 1, total, tokens[:, : k + 1])

        if settings.parallel == 1:
            for k in range(total):
                x = draw(h, [k], central=int(sample.central(k)))[0]
                done(k, x)
                if k + 1 < total:  # the last token is not fed back
                    x = fed(k, x)
                    h = forward([x], k)[:, -1:]
                if observe is not None:  # the trajectory and the token as fed back
                    observe(*sample.trace, x)
        else:
            if observe is not None:
                raise InputError("observe= records sequentially decoded tokens (RL): not available with parallel > 1")
            self._decode_parallel(settings.parallel, total, h, draw, fed, forward, reread, done)
        bar.close()
        return tokens

    @staticmethod
    def _decode_parallel(group: int, total: int, h, draw, fed, forward, reread, done) -> None:
        """Parallel decoding, ``group`` tokens per backbone forward (docs/parallel-decoding.md, "How it works").
        From the state after token k - 1, token k is drawn, then drafts of tokens k+1 .. k+group-1 (each from that
        state through the model's ahead adapter and the draft before it), drawn without noise. One forward reads
        the previous group's tokens again over their drafts, then token k and the drafts as drawn; the drafted
        tokens are then drawn again from the states it computed just before each, without noise like their drafts
        (the image gets these, and the next forward reads them over the drafts), and the state after the last
        draft, corrected toward the token drawn for it, draws the next group's first token with its noise. The
        final group is read too, but for its last token: ceil((total - 1) / group) forwards."""
        k, x, again = 0, draw(h, [0])[0], []  # again: the previous group's tokens, to read over their drafts
        while True:
            done(k, x)
            n = min(group, total - k)  # tokens k .. k + n - 1 in this group
            if n == 1:
                return
            last = k + n == total
            # token k, then the drafts as drawn (no context noise); the final group's last is not drafted
            group_in = [fed(k, x)]
            for a in range(2, n if last else n + 1):
                group_in.append(draw(h, [k + a - 1], prev=group_in[-1], ahead=a, central=1)[0])
            start = k - len(again)
            states = forward([fed(start + i, y) for i, y in enumerate(again)] + group_in, start)[:, len(again):]
            d = len(group_in) - 1  # drafts read: tokens k+1 .. k+d
            xs = draw(states[:, :d], list(range(k + 1, k + d + 1)), central=d) if d else []  # without noise
            after = states[:, -1:] if not d else reread(states[:, d - 1:d], states[:, -1:], group_in[-1], k + 1, xs)
            xs += draw(after, [k + d + 1])  # the next group's first (or the final token), with its noise
            for i in range(1, n):
                done(k + i, xs[i - 1])
            if last:
                return
            h, again = states[:, -1:], xs[:d]  # the next drafts: from the state as computed
            k += n
            x = xs[-1]

    @contextlib.contextmanager
    def recording_rereads(self):
        """Within it, parallel decoding records each state it corrects (``NextStep.reread``) as (before, after,
        drafted, token, exact), each (rows, 1, ...): the state before the (last) draft, the state after it, the draft
        and the token drawn for it (as the backbone reads them), and the state after the token itself, from one more
        forward that reads the tokens drawn for the group's drafts, writing the cache slots the next forward
        rewrites with the same tokens (so the images do not change). What ``nextstep train-reread`` regresses on."""
        self._rereads = recorded = []
        try:
            yield recorded
        finally:
            self._rereads = None

    def decode(self, tokens: torch.Tensor, grid: tuple[int, int], exact: bool = False) -> torch.Tensor:
        """(B, h*w, token_dim) tokens -> (B, 3, H, W) decoder output in about [-1, 1] (not clamped). On a CPU the
        latents go in channels-last, whose convolutions are faster there (``benchmarks/vae_decode.py``; the same
        pixels to float rounding: 2e-5 on the bundled VAE); ``exact`` keeps the reference's layout."""
        z = self.vae.unscale(unpatchify(tokens, grid, self.model.config.patch_size))
        if not exact and z.device.type == "cpu":
            z = z.contiguous(memory_format=torch.channels_last)
        return self.vae.decode(z).float().contiguous()

    @staticmethod
    def _format(pixels01: torch.Tensor, output_type: str):
        if output_type == "pt":
            return pixels01.cpu()
        if output_type == "np":
            return pixels01.permute(0, 2, 3, 1).cpu().numpy()
        return to_pil(pixels01)


def paste_outside(pixels: torch.Tensor, source: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """A masked edit's composite: decoded ``pixels`` inside ``region`` (B, H, W) bool, the input image ``source``
    (B, 3, H, W) in [-1, 1] outside it, exactly; the decoded pixels of tokens that straddle the mask's edge are kept
    only inside it."""
    region = region.to(pixels.device)[:, None]  # (B, 1, H, W)
    return torch.where(region, pixels, source.to(pixels))
