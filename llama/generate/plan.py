"""The CPU decode step in one call: a model's weights and a Decoder's cache as a
llama_kernels.cpu.decode_plan.DecodePlan.

`Decoder` (llama.generate) builds one at each prefill where the model is one the plan runs, and
its steps then make one C++ call each instead of a few hundred Python-level ones. The plan runs
the model's eager step op for op with the same kernels in the same order, so tokens, logits and
cache contents are those of the eager step, bit for bit (tests/test_decode_plan.py). A model with
anything else falls back to the eager step; `unsupported` says why.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from llama_kernels.cpu.decode_plan import CACHE_DTYPES, DecodePlan, LayerWeights

from ..model import FUSED_PROJECTION_MAX_ROWS, KVCache, Linear, RMSNorm, Transformer
from ..quantize import QuantLinear


def _weight(layer: nn.Module):
    """What the plan multiplies by for `layer`: the fp32 weight of our Linear or the 4-bit weight
    of a QuantLinear, both without bias; None for anything else (LoRA, masks, other classes)."""
    w = layer.weight if type(layer) is Linear else None
    if w is not None and layer.bias is None and w.dtype == torch.float32 and w.is_contiguous():
        return w.detach()
    if type(layer) is QuantLinear and layer.bias is None:
        return layer.qweight
    return None


def _group(layers) -> Optional[list]:
    """The weights of layers that read one x, all of one kind (dense, or 4-bit of one format and
    group size), or None."""
    weights = [_weight(layer) for layer in layers]
    if any(w is None for w in weights):
        return None
    dense = [isinstance(w, torch.Tensor) for w in weights]
    if any(dense) and not all(dense):
        return None
    if not any(dense) and len({(w.format, w.group_size) for w in weights}) != 1:
        return None
    return weights


def unsupported(model: Transformer, cache: KVCache) -> Optional[str]:
    """Why the plan cannot run `model` over `cache`, or None if it can."""
    cfg = model.config
    if cache.k[0].device.type != "cpu":
        return "the plan runs on the CPU"
    if model.training:
        return "the model is in training mode"
    if cfg.norm != "rms" or cfg.mlp != "swiglu":
        return f"norm {cfg.norm!r} and mlp {cfg.mlp!r}: the plan runs RMSNorm and SwiGLU"
    if cache.batch > FUSED_PROJECTION_MAX_ROWS:
        return f"batch {cache.batch}: the plan runs decode-sized batches (up to {FUSED_PROJECTION_MAX_ROWS})"
    if model.tok_embeddings.weight.dtype != torch.float32 or cache.k[0].dtype not in CACHE_DTYPES:
        return f"the plan runs float32 models with a cache of {CACHE_DTYPES}"
    if type(model.tok_embeddings) is not nn.Embedding or not model.tok_embeddings.weight.is_contiguous():
        return "the embedding is not a plain nn.Embedding with a contiguous table"
    norms = [model.norm] + [n for layer in model.layers for n in (layer.attention_norm, layer.ffn_norm)]
    if any(type(n) is not RMSNorm or n.weight.dtype != torch.float32 or n.eps != model.norm.eps for n in norms):
        return "a norm is not a float32 RMSNorm with the final norm's eps"
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return "a module has forward hooks, which the plan would not call"
    groups = [[model.output]]
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        groups += [[a.wq, a.wk, a.wv], [a.wo], [f.w1, f.w3], [f.w2]]
    if any(_group(g) is None for g in groups):
        return ("a projection is not our Linear (fp32) or a QuantLinear, without bias, of one kind per group "
                "(LoRA adapters and pruning masks run eagerly)")
    return None


def build(model: Transformer, cache: KVCache) -> Optional[DecodePlan]:
    """The plan for `model` over `cache`, or None where `unsupported` gives a reason."""
    if unsupported(model, cache) is not None:
        return None
    layers = []
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        layers.append(LayerWeights(
            attention_norm=layer.attention_norm.weight.detach(), ffn_norm=layer.ffn_norm.weight.detach(),
            qkv=_group([a.wq, a.wk, a.wv]), wo=_group([a.wo]), gate_up=_group([f.w1, f.w3]), down=_group([f.w2]),
        ))
    cfg = model.config
    return DecodePlan(
        embedding=model.tok_embeddings.weight.detach(), final_norm=model.norm.weight.detach(),
        head=_group([model.output])[0], layers=layers, cos=model.rope_cos, sin=model.rope_sin,
        k_caches=cache.k, v_caches=cache.v, seqlens=cache.seqlens, heads=cfg.n_heads, eps=model.norm.eps,
    )
