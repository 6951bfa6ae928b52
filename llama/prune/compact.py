"""Compaction: a model under deterministic pruning masks becomes the smaller dense model that
computes the same thing.

    masks.eval()
    small = compact(model, masks.deterministic_masks(), target=masks.target, keep=masks.keep())
    llama.save(small, "pruned/")                  # or python -m llama.prune compact CKPT --out OUT

What goes (a gate exactly 0), for z as `llama.prune.masked` applies it:

    layer, head_layer, mlp   a block whose branches are both off (layer * head_layer and
                             layer * mlp are 0); a block that keeps only one of its two branches
                             cannot be a dense block of this model and is a ValueError naming it
    head                     rows head*hd .. head*hd + hd-1 of wq, wk, wv; the same columns of wo
    intermediate             rows of w1 and w3, columns of w2
    hidden                   columns of every input projection (wq, wk, wv, w1, w3, the output
                             head), rows of wo and w2, columns of the embedding, the norms' entries

What is folded in (the kept gates' values, which `deterministic_masks()` makes soft, in [0, 1]):
each value goes into the weight that produces the output it masks, exactly where the masked
forward multiplies it in, so nothing else changes:

    head                     wo's columns of that head
    intermediate             w3's rows (the GELU FFN, which has no w3: w1's rows)
    hidden                   the embedding's columns, wo's and w2's rows
    layer * head_layer       wo (all of it); layer * mlp: w2

The norms then average over the kept model dims only, which is what the masked forward's norms
do. A tied output head is the embedding, which now carries the hidden values: the final norm's
weight (and a LayerNorm's bias) is divided by them, so the head's logits are unchanged.

Weights are read as the layer computes them: a LoRALinear is merged first (into a copy; the model
passed in is not changed), a 4-bit base or a 4-bit layer is dequantized to fp32 first. Folding
runs in fp32; the result is a dense model in the embedding's dtype, on its device, in eval mode.
Its config is the source's with the kept shape (dim, n_layers, n_heads, n_kv_heads, hidden_dim),
which must be uniform: every kept layer must keep the same number of heads and of FFN channels,
and the kept dim must be n_heads * head_dim (head_dim never changes). `target`, if given, must be
the result's shape in every one of those fields (and in vocab_size, tie_embeddings, norm, mlp).

`compact_checkpoint(CKPT, OUT)` does it all for a checkpoint directory that holds its masks
(masks.safetensors and masks.json, as llama.prune.save_masks and the pruning trainer's final
folder write them): load both, compact under the masks' deterministic values (the target's
counts, kept gates at their soft values) against the masks' target, and save; the CLI
`python -m llama.prune compact` is a thin layer over it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import nn

from .. import checkpoint
from ..api import TOKENIZER_NAMES, find_tokenizer
from ..atomic import atomic_file
from ..config import ModelConfig
from ..lora import LoRALinear
from ..model import RMSNorm, Transformer, build
from ..quantize import QuantLinear
from .masked import check_masks
from .masks import load_masks

__all__ = ["OUTPUT_FORMATS", "SHAPE_FIELDS", "compact", "compact_checkpoint", "compact_config"]

OUTPUT_FORMATS = ("native", "hf")  # the formats a compact model is written in

SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size")
_KEPT_FIELDS = ("vocab_size", "tie_embeddings", "norm", "mlp")  # pruning never changes these


def _nonzero(t: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(t != 0).flatten()


def _kept(z: dict[str, torch.Tensor], keep: Optional[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{kind: booleans} of what is kept: `keep` where given (a kept entry may carry the value 0,
    then its weights fold to zeros), else the nonzero entries of z."""
    if keep is None:
        return {kind: t != 0 for kind, t in z.items()}
    if not isinstance(keep, Mapping) or set(keep) != set(z):
        raise ValueError(f"keep: expected booleans for exactly the kinds of z ({', '.join(z)})")
    out = {}
    for kind, t in keep.items():
        if not isinstance(t, torch.Tensor) or t.dtype != torch.bool or t.shape != z[kind].shape:
            raise ValueError(f"keep[{kind!r}]: expected a bool tensor of shape {tuple(z[kind].shape)}")
        out[kind] = t.detach().cpu()
    return out


