"""Triton int4 / NF4 weight-only matmul: y = x @ W^T with W = lut[q] * scale (+ zero).

Two kernels, chosen by the number of rows M of x (see llama_kernels/int4_format.py for the formats):

* **GEMV** (M <= SMALL_M_MAX, decode): each program owns BLOCK_N output columns, up to 4 rows and
  a K range. It streams the packed bytes of its columns, dequantizes in fp32 and multiplies on
  CUDA cores (broadcast FMAs into an elementwise accumulator, one tl.sum at the end; no tl.dot).
  For int4 the table is q - 8, so it is computed, not looked up. When the output columns alone
  cannot fill the GPU, K is split over the grid: fp32 partial sums go to a workspace, and a
  second kernel adds them in a fixed order (deterministic, no atomics) and casts.
* **GEMM** (larger M, prefill/training): (BLOCK_M, BLOCK_N) tiles and a K loop that dequantizes
  the weight tile in registers (fp32 math, then x's dtype) and accumulates with tl.dot in fp32;
  fp32 x gets exact fp32 dots (input_precision="ieee", no TF32). Split-K through the same
  workspace when the tiles are too few to fill the GPU (skinny M).

The GEMV's FMAs per weight grow with M while the GEMM's tensor cores make extra rows nearly free,
hence the small SMALL_M_MAX (a guess from instruction counts; tune it on hardware).

Both walk K one quantization group at a time (BLOCK_K is a whole number of groups), so a group's
scale is one value per output column. The packed layout is consumed without shuffles: byte
16c + l of a row (chunk c, l < 16) holds code k = 32c + l in its low nibble and k + 16 in its high
one, so a run of bytes unpacks into a "low" tile and a "high" tile, and x is loaded at the matching
two sets of k (runs of 16 contiguous elements). The order of k in a dot product is free.

The launch configurations are fixed heuristics (no autotuning: launches stay cheap and CUDA-graph
capturable); `gemv` and `gemm` take explicit block sizes and split counts so the tests can force
every path at small sizes.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ..int4_format import device_lut

SMALL_M_MAX = 4  # rows up to which the CUDA-core GEMV is used (see above)
_INTERPRETER_SMS = 4  # pretend SM count under TRITON_INTERPRET=1: small, so split-K still runs


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _gemv_row_fma(acc, x_row, kg, k_ok, w_lo, w_hi, EVEN_K: tl.constexpr):
    """acc + x[row, low k] * w_lo + x[row, high k] * w_hi, all (BLOCK_N, G/2) in fp32."""
    if EVEN_K:
        x_lo = tl.load(x_row + kg).to(tl.float32)
        x_hi = tl.load(x_row + (kg + 16)).to(tl.float32)
    else:
        x_lo = tl.load(x_row + kg, mask=k_ok, other=0.0).to(tl.float32)
        x_hi = tl.load(x_row + (kg + 16), mask=k_ok, other=0.0).to(tl.float32)
    return acc + x_lo * w_lo + x_hi * w_hi


@triton.jit
def _gemv_row_store(acc, row, M, N, offs_n, rn, pid_k, Y, WS, stride_ym, SPLIT: tl.constexpr):
    out = tl.sum(acc, axis=1)
    mask = (offs_n < N) & ((row + 0 * offs_n) < M)  # a tensor mask (the interpreter wants one)
    if SPLIT:
        tl.store(WS + pid_k.to(tl.int64) * M * N + row * N + rn, out, mask=mask)
    else:
        tl.store(Y + row * stride_ym + rn, out.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def gemv_kernel(
    X, P, S, Z, LUT, Y, WS,
    M, N, K, half_k, n_groups, stride_xm, stride_ym, k_per_split,
    GROUP: tl.constexpr, GROUPS_PER_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ZERO: tl.constexpr, LINEAR_LUT: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr,
):
    """Up to 4 rows of x (BLOCK_M in 1, 2, 4), one accumulator each. Products accumulate
    elementwise in the weight tile's own (BLOCK_N, G/2) layout and are summed over k once at the
    end: no cross-thread reduction or layout change inside the loop."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    HALF: tl.constexpr = GROUP // 2
    BLOCK_K: tl.constexpr = GROUP * GROUPS_PER_TILE

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = tl.minimum(offs_n, N - 1).to(tl.int64)  # out-of-range columns repeat the last; not stored
    j = tl.arange(0, HALF)
    k_lo = (j // 16) * 32 + (j % 16)  # k of the low nibbles of bytes j of a group (high: +16)
    p_ptrs = P + rn[:, None] * half_k + j[None, :]  # (BLOCK_N, HALF) bytes at group start 0
    s_ptrs = S + rn * n_groups
    z_ptrs = Z + rn * n_groups
    # Rows of x as (1, HALF) pointers; rows past M repeat the last one and are not stored.
    row0 = pid_m.to(tl.int64) * BLOCK_M
    x0 = X + tl.minimum(row0, M - 1) * stride_xm + k_lo[None, :]
    x1 = X + tl.minimum(row0 + 1, M - 1) * stride_xm + k_lo[None, :]
    x2 = X + tl.minimum(row0 + 2, M - 1) * stride_xm + k_lo[None, :]
    x3 = X + tl.minimum(row0 + 3, M - 1) * stride_xm + k_lo[None, :]

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc0 = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        for t in tl.static_range(GROUPS_PER_TILE):
            kg = k0 + t * GROUP  # first k of this group
            # K is a multiple of GROUP: a group is wholly inside or wholly past the end.
            k_ok = ((kg + k_lo) < k_end)[None, :]
            if EVEN_K:
                b = tl.load(p_ptrs + kg // 2)
                g = kg // GROUP
            else:
                b = tl.load(p_ptrs + kg // 2, mask=k_ok, other=0)
                g = tl.minimum(kg // GROUP, n_groups - 1)  # past the end x is 0; any scale will do
            s = tl.load(s_ptrs + g).to(tl.float32)
            b = b.to(tl.int32)
            q_lo = b & 15
            q_hi = b >> 4
            if LINEAR_LUT:  # int4: lut[q] * s + z = q * s + (z - 8 s)
                v_lo = q_lo.to(tl.float32)
                v_hi = q_hi.to(tl.float32)
                if HAS_ZERO:
                    z = tl.load(z_ptrs + g).to(tl.float32) - 8.0 * s
                else:
                    z = -8.0 * s
            else:
                v_lo = tl.load(LUT + q_lo)
                v_hi = tl.load(LUT + q_hi)
                if HAS_ZERO:
                    z = tl.load(z_ptrs + g).to(tl.float32)
            if LINEAR_LUT or HAS_ZERO:
                w_lo = v_lo * s[:, None] + z[:, None]
                w_hi = v_hi * s[:, None] + z[:, None]
            else:
                w_lo = v_lo * s[:, None]
                w_hi = v_hi * s[:, None]
            acc0 = _gemv_row_fma(acc0, x0, kg, k_ok, w_lo, w_hi, EVEN_K)
            if BLOCK_M > 1:
                acc1 = _gemv_row_fma(acc1, x1, kg, k_ok, w_lo, w_hi, EVEN_K)
            if BLOCK_M > 2:
                acc2 = _gemv_row_fma(acc2, x2, kg, k_ok, w_lo, w_hi, EVEN_K)
                acc3 = _gemv_row_fma(acc3, x3, kg, k_ok, w_lo, w_hi, EVEN_K)

    _gemv_row_store(acc0, row0, M, N, offs_n, rn, pid_k, Y, WS, stride_ym, SPLIT)
    if BLOCK_M > 1:
        _gemv_row_store(acc1, row0 + 1, M, N, offs_n, rn, pid_k, Y, WS, stride_ym, SPLIT)
    if BLOCK_M > 2:
        _gemv_row_store(acc2, row0 + 2, M, N, offs_n, rn, pid_k, Y, WS, stride_ym, SPLIT)
        _gemv_row_store(acc3, row0 + 3, M, N, offs_n, rn, pid_k, Y, WS, stride_ym, SPLIT)


@triton.jit
def gemm_kernel(
    X, P, S, Z, LUT, Y, WS,
    M, N, K, half_k, n_groups, stride_xm, stride_ym, k_per_split,
    GROUP: tl.constexpr, GROUPS_PER_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_K: tl.constexpr, GROUP_M: tl.constexpr, HAS_ZERO: tl.constexpr, LINEAR_LUT: tl.constexpr,
    SPLIT: tl.constexpr, EVEN_K: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """DOT_K packed bytes (a multiple of 16 dividing GROUP // 2) feed each pair of dots: their low
    and their high codes. fp32 dots run on FMAs, which hold a whole K slice in registers: small."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Grouped tile order: GROUP_M row tiles share each weight tile while it is in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_in_group = GROUP_M * num_pid_n
    first_m = (pid // num_in_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % num_in_group) % group_rows)
    pid_n = (pid % num_in_group) // group_rows

    HALF: tl.constexpr = GROUP // 2
    BLOCK_K: tl.constexpr = GROUP * GROUPS_PER_TILE
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.minimum(offs_m, M - 1).to(tl.int64)
    rn = tl.minimum(offs_n, N - 1).to(tl.int64)
    j = tl.arange(0, DOT_K)
    k_lo = (j // 16) * 32 + (j % 16)  # byte jb + j holds k = 2 * jb + k_lo (low) and + 16 (high)

    p_ptrs = P + rn[None, :] * half_k + j[:, None]  # (DOT_K, BLOCK_N): the dot's (K, N) operand
    x_ptrs = X + rm[:, None] * stride_xm + k_lo[None, :]  # (BLOCK_M, DOT_K)
    s_ptrs = S + rn * n_groups
    z_ptrs = Z + rn * n_groups

    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        for t in tl.static_range(GROUPS_PER_TILE):
            kg = k0 + t * GROUP
            if EVEN_K:
                g = kg // GROUP
            else:
                g = tl.minimum(kg // GROUP, n_groups - 1)  # past the end x is 0; any scale will do
            s = tl.load(s_ptrs + g).to(tl.float32)[None, :]
            if LINEAR_LUT:  # int4: lut[q] * s + z = q * s + (z - 8 s)
                if HAS_ZERO:
                    z = tl.load(z_ptrs + g).to(tl.float32)[None, :] - 8.0 * s
                else:
                    z = -8.0 * s
            elif HAS_ZERO:
                z = tl.load(z_ptrs + g).to(tl.float32)[None, :]
            for c in tl.static_range(HALF // DOT_K):
                kb = kg + 2 * c * DOT_K  # first k of these DOT_K bytes
                if EVEN_K:
                    b = tl.load(p_ptrs + kb // 2)
                    x_lo = tl.load(x_ptrs + kb)
                    x_hi = tl.load(x_ptrs + (kb + 16))
                else:
                    # K is a multiple of GROUP: a group is wholly inside or wholly past the end.
                    k_ok = (kb + k_lo) < k_end
                    b = tl.load(p_ptrs + kb // 2, mask=k_ok[:, None], other=0)
                    x_lo = tl.load(x_ptrs + kb, mask=k_ok[None, :], other=0.0)
                    x_hi = tl.load(x_ptrs + (kb + 16), mask=k_ok[None, :], other=0.0)
                b = b.to(tl.int32)
                q_lo = b & 15
                q_hi = b >> 4
                if LINEAR_LUT:
                    v_lo = q_lo.to(tl.float32)
                    v_hi = q_hi.to(tl.float32)
                else:
                    v_lo = tl.load(LUT + q_lo)
                    v_hi = tl.load(LUT + q_hi)
                if LINEAR_LUT or HAS_ZERO:
                    w_lo = v_lo * s + z
                    w_hi = v_hi * s + z
                else:
                    w_lo = v_lo * s
                    w_hi = v_hi * s
                w_lo = w_lo.to(X.dtype.element_ty)
                w_hi = w_hi.to(X.dtype.element_ty)
                if FP32_DOT:
                    acc = tl.dot(x_lo, w_lo, acc, input_precision="ieee")
                    acc = tl.dot(x_hi, w_hi, acc, input_precision="ieee")
                else:
                    acc = tl.dot(x_lo, w_lo, acc)
                    acc = tl.dot(x_hi, w_hi, acc)

    out_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT:  # this split's (M, N) slab of the workspace (the slab base first: fewer registers)
        ws = WS + pid_k.to(tl.int64) * M * N
        tl.store(ws + rm[:, None] * N + rn[None, :], acc, mask=out_mask)
    else:
        y_ptrs = Y + rm[:, None] * stride_ym + rn[None, :]
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=out_mask)


@triton.jit
def _split_reduce_kernel(WS, Y, M, N, stride_ym, n_split, BLOCK: tl.constexpr):
    """Y[m, :] = sum over s of WS[s, m, :], in a fixed order (deterministic), cast to Y's dtype."""
    m = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, n_split):
        acc += tl.load(WS + (s * M + m) * N + offs, mask=mask, other=0.0)
    tl.store(Y + m * stride_ym + offs, acc.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launch helpers
@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_SMS


def _is_linear_lut(lut: torch.Tensor) -> bool:
    """True for the int4 table (q - 8), known by identity with the one QuantizedWeight.lut hands
    out (reading the values would sync with the GPU). Any other table is looked up: correct, slower."""
    return lut is device_lut("int4", lut.device)


def _split_k(tiles: int, k_tiles: int, target_programs: int, min_k_tiles: int) -> tuple[int, int]:
    """(number of K splits, K tiles per split): enough programs to fill the GPU, each split doing
    at least `min_k_tiles` tiles; no empty split."""
    want = max(1, -(-target_programs // max(tiles, 1)))
    split = max(1, min(want, k_tiles // max(min_k_tiles, 1)))
    per = -(-k_tiles // split)
    return -(-k_tiles // per), per


def _check(x2, packed, scales, zeros, lut, group_size, y):
    m, k = x2.shape
    n = packed.shape[0]
    if k % group_size or k % 32 or packed.shape[1] * 2 != k:
        raise ValueError(f"packed: shape {tuple(packed.shape)} does not fit x's K={k} and group_size={group_size}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size: expected 32, 64 or 128, got {group_size}")
    if tuple(scales.shape) != (n, k // group_size) or (zeros is not None and tuple(zeros.shape) != tuple(scales.shape)):
        raise ValueError(f"scales/zeros: expected shape {(n, k // group_size)}")
    if tuple(y.shape) != (m, n) or y.dtype != x2.dtype:
        raise ValueError(f"y: expected a ({m}, {n}) {x2.dtype} tensor, got {tuple(y.shape)} {y.dtype}")
    if x2.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("x2, y: need a unit column stride")
    for name, t in (("packed", packed), ("scales", scales), ("zeros", zeros), ("lut", lut)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name}: must be contiguous")
    if lut.dtype != torch.float32 or lut.numel() != 16:
        raise ValueError("lut: expected 16 fp32 values")
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed: expected uint8 codes, got {packed.dtype}")


def _splits(split: Optional[int], tiles: int, k_tiles: int, target_programs: int, min_k_tiles: int):
    """(splits, K tiles per split), chosen or forced (a forced count is clamped so none is empty)."""
    if split is None:
        return _split_k(tiles, k_tiles, target_programs, min_k_tiles)
    per = triton.cdiv(k_tiles, max(1, min(split, k_tiles)))
    return triton.cdiv(k_tiles, per), per


def _workspace(split: int, m: int, n: int, device) -> torch.Tensor:
    return torch.empty((split, m, n), dtype=torch.float32, device=device)


def _reduce(ws, y, split):
    m, n = y.shape
    block = min(1024, triton.next_power_of_2(n))
    _split_reduce_kernel[(m, triton.cdiv(n, block))](ws, y, m, n, y.stride(0), split, BLOCK=block, num_warps=4)


def gemv(x2, packed, scales, zeros, lut, group_size, y, *, block_m: Optional[int] = None,
         block_n: Optional[int] = None, block_k: Optional[int] = None, split: Optional[int] = None,
         num_warps: int = 4):
    """The small-M kernel for any M (rows beyond block_m go to further programs). `split` forces
    the number of K splits (clamped so that none is empty)."""
    _check(x2, packed, scales, zeros, lut, group_size, y)
    m, k = x2.shape
    n = packed.shape[0]
    if m == 0 or n == 0 or k == 0:
        y.zero_()
        return
    block_m = block_m or min(triton.next_power_of_2(m), 4)
    if block_m not in (1, 2, 4):
        raise ValueError(f"block_m: expected 1, 2 or 4, got {block_m}")
    # One (BLOCK_N, G/2) fp32 accumulator per row: about the same registers whatever the rows.
    block_n = block_n or max(16, 64 // block_m)
    block_k = block_k or max(256, group_size)
    if block_k % group_size:
        raise ValueError(f"block_k: {block_k} is not a multiple of group_size {group_size}")
    k_tiles = triton.cdiv(k, block_k)
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    # Memory-bound: several programs per SM keep enough loads in flight.
    split, per = _splits(split, tiles, k_tiles, 4 * _num_sms(x2.device), min_k_tiles=2)
    ws = _workspace(split, m, n, x2.device) if split > 1 else y
    grid = (triton.cdiv(n, block_n), split, triton.cdiv(m, block_m))
    gemv_kernel[grid](
        x2, packed, scales, scales if zeros is None else zeros, lut, y, ws,
        m, n, k, k // 2, k // group_size, x2.stride(0), y.stride(0), per * block_k,
        GROUP=group_size, GROUPS_PER_TILE=block_k // group_size, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_ZERO=zeros is not None, LINEAR_LUT=_is_linear_lut(lut), SPLIT=split > 1,
        EVEN_K=k % block_k == 0, num_warps=num_warps, num_stages=2,
    )
    if split > 1:
        _reduce(ws, y, split)


def gemm_config(m: int, dtype: torch.dtype, group_size: int) -> dict:
    """Launch parameters by row count. 16-bit x: tensor-core dots over a group's G/2 bytes at once.
    fp32 x: exact fp32 dots run on FMAs, which hold each dot's K slice in registers: 16 at a time,
    and no software pipelining (with it, sm_90 builds use 220-255 registers; without, under 100)."""
    if dtype == torch.float32:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        return dict(block_m=bm, block_n=64, block_k=max(64, group_size), dot_k=16,
                    num_warps=8 if bm == 64 else 4, num_stages=1)
    if m <= 16:
        return dict(block_m=16, block_n=64, block_k=128, dot_k=64, num_warps=4, num_stages=3)
    if m <= 32:
        return dict(block_m=32, block_n=64, block_k=128, dot_k=64, num_warps=4, num_stages=3)
    if m <= 64:
        return dict(block_m=64, block_n=128, block_k=128, dot_k=64, num_warps=4, num_stages=3)
    return dict(block_m=128, block_n=128, block_k=128, dot_k=64, num_warps=8, num_stages=3)


def gemm(x2, packed, scales, zeros, lut, group_size, y, *, block_m: Optional[int] = None,
         block_n: Optional[int] = None, block_k: Optional[int] = None, split: Optional[int] = None,
         dot_k: Optional[int] = None, num_warps: Optional[int] = None, num_stages: Optional[int] = None):
    """The tiled tensor-core kernel for any M; block sizes >= 16 (tl.dot's minimum)."""
    _check(x2, packed, scales, zeros, lut, group_size, y)
    m, k = x2.shape
    n = packed.shape[0]
    if m == 0 or n == 0 or k == 0:
        y.zero_()
        return
    cfg = gemm_config(m, x2.dtype, group_size)
    block_m = block_m or cfg["block_m"]
    block_n = block_n or cfg["block_n"]
    block_k = block_k or max(cfg["block_k"], group_size)
    dot_k = dot_k or min(cfg["dot_k"], group_size // 2)
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]
    if dot_k % 16 or (group_size // 2) % dot_k:
        raise ValueError(f"dot_k: {dot_k} is not a multiple of 16 dividing group_size / 2")
    if block_k % group_size:
        raise ValueError(f"block_k: {block_k} is not a multiple of group_size {group_size}")
    if block_m < 16 or block_n < 16:
        raise ValueError("block_m, block_n: tl.dot needs at least 16")
    k_tiles = triton.cdiv(k, block_k)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    # Compute-bound: one wave of tiles; split K only for skinny M.
    split, per = _splits(split, tiles, k_tiles, _num_sms(x2.device), min_k_tiles=4)
    ws = _workspace(split, m, n, x2.device) if split > 1 else y
    gemm_kernel[(tiles, split)](
        x2, packed, scales, scales if zeros is None else zeros, lut, y, ws,
        m, n, k, k // 2, k // group_size, x2.stride(0), y.stride(0), per * block_k,
        GROUP=group_size, GROUPS_PER_TILE=block_k // group_size, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_K=dot_k, GROUP_M=8, HAS_ZERO=zeros is not None, LINEAR_LUT=_is_linear_lut(lut), SPLIT=split > 1,
        EVEN_K=k % block_k == 0, FP32_DOT=x2.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
    if split > 1:
        _reduce(ws, y, split)


def int4_matmul(x2, packed, scales, zeros, lut, group_size, y):
    """The backend entry point (see llama_kernels/ops/int4_matmul.py): writes y (M, N) = x2 @ W^T."""
    kernel = gemv if x2.shape[0] <= SMALL_M_MAX else gemm
    # Triton launches on the current device: make it x's (a no-op in the usual one-GPU case).
    on_other_gpu = x2.is_cuda and x2.device.index != torch.cuda.current_device()
    with torch.cuda.device(x2.device) if on_other_gpu else contextlib.nullcontext():
        kernel(x2, packed, scales, zeros, lut, group_size, y)
