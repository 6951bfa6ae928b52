"""Triton masked matmul: y = ((x * c) @ w^T + bias) * r with a column mask c (K) and a row mask
r (N), and the GEMMs of its backward, skipping tiles that a mask zeroes.

Each program owns one output tile and loads the mask slices that tile depends on; a slice whose
entries are all zero (max |mask| == 0) is skipped without loading x or w:

* fwd_kernel, y (BLOCK_M x BLOCK_N) over K: a tile whose rows all have r = 0 stores zeros (bias
  included); inside the K loop, a block of columns with c = 0 throughout is skipped. With
  HAS_ROW off it computes u = (x * c) @ w^T for every row (the backward's recomputation, fp32).
* dz_kernel, dz = (dy * r) @ w (BLOCK_M x BLOCK_K) over N: blocks of rows with r = 0 are skipped.
  Column blocks are not, even where c = 0: the column mask's gradient needs dz there.
* dw_kernel, dw = (dy * r)^T @ (x * c) (BLOCK_N x BLOCK_K) over M: a tile with r = 0 on all its
  rows or c = 0 on all its columns stores zeros without reading dy or x.

Skipping is per tile, so a mask pays off when its zeros cover whole tiles (pruned in groups of
BLOCK_N rows and BLOCK_K columns); scattered zeros are multiplied like any value. Products are
summed in fp32 (fp32 inputs with IEEE dots, no TF32); masks and bias are fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64
BLOCK_K = 32


@triton.jit
def fwd_kernel(X, W, R, C, BIAS, Y, M, N, K, stride_xm, stride_wn, stride_ym,
               HAS_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, FP32_DOT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    in_m = offs_m < M
    in_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_ROW:
        r = tl.load(R + offs_n, mask=in_n, other=0.0)
        live = tl.max(tl.abs(r), axis=0) > 0
    else:
        live = True
    if live:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            in_k = offs_k < K
            c = tl.load(C + offs_k, mask=in_k, other=0.0)
            if tl.max(tl.abs(c), axis=0) > 0:
                x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=in_m[:, None] & in_k[None, :],
                            other=0.0)
                w = tl.load(W + offs_n[None, :] * stride_wn + offs_k[:, None], mask=in_n[None, :] & in_k[:, None],
                            other=0.0)
                z = x.to(tl.float32) * c[None, :]
                if FP32_DOT:
                    acc = tl.dot(z, w.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(z.to(w.dtype), w, acc)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=in_n, other=0.0)[None, :]
    if HAS_ROW:
        acc = acc * r[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=in_m[:, None] & in_n[None, :])


@triton.jit
def dz_kernel(DY, R, W, DZ, M, N, K, stride_dym, stride_wn, stride_dzm, FP32_DOT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    in_m = offs_m < M
    in_k = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_n = offs_n < N
        r = tl.load(R + offs_n, mask=in_n, other=0.0)
        if tl.max(tl.abs(r), axis=0) > 0:
            dy = tl.load(DY + offs_m[:, None] * stride_dym + offs_n[None, :], mask=in_m[:, None] & in_n[None, :],
                         other=0.0)
            w = tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :], mask=in_n[:, None] & in_k[None, :],
                        other=0.0)
            du = dy.to(tl.float32) * r[None, :]
            if FP32_DOT:
                acc = tl.dot(du, w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(du.to(w.dtype), w, acc)
    tl.store(DZ + offs_m[:, None] * stride_dzm + offs_k[None, :], acc.to(DZ.dtype.element_ty),
             mask=in_m[:, None] & in_k[None, :])


@triton.jit
def dw_kernel(DY, R, X, C, DW, M, N, K, stride_dym, stride_xm, stride_dwn, FP32_DOT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    in_n = offs_n < N
    in_k = offs_k < K
    r = tl.load(R + offs_n, mask=in_n, other=0.0)
    c = tl.load(C + offs_k, mask=in_k, other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if (tl.max(tl.abs(r), axis=0) > 0) & (tl.max(tl.abs(c), axis=0) > 0):
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            in_m = offs_m < M
            dy = tl.load(DY + offs_m[None, :] * stride_dym + offs_n[:, None], mask=in_m[None, :] & in_n[:, None],
                         other=0.0)
            x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=in_m[:, None] & in_k[None, :],
                        other=0.0)
            du_t = dy.to(tl.float32) * r[:, None]
            z = x.to(tl.float32) * c[None, :]
            if FP32_DOT:
                acc = tl.dot(du_t, z, acc, input_precision="ieee")
            else:
                acc = tl.dot(du_t.to(x.dtype), z.to(x.dtype), acc)
    tl.store(DW + offs_n[:, None] * stride_dwn + offs_k[None, :], acc.to(DW.dtype.element_ty),
             mask=in_n[:, None] & in_k[None, :])


def block_m(m: int) -> int:
    return 16 if m <= 16 else (32 if m <= 32 else 64)


def forward(x, w, r, c, bias, y, has_row=True):
    """y (M, N) = ((x * c) @ w^T + bias) * r; without the row mask when has_row is False."""
    m, k = x.shape
    n = w.shape[0]
    bm = block_m(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, BLOCK_N))
    fwd_kernel[grid](x, w, r, c, bias if bias is not None else r, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
                     HAS_ROW=has_row, HAS_BIAS=bias is not None, FP32_DOT=x.dtype == torch.float32,
                     BLOCK_M=bm, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)


def grad_z(dy, r, w, dz):
    """dz (M, K) = (dy * r) @ w, fp32."""
    m, n = dy.shape
    k = w.shape[1]
    bm = block_m(m)
    grid = (triton.cdiv(m, bm), triton.cdiv(k, BLOCK_K))
    dz_kernel[grid](dy, r, w, dz, m, n, k, dy.stride(0), w.stride(0), dz.stride(0), FP32_DOT=w.dtype == torch.float32,
                    BLOCK_M=bm, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)


def grad_w(dy, r, x, c, dw):
    """dw (N, K) = (dy * r)^T @ (x * c), in dw's dtype."""
    m, n = dy.shape
    k = x.shape[1]
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K))
    dw_kernel[grid](dy, r, x, c, dw, m, n, k, dy.stride(0), x.stride(0), dw.stride(0), FP32_DOT=x.dtype == torch.float32,
                    BLOCK_M=32, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
