"""The C++ CPU decode plan (csrc/cpu/decode_plan.cpp): a whole decode step of a LLaMA, every layer,
the final norm and the head, in one call that runs the CPU kernels back to back on buffers it
allocated once.

A decode step of a small model is a few dozen kernels of a few microseconds each. Called one by
one from Python, the interpreter, each op's checks and each output's allocation cost about as
much as the kernels do (stories42M in int4 at batch 1: about 1.7 of 3.2 ms per step). The plan
checks everything once, when it is built, and a step checks only the token ids and positions.

The plan reads the tensors it was built from by address: they must stay alive and in place,
which `DecodePlan` sees to by holding them; a model whose weights, RoPE tables or cache were
replaced needs a new plan. Everything is fp32 (the 4-bit weights' codes, scales and zeros
excepted, and the KV cache, which may be fp16 or bf16), on the CPU, with contiguous rows.

Ops, in the model's order: the embedding row; per layer add_rms_norm, the Q/K/V projection (one
multi-weight call), rope_decode_attention (which writes slot seqlens[b] of the caches), the output
projection, add_rms_norm, gate/up (one call), swiglu, the down projection; the final
add_rms_norm; the head, or for greedy decoding only its argmax (linear_argmax for a dense head).
4-bit projections take the activations that llama_kernels.cpu.int4_matmul would give them
(int8 by default for int4, fp32 for NF4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from .. import dispatch
from ..int4_format import QuantizedWeight
from . import int4_matmul as cpu_int4

Weights = Sequence[Union[torch.Tensor, QuantizedWeight]]
# The caches' dtypes: float32, or 16 bits (keys and values rounded to it once, as they are written;
# attention reads them back into fp32): half the bytes that each step streams.
CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class LayerWeights:
    """One block's weights: norms (dim,), and projections as lists of dense fp32 (out, in)
    tensors or 4-bit QuantizedWeights, one kind and one group size per list."""

    attention_norm: torch.Tensor
    ffn_norm: torch.Tensor
    qkv: Weights  # Q, K, V
    wo: Weights  # one weight
    gate_up: Weights  # gate (w1), up (w3)
    down: Weights  # one weight (w2)


def _check_fp32(name: str, t: torch.Tensor, shape: Optional[tuple] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a contiguous float32 CPU tensor, got {type(t).__name__}")
    if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
        layout = "contiguous" if t.is_contiguous() else "non-contiguous"
        raise ValueError(f"{name}: expected a contiguous float32 CPU tensor, got a {layout} {t.dtype} tensor "
                         f"on {t.device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def _projection(name: str, weights: Weights, in_features: int, keep: list):
    """The plan's description of `weights` (all reading x of `in_features`), and the tensors it
    reads appended to `keep`."""
    ext = dispatch.ext()
    if not weights:
        raise ValueError(f"{name}: expected one or more weights")
    if all(isinstance(w, torch.Tensor) for w in weights):
        for i, w in enumerate(weights):
            _check_fp32(f"{name}[{i}]", w)
            if w.dim() != 2 or w.shape[1] != in_features or w.shape[0] == 0:
                raise ValueError(f"{name}[{i}]: expected (out_features, {in_features}), got {tuple(w.shape)}")
        keep.extend(weights)
        return ext.PlanWeights.dense(in_features, [w.data_ptr() for w in weights], [w.shape[0] for w in weights])
    if not all(isinstance(w, QuantizedWeight) for w in weights):
        raise ValueError(f"{name}: expected dense tensors or QuantizedWeights, not a mix")
    first = weights[0]
    for i, qw in enumerate(weights):
        qw.validate(f"{name}[{i}]")
        if qw.packed.device.type != "cpu" or qw.shape[1] != in_features:
            raise ValueError(f"{name}[{i}]: expected a CPU weight of in_features {in_features}, got {qw.shape} "
                             f"on {qw.packed.device}")
        if qw.format != first.format or qw.group_size != first.group_size:
            raise ValueError(f"{name}[{i}]: expected the format and group size of {name}[0]")
    parts = [(qw.packed, qw.scales, qw.zeros) for qw in weights]
    lut = first.lut.contiguous()
    keep.extend([lut, *(t for p in parts for t in p if t is not None)])
    return ext.PlanWeights.int4(
        in_features, first.group_size, cpu_int4.int8_activations(parts), lut.data_ptr(),
        [p.data_ptr() for p, _, _ in parts], [s.data_ptr() for _, s, _ in parts],
        [0 if z is None else z.data_ptr() for _, _, z in parts], [qw.shape[0] for qw in weights],
    )


class DecodePlan:
    """A decode step for `seqlens.shape[0]` sequences in one C++ call.

    embedding (vocab, dim); final_norm (dim,); head: one weight (vocab, dim), dense or 4-bit;
    layers: a LayerWeights per block; cos, sin: RoPE tables (positions, head_dim / 2);
    k_caches, v_caches: per layer (batch, capacity, kv_heads, head_dim), all of one dtype of
    CACHE_DTYPES; seqlens: int64 (batch,), each sequence's next position, which `step` advances.
    All are read in place, never copied.
    """

    def __init__(self, *, embedding: torch.Tensor, final_norm: torch.Tensor, head: Union[torch.Tensor, QuantizedWeight],
                 layers: Sequence[LayerWeights], cos: torch.Tensor, sin: torch.Tensor,
                 k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor], seqlens: torch.Tensor,
                 heads: int, eps: float, softmax_scale: Optional[float] = None):
        _check_fp32("embedding", embedding)
        if embedding.dim() != 2:
            raise ValueError(f"embedding: expected (vocab, dim), got {tuple(embedding.shape)}")
        vocab, dim = embedding.shape
        if not layers or len(k_caches) != len(layers) or len(v_caches) != len(layers):
            raise ValueError(f"layers, k_caches, v_caches: expected one or more layers and a cache pair each, got "
                             f"{len(layers)}, {len(k_caches)}, {len(v_caches)}")
        if (not isinstance(seqlens, torch.Tensor) or seqlens.dtype != torch.int64 or seqlens.dim() != 1
                or seqlens.device.type != "cpu" or not seqlens.is_contiguous()):
            raise ValueError("seqlens: expected a contiguous int64 CPU tensor (batch,)")
        batch = seqlens.shape[0]
        cache_shape = tuple(k_caches[0].shape)
        if len(cache_shape) != 4 or cache_shape[0] != batch:
            raise ValueError(f"k_caches[0]: expected (batch {batch}, capacity, kv_heads, head_dim), got {cache_shape}")
        _, capacity, kv_heads, head_dim = cache_shape
        cache_dtype = k_caches[0].dtype
        if cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"k_caches[0]: expected one of {CACHE_DTYPES}, got {cache_dtype}")
        for i, (k, v) in enumerate(zip(k_caches, v_caches)):
            for name, t in ((f"k_caches[{i}]", k), (f"v_caches[{i}]", v)):
                if (t.dtype != cache_dtype or t.device.type != "cpu" or not t.is_contiguous()
                        or tuple(t.shape) != cache_shape):
                    raise ValueError(f"{name}: expected a contiguous {cache_dtype} CPU tensor of shape {cache_shape} "
                                     f"(as k_caches[0]), got {t.dtype} {tuple(t.shape)}, "
                                     f"{'' if t.is_contiguous() else 'non-'}contiguous, on {t.device}")
        if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0 or heads % kv_heads:
            raise ValueError(f"heads: expected a positive multiple of kv_heads {kv_heads}, got {heads!r}")
        for name, t in (("cos", cos), ("sin", sin)):
            if (not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 2
                    or t.shape[1] != head_dim // 2 or t.stride(1) != 1):
                raise ValueError(f"{name}: expected a float32 CPU table (positions, {head_dim // 2}) with contiguous rows")
        if cos.shape != sin.shape or cos.stride() != sin.stride():
            raise ValueError("cos, sin: expected tables of one shape and layout")
        _check_fp32("final_norm", final_norm, (dim,))
        scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
        if not (math.isfinite(eps) and eps > 0) or not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"eps, softmax_scale: expected positive finite numbers, got {eps!r}, {softmax_scale!r}")
        keep: list = [embedding, final_norm, cos, sin, seqlens, *k_caches, *v_caches]
        ext = dispatch.ext()
        self._plan = ext.DecodePlanCpu(
            batch, dim, heads, kv_heads, head_dim, vocab, capacity, float(eps), scale, embedding.data_ptr(),
            final_norm.data_ptr(), _projection("head", [head], dim, keep), cos.data_ptr(), sin.data_ptr(),
            cos.shape[0], cos.stride(0), seqlens.data_ptr(), dispatch.DTYPE_CODES[cache_dtype],
        )
        for i, layer in enumerate(layers):
            _check_fp32(f"layers[{i}].attention_norm", layer.attention_norm, (dim,))
            _check_fp32(f"layers[{i}].ffn_norm", layer.ffn_norm, (dim,))
            hidden = layer.gate_up[0].shape[0] if layer.gate_up else 0
            self._plan.add_layer(
                layer.attention_norm.data_ptr(), layer.ffn_norm.data_ptr(),
                _projection(f"layers[{i}].qkv", layer.qkv, dim, keep),
                _projection(f"layers[{i}].wo", layer.wo, heads * head_dim, keep),
                _projection(f"layers[{i}].gate_up", layer.gate_up, dim, keep),
                _projection(f"layers[{i}].down", layer.down, hidden, keep),
                k_caches[i].data_ptr(), v_caches[i].data_ptr(),
            )
            keep += [layer.attention_norm, layer.ffn_norm]
        self._keep = keep  # the plan reads these by address
        self.batch, self.vocab = batch, vocab

    def step(self, tokens: torch.Tensor, logits: Optional[torch.Tensor] = None,
             argmax: Optional[torch.Tensor] = None) -> None:
        """tokens: int64 (batch,). Writes logits (batch, vocab) fp32 and/or argmax (batch,) int64,
        whichever is given, and advances seqlens by one."""
        if (tokens.dtype != torch.int64 or tuple(tokens.shape) != (self.batch,) or tokens.device.type != "cpu"
                or not tokens.is_contiguous()):
            raise ValueError(f"tokens: expected a contiguous int64 CPU tensor ({self.batch},)")
        if logits is not None:
            _check_fp32("logits", logits, (self.batch, self.vocab))
        if argmax is not None and (argmax.dtype != torch.int64 or tuple(argmax.shape) != (self.batch,)
                                   or not argmax.is_contiguous() or argmax.device.type != "cpu"):
            raise ValueError(f"argmax: expected a contiguous int64 CPU tensor ({self.batch},)")
        if logits is None and argmax is None:
            raise ValueError("logits, argmax: expected at least one output")
        self._plan.step(tokens.data_ptr(), 0 if logits is None else logits.data_ptr(),
                        0 if argmax is None else argmax.data_ptr(), torch.get_num_threads())

    def time_ops(self, on: bool = True) -> None:
        """Time each op of the steps that follow (or stop timing); the totals restart."""
        self._plan.set_timing(on)

    def op_times(self) -> dict[str, float]:
        """Microseconds per step of each op (summed over layers), averaged over the steps timed
        since time_ops(True): embedding, rms_norm, qkv, attention, wo, gate_up, swiglu, down, head."""
        totals, steps = self._plan.timings()
        return {op: total / max(steps, 1) for op, total in totals.items()}
