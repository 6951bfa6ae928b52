"""Triton RMSNorm: forward, and backward with per-program partial sums for the weight gradient.

A row that fits in one block (up to MAX_FUSED_BLOCK elements) is loaded once and kept in
registers; longer rows are walked in chunks, reading x twice.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MAX_FUSED_BLOCK = 8192  # longest row held in registers at once
LOOP_BLOCK = 4096  # chunk size for longer rows


@triton.jit
def _load_row(x_row, h_row, s_row, offs, mask, HAS_H: tl.constexpr, WRITE_S: tl.constexpr):
    """A chunk of the row to normalise in fp32: x, or s = x + h rounded to x's dtype (stored to s
    when WRITE_S), so the result equals adding first."""
    x = tl.load(x_row + offs, mask=mask, other=0.0)
    if HAS_H:
        x = (x.to(tl.float32) + tl.load(h_row + offs, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        if WRITE_S:
            tl.store(s_row + offs, x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def fwd_kernel(
    X, H, W, Y, S, RSTD, stride_x, stride_h, stride_y, stride_s, N, eps,
    BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr, HAS_H: tl.constexpr, HAS_RSTD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    h_row = H + row * stride_h
    s_row = S + row * stride_s
    y_row = Y + row * stride_y
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        mask = cols < N
        x = _load_row(x_row, h_row, s_row, cols, mask, HAS_H, True)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    else:
        # The sum is recomputed in the second pass rather than read back from S: a program's
        # own stores are not guaranteed visible to its later loads across threads.
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            x = _load_row(x_row, h_row, s_row, start + cols, start + cols < N, HAS_H, True)
            acc += x * x
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK):
            mask = start + cols < N
            x = _load_row(x_row, h_row, s_row, start + cols, mask, HAS_H, False)
            w = tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + start + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=mask)
    if HAS_RSTD:
        tl.store(RSTD + row, rstd)


@triton.jit
def bwd_kernel(
    DY, DS, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_ds, stride_x, stride_dx, M, N,
    BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr, HAS_DS: tl.constexpr,
):
    """Program p handles rows p, p + P, ...; dx = rstd * (dy*w - xhat * mean(dy*w*xhat)) (+ ds,
    a gradient that reached x directly: a fused residual add's) and DW_PARTIAL[p] = sum over its
    rows of dy * xhat."""
    pid = tl.program_id(0).to(tl.int64)
    num_programs = tl.num_programs(0)
    my_rows = tl.cdiv(M - pid, num_programs)
    cols = tl.arange(0, BLOCK)
    part_row = DW_PARTIAL + pid * N
    if ONE_BLOCK:
        mask = cols < N
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, my_rows):
            row64 = pid + i * num_programs
            rstd = tl.load(RSTD + row64)
            x = tl.load(X + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            xhat = x * rstd
            gw = g * w
            mean = tl.sum(gw * xhat, axis=0) / N
            dx = rstd * (gw - xhat * mean)
            if HAS_DS:
                dx += tl.load(DS + row64 * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw += g * xhat
        tl.store(part_row + cols, dw, mask=mask)
    else:
        for start in range(0, N, BLOCK):
            tl.store(part_row + start + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=start + cols < N)
        for i in range(0, my_rows):
            row64 = pid + i * num_programs
            rstd = tl.load(RSTD + row64)
            x_row = X + row64 * stride_x
            g_row = DY + row64 * stride_dy
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, N, BLOCK):
                mask = start + cols < N
                x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.load(g_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
                acc += g * w * x
            mean = tl.sum(acc, axis=0) * rstd / N
            for start in range(0, N, BLOCK):
                mask = start + cols < N
                x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.load(g_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = x * rstd
                dx = rstd * (g * w - xhat * mean)
                if HAS_DS:
                    dx += tl.load(DS + row64 * stride_ds + start + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row64 * stride_dx + start + cols, dx.to(DX.dtype.element_ty), mask=mask)
                part = tl.load(part_row + start + cols, mask=mask, other=0.0)
                tl.store(part_row + start + cols, part + g * xhat, mask=mask)


def _block(n: int, max_block: int) -> tuple[int, bool]:
    block = triton.next_power_of_2(n)
    if block <= max_block:
        return block, True
    return min(LOOP_BLOCK, max_block), False


def num_warps_for(block: int) -> int:
    return min(max(block // 256, 1), 16)


@functools.lru_cache(maxsize=None)
def _num_partials_cap(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs are enough to exercise the reduction


def rms_norm_fwd(x, w, eps, y, rstd, max_block: int = MAX_FUSED_BLOCK, h=None, s=None):
    """x, y: (M, N) with unit column stride; w: (N,); rstd: (M,) fp32 or None. Writes y and rstd.
    With h (like x), normalises s = x + h and writes it to s (like x)."""
    m, n = x.shape
    if m == 0:
        return
    block, one_block = _block(n, max_block)
    has_h = h is not None
    fwd_kernel[(m,)](
        x, h if has_h else x, w, y, s if has_h else y, rstd if rstd is not None else y,
        x.stride(0), h.stride(0) if has_h else 0, y.stride(0), s.stride(0) if has_h else 0, n, eps,
        BLOCK=block, ONE_BLOCK=one_block, HAS_H=has_h, HAS_RSTD=rstd is not None, num_warps=num_warps_for(block),
    )


def rms_norm_bwd(dy, x, w, rstd, dx, dw, max_block: int = MAX_FUSED_BLOCK, ds=None):
    """Writes dx (M, N) and dw (N,) in their own dtypes; ds (like dy, or None) is added to dx."""
    m, n = x.shape
    programs = max(1, min(m, _num_partials_cap(x.device)))
    partial = torch.empty((programs, n), dtype=torch.float32, device=x.device)
    block, one_block = _block(n, max_block)
    if m > 0:
        bwd_kernel[(programs,)](
            dy, dy if ds is None else ds, x, w, rstd, dx, partial, dy.stride(0), 0 if ds is None else ds.stride(0),
            x.stride(0), dx.stride(0), m, n, BLOCK=block, ONE_BLOCK=one_block, HAS_DS=ds is not None,
            num_warps=num_warps_for(block),
        )
    else:
        partial.zero_()
    dw.copy_(partial.sum(dim=0))
