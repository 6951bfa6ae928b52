"""Attention with the rotary embedding fused in: training (forward + backward) and decoding.

    rope_attention(q, k, v, cos, sin, causal=True, softmax_scale=None, dropout_p=0.0,
                   dropout_seed=None, cu_seqlens=None, max_seqlen=None, positions=None)
    rope_decode_attention(q, k_new, v_new, k_cache, v_cache, cache_seqlens, cos, sin,
                          softmax_scale=None, check_bounds=True)

Layouts are the ones that come out of the projections, with no transposes: q (B, S, H, D), k and
v (B, S, Hkv, D), H a multiple of Hkv (GQA/MQA). Packed sequences drop the batch dim, (tokens, H,
D), and pass `cu_seqlens` (B + 1,) int32 offsets: tokens of one sequence attend only to each
other, and each sequence's positions restart at 0. cos and sin are (positions, D/2) tables
(llama.model.rope_tables); RoPE is half-split (element i pairs with i + D/2), the model's
convention.

Backends: Triton for fp16/bf16 CUDA tensors (llama_kernels/triton/rope_attention.py, and
triton/rope_decode.py for decoding); for decoding also a CUDA kernel (csrc/cuda/rope_decode.cu,
through llama_kernels/cuda/rope_decode.py) and a C++ CPU kernel (csrc/cpu/rope_decode.cpp, through
llama_kernels/cpu/rope_decode.py). fp32 CUDA tensors, CPU training calls and anything a kernel
cannot take go to the reference below, which computes in fp32.

Dropout inside the kernel is reproducible: the keep mask is a counter-based hash of
(dropout_seed, head, query token, key index), the same in every backend (see `dropout_keep`), so
a seed gives the same mask on CPU and GPU and in the backward pass.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import dispatch
from ..cpu import rope_decode as cpu_decode
from ..cuda import rope_decode as cuda_decode
from ..triton import kernels as triton_kernels

SUPPORTED_DTYPES = dispatch.FLOAT_DTYPES
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------- reference
def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE in fp32 (fp64 for fp64 x): x (..., D) with cos/sin broadcastable to (..., D/2)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    half = x.shape[-1] // 2
    xf = x.to(compute)
    x1, x2 = xf[..., :half], xf[..., half:]
    cos, sin = cos.to(compute), sin.to(compute)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on int64 tensors holding uint32 values."""
    mask = 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & mask
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & mask
    return x ^ (x >> 16)


def dropout_keep(seed: int, dropout_p: float, heads: int, total_tokens: int, tokens: torch.Tensor,
                 n_keys: int) -> torch.Tensor:
    """The dropout mask every backend uses: (heads, len(tokens), n_keys) booleans, True = kept.

    Query row r = head * total_tokens + token (token: its index in the flattened (B*S) or packed
    layout), key column n (its index within the sequence):
    keep = mix(mix(r ^ seed) + n * 0x9E3779B9) >= round(p * 2**32), all in uint32.
    """
    mask = 0xFFFFFFFF
    threshold = min(int(round(dropout_p * 2**32)), mask)
    seed = seed & 0x7FFFFFFF
    h = torch.arange(heads, device=tokens.device, dtype=torch.int64)
    rows = (h[:, None] * total_tokens + tokens.to(torch.int64)[None, :]) & mask
    row_keys = _mix32(rows ^ seed)
    cols = (torch.arange(n_keys, device=tokens.device, dtype=torch.int64) * 0x9E3779B9) & mask
    return _mix32((row_keys[:, :, None] + cols[None, None, :]) & mask) >= threshold


