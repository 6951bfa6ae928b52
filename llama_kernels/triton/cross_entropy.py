"""Triton cross-entropy rows: loss per row and the gradient written over the fp32 logits in place
(linear_cross_entropy's per-chunk step; see llama_kernels/ops/cross_entropy.py for the formulas).

One program per row: an online pass keeps the running maximum, the sum of exponentials and the
sum of logits; a second pass writes the gradient.
"""
from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def rows_kernel(X, T, LOSS, LSE, stride, V, ignore_index, smoothing, z_loss, scale,
                WRITE_GRAD: tl.constexpr, HAS_LSE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride
    target = tl.load(T + row)
    cols = tl.arange(0, BLOCK)
    if target == ignore_index:
        tl.store(LOSS + row, 0.0)
        if HAS_LSE:
            tl.store(LSE + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, V, BLOCK):
                tl.store(x_row + start + cols, tl.zeros([BLOCK], dtype=tl.float32), mask=start + cols < V)
    else:
        m = -float("inf")
        s = 0.0
        sx = 0.0
        for start in range(0, V, BLOCK):
            mask = start + cols < V
            x = tl.load(x_row + start + cols, mask=mask, other=-float("inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            shift = tl.where(m_new == -float("inf"), 0.0, m_new)  # an all -inf row so far
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
            sx += tl.sum(tl.where(mask, x, 0.0), axis=0)
            m = m_new
        lse = tl.where(m == -float("inf"), 0.0, m) + tl.log(s)
        xt = tl.load(x_row + target)
        loss = lse - (1.0 - smoothing) * xt - smoothing / V * sx + z_loss * lse * lse
        tl.store(LOSS + row, loss)
        if HAS_LSE:
            tl.store(LSE + row, lse)
        if WRITE_GRAD:
            gain = scale * (1.0 + 2.0 * z_loss * lse)
            floor = scale * smoothing / V
            for start in range(0, V, BLOCK):
                mask = start + cols < V
                x = tl.load(x_row + start + cols, mask=mask, other=-float("inf"))
                g = tl.exp(x - lse) * gain - floor
                g = tl.where(start + cols == target, g - scale * (1.0 - smoothing), g)
                tl.store(x_row + start + cols, g, mask=mask)


def rows(logits, target, loss, lse, ignore_index, smoothing, z_loss, scale, write_grad):
    n, v = logits.shape
    block = min(BLOCK, triton.next_power_of_2(v))
    rows_kernel[(n,)](logits, target, loss, loss if lse is None else lse, logits.stride(0), v, ignore_index,
                      smoothing, z_loss, scale, WRITE_GRAD=write_grad, HAS_LSE=lse is not None, BLOCK=block)
