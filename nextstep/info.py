"""What a model directory holds and what running it costs, without reading a single weight.

Sources: ``config.json`` (the model is built on the ``meta`` device: exact parameter counts, which layers
``nextstep.quant`` would quantize), the safetensors headers (stored dtypes and sizes), ``tokenizer.json`` and the
pipeline's own prompt protocol (``NextStepPipeline.prompt_rows`` on the meta-device model: the exact rows a call
prefills). :func:`model_info` returns a JSON-ready dict; :func:`format_info` renders it for people.

Memory figures are of tensors as the code allocates them: weights (float, or int8/fp8 weight-only: one byte per
quantized weight plus one float32 scale per output channel, everything else in the compute dtype) and the KV cache
(keys and values of every layer, its validity mask, slot indices and rotary tables, for the rows a call prefills:
images x guidance branches, and the prompt plus every image token). Activations and allocator overhead come on
top. Under tensor parallelism each rank holds its share of the attention/MLP weights and of the KV heads.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import textwrap
from pathlib import Path
from typing import Any

import torch

from .checkpoint import read_json, require_dir, safetensors_files
from .config import NextStepConfig, SamplingConfig, VAEConfig
from .errors import CheckpointError, InputError
from .model.nextstep import NextStep
from .model.vae import VAE
from .official import schema_of
from .quant import linears_to_quantize
from .sampling.guidance import Guidance
from .tokenizer import Tokenizer

TYPICAL_PROMPT = "a photo of a red apple on a wooden table next to a blue ceramic mug, soft morning light"
SIZES = (256, 512, 1024)  # square image sides for the KV-cache table (the model's native size is added)
BATCHES = (1, 4)  # images per call for the KV-cache table
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# parameter groups of NextStep, by attribute name (every parameter belongs to exactly one)
GROUPS = {"embeddings": ("embed_tokens",), "backbone": ("transformer",), "lm_head": ("lm_head",),
          "projectors": ("image_in_projector", "image_out_projector"), "flow_head": ("image_head",),
          "parallel_decoding": ("image_ahead", "image_reread")}  # adapter and correction (0 in a model without)
WIDTH = 116  # text output is wrapped to this many columns (the KV table excepted)
QUANT_SCALE_BYTES = 4  # one float32 scale per output channel (nextstep.quant)


def model_info(model_dir: str | os.PathLike, vae_dir: str | os.PathLike | None = None, *,
               kv_dtype: str = "bfloat16", prompt: str = TYPICAL_PROMPT) -> dict[str, Any]:
    """Parameter counts, weight memory per dtype and quantization, KV-cache memory per image size and batch, and
    the largest square image the model's positions allow with ``prompt``. ``vae_dir`` defaults to ``vae/`` inside
    the model directory; without one, an f8 VAE with the model's latent channels is assumed (and said so)."""
    from .pipeline import NextStepPipeline  # the pipeline owns the prompt rows; imported late (it is heavy)

    if kv_dtype not in DTYPES:
        raise InputError(f"kv_dtype must be one of {sorted(DTYPES)}, got {kv_dtype!r}")
    root = require_dir(model_dir, "model")
    raw = read_json(root / "config.json", "model config.json")
    fmt = schema_of(raw)
    config = NextStepConfig.from_official(raw)
    vae_path = Path(vae_dir) if vae_dir is not None else root / "vae"
    vae_found = (vae_path / "config.json").is_file()
    vae_config = (VAEConfig.from_official(read_json(vae_path / "config.json", "VAE config.json"), fmt) if vae_found
                  else VAEConfig(z_channels=config.latent_channels))
    with torch.device("meta"):
        model, vae = NextStep(config), VAE(vae_config)
    pipe = NextStepPipeline(model, vae, Tokenizer.from_pretrained(root), SamplingConfig.from_model_dir(root), fmt)
    t = config.transformer
    counts = parameter_counts(model)
    vae_params = sum(p.numel() for p in vae.parameters())
    return {
        "model_dir": str(root), "format": fmt,
        "architecture": {"hidden_size": t.hidden_size, "layers": t.num_layers, "heads": t.num_heads,
                         "kv_heads": t.num_kv_heads, "head_dim": t.head_dim, "intermediate_size": t.intermediate_size,
                         "vocab_size": t.vocab_size, "tied_embeddings": t.tie_word_embeddings,
                         "flow_head": {"width": config.head.width, "depth": config.head.depth},
                         "parallel_tokens": config.parallel_tokens},
        "parameters": counts,
        "vae": {"dir": str(vae_path) if vae_found else None, "parameters": vae_params if vae_found else None,
                "downsample": vae_config.downsample, "latent_channels": vae_config.z_channels},
        "checkpoint": checkpoint_summary(safetensors_files(root)),
        "weights_bytes": weight_bytes(model),
        "vae_weights_bytes": ({name: vae_params * _size(d) for name, d in DTYPES.items() if name != "float16"}
                              if vae_found else None),
        "kv_cache": kv_cache_table(pipe, prompt, kv_dtype),
        "positions": positions(pipe, prompt),
    }


