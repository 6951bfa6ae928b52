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
    arg = dispatch.tensor_arg
    dispatch.cuda_call(
        dispatch.ext().rms_norm_fwd_cuda,
        x=arg(x, "x"), h=arg(h, "h"), w=arg(w, "weight"), y=arg(y, "y"), s=arg(s, "s"), rstd=arg(rstd, "rstd"),
        eps=eps, stream=dispatch.cuda_stream(x),
    )


def backward(dy, x, w, rstd, dx, dw, ds=None):
    partials = max(1, min(x.shape[0], 2 * dispatch.sm_count(x.device)))
    workspace = torch.empty((partials, x.shape[1]), dtype=torch.float32, device=x.device)
    arg = dispatch.tensor_arg
    dispatch.cuda_call(
        dispatch.ext().rms_norm_bwd_cuda,
        dy=arg(dy, "dy"), ds=arg(ds, "ds"), x=arg(x, "x"), w=arg(w, "weight"), rstd=arg(rstd, "rstd"),
        dx=arg(dx, "dx"), dw=arg(dw, "dw"), dw_partial=arg(workspace, "dw_partial"), stream=dispatch.cuda_stream(x),
    )


def unsupported(x: torch.Tensor, *others: torch.Tensor) -> Optional[str]:
    """Mirrors the CUDA kernel's limit: rows are held in registers, 2048 packs (vectors or elements) at most."""
    n = x.shape[-1]
    vec = 16 // x.element_size()
    aligned = n % vec == 0 and all(t.data_ptr() % 16 == 0 for t in (x, *others))
    limit = dispatch.ext().rms_norm_max_cols_cuda(dispatch.DTYPE_CODES[x.dtype], aligned)
    return None if n <= limit else f"rows of {n} elements exceed the CUDA kernel's {limit}"
