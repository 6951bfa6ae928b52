"""The C++ CPU entry point behind linear (csrc/cpu/linear.cpp): the decode GEMV, which reads each
weight row once for all rows of x, for one weight or several that share x.

Inputs arrive validated by llama_kernels/ops/linear.py; `unsupported` names the calls this kernel
is not the fastest for (the op then calls F.linear).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import dispatch

MAX_ROWS = 16  # beyond this a blocked GEMM (MKL/oneDNN) wins


def forward(x2, weight, bias, y):
    """The kernel for one weight into a caller-allocated y (tests poison it first)."""
    forward_parts(x2, (weight,), (bias,), (y,))


def forward_parts(x2, weights, biases, ys):
    """One kernel call for several weights against the same x2: writes ys[p] = x2 @ weights[p]^T
    + biases[p] (all ys with one row stride; biases entries may be None)."""
    if x2.shape[-1] == 0:  # an empty sum (the C++ kernel refuses K = 0): zeros plus bias
        for y, b in zip(ys, biases):
            y.zero_()
            if b is not None:
                y.add_(b.to(y.dtype))
        return
    codes = dispatch.DTYPE_CODES
    bias_dtype = next((codes[b.dtype] for b in biases if b is not None), 0)
    forward_rows(x2, x2.shape[0], x2.stride(0), weights, [0 if b is None else b.data_ptr() for b in biases],
                 bias_dtype, [y.data_ptr() for y in ys], ys[0].stride(0))


def forward_rows(x, rows, x_stride, weights, bias_ptrs, bias_dtype, outs, y_stride):
    """The C++ kernel over `rows` rows of x (row stride x_stride, last dim contiguous): outs[p] is
    the address of part p's first output, y_stride the output row stride."""
    codes = dispatch.DTYPE_CODES
    dispatch.ext().linear_cpu(
        x.data_ptr(), [w.data_ptr() for w in weights], bias_ptrs, outs, [w.shape[0] for w in weights],
        rows, x.shape[-1], x_stride, y_stride, codes[x.dtype], codes[weights[0].dtype], bias_dtype,
        torch.get_num_threads(),
    )


def forward_argmax(x, rows, x_stride, weight, index, value=None):
    """The fused head and argmax: index[i] = argmax of x[i] @ weight^T over `rows` rows of x (row
    stride x_stride, last dim contiguous), value[i] its logit (if given); the logits are never
    written. The same logits as `forward_rows`, so the same index as its output's argmax."""
    codes = dispatch.DTYPE_CODES
    dispatch.ext().linear_argmax_cpu(
        x.data_ptr(), weight.data_ptr(), rows, weight.shape[0], x.shape[-1], x_stride, codes[x.dtype],
        codes[weight.dtype], index.data_ptr(), 0 if value is None else value.data_ptr(), torch.get_num_threads(),
    )


def unsupported(rows: int, weights: Sequence[torch.Tensor]) -> str | None:
    """Why the kernel should not take this call, or None."""
    if weights[0].dtype != torch.float32:  # one dtype for all (the op checks it)
        # Measured on AVX-512: oneDNN's bf16/fp16 GEMV is as fast or faster; the kernel's 16-bit
        # paths exist (and are tested) for the 4-bit work to build on.
        return "16-bit weights (F.linear is as fast)"
    if rows > MAX_ROWS:
        return f"more than {MAX_ROWS} rows (a blocked GEMM is faster)"
    for w in weights:
        if not w.is_contiguous():
            return "a non-contiguous weight"
    return None