# ---- parameters and weights ----------------------------------------------------------------------------------------
def parameter_counts(model: NextStep) -> dict[str, int]:
    """Parameters per group (a tied LM head counts once, in ``embeddings``), and ``total``."""
    counts = {name: 0 for name in GROUPS}
    owner = {attr: name for name, attrs in GROUPS.items() for attr in attrs}
    for key, p in model.named_parameters():  # shared (tied) parameters are listed once
        top = key.split(".", 1)[0]
        if top not in owner:
            raise ValueError(f"parameter {key} belongs to no group of nextstep.info.GROUPS")
        counts[owner[top]] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def weight_bytes(model: NextStep) -> dict[str, int]:
    """Bytes of the model's weights: ``float32`` / ``bfloat16`` (everything in that dtype) and ``KIND+DTYPE`` for
    KIND int8 / fp8 (weight-only quantization of ``quant.linears_to_quantize``'s layers: 1 byte per weight and a
    float32 scale per output channel; everything else in DTYPE, the compute dtype)."""
    total = sum(p.numel() for p in model.parameters())
    linears = linears_to_quantize(model).values()
    quantized = sum(m.weight.numel() for m in linears)
    scales = sum(m.out_features for m in linears) * QUANT_SCALE_BYTES
    out = {name: total * _size(DTYPES[name]) for name in ("float32", "bfloat16")}
    for kind, rest in ((k, r) for k in ("int8", "fp8") for r in ("float32", "bfloat16")):
        out[f"{kind}+{rest}"] = quantized + scales + (total - quantized) * _size(DTYPES[rest])
    return out


