"""4-bit weight-only quantization of a model's linear layers (int4 or NF4), in place.

    from llama.quantize import Int4Config, NF4Config, quantize_
    quantize_(model, Int4Config(group_size=64))     # every nn.Linear -> QuantLinear
    llama.save(model, "out/")                        # native format; llama.load reads it back

    python -m llama.quantize --checkpoint IN --out OUT --format int4 --group-size 64     # see __main__.py
    python -m llama.quantize --checkpoint IN --out OUT --format nf4 [--group-size 64] [--no-double-quant]

Which layers: every `nn.Linear` (our `llama.model.Linear` included) that `filter_fn(module,
fqn)` accepts (torchao's order: the module, then its fully qualified name such as
"layers.0.attention.wq"); by default all of them, so an untied output head is quantized too. The
embedding is not a Linear and stays dense, as do the norms. A tied output head (its weight *is*
the embedding) is always kept dense and tied: quantizing it would untie it and store the
embedding twice. A layer whose in_features is not a multiple of the group size stays dense too;
both are named in one note on the "llama" logger.

The 4-bit formats, packing and matmul are those of `llama_kernels.int4_matmul`. A QuantLinear is
frozen: no gradient reaches its codes or scales, but gradients flow through it to its input,
so adapters on top of it train (QLoRA).
"""
from __future__ import annotations

import inspect
import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn
from tqdm import tqdm

from llama_kernels import int4_matmul
from llama_kernels.int4_format import (
    DOUBLE_QUANT_BLOCK, FORMATS, GROUP_SIZES, SCALE_DTYPE, QuantizedWeight, double_dequantize, quantize_int4,
    quantize_nf4,
)

from ..model import forget_joined, without_joined

__all__ = [
    "Int4Config", "NF4Config", "QuantConfig", "QuantLinear", "config_from_dict", "is_quantized", "model_size_bytes",
    "prepare_quantized", "quantization_info", "quantize_", "quantized_layers",
]

log = logging.getLogger("llama")


