"""The C++ CPU entry points behind swiglu (csrc/cpu/swiglu.cpp): forward and backward.

Inputs arrive validated by llama_kernels/ops/swiglu.py as (rows, cols) tensors of one dtype with
contiguous last dims (each with its own row stride: gate and up are often the two halves of one
fused projection), and outputs allocated there; the signatures are those of the op's FORWARD and
BACKWARD tables.
"""
from __future__ import annotations

import torch

from .. import dispatch


def forward(a, b, y):
    dispatch.ext().swiglu_fwd_cpu(
        a.data_ptr(), b.data_ptr(), y.data_ptr(), a.shape[0], a.shape[1], a.stride(0), b.stride(0), y.stride(0),
        dispatch.DTYPE_CODES[a.dtype], torch.get_num_threads(),
    )


def backward(dy, a, b, da, db):
    dispatch.ext().swiglu_bwd_cpu(
        dy.data_ptr(), a.data_ptr(), b.data_ptr(), da.data_ptr(), db.data_ptr(), a.shape[0], a.shape[1],
        dy.stride(0), a.stride(0), b.stride(0), da.stride(0), db.stride(0), dispatch.DTYPE_CODES[a.dtype],
        torch.get_num_threads(),
    )