def _attend(q, k, v, causal, scale, dropout_p, seed, total, tokens):
    """q (B, S, H, D), k/v (B, S, Hkv, D), already rotated, in the compute dtype; tokens (B, S):
    each query's index in the flattened or packed layout (for the dropout mask)."""
    heads, kv_heads = q.shape[2], k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D)
    if dropout_p == 0:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale, enable_gqa=heads != kv_heads)
        return out.transpose(1, 2)
    kh, vh = kh.repeat_interleave(heads // kv_heads, dim=1), vh.repeat_interleave(heads // kv_heads, dim=1)
    scores = (qh @ kh.transpose(-1, -2)) * scale
    s = q.shape[1]
    if causal:
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = torch.softmax(scores, dim=-1)
    keep = dropout_keep(seed, dropout_p, heads, total, tokens.reshape(-1), s)  # (H, B*S, S)
    keep = keep.view(heads, q.shape[0], s, s).transpose(0, 1)
    return ((p * keep / (1.0 - dropout_p)) @ vh).transpose(1, 2)


def rope_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    causal: bool = True, softmax_scale: Optional[float] = None, dropout_p: float = 0.0, *,
    dropout_seed: int = 0, cu_seqlens: Optional[torch.Tensor] = None, max_seqlen: Optional[int] = None,
    positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The oracle and the torch backend: RoPE, then attention, in fp32 (fp64 for fp64 inputs),
    differentiable by autograd; the result has q's dtype. Same arguments as rope_attention."""
    del max_seqlen  # the reference walks the segments itself
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])

    def one(qs, ks, vs, tokens, pos):
        c, s = cos[pos][:, :, None], sin[pos][:, :, None]  # (B, n, 1, D/2)
        qr, kr = rotate(qs, c, s), rotate(ks, c, s)
        return _attend(qr, kr, vs.to(compute), causal, scale, dropout_p, dropout_seed, total, tokens)

    if cu_seqlens is None:
        b, s = q.shape[:2]
        total = b * s
        pos = torch.arange(s, device=q.device).expand(b, s) if positions is None else positions.long()
        return one(q, k, v, torch.arange(total, device=q.device).view(b, s), pos).to(q.dtype)
    total = q.shape[0]
    offsets = cu_seqlens.tolist()
    outs = []
    for a, e in zip(offsets[:-1], offsets[1:]):
        pos = torch.arange(e - a, device=q.device) if positions is None else positions[a:e].long()
        tokens = torch.arange(a, e, device=q.device)
        outs.append(one(q[a:e][None], k[a:e][None], v[a:e][None], tokens[None], pos[None])[0])
    return torch.cat(outs).to(q.dtype) if outs else q.new_empty(q.shape)


