"""The C++ CPU entry point behind linear_cross_entropy's per-chunk step (csrc/cpu/cross_entropy.cpp).

Inputs arrive validated by llama_kernels/ops/cross_entropy.py: fp32 logits (rows, V) with a
contiguous last dim, int64 targets, fp32 outputs allocated there; the signature is that of the
op's ROWS table.
"""
from __future__ import annotations

import torch

from .. import dispatch


def rows(logits, target, loss, lse, ignore_index, smoothing, z_loss, scale, write_grad):
    dispatch.ext().cross_entropy_rows_cpu(
        logits.data_ptr(), target.data_ptr(), loss.data_ptr(), 0 if lse is None else lse.data_ptr(),
        logits.shape[0], logits.shape[1], logits.stride(0), ignore_index, smoothing, z_loss, scale, write_grad,
        torch.get_num_threads(),
    )
