"""Low-rank adapters (LoRA, built on PEFT) on a loaded NextStep model, applied from outside like quantization.

An adapter adds ``scale * alpha / rank * B @ A`` to chosen linear layers of a frozen base model: the backbone's
attention (q/k/v/o) and MLP (gate/up/down) projections, optionally the flow head's linears and the image projectors
(``TARGETS``). PEFT makes the layers (``inject_adapter_in_model``: in place, the model stays a ``NextStep``); a base
quantized by ``nextstep.quant`` gets PEFT's LoRA layer around each ``QuantizedLinear`` through PEFT's custom-module
mapping (``QuantizedLoraLinear``), since PEFT knows only its own quantized layers (bitsandbytes & co.).

An adapter directory is PEFT's (``adapter_config.json`` + ``adapter_model.safetensors``, keys prefixed
``base_model.model.`` as ``PeftModel.save_pretrained`` writes them) plus ``nextstep_adapter.json``: the base model's
identity (the fingerprint of its config and the means of its norm weights, as a distilled head records them) and the
target groups. Loading an adapter onto another base is a ``CheckpointError``.

Several adapters can be loaded at once (each under a name) and any subset is active, each with its own scale;
switching is a change of PEFT's active adapters and scalings, nothing is reloaded. ``fuse`` merges the active
adapters into the base weights (a host copy of each touched weight is kept, so ``unfuse`` restores the base bit for
bit); a quantized base cannot be fused (the sum would have to be quantized again).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import read_json, require_dir, write_json
from .errors import CheckpointError, InputError, MissingFileError
from .model.distilled_head import base_mismatch, model_fingerprint, norm_means
from .quant import QuantizedLinear, is_quantized, unpacked

CONFIG_FILE = "adapter_config.json"  # PEFT's
WEIGHTS_FILE = "adapter_model.safetensors"  # PEFT's
IDENTITY_FILE = "nextstep_adapter.json"  # ours: which base model the adapter belongs to
KIND = "nextstep-lora"
PEFT_PREFIX = "base_model.model."  # how PeftModel names the base model's modules in its files
TRAINING_NAME = "default"  # PEFT's adapter name while training
# Target groups -> a regular expression over the NextStep module names (PEFT matches a string target in full).
TARGETS = {
    "attn": r"transformer\.layers\.\d+\.self_attn\.(q|k|v|o)_proj",
    "mlp": r"transformer\.layers\.\d+\.mlp\.(gate|up|down)_proj",
    "head": r"image_head\.net\.(time_embed\.mlp\.[02]|cond_embed|input_proj"
            r"|res_blocks\.\d+\.(mlp\.[02]|adaLN_modulation\.1)|final_layer\.(linear|adaLN_modulation\.1))",
    "projectors": r"image_(in|out)_projector",
}
DEFAULT_TARGETS = ("attn", "mlp")


def _peft():
    try:
        import peft
    except ImportError:
        raise InputError("LoRA adapters need PEFT: pip install 'nextstep[lora]' (peft)") from None
    return peft


def check_targets(targets) -> tuple[str, ...]:
    if isinstance(targets, str) or not targets or any(t not in TARGETS for t in targets):
        raise InputError(f"LoRA targets must be a non-empty list among {list(TARGETS)}, got {targets!r}")
    return tuple(dict.fromkeys(targets))


def target_pattern(targets) -> str:
    """The regular expression PEFT matches module names against (in full) for these target groups."""
    return "|".join(f"({TARGETS[t]})" for t in check_targets(targets))


def _lora_layer_type():
    from peft.tuners.lora.layer import Linear

    class QuantizedLoraLinear(Linear):
        """PEFT's LoRA ``Linear`` around a ``nextstep.quant.QuantizedLinear`` (registered with PEFT's custom-module
        mapping): the base's forward is its quantized kernel (which backpropagates to its input through the
        dequantized weight), the adapter's is PEFT's own. Merging is refused: the merged weight would have to be
        quantized again, and unmerging could not restore the base."""

        @property
        def weight(self) -> torch.Tensor:
            # PEFT reads a quantized base's ``qweight``; ours is None while fbgemm holds the int8 weight packed
            return self.get_base_layer().weight

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise InputError("cannot fuse LoRA adapters into a quantized model (the sum would be quantized again and "
                             "could not be undone): sample with the adapters unfused, or load the model in float")

    return QuantizedLoraLinear


def lora_config(rank: int, alpha: float, dropout: float, targets, model: nn.Module):
    """PEFT's ``LoraConfig`` for ``model`` (registers the quantized layers' LoRA type when it is quantized)."""
    peft = _peft()
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_pattern(targets),
                          bias="none")
    _register_quantized(cfg, model)
    return cfg


def _register_quantized(cfg, model: nn.Module) -> None:
    if is_quantized(model):
        cfg._register_custom_module({QuantizedLinear: _lora_layer_type()})


def inject(config, model: nn.Module, name: str = TRAINING_NAME) -> nn.Module:
    """Add the LoRA layers of ``config`` (adapter ``name``, initialised as PEFT does: B = 0) to ``model`` in place;
    every other parameter is frozen."""
    with warnings.catch_warnings(), unpacked(model):
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several adapters: intended
        warnings.filterwarnings("ignore", message="Unsupported layer type")  # QuantizedLinear: ours, registered
        _peft().inject_adapter_in_model(config, model, adapter_name=name)
    return model


@dataclass(frozen=True)
class AdapterIdentity:
    """``nextstep_adapter.json``: what the adapter was trained on and for."""

    base_model: str  # how the base was named when training (a path or hub id), for people
    fingerprint: str  # model_fingerprint() of the base
    norm_means: tuple[float, ...]  # norm_means() of the base
    targets: tuple[str, ...]
    quantized: str | None = None  # the base's quantization while training (None: float)

    @classmethod
    def of(cls, model: nn.Module, base_model: str, targets, quantized: str | None = None) -> AdapterIdentity:
        return cls(str(base_model), model_fingerprint(model), tuple(norm_means(model)), check_targets(targets),
                   quantized)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {"kind": KIND, **d, "norm_means": list(self.norm_means), "targets": list(self.targets)}

    @classmethod
    def read(cls, path: Path) -> AdapterIdentity:
        f = path / IDENTITY_FILE
        if not f.is_file():
            raise CheckpointError(f"{path} has no {IDENTITY_FILE}: it is not a NextStep LoRA adapter (the file names "
                                  f"the base model it was trained on)")
        d = dict(read_json(f, "LoRA adapter identity"))
        if d.pop("kind", None) != KIND:
            raise CheckpointError(f"{f} is not a NextStep LoRA adapter identity (no \"kind\": \"{KIND}\")")
        try:
            return cls(**{**d, "norm_means": tuple(d["norm_means"]), "targets": tuple(d["targets"])})
        except (TypeError, KeyError) as e:
            raise CheckpointError(f"{f} is not a valid LoRA adapter identity: {e}") from None

    def check(self, model: nn.Module, source: str) -> None:
        """CheckpointError unless ``model`` is the base this adapter was trained on (architecture and weights)."""
        why = base_mismatch(self.fingerprint, self.norm_means, model)
        if why is not None:
            raise CheckpointError(f"LoRA adapter {source} belongs to another model: it was trained on "
                                  f"{self.base_model!r} ({why}). Load it onto that model, or train an adapter for "
                                  f"this one")


def save_adapter(path: str | os.PathLike, state: dict[str, torch.Tensor], config, identity: AdapterIdentity) -> Path:
    """Write an adapter directory: ``state`` holds PEFT's saved key names without the prefix
    (``transformer.layers.0.self_attn.q_proj.lora_A.weight``, as ``get_peft_model_state_dict`` gives them)."""
    from .checkpoint import save_safetensors

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in sorted(state.items())}
    save_safetensors(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
    config = dataclasses.replace(config, base_model_name_or_path=identity.base_model)
    config.save_pretrained(str(out))
    write_json(identity.to_dict(), out / IDENTITY_FILE)
    return out


def read_adapter(path: str | os.PathLike):
    """(LoraConfig, identity, state with PEFT's saved key names, unprefixed) of the adapter directory ``path``."""
    peft = _peft()
    d = require_dir(path, "LoRA adapter")
    identity = AdapterIdentity.read(d)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (d / name).is_file():
            raise MissingFileError(f"LoRA adapter {d} has no {name}")
    try:
        config = peft.LoraConfig.from_pretrained(str(d))
    except (TypeError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{d / CONFIG_FILE} is not a LoRA config: {e}") from None
    from safetensors.torch import load_file

    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(d / WEIGHTS_FILE)).items()}
    return config, identity, state


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every PEFT LoRA layer of ``model`` by qualified name."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@contextmanager
def adapters_disabled(model: nn.Module):
    """Inside: ``model`` computes its base (every LoRA layer off), as the base's reference while training adapters
    on it (``NextStep.loss``'s ``base``); each layer's state and its adapters' ``requires_grad`` come back after."""
    layers = list(lora_layers(model).values())
    saved = [(layer.disable_adapters, [(p, p.requires_grad) for p in layer.parameters()]) for layer in layers]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield model
    finally:
        for layer, (disabled, flags) in zip(layers, saved):
            layer.enable_adapters(not disabled)
            for p, flag in flags:
                p.requires_grad_(flag)