def _plan(cfg: ModelConfig, z: dict[str, torch.Tensor], keep: Optional[Mapping[str, torch.Tensor]] = None) -> dict:
    """The kept layers, heads, channels and dims (CPU index tensors) and the new config; every
    non-uniformity is a ValueError naming the kind and the layer."""
    z = {kind: t.detach().float().cpu() for kind, t in z.items()}
    k = _kept(z, keep)
    L = cfg.n_layers
    ones = torch.ones(L)
    attn = z.get("layer", ones) * z.get("head_layer", ones)
    ffn = z.get("layer", ones) * z.get("mlp", ones)
    yes = torch.ones(L, dtype=torch.bool)
    attn_kept = k.get("layer", yes) & k.get("head_layer", yes)
    ffn_kept = k.get("layer", yes) & k.get("mlp", yes)
    layers = []
    for i in range(L):
        a, f = bool(attn_kept[i]), bool(ffn_kept[i])
        if a != f:
            kept, gone = ("attention", "FFN") if a else ("FFN", "attention")
            raise ValueError(f"z: layer {i} keeps its {kept} branch but not its {gone} branch; a dense block "
                             "has both, so compaction needs every layer to keep both or neither")
        if a:
            layers.append(i)
    if not layers:
        raise ValueError("z: every layer is pruned (the layer, head_layer or mlp gates are all 0); nothing to keep")

    def per_layer(kind: str, size: int, what: str) -> tuple[list[torch.Tensor], int]:
        if kind not in z:
            return [torch.arange(size)] * L, size
        kept = [_nonzero(k[kind][i]) for i in range(L)]
        counts = {i: int(kept[i].numel()) for i in layers}
        first = layers[0]
        for i, n in counts.items():
            if n == 0:
                raise ValueError(f"z[{kind!r}]: layer {i} keeps no {what}, but its block is kept")
            if n != counts[first]:
                raise ValueError(f"z[{kind!r}]: layer {first} keeps {counts[first]} {what} but layer {i} keeps "
                                 f"{n}; a dense model needs the same count in every kept layer")
        return kept, counts[first]

    heads, n_heads = per_layer("head", cfg.n_heads, "heads")
    channels, hidden_dim = per_layer("intermediate", cfg.hidden_dim, "FFN channels")
    dims = _nonzero(k["hidden"]) if "hidden" in z else torch.arange(cfg.dim)
    dim = int(dims.numel())
    if dim == 0:
        raise ValueError("z['hidden']: keeps no model dimension")
    if dim != n_heads * cfg.head_dim:
        raise ValueError(f"z: keeps dim {dim} and {n_heads} heads per layer, but head_dim stays {cfg.head_dim}, "
                         f"so the kept dim must be n_heads * head_dim = {n_heads * cfg.head_dim}")
    try:
        new = cfg.replace(dim=dim, n_layers=len(layers), n_heads=n_heads,
                          n_kv_heads=n_heads if "head" in z else cfg.n_kv_heads, hidden_dim=hidden_dim)
    except ValueError as e:
        raise ValueError(f"z: the kept shape is not a valid model ({e})") from None
    return {"z": z, "layers": layers, "heads": heads, "channels": channels, "dims": dims, "attn": attn, "ffn": ffn,
            "config": new}


def _check_target(source: ModelConfig, target: Optional[ModelConfig]) -> None:
    if target is None:
        return
    if not isinstance(target, ModelConfig):
        raise ValueError(f"target: expected a ModelConfig or None, got {type(target).__name__}")
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim"):
        if getattr(target, name) > getattr(source, name):
            raise ValueError(f"target.{name}: expected at most the source's {getattr(source, name)}, "
                             f"got {getattr(target, name)}")


def compact_config(cfg: ModelConfig, z: Mapping[str, torch.Tensor]) -> ModelConfig:
    """The config of the model that `compact` makes of a `cfg` model under z (same checks)."""
    if not isinstance(cfg, ModelConfig):
        raise ValueError(f"cfg: expected a ModelConfig, got {type(cfg).__name__}")
    return _plan(cfg, check_masks(cfg, z))["config"]


def _weight(layer: nn.Module, name: str) -> torch.Tensor:
    """The fp32 weight `layer` computes with: a LoRA layer's adapters merged, 4-bit dequantized."""
    if isinstance(layer, LoRALinear):
        w = _weight(layer.base, name)
        return w if layer.merged else w + layer.delta_weight().float().to(w.device)
    if getattr(layer, "bias", None) is not None:
        raise ValueError(f"{name}: has a bias, which the dense model's layers cannot hold")
    if isinstance(layer, QuantLinear):
        return layer.dequantize(torch.float32)
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().float()
    raise ValueError(f"{name}: expected an nn.Linear, QuantLinear or LoRALinear, got {type(layer).__name__}")


def _norm_state(norm: nn.Module, prefix: str, dims: torch.Tensor, divide: Optional[torch.Tensor] = None) -> dict:
    out = {}
    params = ("weight",) if isinstance(norm, RMSNorm) else ("weight", "bias")
    for p in params:
        t = getattr(norm, p).detach().float()[dims]
        out[prefix + p] = t if divide is None else t / divide
    return out