def checkpoint_summary(files: list[Path]) -> dict[str, Any]:
    """From the safetensors headers alone: files, bytes on disk, tensors, values, and values per stored dtype."""
    tensors, values, dtypes = 0, 0, {}
    for f in files:
        for key, entry in _safetensors_header(f).items():
            if key == "__metadata__":
                continue
            n = math.prod(entry["shape"])
            tensors += 1
            values += n
            dtypes[entry["dtype"]] = dtypes.get(entry["dtype"], 0) + n
    return {"files": len(files), "bytes": sum(f.stat().st_size for f in files), "tensors": tensors, "values": values,
            "dtypes": dtypes}


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON): names, dtypes, shapes.
    (``checkpoint.read_safetensors_header``, once the loader reads headers itself, is the one place for this.)"""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > path.stat().st_size - 8:
            raise CheckpointError(f"{path}: header length {length} runs past the end of the file (truncated?)")
        try:
            return json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from None


# ---- KV cache and positions -----------------------------------------------------------------------------------------
def kv_cache_bytes(config: NextStepConfig, rows: int, length: int, dtype: torch.dtype) -> int:
    """Bytes a ``KVCache`` of ``rows`` x ``length`` slots allocates (``Transformer.new_cache``): keys and values
    (layers, rows, kv_heads, length, head_dim), the (rows, length) bool mask, the int64 slot indices and the
    (length, head_dim) cos and sin tables."""
    t, b = config.transformer, _size(dtype)
    return (2 * t.num_layers * rows * t.num_kv_heads * length * t.head_dim * b + rows * length + 8 * length
            + 2 * length * t.head_dim * b)


def prompt_length(pipe, prompt: str, grid: tuple[int, int]) -> tuple[int, int]:
    """(tokens of the longest prefilled row, guidance branches) for one image of ``grid`` with the model's default
    text-to-image settings."""
    settings = pipe.defaults.resolve(False)
    rows = pipe.prompt_rows(prompt, grid, settings, edit=False)
    return max(len(r) for r in rows), len(rows)


def kv_cache_table(pipe, prompt: str, dtype_name: str) -> dict[str, Any]:
    """KV-cache bytes per square size (SIZES and the native size) for one image without guidance (1 row) and for
    BATCHES images with classifier-free guidance (2 rows each)."""
    cfg, m = pipe.model.config, pipe.size_multiple
    limit = cfg.transformer.max_position_embeddings
    branches = len(Guidance(text_scale=2.0).branches)  # rows per image under classifier-free guidance
    native = m * cfg.base_image_grid_size
    rows_per = {"1 image, no guidance": 1, **{f"{b} image{'s' * (b > 1)}, guidance": b * branches for b in BATCHES}}
    table = []
    for side in sorted(set(SIZES) | {native}):
        g = side // m
        longest, _ = prompt_length(pipe, prompt, (g, g))
        length = longest + g * g
        entry = {"size": side, "image_tokens": g * g, "positions": length, "fits": length <= limit}
        entry["bytes"] = {k: kv_cache_bytes(cfg, r, length, DTYPES[dtype_name]) for k, r in rows_per.items()}
        table.append(entry)
    return {"dtype": dtype_name, "prompt": prompt, "rows": rows_per, "sizes": table}


def positions(pipe, prompt: str) -> dict[str, Any]:
    """The largest square image whose prompt rows plus image tokens fit the model's positions (the pipeline's own
    length check), and the native size."""
    cfg, m = pipe.model.config, pipe.size_multiple
    limit = cfg.transformer.max_position_embeddings
    g = pipe.largest_square(prompt, pipe.defaults.resolve(False), edit=False) // m  # the size errors' advice too
    longest, _ = prompt_length(pipe, prompt, (max(g, 1), max(g, 1)))
    return {"max_position_embeddings": limit, "prompt_tokens": longest, "native_size": m * cfg.base_image_grid_size,
            "largest_square": g * m, "largest_square_tokens": g * g, "pixels_per_token": m}


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---- text ----------------------------------------------------------------------------------------------------------
def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M'; with unit 'B': binary bytes, '1.18 MiB'."""
    if unit == "B":
        for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(n) < 1024 or suffix == "TiB":
                return f"{n:.0f} {suffix}" if suffix == "B" else f"{n:.2f} {suffix}"
            n /= 1024
    for suffix, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{suffix}"
    return f"{n:.0f}"


