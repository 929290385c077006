"""Linear layers with oneDNN-prepacked weights, for inference on a CPU.

At the batch sizes of sampling (1 to 8 rows per call: the guidance branches times the images) PyTorch's default
CPU ``F.linear`` is far from what the CPU can do, and in bfloat16 it is slower than in float32 (its small-row
kernels do not use the CPU's bfloat16 instructions). oneDNN's linear on a weight reordered once into its blocked
layout (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``, what ``torch.compile`` uses on CPU)
computes the same to float rounding, faster at those sizes: 1.06-1.46x per image in float32 and 1.17-1.33x in
bfloat16 on the "ns34m" workload (``python benchmarks/packing.py``, docs/results.md); per layer, ``python
benchmarks/quant.py --skip-memory``.

``packed_linears(*modules)`` is a context: inside it every plain ``nn.Linear`` of ``modules`` (float32 or bfloat16
weights on the CPU) computes with a packed copy of its weight, made on its first call in the context and dropped on
exit, so a weight changed between calls (training, a fused LoRA adapter) is always read fresh. Nothing else changes:
the module, its parameters and ``state_dict`` stay as they are. Skipped, with the plain ``F.linear``: float32 single
rows and float32 layers of fewer than ``PACK_MIN_FLOAT32`` weights (there the default kernel is faster: measured in
whole images), inputs that need a gradient, code that ``torch.compile`` traces (the compiler packs weights its own
way, or not), CPU autocast, layers whose ``forward`` something else has replaced, quantized and tensor-parallel
layers, and models whose float linear weights exceed ``PACK_LIMIT_BYTES`` (a packed copy would double them for the
call). The pipeline enters it for every call but ``exact=True`` (``NextStepPipeline._generate``).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

PACK_LIMIT_BYTES = 4 << 30  # float linear weights above this are not packed (the copy would double them)
PACK_MIN_FLOAT32 = 1 << 17  # float32 layers with fewer weights (256 x 256: the bundled model's) are faster plain
PACK_ROWS_HINT = 8  # rows oneDNN lays the packed weight out for (measured: the same speed from 2 to 80 rows)


@functools.cache
def available(dtype: torch.dtype) -> bool:
    """Whether this build and CPU have oneDNN's packed linear for ``dtype`` (bfloat16 needs native support)."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    return dtype == torch.float32 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _packable(m: nn.Module) -> bool:
    if type(m) is not nn.Linear:  # before reading .weight: a quantized layer's dequantizes on every access
        return False
    w = m.weight
    return (w is not None and type(w.data) is torch.Tensor and w.device.type == "cpu"
            and w.layout == torch.strided and available(w.dtype)
            and (w.dtype != torch.float32 or w.numel() >= PACK_MIN_FLOAT32))


def _forward(module: nn.Linear, packed: dict, x: torch.Tensor) -> torch.Tensor:
    w, b = module.weight, module.bias
    if (x.dtype != w.dtype or x.device.type != "cpu" or x.dtype == torch.float32 and x.numel() == x.shape[-1]
            or torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or b is not None and b.requires_grad)
            or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu")):
        return F.linear(x, w, b)
    p = packed.get(module)
    if p is None:
        p = packed[module] = torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_ROWS_HINT)
    return torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "")


@contextlib.contextmanager
def packed_linears(*modules: nn.Module | None):
    """Within the context the plain float ``nn.Linear`` layers of ``modules`` (None entries ignored) compute with
    oneDNN-prepacked weights on the CPU (see the module docstring). A layer whose ``forward`` is already replaced
    (by an enclosing context, or by a hook library) is left as it is, so nested and repeated entries are harmless;
    on exit a layer gets back its class's ``forward`` only if it still has the one this context gave it."""
    linears = list(dict.fromkeys(m for mod in modules if mod is not None for m in mod.modules() if _packable(m)))
    if not linears or sum(m.weight.numel() * m.weight.element_size() for m in linears) > PACK_LIMIT_BYTES:
        yield
        return
    packed: dict[nn.Module, torch.Tensor] = {}
    mine = {}
    for m in linears:
        if "forward" not in m.__dict__:  # an instance attribute shadows nn.Linear.forward
            mine[m] = m.forward = functools.partial(_forward, m, packed)
    try:
        yield
    finally:
        for m, forward in mine.items():
            if m.__dict__.get("forward") is forward:
                del m.forward
