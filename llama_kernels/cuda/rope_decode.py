"""The CUDA decode kernel behind rope_decode_attention (csrc/cuda/rope_decode.cu): RoPE on q and
k_new, the append to the KV cache and split-K (flash-decoding) attention in one launch, plus a
merge launch when the cache is split.

Inputs arrive validated by llama_kernels/ops/rope_attention.py; `unsupported` names what this kernel
cannot take (the caller falls back to Triton). The C++ entry point checks its arguments again and
returns them as ValueError naming the argument.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch

HEAD_DIMS = (32, 64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16)
WARPS = 4  # warps per block; each takes tiles of 2048 / head_dim keys in turn
MIN_CHUNK = 128  # fewest cache slots per split at full capacity (two tiles a warp at head_dim 128)
MAX_SPLITS = 256
GRID_LIMIT = 65535


def tile_keys(head_dim: int) -> int:
    """Keys one warp takes per step: K and V of a tile are 8 KB (64 registers a thread)."""
    return 2048 // head_dim


def splits_for(batch: int, kv_heads: int, capacity: int, sm_count: int, head_dim: int = 128) -> int:
    """Splits of the cache per (sequence, kv head): about two blocks (of four warps, each with 8 KB
    of loads in flight) per multiprocessor, each split keeping at least MIN_CHUNK slots (and one
    tile per warp) at full capacity. Fixed by the shapes, not the lengths, so a captured CUDA graph
    stays valid; at shorter lengths the chunks shrink (the kernel divides the current length) and
    splits past the end do nothing but write an empty partial."""
    pairs = max(1, batch * kv_heads)
    want = -(-2 * sm_count // pairs)
    chunk = max(MIN_CHUNK, WARPS * tile_keys(head_dim))
    most = max(1, capacity // chunk)
    return max(1, min(want, most, MAX_SPLITS))


def workspace_elems(batch: int, heads: int, head_dim: int, splits: int) -> int:
    """fp32 elements of the workspace: (B, H, splits) {max, sum} pairs, then (B, H, splits, D)
    accumulators; none for one split. The formula of rope_decode_workspace_elems in kernels_cuda.h,
    which llama_kernels._C exposes only when built with CUDA (tests compare the two)."""
    return batch * heads * splits * (head_dim + 2) if splits > 1 else 0


def unsupported(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> Optional[str]:
    """Why the CUDA kernel cannot take this call, or None."""
    batch, _, heads, head_dim = q.shape
    kv_heads, capacity = k_cache.shape[2], k_cache.shape[1]
    if q.dtype not in DTYPES:
        return f"{q.dtype} (the CUDA decode kernel takes float16 and bfloat16)"
    if head_dim not in HEAD_DIMS:
        return f"head dim {head_dim} (the CUDA decode kernel takes {', '.join(map(str, HEAD_DIMS))})"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.data_ptr() % 16 or any(s % 8 for s in t.stride()[:3]):
            return f"{name} is not 16-byte aligned (pointer, and strides a multiple of 8 elements)"
    groups = -(-(heads // kv_heads) // 16)
    if batch > GRID_LIMIT or heads > GRID_LIMIT or kv_heads * groups > GRID_LIMIT or capacity > 2**31 - 1:
        return "too many sequences, heads or slots for the CUDA decode kernel's grid"
    return None


def entry_args(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor,
               workspace: Optional[torch.Tensor], softmax_scale: float, splits: int) -> dict:
    """The arguments of llama_kernels._C.rope_decode_attention_cuda, by name and in order: the
    tensors as descriptors (their shapes, strides, dtypes and device travel with them), then the
    scalars and the stream."""
    tensors = dict(q=q, k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache, seqlens=seqlens, cos=cos,
                   sin=sin, out=out, workspace=workspace)
    args = {name: dispatch.tensor_arg(t, name) for name, t in tensors.items()}
    return dict(args, softmax_scale=float(softmax_scale), splits=splits, stream=dispatch.cuda_stream(q))


def decode(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
           v_cache: torch.Tensor, seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor,
           softmax_scale: float, splits: Optional[int] = None) -> None:
    """Writes out (B, 1, H, D) and slot seqlens[b] of the caches. q (B, 1, H, D), k_new / v_new
    (B, 1, Hkv, D), caches (B, capacity, Hkv, D) sharing one layout, seqlens (B,) int32/int64, cos /
    sin (positions, D/2) fp32 sharing one row stride; last dims contiguous. splits=None picks
    splits_for(). Capturable in a CUDA graph (the workspace comes from the graph's pool)."""
    batch, _, heads, head_dim = q.shape
    if splits is None:
        splits = splits_for(batch, k_cache.shape[2], k_cache.shape[1], dispatch.sm_count(q.device), head_dim)
    workspace = torch.empty(workspace_elems(batch, heads, head_dim, splits), dtype=torch.float32, device=q.device)
    args = entry_args(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, out, workspace, softmax_scale, splits)
    dispatch.cuda_call(dispatch.ext().rope_decode_attention_cuda, **args)