def format_info(info: dict[str, Any]) -> str:
    p, a, v, c = info["parameters"], info["architecture"], info["vae"], info["checkpoint"]
    lm = "tied to the embeddings" if a["tied_embeddings"] else human(p["lm_head"])
    lines = [
        f"model        {info['model_dir']} ({'NextStep-1.1' if info['format'] == 'v1.1' else 'NextStep-1'} format)",
        f"architecture {a['layers']} layers, hidden {a['hidden_size']}, {a['heads']} heads / {a['kv_heads']} KV heads "
        f"x {a['head_dim']}, MLP {a['intermediate_size']}, vocabulary {a['vocab_size']}; flow head "
        f"{a['flow_head']['depth']} blocks x {a['flow_head']['width']}"
        + (f"; parallel decoding up to {a['parallel_tokens']} image tokens per forward (--parallel)"
           if a["parallel_tokens"] > 1 else ""),
        f"parameters   {human(p['total'])} ({p['total']:,}): backbone {human(p['backbone'])}, flow head "
        f"{human(p['flow_head'])}, embeddings {human(p['embeddings'])}, LM head {lm}, image projectors "
        f"{human(p['projectors'])}" + (f", parallel decoding {human(p['parallel_decoding'])}"
                                       if p["parallel_decoding"] else ""),
        (f"VAE          {human(v['parameters'])} parameters, f{v['downsample']} with {v['latent_channels']} latent "
         f"channels ({v['dir']})") if v["dir"] else
        f"VAE          none found: pixel sizes below assume f{v['downsample']} (pass --vae DIR)",
        f"checkpoint   {c['files']} file(s), {human(c['bytes'], 'B')}, {c['tensors']} tensors, {c['values']:,} values "
        f"({', '.join(f'{k} {human(n)}' for k, n in c['dtypes'].items())})",
        "",
        "weights      (quantized: int8/fp8 linear weights, the rest in the column's dtype)",
        f"  {'':>11} {'float32':>12} {'bfloat16':>12}",
    ]
    w = info["weights_bytes"]
    for label, prefix in (("float", ""), ("int8", "int8+"), ("fp8", "fp8+")):
        lines.append(f"  {label:>11}" + "".join(f" {human(w[prefix + d], 'B'):>12}" for d in ("float32", "bfloat16")))
    if info["vae_weights_bytes"]:
        lines.append(f"  {'VAE':>11}" + "".join(f" {human(n, 'B'):>12}" for n in info["vae_weights_bytes"].values()))
    kv = info["kv_cache"]
    pos = info["positions"]
    lines += ["", f"KV cache     {kv['dtype']}; positions = the prompt row ({kv['prompt']!r}, with the image header) "
                  f"+ the image tokens; rows = images x guidance branches"]
    header = f"  {'size':>11} {'positions':>10}" + "".join(f" {k:>22}" for k in kv["rows"])
    lines.append(header)
    for e in kv["sizes"]:
        size = f"{e['size']}x{e['size']}"
        cells = ("".join(f" {human(n, 'B'):>22}" for n in e["bytes"].values()) if e["fits"]
                 else f"  exceeds the {pos['max_position_embeddings']} positions")
        lines.append(f"  {size:>11} {e['positions']:>10}{cells}")
    lines += ["", f"positions    {pos['max_position_embeddings']}: largest square with this prompt "
                  f"{pos['largest_square']}x{pos['largest_square']} ({pos['prompt_tokens']} prompt + "
                  f"{pos['largest_square_tokens']} image tokens); native size "
                  f"{pos['native_size']}x{pos['native_size']}"]
    return "\n".join(textwrap.fill(line, WIDTH, subsequent_indent=" " * 13, break_on_hyphens=False)
                     if not line.startswith("  ") else line for line in lines)


# ---- LoRA training memory ------------------------------------------------------------------------------------------
TRAIN_PROMPT_TOKENS = 64  # text tokens per training sequence when no tokenizer is at hand (a preset)
LORA_STATE_BYTES = 16  # per adapter parameter: float32 value, gradient, AdamW's two moments
LOGIT_BYTES = 4  # text logits are cast to float32 for the cross-entropy
PROCESS_BYTES = 512 * 2**20  # the process itself: interpreter, libtorch and friends (on a GPU: the CUDA context)
WORKSPACE_FRACTION = 0.05  # allocator slack and transient buffers, on top of everything else