# ----------------------------------------------------------------------------- configs
def _check_group(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value not in GROUP_SIZES:
        raise ValueError(f"{name}: expected one of {', '.join(map(str, GROUP_SIZES))}, got {value!r}")


@dataclass(frozen=True)
class Int4Config:
    """Asymmetric int4: a fp16 scale and zero per `group_size` consecutive input elements."""

    group_size: int = 128

    format = "int4"  # class attributes, not fields
    double_quant = False

    def __post_init__(self):
        _check_group(self.group_size, "group_size")

    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        return quantize_int4(w, self.group_size)


@dataclass(frozen=True)
class NF4Config:
    """NF4 (QLoRA): a fp16 absmax per `block_size` inputs; `double_quant` stores it in 8 bits."""

    block_size: int = 64
    double_quant: bool = True

    format = "nf4"

    def __post_init__(self):
        _check_group(self.block_size, "block_size")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant: expected True or False, got {self.double_quant!r}")

    @property
    def group_size(self) -> int:
        return self.block_size

    def quantize(self, w: torch.Tensor) -> QuantizedWeight:
        return quantize_nf4(w, self.block_size, self.double_quant)


QuantConfig = Union[Int4Config, NF4Config]


def config_from_dict(d: dict[str, Any]) -> QuantConfig:
    """The config of {"format": "int4"|"nf4", "group_size": G, "double_quant": bool} (as stored
    in a native checkpoint's config.json; other keys are ignored)."""
    fmt = d.get("format")
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "int4":
        if d.get("double_quant", False):
            raise ValueError("double_quant: applies only to format 'nf4'")
        return Int4Config(group_size=d.get("group_size", 128))
    return NF4Config(block_size=d.get("group_size", 64), double_quant=d.get("double_quant", True))


def _as_config(config: Any) -> QuantConfig:
    if isinstance(config, (Int4Config, NF4Config)):
        return config
    if isinstance(config, str):
        raise ValueError(f"config: pass Int4Config(...) or NF4Config(...), not the string {config!r}")
    raise TypeError(f"config: expected an Int4Config or NF4Config, got {type(config).__name__}")


# ----------------------------------------------------------------------------- the layer
class QuantLinear(nn.Module):
    """A frozen 4-bit linear layer: y = x @ dequant(W)^T (+ bias), through llama_kernels.int4_matmul.

    State-dict entries, under the layer's name (e.g. `layers.0.attention.wq.packed`), for an
    (out_features, in_features) weight with groups of g inputs:

    packed       uint8 (out, in / 2)   the 4-bit codes, two a byte (llama_kernels.int4_matmul's layout)
    scales       fp16  (out, in / g)   int4 scale or NF4 absmax per group; *not stored* for NF4
                                       with double quantization (decoded from absmax_* on load)
    zeros        fp16  (out, in / g)   int4 only: the value of the middle code of each group
    absmax_q     int8  (out * in / g,) NF4 double quant: absmax minus its mean, in 8 bits,
    absmax_step  fp32  (ceil(out * in / g / 256),)  with one step per 256 of them,
    absmax_mean  fp32  (1,)            and the mean
    bias         the layer's bias (a parameter in the model's dtype), if it has one

    These are buffers, so state_dict(), load_state_dict() and .to(device) carry them; a dtype
    change (model.to(torch.bfloat16)) leaves them in the dtypes above.
    """

    def __init__(self, in_features: int, out_features: int, config: QuantConfig, bias: bool = False,
                 device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        config = _as_config(config)
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if in_features % config.group_size:
            raise ValueError(f"in_features: {in_features} is not a multiple of group_size {config.group_size}")
        self.in_features, self.out_features, self.config = in_features, out_features, config
        groups = (out_features, in_features // config.group_size)
        empty = lambda shape, dt: torch.empty(shape, dtype=dt, device=device)  # noqa: E731
        self.register_buffer("packed", empty((out_features, in_features // 2), torch.uint8))
        dq = config.double_quant
        self.register_buffer("scales", empty(groups, SCALE_DTYPE), persistent=not dq)
        self.register_buffer("zeros", empty(groups, SCALE_DTYPE) if config.format == "int4" else None)
        if dq:
            n = groups[0] * groups[1]
            self.register_buffer("absmax_q", empty((n,), torch.int8))
            self.register_buffer("absmax_step", empty((-(-n // DOUBLE_QUANT_BLOCK),), torch.float32))
            self.register_buffer("absmax_mean", empty((1,), torch.float32))
        if bias:
            self.bias = nn.Parameter(empty((out_features,), dtype or torch.float32))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig) -> "QuantLinear":
        """A QuantLinear holding `linear`'s weight quantized (and its bias, unchanged)."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, config, bias=linear.bias is not None,
                    device="meta", dtype=w.dtype)
        qw = layer.config.quantize(w.detach())
        layer.packed, layer.scales, layer.zeros = qw.packed, qw.scales, qw.zeros
        if qw.double_quant is not None:
            for name, t in qw.double_quant.items():
                setattr(layer, name, t)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    @property
    def qweight(self) -> QuantizedWeight:
        """The kernels' view of the buffers (no copy), rebuilt only when a buffer was replaced."""
        b = self._buffers
        packed, scales, zeros, absmax_q = b["packed"], b["scales"], b["zeros"], b.get("absmax_q")
        cached = self.__dict__.get("_qweight")
        if (cached is not None and cached[0] is packed and cached[1] is scales and cached[2] is zeros
                and cached[3] is absmax_q):
            return cached[4]
        dq = None
        if self.config.double_quant:
            dq = {"absmax_q": self.absmax_q, "absmax_step": self.absmax_step, "absmax_mean": self.absmax_mean}
        qw = QuantizedWeight(self.config.format, self.packed, self.scales, self.zeros, self.config.group_size,
                             (self.out_features, self.in_features), double_quant=dq)
        self.__dict__["_qweight"] = (packed, scales, zeros, absmax_q, qw)
        return qw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4_matmul(x, self.qweight, self.bias)

    # project() takes fused_forward at every size, prompts too: below the kernel's rows x is
    # converted to int8 once for all the weights, past them int4_matmul takes each weight in turn.
    FUSED_ANY_ROWS = True

    @staticmethod
    def fused_forward(x: torch.Tensor, layers: Sequence["QuantLinear"]) -> Optional[torch.Tensor]:
        """The layers' outputs side by side from one int4_matmul call, or None when they differ in
        format or group size, or have biases (see llama.model.project)."""
        first = layers[0]
        weights = []
        for layer in layers:  # a plain loop: this runs for every projection of every decode step
            if layer.bias is not None or (layer.config is not first.config and layer.config != first.config):
                return None
            weights.append(layer.qweight)
        return int4_matmul(x, weights)

    @staticmethod
    def store_joined(layers: Sequence["QuantLinear"]) -> Optional[QuantizedWeight]:
        """Copy the layers' codes, scales and zeros side by side (groups run along K, so joining
        along N changes nothing) and make each layer's buffers views of their rows; returns the
        joined weight, or None if they differ in format, group size, K or device, or have biases
        (see llama.model.join)."""
        first = layers[0]
        if any(layer.bias is not None or layer.in_features != first.in_features
               or layer.packed.device != first.packed.device
               or (layer.config is not first.config and layer.config != first.config) for layer in layers):
            return None
        sizes = [layer.out_features for layer in layers]
        joined = {}
        for name in ("packed", "scales", "zeros"):
            if getattr(first, name) is None:
                continue
            joined[name] = torch.cat([getattr(layer, name) for layer in layers])
            for layer, rows in zip(layers, joined[name].split(sizes)):
                setattr(layer, name, rows)  # a buffer: replaced, still registered
        return QuantizedWeight(first.config.format, joined["packed"], joined["scales"], joined.get("zeros"),
                               first.config.group_size, (sum(sizes), first.in_features))

    def __getstate__(self):
        return without_joined(self)

    @staticmethod
    def joined_parts(layer: "QuantLinear") -> tuple[Optional[torch.Tensor], ...]:
        b = layer._buffers  # not through Module.__getattr__: this runs for every decode step
        return (b["packed"], b["scales"], b["zeros"])

    @staticmethod
    def joined_forward(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
        return int4_matmul(x, qw)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out_features, in_features) weight the codes stand for."""
        return self.qweight.dequantize(dtype)

    def extra_repr(self) -> str:
        c = self.config
        dq = ", double_quant" if c.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={c.format}, group_size={c.group_size}{dq}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.config.double_quant and not self.absmax_q.is_meta:
            self._decode_scales()

    def _decode_scales(self) -> None:
        stored = {"absmax_q": self.absmax_q, "absmax_step": self.absmax_step, "absmax_mean": self.absmax_mean}
        shape = (self.out_features, self.in_features // self.config.group_size)
        self.scales = double_dequantize(stored, shape).to(SCALE_DTYPE)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every floating buffer; the scales must stay fp16 (and the
        # double-quant tensors fp32). A buffer whose dtype changed is moved again, from the original.
        before = {name: b for name, b in self._buffers.items() if b is not None}
        forget_joined(self)  # the joined copy stays where it was (see store_joined)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self


# ----------------------------------------------------------------------------- model-level
def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """{name: layer} of the QuantLinear layers of `model`, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def quantization_info(model: nn.Module) -> Optional[dict[str, Any]]:
    """What native checkpoints store under "quantization": {"format", "group_size",
    "double_quant", "layers"}; None for a dense model. Raises if the layers differ in format."""
    layers = quantized_layers(model)
    if not layers:
        return None
    configs = {layer.config for layer in layers.values()}
    if len(configs) > 1:
        raise ValueError(f"model: its 4-bit layers use {len(configs)} different configurations; "
                         "a checkpoint holds one")
    (config,) = configs
    return {"format": config.format, "group_size": config.group_size, "double_quant": config.double_quant,
            "layers": list(layers)}


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of what `model.state_dict()` holds (parameters and persistent buffers), each
    storage counted once (a tied output head is free): the size of a checkpoint."""
    unique = {id(t): t for t in model.state_dict(keep_vars=True).values()}  # tied: one object, two names
    return sum(t.numel() * t.element_size() for t in unique.values())


def shared_parameters(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one name (tied weights)."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    return {pid for pid, n in counts.items() if n > 1}


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


FilterFn = Callable[[nn.Module, str], bool]  # (module, fqn) -> quantize it?


def _check_filter_fn(filter_fn: Any) -> None:
    """TypeError naming filter_fn unless it is a callable that takes (module, fqn)."""
    if not callable(filter_fn):
        raise TypeError(f"filter_fn: expected a callable (module, fqn) -> bool, got {type(filter_fn).__name__}")
    try:
        signature = inspect.signature(filter_fn)
    except (TypeError, ValueError):  # some builtins have no signature to check
        return
    try:
        signature.bind(nn.Identity(), "")
    except TypeError:
        raise TypeError(f"filter_fn: expected a callable (module, fqn) -> bool that takes two positional "
                        f"arguments, got one with signature {signature}") from None
    # The order was (name, module) before it followed torchao's; such a function would now get its
    # arguments swapped and quietly select nothing, so one whose first parameter is named like a
    # layer name is refused.
    first = next(iter(signature.parameters), None)
    if first in ("name", "fqn", "path", "layer_name", "module_name"):
        raise TypeError(f"filter_fn: is called as filter_fn(module, fqn) (torchao's order), but its first "
                        f"parameter is {first!r}; swap its parameters")


def _select(model: nn.Module, config: QuantConfig,
            filter_fn: Optional[FilterFn]) -> tuple[list[str], list[str]]:
    """The Linear layers to quantize, and notes on those kept dense."""
    shared = shared_parameters(model)
    chosen, kept = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or (filter_fn is not None and not filter_fn(module, name)):
            continue
        if id(module.weight) in shared:
            kept.append(f"{name} (its weight is tied to another parameter)")
        elif module.in_features % config.group_size:
            kept.append(f"{name} (in_features {module.in_features} is not a multiple of group_size "
                        f"{config.group_size})")
        else:
            chosen.append(name)
    return chosen, kept


def quantize_(model: nn.Module, config: QuantConfig,
              filter_fn: Optional[FilterFn] = None, *, progress: bool = False) -> nn.Module:
    """Replace the `nn.Linear` layers of `model` that `filter_fn(module, fqn)` accepts (default:
    all) by QuantLinear layers holding their weights in 4 bits, in place; returns `model`.

    `filter_fn` takes torchao's arguments in torchao's order: the module, then its fully
    qualified name in `model` (e.g. "layers.0.attention.wq"); a callable that cannot take two
    positional arguments is a TypeError.

    Kept dense, with one note on the "llama" logger: tied layers (a tied output head) and layers
    whose in_features is not a multiple of the group size. The sizes before and after are logged
    at INFO. `progress` shows a bar over the layers. A model that already has 4-bit layers is
    refused: quantize the dense model.
    """
    config = _as_config(config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if filter_fn is not None:
        _check_filter_fn(filter_fn)
    already = quantized_layers(model)
    if already:
        raise ValueError(f"model: already quantized ({len(already)} 4-bit layers, e.g. {next(iter(already))}); "
                         "quantize the dense model instead")
    chosen, kept = _select(model, config, filter_fn)
    if kept:
        log.warning("quantize_: kept %d layer(s) dense: %s", len(kept), "; ".join(kept))
    before = model_size_bytes(model)
    layers = chosen
    if progress:
        layers = tqdm(chosen, desc=f"{config.format} g{config.group_size}", unit="layer", file=sys.stderr)
    with torch.no_grad():
        for name in layers:
            linear = model.get_submodule(name)
            if linear.weight.is_meta:
                raise ValueError(f"{name}: its weight is on the meta device; load the weights first")
            set_module(model, name, QuantLinear.from_linear(linear, config))
    after = model_size_bytes(model)
    log.info("quantize_: %d linear layers to %s (group %d%s): %.2f MB -> %.2f MB (%.2f MB saved)",
             len(chosen), config.format, config.group_size, ", double quant" if config.double_quant else "",
             before / 1e6, after / 1e6, (before - after) / 1e6)
    return model


def prepare_quantized(model: nn.Module, config: QuantConfig, layers: Sequence[str]) -> nn.Module:
    """Swap the named Linear layers for empty QuantLinear layers on the same device (meta, for
    a checkpoint's model), ready to take stored 4-bit tensors; quantizes nothing."""
    config = _as_config(config)
    shared = shared_parameters(model)
    for name in layers:
        try:
            linear = model.get_submodule(name) if isinstance(name, str) and name else None
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"quantization.layers: {name!r} is not a linear layer of this model")
        if id(linear.weight) in shared:
            raise ValueError(f"quantization.layers: {name!r} is tied to another parameter, so it stays dense")
        w = linear.weight
        set_module(model, name, QuantLinear(linear.in_features, linear.out_features, config,
                                             bias=linear.bias is not None, device=w.device, dtype=w.dtype))
    return model
