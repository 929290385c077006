"""Tensor-parallel inference on PyTorch's own engine (``torch.distributed.tensor.parallel``), applied from outside
the model.

Megatron-style split of every decoder layer over a 1-D ``DeviceMesh`` of ``tp`` ranks:
    q/k/v_proj, gate/up_proj   ColwiseParallel: each rank holds ``1/tp`` of the output features (whole heads)
    o_proj, down_proj          RowwiseParallel: each rank multiplies its share, one all-reduce sums the parts
so a layer costs two all-reduces and the residual stream, norms and everything outside the decoder layers (token
embedding, LM head, image projectors, the flow head) stay replicated: the simplest correct choice, since the
backbone's layers hold nearly all the weights (NextStep-1: 13.2B of 15.0B parameters split; of the replicated
1.7B, the embedding and the LM head are 0.78B each, a vocabulary-parallel split left for when memory asks; weights
per rank in bfloat16: 15.5 GiB at tp 2, 9.4 at 4, 6.3 at 8, against 27.9 on one device).
Attention runs on this rank's heads: ``tensor_parallel`` divides each attention module's head counts by ``tp``,
and the KV cache is sized from them, so each rank caches ``1/tp`` of the keys and values.

Every rank runs the same sampling: the replicated parts compute the same numbers on every rank and the all-reduce
hands every rank the same sum, so with the same generator seed each rank draws the same noise and the same image
(only one needs to save it). The rounding differs from one device by the order of the partial sums only.

``load_model`` (``NextStepPipeline.from_pretrained(..., tp_mesh=mesh)``) builds the model on the ``meta`` device,
splits it, then reads from the safetensors files only this rank's rows (columns) of each split weight
(``safe_open(...).get_slice``) and the replicated tensors whole: a rank never holds the full backbone.

Processes and the mesh are the caller's (rule 4): under ``torchrun``, e.g.
    dist.init_process_group("gloo" or "nccl"); mesh = init_device_mesh("cpu" or "cuda", (world_size,))
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from safetensors import safe_open
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from . import quant
from .checkpoint import assign_state_dict, read_json, require_dir, safetensors_files
from .config import NextStepConfig, TransformerConfig
from .errors import CheckpointError, InputError
from .model.nextstep import OFFICIAL_IGNORED_KEYS, NextStep, official_to_ours

# submodule of a DecoderLayer -> its split (one place for the plan)
LAYER_PLAN = {
    "self_attn.q_proj": ColwiseParallel,
    "self_attn.k_proj": ColwiseParallel,
    "self_attn.v_proj": ColwiseParallel,
    "self_attn.o_proj": RowwiseParallel,
    "mlp.gate_proj": ColwiseParallel,
    "mlp.up_proj": ColwiseParallel,
    "mlp.down_proj": RowwiseParallel,
}


def check_degree(cfg: TransformerConfig, tp: int) -> None:
    """Raise ValueError unless ``tp`` ranks can split the backbone evenly: whole query heads, whole KV heads (GQA
    groups stay on one rank) and equal MLP shares."""
    if not isinstance(tp, int) or tp < 1:
        raise InputError(f"the tensor-parallel degree must be a positive integer, got {tp!r}")
    for name, n in (("num_heads (attention heads)", cfg.num_heads), ("num_kv_heads (key/value heads)",
                    cfg.num_kv_heads), ("intermediate_size (MLP width)", cfg.intermediate_size)):
        if n % tp:
            ok = [d for d in range(1, cfg.num_kv_heads + 1)
                  if cfg.num_heads % d == 0 and cfg.num_kv_heads % d == 0 and cfg.intermediate_size % d == 0]
            raise InputError(f"tensor-parallel degree {tp} does not divide the model's {name} = {n}: each rank "
                             f"must hold whole heads and an equal share; degrees that work for this model: {ok}")


def tensor_parallel(model: NextStep, mesh: DeviceMesh) -> NextStep:
    """Split ``model``'s decoder layers over the 1-D ``mesh`` in place (see the module docstring) and return it.

    The model may be on ``meta`` (then load weights with ``load_model``'s reader) or hold full weights on every
    rank (each rank then keeps its share; ``parallelize_module`` takes the values of rank 0)."""
    if mesh.ndim != 1:
        raise InputError(f"tensor parallelism needs a 1-D mesh, got {mesh.ndim} dimensions "
                         f"(pass the tensor-parallel dimension, e.g. mesh['tp'])")
    kind = quant.quantized_kind(model)
    if kind is not None:
        raise InputError(f"this model is quantized ({kind}); tensor parallelism splits float nn.Linear layers: "
                         f"load it in float")
    layers = model.transformer.layers
    if isinstance(layers[0].self_attn.q_proj.weight, DTensor):
        raise InputError("this model is already tensor-parallel")
    tp = mesh.size()
    check_degree(model.config.transformer, tp)
    for layer in layers:
        parallelize_module(layer, mesh, {name: style() for name, style in LAYER_PLAN.items()})
        attn = layer.self_attn
        attn.num_heads, attn.num_kv_heads = attn.num_heads // tp, attn.num_kv_heads // tp
    return model


def load_model(path: str | os.PathLike, *, mesh: DeviceMesh, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> NextStep:
    """``NextStep.from_pretrained`` under tensor parallelism: this rank reads only its shard of each split weight.

    Call it on every rank of ``mesh`` (collective). ``device`` defaults to the mesh's device type (the current
    CUDA device for a CUDA mesh) and must be of that type; ``dtype`` casts the floating weights."""
    device = _mesh_device(mesh, device)
    model_dir = require_dir(path, "model")
    config = NextStepConfig.from_official(read_json(model_dir / "config.json", "model config.json"))
    with torch.device("meta"):
        model = NextStep(config)
    tied = config.transformer.tie_word_embeddings
    if tied:  # as NextStep.from_pretrained: load the embedding once, re-tie after assignment
        del model.lm_head.weight
        model.lm_head.register_parameter("weight", None)
    tensor_parallel(model, mesh)
    expected = model.state_dict(keep_vars=True)
    tensors = ((k, t) for k, t in _read(safetensors_files(model_dir), expected, mesh, dtype, device)
               if not (tied and k == "lm_head.weight"))
    assign_state_dict(model, tensors, source=str(model_dir), dtype=dtype, device=device, ignore=OFFICIAL_IGNORED_KEYS)
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def _mesh_device(mesh: DeviceMesh, device: torch.device | str | None) -> torch.device:
    if device is None:
        if mesh.device_type == "cpu":
            return torch.device("cpu")
        return torch.device(mesh.device_type, torch.get_device_module(mesh.device_type).current_device())
    device = torch.device(device)
    if device.type != mesh.device_type:
        raise ValueError(f"device {device} does not match the mesh's device type {mesh.device_type!r}")
    return device


def _read(files, expected: dict[str, torch.Tensor], mesh: DeviceMesh, dtype, device
          ) -> Iterator[tuple[str, torch.Tensor]]:
    """(our key, tensor) for every tensor of the files: this rank's DTensor shard for a split parameter, read as a
    slice; the whole tensor otherwise (and where the file's shape is wrong, so that the loader names the mismatch)."""
    for f in files:
        try:
            fh = safe_open(str(f), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
            raise CheckpointError(f"cannot read {f} as safetensors: {e}") from None
        with fh:
            for key in fh.keys():
                ours = official_to_ours(key)
                p = expected.get(ours)
                if isinstance(p, DTensor):
                    sl = fh.get_slice(key)
                    if tuple(sl.get_shape()) == tuple(p.shape):
                        yield ours, _shard(sl, p, mesh, dtype, device)
                        continue
                yield ours, fh.get_tensor(key)


def _shard(sl, p: DTensor, mesh: DeviceMesh, dtype, device) -> DTensor:
    """This rank's part of a split parameter ``p`` (a meta DTensor), read from safetensors slice ``sl``."""
    (placement,) = p.placements
    if isinstance(placement, Replicate):
        local = sl[:]
    elif isinstance(placement, Shard) and placement.dim in (0, 1):
        n = p.shape[placement.dim] // mesh.size()  # check_degree made the split even
        part = slice(mesh.get_local_rank() * n, (mesh.get_local_rank() + 1) * n)
        local = sl[part] if placement.dim == 0 else sl[:, part]
    else:
        raise AssertionError(f"unexpected placement {placement} for a linear parameter")
    local = local.to(device=device, dtype=dtype or p.dtype)
    assert local.shape == p.to_local().shape, (local.shape, p.to_local().shape)
    return DTensor.from_local(local, mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def join_tensor_parallel(tp: int, device: torch.device):
    """Join torchrun's ``tp`` processes -> (DistInfo, 1-D mesh, this rank's device; CUDA: one GPU per local rank).
    ValueError when this run does not have exactly ``tp`` processes. Used by ``generate --tp`` and ``serve --tp``."""
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"tensor parallelism runs on cpu or cuda devices, not {device.type}")
    from torch.distributed.device_mesh import init_device_mesh

    from .train.distributed import init_from_env

    info = init_from_env(device.type)  # a lone process (no torchrun) joins nothing: world 1
    if info.world != tp:
        raise InputError(f"--tp {tp} needs {tp} processes: run it under torchrun --nproc_per_node {tp} (this run has "
                         f"{info.world})")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)  # one GPU per rank
    return info, init_device_mesh(device.type, (tp,)), device