class Adapters:
    """The LoRA adapters loaded on one model: names, scales, which are active, whether they are fused."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.loaded: dict[str, Path] = {}
        self.active: dict[str, float] = {}  # name -> scale
        self._fused: dict[str, torch.Tensor] | None = None  # layer name -> host copy of its base weight
        self._requires_grad: dict[int, bool] | None = None  # the base's flags before the first adapter, by id

    @property
    def fused(self) -> bool:
        return self._fused is not None

    def load(self, path: str | os.PathLike, name: str | None = None, scale: float = 1.0) -> str:
        """Load the adapter in ``path`` under ``name`` and make it active too, with ``scale``; returns the name.
        The default name is the directory's; where another directory of that name is loaded already (every training
        run's adapter is ``OUT/final``), the parent directory's name joined to it (``lora-star-final``), then a
        number (``final-2``)."""
        self._not_fused("load an adapter")
        config, identity, state = read_adapter(path)
        source = str(path)
        name = name or self._default_name(Path(path))
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", name) \
                or hasattr(nn.ModuleDict(), name):  # PEFT keeps adapters in ModuleDicts: "half", "to" are taken
            raise InputError(f"LoRA adapter name must be 1-64 letters, digits, '_', '-' and not a torch module "
                             f"attribute, got {name!r}")
        if name in self.loaded:
            raise InputError(f"a LoRA adapter named {name!r} is loaded already ({self.loaded[name]}): pass another "
                             f"name, or unload the adapters first")
        _check_scale(scale)
        identity.check(self.model, source)
        if self._requires_grad is None:
            self._requires_grad = {id(p): p.requires_grad for p in self.model.parameters()}
        _register_quantized(config, self.model)
        peft = _peft()
        inject(config, self.model, name)
        # PEFT froze the base; give it back its flags: torch's CPU linear on a strided 3-D input takes another path
        # (other float rounding) when the weight requires grad, so a frozen base would not sample as the base does
        for p in self.model.parameters():
            if id(p) in self._requires_grad:
                p.requires_grad_(self._requires_grad[id(p)])
        result = peft.set_peft_model_state_dict(self.model, state, adapter_name=name)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            self._drop(name)
            raise CheckpointError(f"LoRA adapter {source} holds weights this model has no layer for: {unexpected[:3]}")
        dtype = next(p for n, p in self.model.named_parameters() if ".lora_" not in n).dtype
        for layer in lora_layers(self.model).values():
            for part in (layer.lora_A, layer.lora_B):
                if name in part:
                    part[name].to(dtype=dtype)
        self.loaded[name] = Path(path)
        self.set({**self.active, name: scale})
        return name

    def set(self, adapters: dict[str, float]) -> None:
        """Make exactly ``adapters`` ({name: scale}) active; {} samples with the base alone."""
        self._not_fused("change the active adapters")
        unknown = sorted(set(adapters) - set(self.loaded))
        if unknown:
            raise InputError(f"no LoRA adapter named {', '.join(map(repr, unknown))} is loaded "
                             f"(loaded: {', '.join(self.loaded) or 'none'})")
        for scale in adapters.values():
            _check_scale(scale)
        names = list(adapters)
        for layer in lora_layers(self.model).values():
            if not names:
                layer.enable_adapters(False)
                continue
            layer.enable_adapters(True)
            layer.set_adapter(names, inference_mode=True)
            for n, s in adapters.items():
                layer.set_scale(n, float(s))
        self.active = dict(adapters)

    @torch.no_grad()
    def fuse(self) -> None:
        """Merge the active adapters into the base weights; a host copy of every weight it changes is kept."""
        self._not_fused("fuse again")
        if not self.active:
            raise InputError("no LoRA adapter is active: nothing to fuse")
        if is_quantized(self.model):
            raise InputError("cannot fuse LoRA adapters into a quantized model (the sum would be quantized again "
                             "and could not be undone): sample with the adapters unfused, or load the model in float")
        names = list(self.active)
        layers = {n: m for n, m in lora_layers(self.model).items() if any(a in m.lora_A for a in names)}
        self._fused = {n: m.get_base_layer().weight.detach().to("cpu", copy=True) for n, m in layers.items()}
        for m in layers.values():
            m.merge(adapter_names=[a for a in names if a in m.lora_A])

    @torch.no_grad()
    def unfuse(self) -> None:
        """Put back the base weights as they were before ``fuse``, bit for bit."""
        if self._fused is None:
            raise InputError("no LoRA adapter is fused")
        layers = lora_layers(self.model)
        for n, saved in self._fused.items():
            layers[n].get_base_layer().weight.copy_(saved)
            layers[n].merged_adapters.clear()
        self._fused = None

    def unload(self) -> None:
        """Remove every adapter (unfusing first): the model is the base again, its modules and weights as before."""
        if self._fused is not None:
            self.unfuse()
        for name, layer in lora_layers(self.model).items():
            self.model.set_submodule(name, layer.get_base_layer())
        self.loaded, self.active, self._requires_grad = {}, {}, None

    def _drop(self, name: str) -> None:
        for layer in lora_layers(self.model).values():
            if name in layer.lora_A:
                layer.delete_adapter(name)

    def _default_name(self, path: Path) -> str:
        path = path.resolve()
        taken = {n for n, p in self.loaded.items() if p.resolve() != path}  # the same directory again stays an error
        clean = [re.sub(r"[^A-Za-z0-9_-]", "_", s)[-56:] for s in (path.name, f"{path.parent.name}-{path.name}")]
        name = next((c for c in clean if c not in taken), clean[0])
        number = 2
        while name in taken:
            name, number = f"{clean[0]}-{number}", number + 1
        return name

    def _not_fused(self, what: str) -> None:
        if self._fused is not None:
            raise InputError(f"cannot {what} while LoRA adapters are fused: call unfuse_lora() first")


def _check_scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not -1e3 <= scale <= 1e3 \
            or scale != scale:
        raise InputError(f"a LoRA scale must be a number in [-1000, 1000], got {scale!r}")


def parse_spec(text: str) -> tuple[str, float]:
    """``DIR`` or ``DIR:SCALE`` (the CLI's ``--lora``) -> (DIR, scale). A path holding ':' takes a scale last."""
    path, sep, tail = text.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the base weights for good and remove the LoRA layers: a plain model to save
    (``save_pretrained``)."""
    for m in lora_layers(model).values():
        m.merge()
    for name, m in lora_layers(model).items():
        model.set_submodule(name, m.get_base_layer())
    return model
