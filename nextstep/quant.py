"""Weight-only int8 / fp8 linear layers, applied to a loaded model from outside (as parallelism is).

``quantize_(model, "int8" | "fp8")`` replaces every ``nn.Linear`` of a module (backbone, projectors, flow head,
``lm_head`` unless it is tied to the embedding) by a ``QuantizedLinear``; embeddings, norms and anything that is
not an ``nn.Linear`` stay float. Weights get one symmetric scale per output channel:

    int8: q = round(w / s), s = max|w_row| / 127, q in [-127, 127]
    fp8:  q = e4m3(w / s),  s = max|w_row| / 448

so ``y = (x @ q^T) * s + b``: the scale is applied to the output, never to a dequantized copy of the weight.

Kernels (``benchmarks/quant.py`` measures them; one thread, 1-6 rows, this is the flow head's and the decode
step's batch):
- int8 on CPU: fbgemm's dynamic-quantization linear (``torch.ops.quantized.linear_dynamic``; the activation rows
  are quantized to uint8 on the fly, accumulation in int32; in a prefill or the head's batched modulations each row
  is first scaled to a largest |value| of 1, so that fbgemm's one scale for the whole input serves every row:
  ``_fbgemm_rowwise``). It was 1.5-9x faster than float32 ``F.linear`` on the layer shapes measured, while
  ``aten._weight_int8pack_mm`` was 2-10x slower than float32 and dequantizing on the fly no faster than float32. The
  weight lives only in fbgemm's packed layout (one int8 copy). Where the quantized engine is missing, int8 falls back
  to dequantize-on-the-fly.
- int8 on CUDA: ``F.linear(x, q.to(x.dtype)) * s``, the weight-only form torch.compile fuses into one kernel
  (as gpt-fast does); eager it saves memory, not time.
- fp8 on CUDA with compute capability >= 8.9: ``torch._scaled_mm`` on e4m3 activations (per-row dynamic scales)
  and weights, scales applied to the float32 output. Elsewhere (CPU, older GPUs) the weight is upcast to the
  activation dtype on the fly: a memory format there, slower than float32 on CPU.

A quantized model is for inference: ``NextStep.save_pretrained`` refuses it (``is_quantized``), and a dtype cast
(``model.to(torch.bfloat16)``) changes only the compute dtype (biases, the dequantized output), never the stored
int8/fp8 weights or their float32 scales.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import StoredTensor
from .errors import InputError

KINDS = ("int8", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
INT8_MAX = 127  # symmetric: -128 is never used
QUANT_BLOCK_BYTES = 16 << 20  # float32 rows quantized at a time (the one work block)


def quantize_weight(weight: torch.Tensor | StoredTensor, kind: str, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (q, scale): q (out, in) int8, or uint8 holding e4m3 bits for fp8 (a dtype cast of
    the module can then never touch it); scale (out,) float32:

        scale = max|w_row| / top (1 for an all-zero row),  q = round(w / scale) (int8) or e4m3(w / scale)

    ``weight`` may be a ``StoredTensor`` (loading), read and cast to ``dtype`` first (the model's dtype: rounded to
    it before quantizing, as a float model would be). Computed in float32 on ``device`` (default: the weight's) a
    block of rows at a time, in place in one float32 work block of at most ``QUANT_BLOCK_BYTES`` (every step is per
    row, so the result is the same bit for bit; and no temporaries of a block's size come and go, which would
    fragment the host heap between the model's tensors)."""
    check_kind(kind)
    stored = isinstance(weight, StoredTensor)
    device = torch.device(device) if device is not None else (torch.device("cpu") if stored else weight.device)
    want = dtype or weight.dtype
    n_out, n_in = weight.shape
    q = torch.empty(n_out, n_in, dtype=torch.int8 if kind == "int8" else FP8, device=device)
    scale = torch.empty(n_out, dtype=torch.float32, device=device)
    step = min(n_out, max(1, QUANT_BLOCK_BYTES // max(1, 4 * n_in)))
    work = torch.empty(step, n_in, dtype=torch.float32, device=device)
    cast = None if want == torch.float32 else torch.empty(step, n_in, dtype=want, device=device)
    top = INT8_MAX if kind == "int8" else FP8_MAX
    for i in range(0, n_out, step):
        j = min(i + step, n_out)
        w = work[:j - i]  # (rows, in) float32
        rows = w if cast is None else cast[:j - i]  # the weight's rows in the model's dtype
        if stored:
            weight.read(rows=(i, j), out=rows)
        else:
            rows.copy_(weight.detach()[i:j])
        if cast is not None:
            w.copy_(rows)
        amax = torch.maximum(w.amax(dim=1), w.amin(dim=1).neg_())  # max |w| per row, without an |w| copy
        s = torch.where(amax > 0, amax / top, torch.ones_like(amax))  # an all-zero row keeps q = 0
        w.div_(s[:, None])
        if kind == "int8":
            w.round_().clamp_(-INT8_MAX, INT8_MAX)
        else:
            w.clamp_(-FP8_MAX, FP8_MAX)
        q[i:j].copy_(w)
        scale[i:j] = s
    return (q if kind == "int8" else q.view(torch.uint8)), scale


class QuantizedLinear(nn.Module):
    """``nn.Linear`` with a weight-only quantized weight. Input (..., in_features) in any float dtype ->
    (..., out_features) in the same dtype.

    State: ``qweight`` (out, in) int8 or e4m3 bits (uint8), ``scale`` (out,) float32, ``bias`` (out,) or None in the
    compute dtype. On CPU an int8 weight is kept in fbgemm's packed layout instead of ``qweight`` (``int_weight()``
    and ``state_dict()`` unpack it, bit for bit)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, kind: str,
                 dtype: torch.dtype):
        super().__init__()
        check_kind(kind)
        want = torch.int8 if kind == "int8" else torch.uint8
        if qweight.dim() != 2 or qweight.dtype != want:
            raise ValueError(f"{kind} qweight must be a 2-D {want} tensor, got {qweight.dtype} {tuple(qweight.shape)}")
        if scale.shape != qweight.shape[:1]:
            raise ValueError(f"scale must be ({qweight.shape[0]},), got {tuple(scale.shape)}")
        self.kind = kind
        self.out_features, self.in_features = qweight.shape
        self.dtype = dtype  # the compute dtype: of the float weight this replaces, changed by .to(dtype)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.float())
        self.set_bias(bias)
        self._packed = None  # fbgemm's packed int8 weight (CPU), replacing qweight
        self._pack()

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str) -> QuantizedLinear:
        q, s = quantize_weight(linear.weight, kind)
        return cls(q, s, linear.bias, kind, linear.weight.dtype)

    def set_bias(self, bias: torch.Tensor | None) -> None:
        """(out,) bias, kept in the compute dtype, or None."""
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().to(self.dtype), requires_grad=False)

    # ---- storage ------------------------------------------------------------------------------------------------
    def _pack(self) -> None:
        if self.kind == "int8" and self.qweight is not None and self.qweight.device.type == "cpu" and _fbgemm():
            self._packed = _fbgemm_pack(self.qweight, self.scale)
            self.qweight = None

    def _unpack(self) -> None:
        if self._packed is not None:
            self.qweight = _fbgemm_unpack(self._packed)
            self._packed = None

    def int_weight(self) -> torch.Tensor:
        """The stored (out, in) weight: int8, or float8_e4m3fn for fp8."""
        q = self.qweight if self._packed is None else _fbgemm_unpack(self._packed)
        return q if self.kind == "int8" else q.view(FP8)

    @property
    def weight(self) -> torch.Tensor:
        """A dequantized (out, in) copy in the compute dtype, for code that reads ``.weight`` (its dtype, or to fuse
        weights). Built on every access: the forward pass never uses it."""
        return (self.int_weight().float() * self.scale[:, None]).to(self.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packed is not None:  # qweight is None while packed: write the int8 weight all the same
            destination[prefix + "qweight"] = _fbgemm_unpack(self._packed)

    def _apply(self, fn, recurse=True):
        # A device move moves the quantized weight and scales; a dtype cast changes only the compute dtype (and the
        # bias): casting e4m3 bits or float32 scales to bfloat16 would lose what the quantization kept.
        probe = fn(torch.zeros((), dtype=self.dtype, device=self.scale.device))
        self._unpack()
        self.qweight = self.qweight.to(probe.device)
        self.scale = self.scale.to(probe.device)
        if self.bias is not None:
            self.bias.data = fn(self.bias.data)
        self.dtype = probe.dtype
        self._pack()
        return self

    # ---- compute ------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        # a sequence of rows (a prefill, the head's batched modulations: (B, T > 1, D)) gets per-row activation scales
        # on fbgemm; the per-token calls (a decode step (B, 1, D), a head step (N, D)) do not pay for them
        rowwise = x.dim() >= 3 and x.shape[-2] > 1
        # training adapters on a frozen quantized base (QLoRA) backpropagates through this layer to its input: the
        # fast kernels have no backward (fbgemm's would be silently wrong), so the gradient is taken against the
        # dequantized weight; inference (no gradient asked) takes the kernels directly, unchanged
        if torch.is_grad_enabled() and x2.requires_grad:
            y = _FrozenWeightMatmul.apply(x2, self, rowwise)
        else:
            y = self._matmul(x2, rowwise)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def _matmul(self, x2: torch.Tensor, rowwise: bool) -> torch.Tensor:
        """(M, in) -> (M, out) in x2's dtype, without the bias."""
        if self._packed is not None:
            return _fbgemm_rowwise(x2.float(), self._packed, rowwise).to(x2.dtype)
        if self.kind == "fp8" and _scaled_mm_ok(x2, self.out_features):
            return fp8_scaled_mm(x2, self.qweight.view(FP8), self.scale)
        return dequant_mm(x2, self.int_weight(), self.scale)

    def extra_repr(self) -> str:
        where = "fbgemm" if self._packed is not None else "tensor"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kind={self.kind}, dtype={self.dtype}, storage={where}")


class _FrozenWeightMatmul(torch.autograd.Function):
    """``QuantizedLinear._matmul`` with a backward to its input only (the weight is frozen): grad_x = (grad_y *
    scale) @ q, the gradient of the dequantized layer, as QLoRA takes it."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, layer: QuantizedLinear, rowwise: bool) -> torch.Tensor:
        ctx.layer = layer
        return layer._matmul(x2, rowwise)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        layer = ctx.layer
        return (grad * layer.scale.to(grad.dtype)) @ layer.int_weight().to(grad.dtype), None, None


def dequant_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(M, in) x, (out, in) int8 or e4m3 q, (out,) scale -> (M, out) in x's dtype: the weight is upcast to the
    activation dtype (exact for int8 and e4m3 in float32/bfloat16/float16) and the scale applied to the output."""
    return F.linear(x, q.to(x.dtype)) * scale.to(x.dtype)


def fp8_scaled_mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(M, in) x, (out, in) e4m3 q, (out,) scale -> (M, out) in x's dtype, on fp8 tensor cores: each row of x is
    scaled into e4m3's range, multiplied with unit scales into float32, and both scales applied to the output
    (unit tensor-wise scales are the ``_scaled_mm`` mode every fp8 GPU supports)."""
    xs = x.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-12) / FP8_MAX  # (M, 1)
    x8 = (x.float() / xs).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    one = torch.ones((), device=x.device, dtype=torch.float32)
    y = torch._scaled_mm(x8, q.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)  # (M, out)
    return (y * xs * scale).to(x.dtype)


def _scaled_mm_ok(x: torch.Tensor, out_features: int) -> bool:
    """fp8 matmul needs a GPU with compute capability >= 8.9 and both matrix sides in multiples of 16."""
    return (x.is_cuda and _fp8_capable(x.device.index if x.device.index is not None else torch.cuda.current_device())
            and x.shape[1] % 16 == 0 and out_features % 16 == 0)


@functools.cache
def _fp8_capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)


# ---- fbgemm (CPU int8) -------------------------------------------------------------------------------------------
# reduce_range keeps activations to 7 bits, needed on x86 CPUs without VNNI whose int8 instructions saturate 16-bit
# partial sums; with VNNI the full 8 bits are exact, more accurate, and (measured) faster.
_REDUCE_RANGE = not (hasattr(torch.cpu, "_is_vnni_supported") and torch.cpu._is_vnni_supported())


@functools.cache
def _fbgemm() -> bool:
    return hasattr(torch.ops.quantized, "linear_dynamic") and "fbgemm" in torch.backends.quantized.supported_engines


def _fbgemm_rowwise(x: torch.Tensor, packed, rowwise: bool = True) -> torch.Tensor:
    """fbgemm's int8 linear (no bias), with one activation scale per ROW when ``rowwise``: fbgemm quantizes its whole
    input with one scale, so a row of large values (an attention-sink position in a prefill) would leave the others
    a few levels. Each row is divided by its largest |value| first and the output row multiplied back (the product is
    linear in each row): every row then reaches the ends of fbgemm's range ([-1, 1] for the batch), so it gets at
    least half of the levels, whatever the other rows hold. Its four extra operations would double the cost of a
    small per-token call (measured 20 -> 40 us at 2 x 512 x 512), which ``QuantizedLinear.forward`` spares."""
    if not rowwise:
        return torch.ops.quantized.linear_dynamic(x, packed, _REDUCE_RANGE)
    s = x.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)  # (M, 1)
    return torch.ops.quantized.linear_dynamic(x / s, packed, _REDUCE_RANGE) * s


def _fbgemm_pack(q: torch.Tensor, scale: torch.Tensor):
    with warnings.catch_warnings():  # quantized tensors are deprecated in torch; this is the only use, and int8
        warnings.simplefilter("ignore", UserWarning)  # falls back to dequantize-on-the-fly where they are gone
        qt = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qt, None)


def _fbgemm_unpack(packed) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.ops.quantized.linear_unpack(packed)[0].int_repr()


# ---- whole models ------------------------------------------------------------------------------------------------
def linears_to_quantize(module: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``module`` by qualified name, except one whose weight is an embedding's (a tied
    ``lm_head``; while loading, its weight is None until it is tied again)."""
    tied = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    return {name: m for name, m in module.named_modules()
            if type(m) is nn.Linear and m.weight is not None and id(m.weight) not in tied}


def quantize_(module: nn.Module, kind: str) -> nn.Module:
    """Replace every linear layer of ``module`` (see ``linears_to_quantize``) by a ``QuantizedLinear`` of ``kind``,
    in place, one layer at a time; returns ``module``."""
    check_kind(kind)
    already = quantized_kind(module)
    if already is not None:
        raise InputError(f"the module is already quantized ({already}); quantize a float model")
    for name, linear in linears_to_quantize(module).items():
        module.set_submodule(name, QuantizedLinear.from_linear(linear, kind))
    return module


class LoadTimeQuantizer:
    """Quantizes ``model``'s linear layers while it is loaded (``NextStep.from_pretrained(quantize=)``): passed as
    ``assign_state_dict(..., take=quantizer)``, it claims each linear weight as it comes, reads it a block of rows at
    a time and builds its ``QuantizedLinear`` at once (on CPU, int8 goes straight into fbgemm's packed layout);
    ``finish()`` gives the layers their biases, loaded by then, and swaps them in. The float weights are never in
    memory: the host peak is the quantized model plus one block's temporaries and, while fbgemm packs a layer, two
    more int8 copies of it (measured: +250 MB for a 32000 x 4096 lm_head). Equal, bit for bit, to loading in float
    and then ``quantize_``."""

    def __init__(self, model: nn.Module, kind: str, dtype: torch.dtype | None, device: torch.device | str):
        check_kind(kind)
        self.model, self.kind, self.device = model, kind, device
        self.targets = linears_to_quantize(model)  # on meta: name -> nn.Linear
        self.dtypes = {name: dtype or lin.weight.dtype for name, lin in self.targets.items()}
        self.done: dict[str, QuantizedLinear] = {}

    def __call__(self, key: str, tensor: torch.Tensor | StoredTensor) -> bool:
        owner, _, leaf = key.rpartition(".")
        if leaf != "weight" or owner not in self.targets:
            return False
        q, s = quantize_weight(tensor, self.kind, self.dtypes[owner], self.device)
        self.done[owner] = QuantizedLinear(q, s, None, self.kind, self.dtypes[owner])
        return True

    def finish(self) -> None:
        missing = sorted(set(self.targets) - set(self.done))
        assert not missing, missing  # assign_state_dict checked every key before
        for name, lin in self.targets.items():
            layer = self.done.pop(name)
            layer.set_bias(lin.bias)
            self.model.set_submodule(name, layer)


@contextlib.contextmanager
def unpacked(module: nn.Module):
    """Inside the block every ``QuantizedLinear`` of ``module`` holds its int8 weight as the ``qweight`` tensor
    rather than fbgemm's packed object (for code that reads ``qweight``, as PEFT does to place an adapter); packed
    again after it, bit for bit."""
    layers = [m for m in module.modules() if isinstance(m, QuantizedLinear) and m._packed is not None]
    for m in layers:
        m._unpack()
    try:
        yield module
    finally:
        for m in layers:
            m._pack()


def quantized_kind(module: nn.Module) -> str | None:
    """``"int8"`` / ``"fp8"`` if ``module`` holds quantized layers, else None."""
    return next((m.kind for m in module.modules() if isinstance(m, QuantizedLinear)), None)


def is_quantized(module: nn.Module) -> bool:
    return quantized_kind(module) is not None


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InputError(f"quantization must be one of {KINDS}, got {kind!r}")