def lora_training_memory(config: NextStepConfig, *, rank: int, height: int, width: int, batch: int = 1,
                         targets=("attn", "mlp"), quantize: str | None = None, dtype: str = "bfloat16",
                         checkpointing: bool = True, prompt_tokens: int = TRAIN_PROMPT_TOKENS,
                         downsample: int = 8) -> dict[str, Any]:
    """Estimated peak memory of a LoRA training step on a frozen base (``nextstep train`` with a ``lora`` section), in
    bytes per term, from the config's layer shapes alone (the model is built on the ``meta`` device).

    Sequence: T = prompt_tokens + N, N = (height/downsample/patch) * (width/downsample/patch) image tokens, B rows.
    a = bytes of the activations (``dtype``: the compute dtype, also of the non-quantized weights).
      base_weights     every weight in ``dtype``; with ``quantize`` int8/fp8: 1 byte per linear weight plus one
                       float32 scale per output channel (``weight_bytes``)
      lora             rank * (in + out) per targeted linear (``nextstep.lora.TARGETS``), LORA_STATE_BYTES each:
                       float32 value, gradient and AdamW's two moments
      checkpoints      with checkpointing, every decoder layer's input: L * B * T * d * a
      layer            one decoder layer's saved activations, recomputed in the backward, and as much again for their
                       gradients: 2 * B * T * (5d + 3 h hd + 3 kv hd + 4 I + r * (LoRA layers per decoder layer)) * a,
                       plus its attention probabilities B * h * T^2 * a (the math kernel's; fused kernels keep less).
                       Without checkpointing every layer keeps its activations (L times the first part, not doubled)
      logits           the text positions' float32 logits and their gradient: 2 * B * prompt_tokens * V * 4
      flow_head        the head runs on R = B * N * batch_mul rows (each image token repeated batch_mul times),
                       not checkpointed: R * (d + 4w + depth * (8w + 2 inner) + 4w) * a (the repeated condition, the
                       time / condition / input embeddings, each residual block's saved tensors, the final layer)
      workspace        the largest quantized linear dequantized to ``dtype`` (its backward to the input), then
                       WORKSPACE_FRACTION of all the above
      process          PROCESS_BYTES
    Data (the latent cache), the VAE and the tokenizer are not counted: the AR trainer encodes images once up front.
    """
    from .lora import TARGETS, check_targets  # the adapters' own target groups

    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if quantize not in (None, "int8", "fp8"):
        raise InputError(f"quantize must be int8 or fp8 (or none), got {quantize!r}")
    for name, v in (("rank", rank), ("batch", batch), ("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{name} must be an integer >= 1, got {v!r}")
    if prompt_tokens < 0:
        raise InputError(f"prompt_tokens must be >= 0, got {prompt_tokens}")
    m = downsample * config.patch_size
    if height % m or width % m:
        raise InputError(f"training size {height}x{width} must be a multiple of {m} (VAE f{downsample} x patch "
                         f"{config.patch_size})")
    targets = check_targets(targets)
    with torch.device("meta"):
        model = NextStep(config)
    t, h = config.transformer, config.head
    a = _size(DTYPES[dtype])
    n_img = (height // m) * (width // m)
    seq = prompt_tokens + n_img
    d, layers = t.hidden_size, t.num_layers

    pattern = re.compile("|".join(f"({TARGETS[g]})" for g in targets))
    lora_linears = {k: mod for k, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)
                    and pattern.fullmatch(k)}
    lora_params = sum(rank * (mod.in_features + mod.out_features) for mod in lora_linears.values())
    per_layer = sum(1 for k in lora_linears if k.startswith("transformer.layers.0."))

    weights = weight_bytes(model)["float32" if dtype == "float32" else "bfloat16"]
    if quantize:
        weights = weight_bytes(model)[f"{quantize}+{'float32' if dtype == 'float32' else 'bfloat16'}"]
        if dtype == "float16":
            raise InputError("quantize: the compute dtype of a quantized base is bfloat16 or float32")
    elif dtype == "float16":
        weights = sum(p.numel() for p in model.parameters()) * 2

    layer_values = (5 * d + 3 * t.num_heads * t.head_dim + 3 * t.num_kv_heads * t.head_dim
                    + 4 * t.intermediate_size + rank * per_layer)  # per token
    one_layer = batch * seq * layer_values * a
    attn_probs = batch * t.num_heads * seq * seq * a
    if checkpointing:
        checkpoints = layers * batch * seq * d * a
        layer = 2 * one_layer + attn_probs
    else:
        checkpoints = 0
        layer = layers * (one_layer + attn_probs)
    logits = 2 * batch * prompt_tokens * t.vocab_size * LOGIT_BYTES
    rows = batch * n_img * h.batch_mul
    inner = int(h.width * h.mlp_ratio)
    flow_head = rows * (d + 4 * h.width + h.depth * (8 * h.width + 2 * inner) + 4 * h.width) * a
    largest = max((mod.weight.numel() for mod in linears_to_quantize(model).values()), default=0)
    terms = {"base_weights": weights, "lora": lora_params * LORA_STATE_BYTES, "checkpoints": checkpoints,
             "layer": layer, "logits": logits, "flow_head": flow_head,
             "workspace": largest * a if quantize else 0}
    terms["workspace"] += int(WORKSPACE_FRACTION * sum(terms.values()))
    terms["process"] = PROCESS_BYTES
    return {"rank": rank, "targets": list(targets), "lora_layers": len(lora_linears), "lora_parameters": lora_params,
            "size": [height, width], "batch": batch, "quantize": quantize, "dtype": dtype,
            "checkpointing": checkpointing, "sequence": {"prompt_tokens": prompt_tokens, "image_tokens": n_img,
                                                          "total": seq, "head_rows": rows},
            "bytes": terms, "total_bytes": sum(terms.values())}


def format_lora_memory(plan: dict[str, Any], what: str) -> str:
    """The plan of ``lora_training_memory`` as a small table for people."""
    s, b = plan["sequence"], plan["bytes"]
    lines = [f"LoRA training memory   {what}: rank {plan['rank']} on {'+'.join(plan['targets'])} "
             f"({plan['lora_layers']} linears, {human(plan['lora_parameters'])} adapter parameters), "
             f"{plan['size'][0]}x{plan['size'][1]}, batch {plan['batch']}, base "
             f"{plan['quantize'] or plan['dtype']} (activations {plan['dtype']}), checkpointing "
             f"{'on' if plan['checkpointing'] else 'off'}",
             f"  sequence {s['total']} tokens ({s['prompt_tokens']} prompt + {s['image_tokens']} image), flow head "
             f"{s['head_rows']} rows"]
    labels = {"base_weights": "base weights", "lora": "adapters + grads + AdamW",
              "checkpoints": "checkpointed layer inputs", "layer": "layer activations",
              "logits": "text logits", "flow_head": "flow head activations", "workspace": "workspace",
              "process": "process"}
    lines += [f"  {labels[k]:<27} {human(v, 'B'):>12}" for k, v in b.items()]
    lines.append(f"  {'total (estimate)':<27} {human(plan['total_bytes'], 'B'):>12} "
                 f"({plan['total_bytes'] / 1e9:.1f} GB)")
    return "\n".join(lines)


def lora_memory_info(model_dir: str | os.PathLike | None = None, *, preset_name: str | None = None,
                     vae_dir: str | os.PathLike | None = None, prompt: str = TYPICAL_PROMPT, **kw: Any
                     ) -> dict[str, Any]:
    """``lora_training_memory`` for a model directory (its config, VAE downsampling and the tokenizer's length of
    ``prompt`` with the image header, as ``model_info`` counts prompt rows) or a ``nextstep.config`` preset (no
    tokenizer: TRAIN_PROMPT_TOKENS, f8). ``kw``: the training figures (rank, height, width, batch, ...)."""
    from .config import preset

    if (model_dir is None) == (preset_name is None):
        raise InputError("give a model directory or a preset, not both or neither")
    if preset_name is not None:
        return {"model": f"preset {preset_name}", **lora_training_memory(preset(preset_name), **kw)}
    from .pipeline import NextStepPipeline

    root = require_dir(model_dir, "model")
    raw = read_json(root / "config.json", "model config.json")
    fmt = schema_of(raw)
    config = NextStepConfig.from_official(raw)
    vae_path = Path(vae_dir) if vae_dir is not None else root / "vae"
    vae_config = (VAEConfig.from_official(read_json(vae_path / "config.json", "VAE config.json"), fmt)
                  if (vae_path / "config.json").is_file() else VAEConfig(z_channels=config.latent_channels))
    with torch.device("meta"):
        model, vae = NextStep(config), VAE(vae_config)
    pipe = NextStepPipeline(model, vae, Tokenizer.from_pretrained(root), SamplingConfig.from_model_dir(root), fmt)
    m = vae_config.downsample * config.patch_size
    grid = (max(kw.get("height", m) // m, 1), max(kw.get("width", m) // m, 1))
    rows, _ = prompt_length(pipe, prompt, grid)
    plan = lora_training_memory(config, prompt_tokens=rows, downsample=vae_config.downsample, **kw)
    return {"model": str(root), **plan}
