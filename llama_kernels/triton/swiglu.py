"""Triton SwiGLU: y = silu(a) * b, and its backward recomputing the sigmoid from a.

One program per (row, block of columns); every tensor has its own row stride, so a and b can be
the two halves of a fused gate/up projection. fp32 math for every storage dtype.
"""
from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def fwd_kernel(A, B, Y, stride_a, stride_b, stride_y, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    a = tl.load(A + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def bwd_kernel(DY, A, B, DA, DB, stride_dy, stride_a, stride_b, stride_da, stride_db, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + row * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    silu = a * s
    tl.store(DB + row * stride_db + cols, (g * silu).to(DB.dtype.element_ty), mask=mask)
    tl.store(DA + row * stride_da + cols, (g * b * (s + silu * (1.0 - s))).to(DA.dtype.element_ty), mask=mask)


def forward(a, b, y):
    rows, n = a.shape
    grid = (rows, triton.cdiv(n, BLOCK))
    fwd_kernel[grid](a, b, y, a.stride(0), b.stride(0), y.stride(0), n, BLOCK=BLOCK)


def backward(dy, a, b, da, db):
    rows, n = a.shape
    grid = (rows, triton.cdiv(n, BLOCK))
    bwd_kernel[grid](dy, a, b, da, db, dy.stride(0), a.stride(0), b.stride(0), da.stride(0), db.stride(0), n,
                     BLOCK=BLOCK)
