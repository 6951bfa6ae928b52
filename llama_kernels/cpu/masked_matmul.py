"""The C++ CPU entry points behind masked_matmul (csrc/cpu/masked_matmul.cpp), and the CPU backward.

Inputs arrive validated by llama_kernels/ops/masked_matmul.py: x (M, K) and w (N, K) of one
dtype with contiguous last dims, the masks as fp32 vectors r (N) and c (K), bias fp32 (N) or
None, and outputs allocated there; the signatures are those of the op's FORWARD and BACKWARD
tables.

The forward finds the active (nonzero) entries of each mask once, in C++ (`find_active`), then
takes one of two paths by the rows of x:

* up to MAX_ROWS rows (decode, small batches): the fused kernel (`launch`), which multiplies only
  the active rows and columns, gathering each weight tile as it goes (`forward_fused`);
* beyond: the C++ kernel gathers the compact fp32 operands x[:, cols] * c[cols] and
  w[rows][:, cols] once, torch's GEMM (MKL/oneDNN) multiplies them, and the C++ kernel scatters
  the product into y with the bias and row mask applied and exact zeros on the pruned rows
  (`forward_gemm`). Where no row or column is masked and the masks are all 1 (0% sparsity) there
  is no gather and no scatter: the GEMM runs on x and w as they are, into y.

MAX_ROWS: the fused kernel's register tiles do not match a blocked GEMM's cache blocking. On a
2-core x86 VM (AVX-512; stories42M's shapes, fp32, 0% and 50% sparsity, one thread) the fused
kernel ran 1.5-3x faster than torch's compact GEMM at 1-4 rows, level at 32, and 10-25% slower
at 64-128 (up to 1.8x at 512).

The backward recomputes u = (x * c) @ w^T for every row of w through the same paths (all rows
active, masked columns skipped), since the row mask's gradient needs u where r = 0 too; the rest
of it is torch matmuls on compacted operands, shared with the torch backend (ops/masked_matmul.py,
`compact_backward`).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import dispatch

MAX_ROWS = 32  # rows of x up to which the fused kernel runs (see the module docstring)


class Active(NamedTuple):
    """A mask's active entries: their indices (int64, ascending), how many, and whether their
    values are all exactly 1 (a hard mask, whose multiply can be skipped)."""

    idx: torch.Tensor
    count: int
    all_ones: bool


def find_active(mask: torch.Tensor) -> Active:
    """The nonzero entries of a mask vector, in one C++ pass (no torch op but the index buffer)."""
    idx = torch.empty(mask.shape[0], dtype=torch.int64)
    count, all_ones = dispatch.ext().masked_matmul_active_cpu(mask.data_ptr(), mask.shape[0], idx.data_ptr())
    return Active(idx[:count], count, all_ones)


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
    """The fused kernel up to MAX_ROWS rows of x, the compact GEMM beyond."""
    (forward_fused if x.shape[0] <= MAX_ROWS else forward_gemm)(x, w, r, c, bias, y)


def forward_fused(x, w, r, c, bias, y):
    launch(x, w, r, c, bias, find_active(r).idx, find_active(c).idx, y)


def gather(src, rows: Optional[Active], cols: Optional[Active], scale: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 src[rows][:, cols] * scale[cols] (every row or column where rows or cols is None)."""
    n_rows = src.shape[0] if rows is None else rows.count
    n_cols = src.shape[1] if cols is None else cols.count
    out = torch.empty(n_rows, n_cols, dtype=torch.float32)
    dispatch.ext().masked_matmul_gather_cpu(
        src.data_ptr(), src.stride(0), 0 if rows is None else rows.idx.data_ptr(), n_rows,
        0 if cols is None else cols.idx.data_ptr(), n_cols, 0 if scale is None else scale.data_ptr(), out.data_ptr(),
        n_cols, dispatch.DTYPE_CODES[src.dtype], torch.get_num_threads())
    return out


def forward_gemm(x, w, r, c, bias, y):
    """Compact operands gathered once, torch's GEMM, the product scattered into y (see above)."""
    m, k = x.shape
    n = w.shape[0]
    rows, cols = find_active(r), find_active(c)
    all_rows, all_cols = rows.count == n, cols.count == k
    fp32 = x.dtype == torch.float32
    z = x if all_cols and cols.all_ones and fp32 else gather(x, None, None if all_cols else cols,
                                                              None if cols.all_ones else c)
    wc = w if all_rows and all_cols and fp32 else gather(w, None if all_rows else rows, None if all_cols else cols, None)
    if all_rows and rows.all_ones and y.dtype == torch.float32 and y.is_contiguous():
        if bias is None:
            torch.mm(z, wc.t(), out=y)
        else:
            torch.addmm(bias, z, wc.t(), out=y)
        return
    u = torch.mm(z, wc.t())
    dispatch.ext().masked_matmul_scatter_cpu(
        u.data_ptr(), u.stride(0), rows.idx.data_ptr(), rows.count, 0 if bias is None else bias.data_ptr(),
        r.data_ptr(), y.data_ptr(), m, n, y.stride(0), dispatch.DTYPE_CODES[y.dtype], torch.get_num_threads())


def unmasked_rows(x, w, c):
    """u = (x * c) @ w^T in fp32 for every row of w (the backward's recomputation)."""
    n = w.shape[0]
    u = torch.empty(x.shape[0], n, dtype=torch.float32, device=x.device)
    ones = torch.ones(n, dtype=torch.float32, device=x.device)
    if x.shape[0] <= MAX_ROWS:
        launch(x, w, ones, c, None, torch.arange(n, device=x.device), find_active(c).idx, u)
    else:
        forward_gemm(x, w, ones, c, None, u)
    return u