def rope_decode_attention_reference(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """The decode oracle and torch backend, with the op's side effect: rotates q and k_new at
    position L = cache_seqlens[b], writes the rotated key and the value into slot L of the caches,
    then attends over slots 0..L in fp32. Graph-capturable (no host sync)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    b, heads = q.shape[0], q.shape[2]
    lengths = cache_seqlens.to(torch.long)
    c, s = cos[lengths][:, None, None], sin[lengths][:, None, None]  # (B, 1, 1, D/2)
    qr = rotate(q, c, s)
    kr = rotate(k_new, c, s)
    rows = torch.arange(b, device=q.device)
    k_cache[rows, lengths] = kr[:, 0].to(k_cache.dtype)
    v_cache[rows, lengths] = v_new[:, 0].to(v_cache.dtype)
    slots = torch.arange(k_cache.shape[1], device=q.device)
    mask = (slots[None, :] <= lengths[:, None])[:, None, None, :]  # (B, 1, 1, capacity)
    out = F.scaled_dot_product_attention(
        qr.transpose(1, 2), k_cache.transpose(1, 2).to(compute), v_cache.transpose(1, 2).to(compute),
        attn_mask=mask, scale=scale, enable_gqa=heads != k_cache.shape[2],
    )
    return out.transpose(1, 2).to(q.dtype)


# ----------------------------------------------------------------------------- checks
def _is_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def _check_tables(cos, sin, head_dim: int, needed: Optional[int], device) -> None:
    for name, t in (("cos", cos), ("sin", sin)):
        _is_tensor(name, t)
        if t.dim() != 2 or t.shape[1] != head_dim // 2:
            raise ValueError(f"{name}: expected shape (positions, {head_dim // 2}) for head dim {head_dim}, "
                             f"got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point table, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name}: is on {t.device} but q is on {device}")
    if cos.shape != sin.shape:
        raise ValueError(f"sin: shape {tuple(sin.shape)} differs from cos {tuple(cos.shape)}")
    if sin.dtype != cos.dtype:
        raise TypeError(f"sin: dtype {sin.dtype} differs from cos's {cos.dtype}")
    if needed is not None and cos.shape[0] < needed:
        raise ValueError(f"cos: has {cos.shape[0]} positions but the sequences need {needed}")


def _check_qkv(q, k, v, packed: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _is_tensor(name, t)
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: dtype must be float32, float16 or bfloat16, got {t.dtype}")
        want = 3 if packed else 4
        if t.dim() != want:
            layout = "(tokens, heads, head_dim) with cu_seqlens" if packed else "(batch, seq, heads, head_dim)"
            raise ValueError(f"{name}: expected {want} dims {layout}, got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from q's {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: is on {t.device} but q is on {q.device}")
        if t.shape[:-2] != q.shape[:-2]:
            raise ValueError(f"{name}: leading dims {tuple(t.shape[:-2])} differ from q's {tuple(q.shape[:-2])}")
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"k, v: head dims {k.shape[-1]}, {v.shape[-1]} must equal q's head dim {d}")
    if d % 2 or d == 0:
        raise ValueError(f"q: head dim must be even for RoPE, got {d}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"v: has {v.shape[-2]} heads but k has {k.shape[-2]}")
    if k.shape[-2] == 0 or q.shape[-2] % k.shape[-2]:
        raise ValueError(f"k: q's {q.shape[-2]} heads must be a multiple of k's {k.shape[-2]} (GQA)")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_cu_seqlens(cu_seqlens, q) -> None:
    """Structure only (dtype, rank, device): no host sync."""
    _is_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected a 1-D int32 tensor of batch + 1 offsets, got "
                         f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens: is on {cu_seqlens.device} but q is on {q.device}")


def _packed_max_seqlen(cu_seqlens, q, max_seqlen: Optional[int]) -> int:
    """Checks the offsets' values where a host sync is allowed (one sync: they are read once) and
    returns the longest sequence; a given `max_seqlen` must cover it. Where no sync is allowed
    (compiling, capturing a CUDA graph) only `max_seqlen`'s own range is checked."""
    tokens = q.shape[0]
    if max_seqlen is not None:
        if not _is_int(max_seqlen) or max_seqlen < 0 or (max_seqlen == 0 and tokens > 0):
            raise ValueError(f"max_seqlen: expected a positive int (the longest sequence's length), "
                             f"got {max_seqlen!r}")
    if not dispatch.host_sync_allowed(q):
        if max_seqlen is not None:
            return max_seqlen
        if torch.compiler.is_compiling():  # torch.compile breaks the graph here, as it always has
            return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        raise ValueError("max_seqlen: required with cu_seqlens while capturing a CUDA graph "
                         "(computing it needs a host sync)")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens: must start at 0, got {offsets[0]}")
    longest = 0
    for i in range(1, len(offsets)):
        n = offsets[i] - offsets[i - 1]
        if n < 0:
            raise ValueError(f"cu_seqlens: offsets must be non-decreasing, got {offsets[i - 1]} then "
                             f"{offsets[i]} at index {i}")
        longest = max(longest, n)
    if offsets[-1] != tokens:
        raise ValueError(f"cu_seqlens: must end at the token count {tokens} (q.shape[0]), got {offsets[-1]}")
    if max_seqlen is None:
        return longest
    if max_seqlen < longest:
        raise ValueError(f"max_seqlen: {max_seqlen} is smaller than the longest sequence in cu_seqlens, {longest}")
    return max_seqlen


def _check_positions(positions, q, packed: bool, table_rows: int) -> None:
    _is_tensor("positions", positions)
    want = tuple(q.shape[:1] if packed else q.shape[:2])
    if positions.dtype not in (torch.int32, torch.int64) or tuple(positions.shape) != want:
        raise ValueError(f"positions: expected an int32 or int64 tensor of shape {want}, got "
                         f"{positions.dtype} of shape {tuple(positions.shape)}")
    if positions.device != q.device:
        raise ValueError(f"positions: is on {positions.device} but q is on {q.device}")
    if positions.numel() and dispatch.host_sync_allowed(q):
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= table_rows:
            raise ValueError(f"positions: must index the {table_rows} rows of cos/sin, got [{lo}, {hi}]")


def _check_scalars(causal, softmax_scale, dropout_p, dropout_seed) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    _check_scale(softmax_scale)
    if isinstance(dropout_p, bool) or not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p!r}")
    if dropout_seed is not None and not _is_int(dropout_seed):
        raise TypeError(f"dropout_seed: expected an int or None, got {type(dropout_seed).__name__}")


