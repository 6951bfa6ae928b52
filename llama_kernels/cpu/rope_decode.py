"""The C++ CPU entry point behind rope_decode_attention (csrc/cpu/rope_decode.cpp): RoPE on q and
k_new, the append to the KV cache and split-K attention over it in one call, streaming the cache
slot by slot.

Inputs arrive validated by llama_kernels/ops/rope_attention.py, with q, k_new, v_new of contiguous
last dims, fp32 cos/sin tables of one layout and a contiguous cache_seqlens.
"""
from __future__ import annotations

import torch

from .. import dispatch


def decode(q, k_new, v_new, k_cache, v_cache, cache_seqlens, cos, sin, out, softmax_scale: float) -> None:
    """Writes out (B, 1, H, D) and slot cache_seqlens[b] of the caches."""
    strides = [q.stride(0), q.stride(2), k_new.stride(0), k_new.stride(2), v_new.stride(0), v_new.stride(2),
               k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(2), cos.stride(0)]
    batch, _, heads, head_dim = q.shape
    dispatch.ext().rope_decode_attention_cpu(
        q.data_ptr(), k_new.data_ptr(), v_new.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        cache_seqlens.data_ptr(), cache_seqlens.dtype == torch.int64, cos.data_ptr(), sin.data_ptr(), out.data_ptr(),
        batch, heads, k_cache.shape[2], head_dim, k_cache.shape[1], cos.shape[0], strides,
        dispatch.DTYPE_CODES[q.dtype], dispatch.DTYPE_CODES[k_cache.dtype], softmax_scale, torch.get_num_threads(),
    )
