"""RoPE pieces shared by the Triton attention kernels of rope_attention.py (training) and
rope_decode.py (decode): the half-split rotation of a tile as it is loaded, and the constants both
launch with.

A head vector is held as two halves x1 = x[:D/2], x2 = x[D/2:] (each padded to HPAD, a power of
two) and rotated in fp32 as (x1 c - x2 s, x2 c + x1 s), so the scores are two tl.dot's of width D/2.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def half_pad(head_dim: int) -> int:
    """Width of a half head vector in the kernels: D/2 rounded up to a power of two, >= 16."""
    return max(16, triton.next_power_of_2(head_dim // 2))


@triton.jit
def load_rotated(base, stride_s, offs_s, offs_d, s_ok, COS, SIN, stride_c, pos, HALF: tl.constexpr,
                 HPAD: tl.constexpr, scale, MASK_S: tl.constexpr):
    """Rows offs_s of a head (D contiguous): the rotated halves (x1 c - x2 s, x2 c + x1 s) * scale,
    in fp32, for table positions pos."""
    ptr = base + offs_s[:, None] * stride_s + offs_d[None, :]
    cptr = pos[:, None] * stride_c + offs_d[None, :]
    if MASK_S or HALF != HPAD:
        if MASK_S:
            m = s_ok[:, None] & (offs_d[None, :] < HALF)
        else:
            m = (offs_s[:, None] >= 0) & (offs_d[None, :] < HALF)
        x1 = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(ptr + HALF, mask=m, other=0.0).to(tl.float32)
        c = tl.load(COS + cptr, mask=m, other=0.0)
        s = tl.load(SIN + cptr, mask=m, other=0.0)
    else:
        x1 = tl.load(ptr).to(tl.float32)
        x2 = tl.load(ptr + HALF).to(tl.float32)
        c = tl.load(COS + cptr)
        s = tl.load(SIN + cptr)
    return (x1 * c - x2 * s) * scale, (x2 * c + x1 * s) * scale