def _check_scale(softmax_scale) -> None:
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not (
            isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale))):
        raise ValueError(f"softmax_scale: expected a finite number or None, got {softmax_scale!r}")


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 tables with one shared, contiguous layout (the kernels take one row stride)."""
    return cos.float().contiguous(), sin.float().contiguous()


def _kernel_unsupported(dtype: torch.dtype, head_dim: int) -> Optional[str]:
    if dtype not in KERNEL_DTYPES:
        return f"{dtype} goes through the fp32 reference"
    if head_dim > MAX_HEAD_DIM or head_dim < 16:
        return f"head dim {head_dim} is outside the kernels' 16..{MAX_HEAD_DIM}"
    return None


@torch.compiler.assume_constant_result
def _attention_backend(device_type: str, dtype: torch.dtype, head_dim: int) -> str:
    """The training op's backend. It depends only on constants, so torch.compile evaluates it
    once while tracing (the forced-backend context is not traceable) and bakes the answer in."""
    reason = _kernel_unsupported(dtype, head_dim)
    return dispatch.choose("rope_attention", torch.device(device_type), {"triton": lambda: reason},
                           implemented=("triton", "torch"))


# ----------------------------------------------------------------------------- training op
def _lse_shape(q: torch.Tensor, packed: bool) -> tuple[int, int]:
    tokens = q.shape[0] if packed else q.shape[0] * q.shape[1]
    return q.shape[-2], tokens


@torch.library.custom_op("llama_kernels::rope_attention_fwd", mutates_args=())
def rope_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor], positions: Optional[torch.Tensor], max_seqlen: int, causal: bool,
    softmax_scale: float, dropout_p: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out like q, lse (H, tokens) fp32: the natural-log logsumexp of each query row)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, cu_seqlens is not None), dtype=torch.float32, device=q.device)
    if q.numel():
        triton_kernels("rope_attention").forward(q, k, v, cos, sin, out, lse, cu_seqlens, max_seqlen, causal,
                                                 softmax_scale, dropout_p, seed, positions)
    return out, lse


@rope_attention_fwd.register_fake
def _(q, k, v, cos, sin, cu_seqlens, positions, max_seqlen, causal, softmax_scale, dropout_p, seed):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        _lse_shape(q, cu_seqlens is not None), dtype=torch.float32)


@torch.library.custom_op("llama_kernels::rope_attention_bwd", mutates_args=())
def rope_attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
    positions: Optional[torch.Tensor], max_seqlen: int, causal: bool, softmax_scale: float, dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv), gradients w.r.t. the unrotated q and k."""
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel():
        do = _last_contiguous(grad_out.to(q.dtype))
        triton_kernels("rope_attention").backward(do, q, k, v, out, lse, cos, sin, dq, dk, dv, cu_seqlens,
                                                  max_seqlen, causal, softmax_scale, dropout_p, seed, positions)
    return dq, dk, dv


