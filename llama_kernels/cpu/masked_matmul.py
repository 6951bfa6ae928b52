"""The C++ CPU entry point behind masked_matmul (csrc/cpu/masked_matmul.cpp), and the CPU backward.

Inputs arrive validated by llama_kernels/ops/masked_matmul.py: x (M, K) and w (N, K) of one
dtype with contiguous last dims, the masks as fp32 vectors r (N) and c (K), bias fp32 (N) or
None, and outputs allocated there; the signatures are those of the op's FORWARD and BACKWARD
tables.

The forward finds the nonzero entries of each mask once (`active`) and hands the index lists to
the kernel (`launch`), which multiplies only those rows and columns. The backward recomputes
u = (x * c) @ w^T for every row of w through the same kernel (all rows active, masked columns
skipped), since the row mask's gradient needs u where r = 0 too; the rest of it is torch matmuls
on compacted operands, shared with the torch backend (ops/masked_matmul.py, `compact_backward`).
"""
from __future__ import annotations

import torch

from .. import dispatch


def active(mask: torch.Tensor) -> torch.Tensor:
    """Indices (int64, ascending) of the nonzero entries of a mask vector."""
    return torch.nonzero(mask).flatten()


def launch(x, w, r, c, bias, rows, cols, y):
    """y = ((x * c) @ w^T + bias) * r on rows `rows` of w and columns `cols` of x; y's other
    entries are set to zero. y is in x's dtype or fp32."""
    dispatch.ext().masked_matmul_fwd_cpu(
        x.data_ptr(), w.data_ptr(), r.data_ptr(), c.data_ptr(), 0 if bias is None else bias.data_ptr(),
        rows.data_ptr(), rows.numel(), cols.data_ptr(), cols.numel(), y.data_ptr(), x.shape[0], w.shape[0],
        x.shape[1], x.stride(0), w.stride(0), y.stride(0), dispatch.DTYPE_CODES[x.dtype], y.dtype == torch.float32,
        torch.get_num_threads(),
    )


def forward(x, w, r, c, bias, y):
    launch(x, w, r, c, bias, active(r), active(c), y)


def unmasked_rows(x, w, c):
    """u = (x * c) @ w^T in fp32 for every row of w (the backward's recomputation)."""
    u = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32, device=x.device)
    ones = torch.ones(w.shape[0], dtype=torch.float32, device=x.device)
    launch(x, w, ones, c, None, torch.arange(w.shape[0], device=x.device), active(c), u)
    return u
