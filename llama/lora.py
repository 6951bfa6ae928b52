"""LoRA: low-rank adapters on a model's linear layers, trained while the base stays frozen.

    from llama.lora import apply_lora, save_adapters, load_adapters, remove_lora
    apply_lora(model, rank=8, alpha=16, targets=("wq", "wk", "wv", "wo"), trainable=("norm",))
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ...                                           # train: only the adapters (and "norm") change
    save_adapters(model, "runs/adapter/")          # a few hundred KB, no base weights
    load_adapters(llama.load("base/").model, "runs/adapter/")   # the same model again
    remove_lora(model, merge=True); llama.save(model, "merged/")  # a plain checkpoint

The layer
---------
`LoRALinear` wraps a linear layer (`nn.Linear`, our `llama.model.Linear`, or a 4-bit
`llama.quantize.QuantLinear`) as its submodule `base` and computes

    y = base(x) + dropout(x) @ A^T @ B^T * (alpha / rank)

with A (rank, in_features) initialised like nn.Linear's weight (Kaiming-uniform, a = sqrt(5))
and B (out_features, rank) at zero, so a freshly wrapped model computes exactly what it did
before. The base's parameters are frozen (requires_grad False). A and B are kept in their own
dtype (fp32 unless `dtype` says otherwise), also through `model.to(torch.bfloat16)`: the adapter
math runs in that dtype and its output is cast to the base output's dtype. `in_features`,
`out_features`, `weight` and `bias` read through to the base (a 4-bit base has no `weight`,
as QuantLinear has none).

QLoRA: on a base made 4-bit by `llama.quantize.quantize_`, the codes and scales are buffers that
no optimizer sees, and `llama_kernels.int4_matmul` is differentiable in its input, so the
gradient reaches the adapters of earlier layers through the 4-bit layers' backward while the
4-bit tensors stay bit-identical.

Decode-time joining. `Transformer.join_projections` (called by generation on a GPU) stores the
Q/K/V and gate/up weights of plain layers side by side, and `llama.model.project` runs a joined
or fused group as one product. Neither may bypass an adapter, so LoRALinear defines none of the
hooks they look for (`store_joined`, `fused_forward`): a group with a LoRA layer always runs
layer by layer, through each wrapper's forward. Wrapping a layer also drops its own record of
being joined, so its former partners notice their record is stale and stop using it. For
full-speed decoding, merge the adapters and remove the wrappers (`remove_lora(model,
merge=True)`); the plain layers then join again.

Merging. `merge()` adds scale * B @ A into a dense base weight in place, and the forward then
skips the adapter branch (it is in the weight); `unmerge()` subtracts the same product again,
recomputed from copies of A and B taken at merge time, so the base weight comes back up to
rounding even if A or B were changed while merged. Merging and unmerging twice is a no-op. A
4-bit base cannot take the update in its codes: merge() refuses it unless `dequantize=True`,
which replaces the base by a dense `llama.model.Linear` holding dequant(W) + scale * B @ A
(dtype: `dtype`, else the adapters'); unmerge() then puts the original 4-bit layer back
unchanged. A layer whose weight is tied to another parameter (a tied output head is the
embedding) is never wrapped: merging into it would change the embedding too.

State-dict names and checkpoints. Because the base is the submodule `base`, a wrapped layer's
tensors are `NAME.base.weight` (or `NAME.base.packed`, ...), `NAME.lora_A` and `NAME.lora_B`.
A LoRA model is therefore not a checkpoint of the base model: save the adapters apart with
`save_adapters`, or merge and unwrap first (`remove_lora(model, merge=True)`), after which the
names are the base's again and `llama.save` writes an ordinary checkpoint. `check_no_lora`
is the refusal a saver can call ("merge or save adapters").

Adapters on disk. `save_adapters(model, DIR)` writes, atomically (llama.atomic.write_dir),

* `adapter_config.json`: {"format": "llama-kernels-lora", "version": 1, "rank", "alpha",
  "dropout", "dtype", "targets", "trainable", "layers": [names of the wrapped layers]}, and
* `adapter_model.safetensors`: `NAME.lora_A` and `NAME.lora_B` of every wrapped layer and the
  parameters that `trainable` names, under their names in the model's state_dict; no base weight.

`load_adapters(model, DIR)` checks every field of the config (a wrong type, an unknown layer or a
non-matching trainable name is a ValueError naming the file and the field), checks the tensor
names and shapes of the safetensors file against the model before anything is allocated, then
wraps the layers (unless the model already carries the same adapters) and copies the tensors
in. Missing, unexpected or mis-shaped tensors are ValueErrors naming the file and the tensor.
Nothing is unpickled.

Which parameters train. `apply_lora` freezes every parameter of the model except the adapters
and those that `trainable` names. A `trainable` entry, like a target, is matched against whole
dot-separated parts of a name: "norm" is the final norm (`norm.weight`), "attention_norm" the
norm before every attention, "layers.1" all of block 1. The base of a wrapped layer cannot be
made trainable. `remove_lora` leaves the requires_grad flags as they are (call
`model.requires_grad_(True)` to train everything again).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .atomic import write_dir
from .formats.common import json_writer, open_safetensors, read_json, save_safetensors
from .model import Linear, forget_joined
from .quantize import QuantLinear, set_module, shared_parameters

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_FORMAT", "ADAPTER_VERSION", "ADAPTER_WEIGHTS", "DEFAULT_TARGETS", "LoRAConfig",
    "LoRALinear", "apply_lora", "check_no_lora", "has_lora", "load_adapters", "lora_layers", "lora_parameters",
    "merge_lora", "read_adapter_config", "remove_lora", "save_adapters", "trainable_parameter_count",
    "trainable_parameters", "unmerge_lora",
]

ADAPTER_FORMAT = "llama-kernels-lora"
ADAPTER_VERSION = 1
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_TARGETS = ("wq", "wk", "wv", "wo")

# Adapter dtypes a config may name (and the dtypes adapter tensors may be stored in).
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_SAFETENSORS_FLOATS = {"F64", "F32", "F16", "BF16"}

Target = Callable[[nn.Module, str], bool]  # (module, fqn) -> wrap it?


# ----------------------------------------------------------------------------- checks
def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


def _positive_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    return value


def _dropout_p(value: Any, name: str = "dropout") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {value!r}")
    return float(value)


def _adapter_dtype(value: Any, name: str = "dtype") -> torch.dtype:
    if value in _DTYPES.values():
        return value
    raise ValueError(f"{name}: expected one of torch.{', torch.'.join(_DTYPES)}, got {value!r}")


def _names(value: Any, name: str, allow_empty: bool, single: bool = True) -> tuple[str, ...]:
    """`value` (a list or tuple of strings, or with `single` one string) as a tuple of distinct
    non-empty names."""
    if isinstance(value, str) and single:
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise TypeError(f"{name}: expected a list of non-empty strings, got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{name}: names repeat in {list(value)!r}")
    if not value and not allow_empty:
        raise ValueError(f"{name}: expected at least one name")
    return tuple(value)


def _matches(fqn: str, pattern: str) -> bool:
    """Whether the dot-separated parts of `pattern` occur as consecutive whole parts of `fqn`."""
    parts, want = fqn.split("."), pattern.split(".")
    n = len(want)
    return any(parts[i:i + n] == want for i in range(len(parts) - n + 1))


def _suffix(fqn: str, pattern: str) -> bool:
    """Whether `pattern` is `fqn` or its last dot-separated part(s)."""
    return fqn == pattern or fqn.endswith("." + pattern)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, QuantLinear))


def _device_of(layer: nn.Module) -> torch.device:
    t = layer.weight if isinstance(layer, nn.Linear) else layer.packed
    return t.device


# ----------------------------------------------------------------------------- the layer
class LoRALinear(nn.Module):
    """base(x) + dropout(x) @ A^T @ B^T * (alpha / rank), the base frozen (see the module docstring).

    base: an nn.Linear (our Linear included) or a QuantLinear. rank: a positive integer; alpha:
    a positive number; dropout: the probability in [0, 1) of dropping an element of the
    adapter's input in training mode; dtype: the adapters' dtype (float32 by default).
    """

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if isinstance(base, LoRALinear):
            raise TypeError("base: is already a LoRALinear; wrap its base layer instead")
        if not _is_linear(base):
            raise TypeError(f"base: expected an nn.Linear or a 4-bit QuantLinear, got {type(base).__name__}")
        self.rank = _positive_int(rank, "rank")
        self.alpha = _positive_number(alpha, "alpha")
        self.dropout_p = _dropout_p(dropout)
        self.adapter_dtype = _adapter_dtype(dtype)
        forget_joined(base)  # a joined copy of its weight must not stand for this layer (see project)
        for p in base.parameters():
            p.requires_grad_(False)
        self.base = base
        device = _device_of(base)
        self.lora_A = nn.Parameter(torch.empty(self.rank, base.in_features, device=device, dtype=self.adapter_dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, self.rank, device=device, dtype=self.adapter_dtype))
        self.dropout = nn.Dropout(self.dropout_p) if self.dropout_p > 0 else nn.Identity()
        self.reset_lora_parameters()

    # ------------------------------------------------------------------ what code reads of a linear layer
    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base's weight (with the adapters folded in only while merged). A 4-bit base has none."""
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def merged(self) -> bool:
        return "_merged_with" in self.__dict__

    def reset_lora_parameters(self) -> None:
        """A Kaiming-uniform (a = sqrt(5), as nn.Linear), B zero: the layer computes what its base does."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()

    # ------------------------------------------------------------------ forward
    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, (out_features, in_features), in the adapters' dtype (fp32 at least)."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y  # the adapters are in the base weight
        a, b = self.lora_A, self.lora_B
        h = self.dropout(x).to(a.dtype)
        return y + (F.linear(F.linear(h, a), b) * self.scale).to(y.dtype)

    # ------------------------------------------------------------------ merging
    def merge(self, dequantize: bool = False, dtype: Optional[torch.dtype] = None) -> "LoRALinear":
        """Fold scale * B @ A into the base weight (in place); a no-op if already merged.

        A 4-bit base is a ValueError unless `dequantize`: it is then replaced by a dense Linear
        holding dequant(W) + scale * B @ A in `dtype` (default: the adapters' dtype), and
        unmerge() puts the 4-bit layer back.
        """
        if self.merged:
            return self
        saved_a, saved_b = self.lora_A.detach().clone(), self.lora_B.detach().clone()
        if isinstance(self.base, QuantLinear):
            if not dequantize:
                raise ValueError(
                    "merge: the base layer is 4-bit (QuantLinear), whose codes cannot take the update; pass "
                    "dequantize=True to replace it by a dense layer holding dequant(W) + scale * B @ A, or keep "
                    "the adapters unmerged")
            quantized = self.base
            dtype = self.adapter_dtype if dtype is None else dtype
            if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
                raise ValueError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
            with torch.no_grad():
                w = quantized.dequantize(torch.float32) + self.delta_weight().to(torch.float32)
                dense = Linear(quantized.in_features, quantized.out_features, bias=quantized.bias is not None,
                               device="meta")
                dense.weight = nn.Parameter(w.to(dtype), requires_grad=False)
                if quantized.bias is not None:
                    dense.bias = nn.Parameter(quantized.bias.detach().clone(), requires_grad=False)
            self.base = dense
            self.__dict__["_merged_with"] = (saved_a, saved_b, self.scale, quantized)
            return self
        if dtype is not None:
            raise ValueError("dtype: applies only to merging into a 4-bit base with dequantize=True")
        weight = self.base.weight
        if weight.is_meta:
            raise ValueError("merge: the base weight is on the meta device; load the weights first")
        with torch.no_grad():
            weight.add_(self.delta_weight().to(device=weight.device, dtype=weight.dtype))
        self.__dict__["_merged_with"] = (saved_a, saved_b, self.scale, None)
        return self

    def unmerge(self) -> "LoRALinear":
        """Take the merged update back out of the base weight (with the A and B it was merged
        with); a no-op if not merged. A base dequantized by merge(dequantize=True) becomes the
        original 4-bit layer again."""
        if not self.merged:
            return self
        a, b, scale, quantized = self.__dict__.pop("_merged_with")
        if quantized is not None:
            self.base = quantized.to(_device_of(self.base))
            return self
        weight = self.base.weight
        dtype = torch.promote_types(a.dtype, torch.float32)
        with torch.no_grad():
            delta = (b.to(device=weight.device, dtype=dtype) @ a.to(device=weight.device, dtype=dtype)) * scale
            weight.sub_(delta.to(weight.dtype))
        return self

    # ------------------------------------------------------------------ module plumbing
    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) would cast the adapters too; they keep their dtype (moved only).
        before = {name: p.detach() for name, p in self._parameters.items() if p is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            p = self._parameters[name]
            if p is not None and p.dtype != old.dtype:
                with torch.no_grad():
                    p.data = old.to(p.device)
                if p.grad is not None:
                    p.grad = p.grad.to(old.dtype)
        return self

    def extra_repr(self) -> str:
        dtype = str(self.adapter_dtype).removeprefix("torch.")
        return (f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}, dropout={self.dropout_p}, "
                f"dtype={dtype}, merged={self.merged}")


# ----------------------------------------------------------------------------- model level
@dataclass(frozen=True)
class LoRAConfig:
    """How `apply_lora` set a model up; `save_adapters` writes it."""

    rank: int
    alpha: float
    dropout: float
    dtype: torch.dtype
    targets: tuple[str, ...]  # as given (the layer names when targets was a function)
    trainable: tuple[str, ...]
    layers: tuple[str, ...]  # the wrapped layers, in module order


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{name: layer} of the LoRALinear layers of `model`, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def check_no_lora(model: nn.Module, action: str = "save it as a checkpoint") -> None:
    """ValueError if `model` carries LoRA adapters, whose `.base.`/`lora_*` tensor names no
    checkpoint format knows: merge and unwrap them, or save the adapters on their own."""
    layers = lora_layers(model)
    if layers:
        raise ValueError(
            f"model: has LoRA adapters on {len(layers)} layer(s) (e.g. {next(iter(layers))}), so cannot {action}; "
            "merge them into the base first (llama.lora.remove_lora(model, merge=True)) or save only the "
            "adapters (llama.lora.save_adapters)")


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The A and B matrices of every LoRA layer, in module order."""
    return [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameters, each counted once (a tied head is the
    embedding). A 4-bit layer counts as its out_features * in_features weights (plus its bias)."""
    trainable = total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.out_features * m.in_features
    return trainable, total


def _short_names(names: Sequence[str]) -> str:
    """The distinct last parts of `names`, in order: "wq, wk, wv, wo, w1, w2, w3, output"."""
    seen = dict.fromkeys(n.rpartition(".")[2] for n in names)
    return ", ".join(seen) if seen else "(none)"


def _select_layers(model: nn.Module, targets: Union[Sequence[str], Target], where: str) -> list[str]:
    """The names of the linear layers `targets` picks; ValueError for a target that picks none."""
    linear = {name: m for name, m in model.named_modules() if _is_linear(m)}
    if callable(targets):
        chosen = [name for name, m in linear.items() if targets(m, name)]
        if not chosen:
            raise ValueError(f"{where}: the filter accepted none of the linear layers "
                             f"({_short_names(list(linear))})")
        return chosen
    chosen = [name for name in linear if any(_suffix(name, t) for t in targets)]
    unmatched = [t for t in targets if not any(_suffix(name, t) for name in linear)]
    if unmatched:
        modules = {name: m for name, m in model.named_modules() if name}
        not_linear = {t: type(m).__name__ for t in unmatched for name, m in modules.items() if _suffix(name, t)}
        details = "; ".join(f"{t!r} names a module of type {kind}, not a linear layer"
                            for t, kind in not_linear.items())
        raise ValueError(
            f"{where}: {', '.join(map(repr, unmatched))} matches no linear layer of this model"
            f"{' (' + details + ')' if details else ''}; its linear layers are named {_short_names(list(linear))} "
            "(a target is a layer's full name, such as 'layers.0.attention.wq', or its last part(s), such as "
            "'wq' or 'attention.wq')")
    return chosen


def _trainable_params(model: nn.Module, patterns: Sequence[str], lora_names: Sequence[str],
                      where: str) -> dict[str, nn.Parameter]:
    """{name: parameter} of the parameters `patterns` name (first name of a tied one); a pattern
    that names none, or names a wrapped layer's base, is a ValueError."""
    found: dict[str, nn.Parameter] = {}
    ids: set[int] = set()
    named = list(model.named_parameters(remove_duplicate=False))
    for pattern in patterns:
        hits = [(name, p) for name, p in named if _matches(name, pattern)]
        if not hits:
            raise ValueError(f"{where}: {pattern!r} names no parameter of this model")
        for name, p in hits:
            layer = next((ln for ln in lora_names if name.startswith(ln + ".")), None)
            if layer is not None:
                raise ValueError(f"{where}: {pattern!r} names {name}, a parameter of the LoRA-wrapped layer "
                                 f"{layer}, whose base stays frozen")
            if id(p) not in ids:
                ids.add(id(p))
                found[name] = p
    return found


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
               targets: Union[Sequence[str], Target] = DEFAULT_TARGETS, trainable: Sequence[str] = (),
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """Wrap the linear layers that `targets` picks in LoRALinear, in place, and freeze every
    other parameter except those `trainable` names; returns `model`.

    targets: layer names, each a full name ("layers.0.attention.wq") or its last part(s) ("wq",
    "attention.wq"), or a function (module, fqn) -> bool over the linear layers (nn.Linear and
    4-bit QuantLinear), in quantize_'s order. A name that picks no linear layer is a ValueError
    listing the model's layer names. trainable: names of parameters or modules that train too,
    matched by whole dot-separated parts ("norm", "output", "attention_norm", "layers.1").
    A model that already has adapters, and layers whose weight is tied to another parameter,
    are refused.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    _positive_int(rank, "rank")
    _positive_number(alpha, "alpha")
    _dropout_p(dropout)
    _adapter_dtype(dtype)
    if not callable(targets):
        targets = _names(targets, "targets", allow_empty=False)
    trainable = _names(trainable, "trainable", allow_empty=True)
    return _apply(model, rank, alpha, dropout, targets, trainable, dtype, "targets", "trainable")


def _apply(model: nn.Module, rank: int, alpha: float, dropout: float, targets: Union[tuple[str, ...], Target],
           trainable: tuple[str, ...], dtype: torch.dtype, targets_where: str, trainable_where: str,
           record_targets: Optional[tuple[str, ...]] = None) -> nn.Module:
    existing = lora_layers(model)
    if existing:
        raise ValueError(f"model: already has LoRA adapters on {len(existing)} layer(s) (e.g. "
                         f"{next(iter(existing))}); remove_lora(model) first")
    chosen = _select_layers(model, targets, targets_where)
    shared = shared_parameters(model)
    for name in chosen:
        layer = model.get_submodule(name)
        if isinstance(layer, nn.Linear) and id(layer.weight) in shared:
            raise ValueError(f"{targets_where}: {name}'s weight is tied to another parameter (a tied output "
                             "head is the embedding); adapters on it are not supported, leave it out")
        if isinstance(layer, nn.Linear) and layer.weight.is_meta:
            raise ValueError(f"{name}: its weight is on the meta device; load the weights first")
    trainable_params = _trainable_params(model, trainable, chosen, trainable_where)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        set_module(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout, dtype))
    for p in trainable_params.values():
        p.requires_grad_(True)
    if record_targets is None:
        record_targets = tuple(chosen) if callable(targets) else targets
    model.__dict__["lora_config"] = LoRAConfig(rank, alpha, float(dropout), dtype, record_targets, trainable,
                                               tuple(chosen))
    return model


def _config_of(model: nn.Module) -> LoRAConfig:
    config = model.__dict__.get("lora_config")
    layers = lora_layers(model)
    if config is None or not layers:
        raise ValueError("model: has no LoRA adapters (apply_lora or load_adapters first)")
    if tuple(layers) != config.layers:
        raise ValueError(f"model: its LoRA layers {list(layers)} differ from those apply_lora wrapped "
                         f"{list(config.layers)}")
    return config


def merge_lora(model: nn.Module, dequantize: bool = False, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """merge() every LoRA layer, in place; returns `model`. A 4-bit base is refused (before
    anything changes) unless `dequantize`, which makes it a dense layer in `dtype` (default: the
    adapters' dtype; see LoRALinear.merge)."""
    layers = lora_layers(model)
    quantized = [name for name, layer in layers.items() if isinstance(layer.base, QuantLinear) and not layer.merged]
    if quantized and not dequantize:  # refuse before anything changes
        raise ValueError(f"model: {len(quantized)} LoRA layer(s) have a 4-bit base (e.g. {quantized[0]}), "
                         "whose codes cannot take the update; pass dequantize=True to make them dense, or keep "
                         "the adapters unmerged")
    for layer in layers.values():
        layer.merge(dequantize=dequantize, dtype=dtype if isinstance(layer.base, QuantLinear) else None)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """unmerge() every LoRA layer; returns `model`."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def remove_lora(model: nn.Module, merge: bool = True, dequantize: bool = False,
                dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every LoRALinear by its base layer, in place; returns `model`. With `merge` the
    adapters are folded into the base first (see merge_lora), else they are dropped (and a
    merged layer is unmerged). The parameters keep their requires_grad flags."""
    if merge:
        merge_lora(model, dequantize=dequantize, dtype=dtype)
    for name, layer in lora_layers(model).items():
        if not merge:
            layer.unmerge()
        layer.__dict__.pop("_merged_with", None)
        set_module(model, name, layer.base)
    model.__dict__.pop("lora_config", None)
    return model


# ----------------------------------------------------------------------------- adapters on disk
def _adapter_tensors(model: nn.Module, config: LoRAConfig) -> dict[str, nn.Parameter]:
    """{state_dict name: parameter} of what save_adapters writes."""
    out: dict[str, nn.Parameter] = {}
    for name in config.layers:
        layer = model.get_submodule(name)
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = layer.lora_A, layer.lora_B
    out.update(_trainable_params(model, config.trainable, config.layers, "trainable"))
    return out


def save_adapters(model: nn.Module, path: Union[str, Path]) -> Path:
    """Write the adapters of `model` (and the parameters `trainable` named) to the directory
    `path`, atomically, apart from the base weights; returns the path. Unrelated files already
    in the directory are kept."""
    config = _config_of(model)
    tensors = {}
    for name, p in _adapter_tensors(model, config).items():
        t = p.detach().to("cpu").contiguous()
        tensors[name] = t if t.untyped_storage().nbytes() == t.nbytes else t.clone()
    meta = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "rank": config.rank,
        "alpha": config.alpha,
        "dropout": config.dropout,
        "dtype": str(config.dtype).removeprefix("torch."),
        "targets": list(config.targets),
        "trainable": list(config.trainable),
        "layers": list(config.layers),
    }
    path = Path(path)
    return write_dir(path, {ADAPTER_CONFIG: json_writer(meta),
                            ADAPTER_WEIGHTS: lambda p: save_safetensors(tensors, p)})


def read_adapter_config(path: Union[str, Path]) -> LoRAConfig:
    """The checked adapter_config.json of the adapter directory `path`; ValueError naming the
    file and the field for anything wrong."""
    config_path = Path(path) / ADAPTER_CONFIG
    raw = read_json(config_path)

    def field(key: str, check: Callable[[Any, str], Any]) -> Any:
        if key not in raw:
            raise ValueError(f"{config_path}: missing field {key!r}")
        try:
            return check(raw[key], key)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{config_path}: {e}") from None

    if raw.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{config_path}: format: expected {ADAPTER_FORMAT!r}, got {raw.get('format')!r}")
    version = raw.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{config_path}: version: expected a positive integer, got {version!r}")
    if version > ADAPTER_VERSION:
        raise ValueError(f"{config_path}: version: {version} is newer than this reader ({ADAPTER_VERSION}); upgrade")

    def dtype_field(value: Any, name: str) -> torch.dtype:
        if not isinstance(value, str) or value not in _DTYPES:
            raise ValueError(f"{name}: expected one of {', '.join(_DTYPES)}, got {value!r}")
        return _DTYPES[value]

    return LoRAConfig(
        rank=field("rank", _positive_int),
        alpha=field("alpha", _positive_number),
        dropout=field("dropout", _dropout_p),
        dtype=field("dtype", dtype_field) if "dtype" in raw else torch.float32,
        targets=field("targets", lambda v, n: _names(v, n, allow_empty=False, single=False)),
        trainable=field("trainable", lambda v, n: _names(v, n, allow_empty=True, single=False)),
        layers=field("layers", lambda v, n: _names(v, n, allow_empty=False, single=False)),
    )


def load_adapters(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Put the adapters saved in directory `path` onto `model` (the base they were trained on),
    in place; returns `model`. A model without adapters gets them applied with the saved
    configuration; one that has them must carry the same ones (layers, rank, alpha, dtype,
    trainable) and not be merged. Strict, and checked before anything is allocated (see the
    module docstring)."""
    path = Path(path)
    config = read_adapter_config(path)
    config_path, weights_path = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    existing = lora_layers(model)
    if existing:
        current = _config_of(model)
        for key in ("layers", "rank", "alpha", "dtype", "trainable"):
            if getattr(current, key) != getattr(config, key):
                raise ValueError(f"{config_path}: {key}: {getattr(config, key)!r} differs from the model's LoRA "
                                 f"adapters ({getattr(current, key)!r}); remove_lora(model) first")
        merged = [name for name, layer in existing.items() if layer.merged]
        if merged:
            raise ValueError(f"model: its LoRA layers are merged (e.g. {merged[0]}); unmerge_lora(model) first")
        base_of = {name: layer.base for name, layer in existing.items()}
    else:
        base_of = {}
        for name in config.layers:
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                layer = None
            if not _is_linear(layer):
                raise ValueError(f"{config_path}: layers: {name!r} is not a linear layer of this model (its linear "
                                 f"layers are named {_short_names(_select_linear(model))})")
            base_of[name] = layer
    # The tensors the file must hold, and their shapes, from the model as it is.
    expected: dict[str, tuple[int, ...]] = {}
    for name, base in base_of.items():
        expected[f"{name}.lora_A"] = (config.rank, base.in_features)
        expected[f"{name}.lora_B"] = (base.out_features, config.rank)
    try:
        extra = _trainable_params(model, config.trainable, config.layers, "trainable")
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from None
    for name, p in extra.items():
        expected[name] = tuple(p.shape)
    with contextlib.ExitStack() as stack:
        handles = open_safetensors(weights_path, stack)
        missing = sorted(set(expected) - set(handles))
        unexpected = sorted(set(handles) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{weights_path}: missing tensors {missing}, unexpected tensors {unexpected}")
        for name, shape in expected.items():
            try:
                view = handles[name].get_slice(name)
                stored_shape, stored_dtype = tuple(view.get_shape()), view.get_dtype()
            except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
                raise ValueError(f"{weights_path}: cannot read tensor {name} ({e})") from None
            if stored_shape != shape:
                raise ValueError(f"{weights_path}: tensor {name}: expected shape {shape}, got {stored_shape}")
            if stored_dtype not in _SAFETENSORS_FLOATS:
                raise ValueError(f"{weights_path}: tensor {name}: expected a floating-point dtype, got {stored_dtype}")
        flags = {id(p): p.requires_grad for p in model.parameters()}
        if not existing:
            _apply(model, config.rank, config.alpha, config.dropout, config.layers, config.trainable, config.dtype,
                   f"{config_path}: layers", f"{config_path}: trainable", record_targets=config.targets)
        try:
            params = _adapter_tensors(model, _config_of(model))
            with torch.no_grad():
                for name, p in params.items():
                    try:
                        t = handles[name].get_tensor(name)
                    except Exception as e:  # noqa: BLE001
                        raise ValueError(f"{weights_path}: cannot read tensor {name} ({e})") from None
                    p.copy_(t)
        except BaseException:
            if not existing:  # leave the model as it came
                remove_lora(model, merge=False)
                for p in model.parameters():
                    p.requires_grad_(flags.get(id(p), p.requires_grad))
            raise
    return model


def _select_linear(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if _is_linear(m)]


def trainable_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The parameters that train (requires_grad), each once: what to hand an optimizer."""
    seen: set[int] = set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            yield p