@torch.no_grad()
def compact(model: Transformer, z: Mapping[str, torch.Tensor], target: Optional[ModelConfig] = None,
            keep: Optional[Mapping[str, torch.Tensor]] = None) -> Transformer:
    """The dense model of the kept shape that computes what `model` computes under the masks z
    (`masked_forward(model, tokens, z)`); see the module docstring. z: {kind: mask} with the
    gate shapes of model.config (deterministic masks: every kept layer must keep the same counts).
    `keep`: {kind: booleans} of what is kept (PruningMasks.keep()), where a kept gate's value may
    be exactly 0 (its weights then fold to zeros); default: the nonzero entries of z.
    `target`: a ModelConfig the result must match in every shape field."""
    if not isinstance(model, Transformer):
        raise ValueError(f"model: expected a llama.model.Transformer, got {type(model).__name__}")
    cfg = model.config
    _check_target(cfg, target)
    emb = model.tok_embeddings.weight
    if emb.is_meta:
        raise ValueError("model: its weights are on the meta device; load them first")
    device, dtype = emb.device, emb.dtype
    plan = _plan(cfg, check_masks(cfg, z), keep)  # any device: the plan is made on the CPU
    new_cfg = plan["config"]
    if target is not None:
        for name in (*SHAPE_FIELDS, *_KEPT_FIELDS):
            if getattr(new_cfg, name) != getattr(target, name):
                raise ValueError(f"target.{name}: the masks give {getattr(new_cfg, name)!r}, "
                                 f"but the target has {getattr(target, name)!r}")

    zc, hd = plan["z"], cfg.head_dim
    dims = plan["dims"].to(device)
    hidden = zc["hidden"].to(device)[dims] if "hidden" in zc else torch.ones(len(dims), device=device)
    state = {"tok_embeddings.weight": emb.detach().float()[:, dims] * hidden}
    for j, i in enumerate(plan["layers"]):
        block, p = model.layers[i], f"layers.{j}."
        heads = plan["heads"][i].to(device)
        q_rows = (heads[:, None] * hd + torch.arange(hd, device=device)).flatten()
        kv_rows = q_rows if "head" in zc else torch.arange(cfg.n_kv_heads * hd, device=device)
        attn = block.attention
        for name, rows in (("wq", q_rows), ("wk", kv_rows), ("wv", kv_rows)):
            w = _weight(getattr(attn, name), f"layers.{i}.attention.{name}")
            state[f"{p}attention.{name}.weight"] = w[rows][:, dims]
        wo = _weight(attn.wo, f"layers.{i}.attention.wo")[dims][:, q_rows]
        wo = wo * (hidden * plan["attn"][i].item())[:, None]
        if "head" in zc:
            wo = wo * zc["head"][i].to(device).repeat_interleave(hd)[q_rows][None, :]
        state[f"{p}attention.wo.weight"] = wo
        state.update(_norm_state(block.attention_norm, f"{p}attention_norm.", dims))
        state.update(_norm_state(block.ffn_norm, f"{p}ffn_norm.", dims))

        ff = block.feed_forward
        channels = plan["channels"][i].to(device)
        inter = zc["intermediate"][i].to(device)[channels] if "intermediate" in zc else None
        w1 = _weight(ff.w1, f"layers.{i}.feed_forward.w1")[channels][:, dims]
        if ff.swiglu:
            w3 = _weight(ff.w3, f"layers.{i}.feed_forward.w3")[channels][:, dims]
            state[f"{p}feed_forward.w3.weight"] = w3 if inter is None else w3 * inter[:, None]
        elif inter is not None:
            w1 = w1 * inter[:, None]
        state[f"{p}feed_forward.w1.weight"] = w1
        w2 = _weight(ff.w2, f"layers.{i}.feed_forward.w2")[dims][:, channels]
        state[f"{p}feed_forward.w2.weight"] = w2 * (hidden * plan["ffn"][i].item())[:, None]
    tied = cfg.tie_embeddings
    state.update(_norm_state(model.norm, "norm.", dims, divide=hidden if tied else None))
    if not tied:
        state["output.weight"] = _weight(model.output, "output")[:, dims]

    small = build(new_cfg, init=False)
    small.load_weights({name: t.to(dtype).contiguous() for name, t in state.items()})
    return small.eval()


def compact_checkpoint(source: Union[str, Path], out: Union[str, Path], format: str = "native",
                       force: bool = False) -> Transformer:
    """Compact the checkpoint directory `source` under the masks saved in it and write the dense
    model to `out` (`format` "native" or "hf", atomically), with the tokenizer found in `source`,
    if any; returns the compact model. `out` must be new or empty unless `force`, and is never
    `source` itself."""
    source, out = Path(source), Path(out)
    if format not in OUTPUT_FORMATS:
        raise ValueError(f"format: expected one of {', '.join(OUTPUT_FORMATS)}, got {format!r}")
    if not source.is_dir():
        raise ValueError(f"source: {str(source)!r} is not a directory; expected a checkpoint directory with its masks")
    if out.resolve() == source.resolve():
        raise ValueError(f"out: {str(out)!r} is the source checkpoint; write the compact model elsewhere")
    if out.is_dir() and os.listdir(out) and not force:
        raise ValueError(f"out: {str(out)!r} is not empty; pass force=True to write into it anyway")
    masks = load_masks(source)  # first: a checkpoint without masks fails before the model loads
    model = checkpoint.load_model(source, device="cpu")
    masks.eval()
    small = compact(model, masks.deterministic_masks(), target=masks.target, keep=masks.keep())
    checkpoint.save(small, out, format=format)
    tokenizer = find_tokenizer(source)
    if tokenizer is not None:
        with atomic_file(out / tokenizer.name) as tmp:
            shutil.copyfile(tokenizer, tmp)
    for name in TOKENIZER_NAMES:  # one left there by an earlier model is not this model's
        stale = out / name
        if (tokenizer is None or name != tokenizer.name) and stale.is_file():
            stale.unlink()
    return small
