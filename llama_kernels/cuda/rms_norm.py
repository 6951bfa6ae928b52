"""The CUDA entry points behind rms_norm and add_rms_norm (csrc/cuda/rms_norm.cu): forward
(optionally over the sum x + h, optionally without 1/rms) and backward, whose weight gradient is
summed from per-block partials in a workspace.

Inputs arrive validated by llama_kernels/ops/rms_norm.py, as (rows, hidden) with a contiguous last
dim, a weight in x's dtype or fp32, and outputs allocated there; the signatures are those of the
op's FORWARD and BACKWARD tables. `unsupported` names the rows the kernel cannot hold (the op then
falls back to Triton).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch


def forward(x, w, eps, y, rstd, h=None, s=None):
    has_h = h is not None
    codes = dispatch.DTYPE_CODES
    dispatch.cuda_call(
        dispatch.ext().rms_norm_fwd_cuda,
        x.data_ptr(), h.data_ptr() if has_h else 0, w.data_ptr(), y.data_ptr(), s.data_ptr() if has_h else 0,
        0 if rstd is None else rstd.data_ptr(), x.shape[0], x.shape[1], x.stride(0), h.stride(0) if has_h else 0,
        y.stride(0), s.stride(0) if has_h else 0, codes[x.dtype], codes[w.dtype], eps, x.device.index,
        dispatch.cuda_stream(x),
    )


def backward(dy, x, w, rstd, dx, dw, ds=None):
    partials = max(1, min(x.shape[0], 2 * dispatch.sm_count(x.device)))
    workspace = torch.empty((partials, x.shape[1]), dtype=torch.float32, device=x.device)
    codes = dispatch.DTYPE_CODES
    dispatch.cuda_call(
        dispatch.ext().rms_norm_bwd_cuda,
        dy.data_ptr(), 0 if ds is None else ds.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr(),
        dx.data_ptr(), dw.data_ptr(), workspace.data_ptr(), partials, x.shape[0], x.shape[1], dy.stride(0),
        0 if ds is None else ds.stride(0), x.stride(0), dx.stride(0), codes[x.dtype], codes[w.dtype],
        x.device.index, dispatch.cuda_stream(x),
    )


def unsupported(x: torch.Tensor, *others: torch.Tensor) -> Optional[str]:
    """Mirrors the CUDA kernel's limit: rows are held in registers, 2048 packs (vectors or elements) at most."""
    n = x.shape[-1]
    vec = 16 // x.element_size()
    aligned = n % vec == 0 and all(t.data_ptr() % 16 == 0 for t in (x, *others))
    limit = dispatch.ext().rms_norm_max_cols_cuda(dispatch.DTYPE_CODES[x.dtype], aligned)
    return None if n <= limit else f"rows of {n} elements exceed the CUDA kernel's {limit}"