@rope_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, cos, sin, cu_seqlens, positions, max_seqlen, causal, softmax_scale, dropout_p,
      seed):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, cos, sin, cu_seqlens, positions, max_seqlen, causal, scale, dropout_p, seed = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cos, sin, cu_seqlens, positions)
    ctx.args = (max_seqlen, causal, scale, dropout_p, seed)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cos, sin, cu_seqlens, positions = ctx.saved_tensors
    dq, dk, dv = rope_attention_bwd(grad_out, q, k, v, out, lse, cos, sin, cu_seqlens, positions, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


rope_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def rope_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    causal: bool = True, softmax_scale: Optional[float] = None, dropout_p: float = 0.0, *,
    dropout_seed: Optional[int] = None, cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None, positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """softmax(scale * rope(q) rope(k)^T [+ causal mask]) v, with RoPE applied inside the kernel.

    q (B, S, H, D), k and v (B, S, Hkv, D); or, with `cu_seqlens` (B + 1,) int32 offsets that
    start at 0, never decrease and end at the token count, packed (tokens, H, D) and (tokens, Hkv,
    D). cos, sin: (positions, D/2) tables covering S (or the longest packed sequence; `max_seqlen`
    must be at least that, and is computed when omitted). The offsets are read once on the host to
    check them, except while compiling or capturing a CUDA graph, where only `max_seqlen`'s range
    is checked (it is then required when capturing). Returns q's
    shape and dtype; differentiable in q, k and v. `softmax_scale` defaults to 1/sqrt(D).
    `dropout_p` > 0 drops attention weights with a mask fixed by `dropout_seed` (drawn from torch's
    generator when None). `positions`, int (B, S) or (tokens,) for packed input, picks each
    token's row of the tables (default: 0, 1, ... within each sequence); the causal mask still
    follows token order. fp16/bf16 CUDA tensors run the Triton kernels; fp32 and CPU tensors the
    fp32 reference.
    """
    packed = cu_seqlens is not None
    _check_qkv(q, k, v, packed)
    _check_scalars(causal, softmax_scale, dropout_p, dropout_seed)
    if packed:
        _check_cu_seqlens(cu_seqlens, q)
        max_seqlen = _packed_max_seqlen(cu_seqlens, q, max_seqlen)
    else:
        if max_seqlen is not None:
            raise ValueError("max_seqlen: only meaningful with cu_seqlens (packed sequences)")
        max_seqlen = q.shape[1]
    _check_tables(cos, sin, q.shape[-1], max_seqlen if positions is None else None, q.device)
    if positions is not None:
        _check_positions(positions, q, packed, cos.shape[0])
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    seed = 0
    if dropout_p > 0:
        seed = int(torch.randint(0, 2**31 - 1, ()).item()) if dropout_seed is None else int(dropout_seed)
    backend = _attention_backend(q.device.type, q.dtype, q.shape[-1])
    if backend == "torch":
        return rope_attention_reference(q, k, v, cos, sin, causal, scale, float(dropout_p), dropout_seed=seed,
                                        cu_seqlens=cu_seqlens, positions=positions)
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    cos, sin = _tables(cos, sin)
    if positions is not None:
        positions = positions.contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.contiguous()
    return rope_attention_fwd(q, k, v, cos, sin, cu_seqlens, positions, max_seqlen, causal, scale,
                              float(dropout_p), seed)[0]


# ----------------------------------------------------------------------------- decode op
def _cuda_decode_unsupported(q: torch.Tensor, *tensors: torch.Tensor) -> Optional[str]:
    reason = _kernel_unsupported(q.dtype, q.shape[-1])
    if reason:
        return reason
    ext = dispatch.ext()
    if not hasattr(ext, "rope_decode_attention_cuda"):
        return "llama_kernels._C has no rope_decode_attention_cuda (rebuild it)"
    return cuda_decode.unsupported(q, *tensors)


def _cpu_decode_unsupported() -> Optional[str]:
    ext = dispatch.ext()
    return None if hasattr(ext, "rope_decode_attention_cpu") else "llama_kernels._C has no rope_decode_attention_cpu"


def _decode(q, k_new, v_new, k_cache, v_cache, cache_seqlens, cos, sin, softmax_scale: float) -> torch.Tensor:
    """Choose a backend for these (real) tensors and run it; writes slot L_b of the caches."""
    checks = {"triton": lambda: _kernel_unsupported(q.dtype, q.shape[-1]),
              "cuda": lambda: _cuda_decode_unsupported(q, k_new, v_new, k_cache, v_cache),
              "cpu": _cpu_decode_unsupported}
    backend = dispatch.choose("rope_decode_attention", q.device, checks,
                              implemented=("cuda", "triton", "cpu", "torch"))
    if backend == "torch":
        return rope_decode_attention_reference(q, k_new, v_new, k_cache, v_cache, cache_seqlens, cos, sin,
                                               softmax_scale)
    q, k_new, v_new = _last_contiguous(q), _last_contiguous(k_new), _last_contiguous(v_new)
    cos, sin = _tables(cos, sin)
    cache_seqlens = cache_seqlens.contiguous()  # the kernels index it as a plain array
    out = q.new_empty(q.shape)
    if q.shape[0] == 0:
        return out
    if backend == "cpu":
        cpu_decode.decode(q, k_new, v_new, k_cache, v_cache, cache_seqlens, cos, sin, out, softmax_scale)
        return out
    sms = dispatch.sm_count(q.device) if q.is_cuda else 4
    if backend == "cuda":
        splits = cuda_decode.splits_for(q.shape[0], k_cache.shape[2], k_cache.shape[1], sms, q.shape[-1])
        cuda_decode.decode(q, k_new, v_new, k_cache, v_cache, cache_seqlens, cos, sin, out, softmax_scale, splits)
    else:
        tri = triton_kernels("rope_decode")
        splits = tri.decode_splits(q.shape[0], k_cache.shape[2], k_cache.shape[1], sms)
        tri.decode(q, k_new, v_new, k_cache, v_cache, cache_seqlens, cos, sin, out, softmax_scale, splits)
    return out


@torch.library.custom_op("llama_kernels::rope_decode_attention", mutates_args=("k_cache", "v_cache"))
def rope_decode_attention_op(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, softmax_scale: float,
) -> torch.Tensor:
    """The decode step as one opaque op for torch.compile (the backend is chosen inside)."""
    return _decode(q, k_new, v_new, k_cache, v_cache, cache_seqlens, cos, sin, softmax_scale)


@rope_decode_attention_op.register_fake
def _(q, k_new, v_new, k_cache, v_cache, cache_seqlens, cos, sin, softmax_scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def cache_dtype_supported(dtype: torch.dtype, cache_dtype: torch.dtype) -> bool:
    """Whether rope_decode_attention takes caches of `cache_dtype` under q of `dtype`: q's own
    dtype, or 16 bits under fp32 q."""
    return cache_dtype == dtype or (dtype == torch.float32 and cache_dtype in (torch.float16, torch.bfloat16))


def _check_decode(q, k_new, v_new, k_cache, v_cache, cache_seqlens) -> None:
    for name, t in (("q", q), ("k_new", k_new), ("v_new", v_new), ("k_cache", k_cache), ("v_cache", v_cache)):
        _is_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: dtype must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: is on {t.device} but q is on {q.device}")
        cache = name in ("k_cache", "v_cache")
        if not (cache_dtype_supported(q.dtype, t.dtype) if cache else t.dtype == q.dtype):
            raise TypeError(f"{name}: dtype {t.dtype} differs from q's {q.dtype}")
    if v_cache.dtype != k_cache.dtype:
        raise TypeError(f"v_cache: dtype {v_cache.dtype} differs from k_cache's {k_cache.dtype}")
    b, s, heads, d = q.shape
    if s != 1:
        raise ValueError(f"q: expected one new token per sequence, shape (batch, 1, heads, head_dim), "
                         f"got {tuple(q.shape)}")
    if d % 2 or d == 0:
        raise ValueError(f"q: head dim must be even for RoPE, got {d}")
    kv_heads = k_cache.shape[2]
    if k_cache.shape[0] != b or k_cache.shape[3] != d or kv_heads == 0:
        raise ValueError(f"k_cache: expected shape ({b}, capacity, kv_heads, {d}), got {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: shape {tuple(v_cache.shape)} differs from k_cache's {tuple(k_cache.shape)}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("v_cache: k_cache and v_cache must share one layout with a contiguous last dim")
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if tuple(t.shape) != (b, 1, kv_heads, d):
            raise ValueError(f"{name}: expected shape ({b}, 1, {kv_heads}, {d}), got {tuple(t.shape)}")
    if heads % kv_heads:
        raise ValueError(f"k_cache: q's {heads} heads must be a multiple of the cache's {kv_heads} (GQA)")
    _is_tensor("cache_seqlens", cache_seqlens)
    if cache_seqlens.dtype not in (torch.int32, torch.int64) or tuple(cache_seqlens.shape) != (b,):
        raise ValueError(f"cache_seqlens: expected an int32 or int64 tensor of shape ({b},), got "
                         f"{cache_seqlens.dtype} of shape {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens: is on {cache_seqlens.device} but q is on {q.device}")


def rope_decode_attention(
    q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, softmax_scale: Optional[float] = None,
    check_bounds: bool = True,
) -> torch.Tensor:
    """One decoding step of attention for a batch of sequences of different lengths.

    q (B, 1, H, D), k_new and v_new (B, 1, Hkv, D): the new token's projections. k_cache and
    v_cache (B, capacity, Hkv, D), in q's dtype, or in fp16/bf16 under fp32 q (the new key and value
    are rounded to it as they are written; attention reads the cache back in fp32: the C++ CPU
    kernel, or the reference on a GPU). cache_seqlens (B,) int32/int64: positions already
    cached, L_b. Rotates q and k_new at position L_b (cos/sin tables of (positions, D/2)), writes
    the rotated key and the value into slot L_b of the caches in place (cache_seqlens is not
    advanced), and returns attention over slots 0..L_b, (B, 1, H, D). Split-K over the cache
    (flash-decoding), CUDA or Triton, for fp16/bf16 CUDA tensors (fp32 ones take the reference);
    a C++ kernel for CPU tensors of any of the three dtypes.

    `check_bounds` verifies on the host that every L_b < capacity and < positions (a device sync;
    skipped while capturing a CUDA graph or compiling). Without the check, a length out of range
    gives NaN for that sequence and no cache write in the kernels.
    """
    _check_decode(q, k_new, v_new, k_cache, v_cache, cache_seqlens)
    _check_tables(cos, sin, q.shape[-1], None, q.device)
    _check_scale(softmax_scale)
    if not isinstance(check_bounds, bool):
        raise TypeError(f"check_bounds: expected a bool, got {type(check_bounds).__name__}")
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if check_bounds and q.shape[0] and dispatch.host_sync_allowed(q):
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        limit = min(k_cache.shape[1], cos.shape[0])
        if lo < 0 or hi >= limit:
            raise ValueError(f"cache_seqlens: lengths must be in [0, {limit - 1}] (capacity {k_cache.shape[1]}, "
                             f"{cos.shape[0]} table positions), got [{lo}, {hi}]")
    if torch.compiler.is_compiling():
        return rope_decode_attention_op(q, k_new, v_new, k_cache, v_cache, cache_seqlens, cos, sin, scale)
    return _decode(q, k_new, v_new, k_cache, v_cache, cache_seqlens, cos, sin, scale)  # no custom-op layer
