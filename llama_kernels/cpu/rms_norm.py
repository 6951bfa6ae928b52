"""The C++ CPU entry points behind rms_norm and add_rms_norm (csrc/cpu/rms_norm.cpp): forward
(optionally over the sum x + h, optionally without 1/rms) and backward.

Inputs arrive validated by llama_kernels/ops/rms_norm.py, as (rows, hidden) with a contiguous last
dim, a weight in x's dtype or fp32, and outputs allocated there; the signatures are those of the
op's FORWARD and BACKWARD tables.
"""
from __future__ import annotations

import torch

from .. import dispatch


def forward(x, w, eps, y, rstd, h=None, s=None):
    strides = (0, 0) if h is None else (h.stride(0), s.stride(0))
    forward_rows(x, x.shape[0], x.stride(0), w, eps, y, y.stride(0), rstd, h, strides[0], s, strides[1])


def forward_rows(x, rows, x_stride, w, eps, y, y_stride, rstd, h=None, h_stride=0, s=None, s_stride=0):
    """The C++ forward over `rows` rows of x and y (row strides given, last dims contiguous); with
    h and s, over the sum s = x + h."""
    codes = dispatch.DTYPE_CODES
    dispatch.ext().rms_norm_fwd_cpu(
        x.data_ptr(), 0 if h is None else h.data_ptr(), w.data_ptr(), y.data_ptr(), 0 if s is None else s.data_ptr(),
        0 if rstd is None else rstd.data_ptr(), rows, x.shape[-1], x_stride, h_stride, y_stride, s_stride,
        codes[x.dtype], codes[w.dtype], eps, torch.get_num_threads(),
    )


def backward(dy, x, w, rstd, dx, dw, ds=None):
    codes = dispatch.DTYPE_CODES
    dispatch.ext().rms_norm_bwd_cpu(
        dy.data_ptr(), 0 if ds is None else ds.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr(),
        dx.data_ptr(), dw.data_ptr(), x.shape[0], x.shape[1], dy.stride(0), 0 if ds is None else ds.stride(0),
        x.stride(0), dx.stride(0), codes[x.dtype], codes[w.dtype], torch.get_num_threads(),
    )
