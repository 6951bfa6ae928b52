"""Triton kernels for training attention with the rotary embedding applied inside: forward and
backward (see llama_kernels/ops/rope_attention.py; the decode step's kernels are in rope_decode.py).

Layout: q (tokens, H, D) and k, v (tokens, Hkv, D) addressed through strides, so the dense
(B, S, H, D) form and the packed varlen form (cu_seqlens) share every kernel. RoPE is half-split:
a head vector is held as two halves x1 = x[:D/2], x2 = x[D/2:] (each padded to HPAD, a power of
two), rotated in fp32 as (x1 c - x2 s, x2 c + x1 s) and rounded to the input dtype, so the scores
are two tl.dot's of width D/2 (rope_common.py). Rotated q and k never leave registers.

* Forward: one program per (query block, batch * head); online softmax in base 2 with the
  softmax scale * log2(e) folded into the rotated q; saves the logsumexp (natural log, fp32).
* Backward: a dQ kernel (one program per query block and head) that also computes
  delta = rowsum(dO * O) and stores it, then a dK/dV kernel (one program per key block and kv
  head) that loops over the query heads of its GQA group, so dK and dV need no atomics. dQ and dK
  are rotated back (the transpose of the rotation) before they are stored.
* Dropout: keep(row, col) comes from a counter-based hash of (seed, head, query token, key
  index), recomputed in the backward; `dropout_keep` in llama_kernels/ops/rope_attention.py is
  the same hash in PyTorch, so tests compare against the exact mask.

Causal masking is only evaluated on the blocks that cross the diagonal; ragged ends are masked on
the last block only. Under TRITON_INTERPRET=1 every kernel runs with one small configuration.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rope_common import INTERPRET, LOG2E, half_pad, load_rotated

# ----------------------------------------------------------------------------- shared pieces
@triton.jit
def _mix32(x):
    """murmur3's 32-bit finalizer (x uint32)."""
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def _row_keys(seed, row_base, offs_m):
    """Per query row: mix(seed ^ (h * T + token)), the first half of the dropout hash, where
    row_base = h * T + the sequence's first token."""
    r = (row_base + offs_m).to(tl.uint32)
    return _mix32(r ^ seed)


@triton.jit
def _keep(row_keys, offs_n, threshold):
    """(M, N) boolean: keep when mix(row_key + n * golden) >= threshold (uint32)."""
    cols = offs_n.to(tl.uint32) * 0x9E3779B9
    h = _mix32(row_keys[:, None] + cols[None, :])
    return h >= threshold


@triton.jit
def _keep_t(seed, row_base, offs_m, offs_n, threshold):
    """_keep transposed, (N, M), for query rows offs_m."""
    r = _row_keys(seed, row_base, offs_m)
    cols = offs_n.to(tl.uint32) * 0x9E3779B9
    return _mix32(r[None, :] + cols[:, None]) >= threshold


@triton.jit
def _table_rows(POS, offs, ok, table_len, HAS_POS: tl.constexpr):
    """Table rows of tokens offs of a sequence: their index, or POS[offs] (POS already points at
    the sequence's first token), clamped into the table."""
    rows = offs
    if HAS_POS:
        p = tl.load(POS + offs, mask=ok, other=0)
        rows = tl.minimum(tl.maximum(p, 0), table_len - 1).to(tl.int32)
    return rows


@triton.jit
def _store_unrotated(base, stride_s, offs_s, offs_d, s_ok, COS, SIN, stride_c, pos, g1, g2,
                     HALF: tl.constexpr):
    """Store the gradient w.r.t. the unrotated vector, given (g1, g2) w.r.t. the rotated one:
    the transpose of the rotation, (g1 c + g2 s, g2 c - g1 s)."""
    d_ok = offs_d < HALF
    m = s_ok[:, None] & d_ok[None, :]
    cptr = pos[:, None] * stride_c + offs_d[None, :]
    c = tl.load(COS + cptr, mask=m, other=0.0)
    s = tl.load(SIN + cptr, mask=m, other=0.0)
    ptr = base + offs_s[:, None] * stride_s + offs_d[None, :]
    tl.store(ptr, (g1 * c + g2 * s).to(base.dtype.element_ty), mask=m)
    tl.store(ptr + HALF, (g2 * c - g1 * s).to(base.dtype.element_ty), mask=m)


@triton.jit
def _segment(CU, b, S, VARLEN: tl.constexpr):
    """(first token, length) of sequence b."""
    if VARLEN:
        start = tl.load(CU + b)
        return start, tl.load(CU + b + 1) - start
    return b * S, S


@triton.jit
def _query_program(CU, H, GROUP, S, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr):
    """The (query block, batch * head) program's coordinates: (pid_m, b, h, kv head, first token,
    length). Causal grids run the longest rows first, so the short ones fill the tail."""
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    row0, seqlen = _segment(CU, b, S, VARLEN)
    return pid_m, b, h, h // GROUP, row0, seqlen


@triton.jit
def _head(P, b, row0, head, stride_b, stride_s, stride_h, VARLEN: tl.constexpr):
    """Pointer to token 0 of one sequence and head. Dense tensors offset by the batch stride (any
    layout); packed (varlen) ones by the sequence's first token."""
    if VARLEN:
        return P + row0.to(tl.int64) * stride_s + head * stride_h
    return P + b.to(tl.int64) * stride_b + head * stride_h


@triton.jit
def _query_tile(q_base, stride_qs, offs_m, offs_d, m_ok, COS, SIN, stride_c, POS, table_len, qk_scale, seed,
                row_base, HALF: tl.constexpr, HPAD: tl.constexpr, HAS_POS: tl.constexpr, DROPOUT: tl.constexpr):
    """A block of queries, rotated and scaled by softmax scale * log2(e), in the input dtype, and
    their dropout row keys (row_base = head * tokens + the sequence's first token)."""
    q1, q2 = load_rotated(q_base, stride_qs, offs_m, offs_d, m_ok, COS, SIN, stride_c,
                          _table_rows(POS, offs_m, m_ok, table_len, HAS_POS), HALF, HPAD, qk_scale, True)
    dtype = q_base.dtype.element_ty
    row_keys = offs_m
    if DROPOUT:
        row_keys = _row_keys(seed, row_base, offs_m)
    return q1.to(dtype), q2.to(dtype), row_keys


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_inner(acc, m_i, l_i, q1, q2, k_base, v_base, stride_ks, stride_vs, COS, SIN, stride_c, POS, table_len,
               lo, hi, seqlen, offs_m, offs_d, offs_dv, row_keys, threshold, drop_scale,
               HALF: tl.constexpr, HPAD: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
               CAUSAL_MASK: tl.constexpr, BOUNDS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
               ROTATE_K: tl.constexpr, HAS_POS: tl.constexpr):
    dtype = q1.dtype
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seqlen
        if ROTATE_K:
            k1, k2 = load_rotated(k_base, stride_ks, offs_n, offs_d, n_ok, COS, SIN, stride_c,
                                  _table_rows(POS, offs_n, n_ok, table_len, HAS_POS), HALF, HPAD,
                                  1.0, BOUNDS_MASK)
        else:  # timing hook only (see forward): keys used as stored
            kp = k_base + offs_n[:, None] * stride_ks + offs_d[None, :]
            k1 = tl.load(kp, mask=n_ok[:, None] & (offs_d[None, :] < HALF), other=0.0)
            k2 = tl.load(kp + HALF, mask=n_ok[:, None] & (offs_d[None, :] < HALF), other=0.0)
        qk = tl.dot(q2, tl.trans(k2.to(dtype)), tl.dot(q1, tl.trans(k1.to(dtype))))
        if CAUSAL_MASK:
            qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
        if BOUNDS_MASK:
            qk = tl.where(n_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(row_keys, offs_n, threshold), p * drop_scale, 0.0)
        v_mask = offs_dv[None, :] < HEAD_DIM
        if BOUNDS_MASK:
            v_mask = v_mask & n_ok[:, None]
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_dv[None, :], mask=v_mask, other=0.0)
        acc = tl.dot(p.to(dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["seed"])
def fwd_kernel(
    Q, K, V, COS, SIN, O, LSE, CU, POS,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, stride_c, stride_lh,
    H, GROUP, S, T, table_len, qk_scale, seed, threshold, drop_scale,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HPAD: tl.constexpr, DPAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr, ROTATE_K: tl.constexpr,
    HAS_POS: tl.constexpr,
):
    pid_m, b, h, hk, row0, seqlen = _query_program(CU, H, GROUP, S, BLOCK_M, CAUSAL, VARLEN)
    if pid_m * BLOCK_M >= seqlen:
        return
    POS = POS + row0  # positions of this sequence's tokens (unused without HAS_POS)
    q_base = _head(Q, b, row0, h, stride_qb, stride_qs, stride_qh, VARLEN)
    k_base = _head(K, b, row0, hk, stride_kb, stride_ks, stride_kh, VARLEN)
    v_base = _head(V, b, row0, hk, stride_vb, stride_vs, stride_vh, VARLEN)
    o_base = _head(O, b, row0, h, stride_ob, stride_os, stride_oh, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HPAD)
    offs_dv = tl.arange(0, DPAD)
    m_ok = offs_m < seqlen
    q1, q2, row_keys = _query_tile(q_base, stride_qs, offs_m, offs_d, m_ok, COS, SIN, stride_c, POS, table_len,
                                   qk_scale, seed, h * T + row0, HALF, HPAD, HAS_POS, DROPOUT)

    acc = tl.zeros([BLOCK_M, DPAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if CAUSAL:
        diag = pid_m * BLOCK_M  # keys before the block's first query need no mask
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q1, q2, k_base, v_base, stride_ks, stride_vs, COS, SIN, stride_c,
                                   POS, table_len, 0, diag, seqlen, offs_m, offs_d, offs_dv, row_keys, threshold,
                                   drop_scale, HALF, HPAD, BLOCK_N, HEAD_DIM, False, False, DROPOUT, ROTATE_K,
                                   HAS_POS)
        hi = tl.minimum(diag + BLOCK_M, seqlen)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q1, q2, k_base, v_base, stride_ks, stride_vs, COS, SIN, stride_c,
                                   POS, table_len, diag, hi, seqlen, offs_m, offs_d, offs_dv, row_keys, threshold,
                                   drop_scale, HALF, HPAD, BLOCK_N, HEAD_DIM, True, True, DROPOUT, ROTATE_K,
                                   HAS_POS)
    else:
        full = (seqlen // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q1, q2, k_base, v_base, stride_ks, stride_vs, COS, SIN, stride_c,
                                   POS, table_len, 0, full, seqlen, offs_m, offs_d, offs_dv, row_keys, threshold,
                                   drop_scale, HALF, HPAD, BLOCK_N, HEAD_DIM, False, False, DROPOUT, ROTATE_K,
                                   HAS_POS)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q1, q2, k_base, v_base, stride_ks, stride_vs, COS, SIN, stride_c,
                                   POS, table_len, full, seqlen, seqlen, offs_m, offs_d, offs_dv, row_keys,
                                   threshold, drop_scale, HALF, HPAD, BLOCK_N, HEAD_DIM, False, True, DROPOUT,
                                   ROTATE_K, HAS_POS)
    out = acc / l_i[:, None]
    o_mask = m_ok[:, None] & (offs_dv[None, :] < HEAD_DIM)
    tl.store(o_base + offs_m[:, None] * stride_os + offs_dv[None, :], out.to(O.dtype.element_ty), mask=o_mask)
    # Natural-log LSE per (head, token): (m + log2 l) / log2(e).
    tl.store(LSE + h * stride_lh + row0 + offs_m, (m_i + tl.log2(l_i)) / 1.4426950408889634, mask=m_ok)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _bwd_dq_inner(dq1, dq2, q1, q2, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, COS, SIN,
                  stride_c, POS, table_len, lo, hi, seqlen, offs_m, offs_d, offs_dv, row_keys, threshold, drop_scale,
                  HALF: tl.constexpr, HPAD: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  CAUSAL_MASK: tl.constexpr, BOUNDS_MASK: tl.constexpr, DROPOUT: tl.constexpr, HAS_POS: tl.constexpr):
    dtype = q1.dtype
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seqlen
        k1, k2 = load_rotated(k_base, stride_ks, offs_n, offs_d, n_ok, COS, SIN, stride_c,
                                   _table_rows(POS, offs_n, n_ok, table_len, HAS_POS), HALF, HPAD,
                               1.0, BOUNDS_MASK)
        k1, k2 = k1.to(dtype), k2.to(dtype)
        v_mask = offs_dv[None, :] < HEAD_DIM
        if BOUNDS_MASK:
            v_mask = v_mask & n_ok[:, None]
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_dv[None, :], mask=v_mask, other=0.0)
        qk = tl.dot(q2, tl.trans(k2), tl.dot(q1, tl.trans(k1)))
        p = tl.exp2(qk - lse2[:, None])
        if CAUSAL_MASK:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        if DROPOUT:
            dp = tl.where(_keep(row_keys, offs_n, threshold), dp * drop_scale, 0.0)
        ds = (p * (dp - delta[:, None])).to(dtype)
        # Keys past the end were loaded as zeros: their ds multiplies a zero row of k.
        dq1 = tl.dot(ds, k1, dq1)
        dq2 = tl.dot(ds, k2, dq2)
    return dq1, dq2


@triton.jit(do_not_specialize=["seed"])
def bwd_dq_kernel(
    Q, K, V, COS, SIN, O, DO, LSE, DELTA, DQ, CU, POS,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh,
    stride_c, stride_lh,
    H, GROUP, S, T, table_len, qk_scale, sm_scale, seed, threshold, drop_scale,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HPAD: tl.constexpr, DPAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr, HAS_POS: tl.constexpr,
):
    pid_m, b, h, hk, row0, seqlen = _query_program(CU, H, GROUP, S, BLOCK_M, CAUSAL, VARLEN)
    if pid_m * BLOCK_M >= seqlen:
        return
    POS = POS + row0  # positions of this sequence's tokens (unused without HAS_POS)
    q_base = _head(Q, b, row0, h, stride_qb, stride_qs, stride_qh, VARLEN)
    k_base = _head(K, b, row0, hk, stride_kb, stride_ks, stride_kh, VARLEN)
    v_base = _head(V, b, row0, hk, stride_vb, stride_vs, stride_vh, VARLEN)
    o_base = _head(O, b, row0, h, stride_ob, stride_os, stride_oh, VARLEN)
    do_base = _head(DO, b, row0, h, stride_dob, stride_dos, stride_doh, VARLEN)
    dq_base = _head(DQ, b, row0, h, stride_dqb, stride_dqs, stride_dqh, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HPAD)
    offs_dv = tl.arange(0, DPAD)
    m_ok = offs_m < seqlen
    row_mask = m_ok[:, None] & (offs_dv[None, :] < HEAD_DIM)
    do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_dv[None, :], mask=row_mask, other=0.0)
    o = tl.load(o_base + offs_m[:, None] * stride_os + offs_dv[None, :], mask=row_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + h * stride_lh + row0 + offs_m, delta, mask=m_ok)
    lse2 = tl.load(LSE + h * stride_lh + row0 + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    q1, q2, row_keys = _query_tile(q_base, stride_qs, offs_m, offs_d, m_ok, COS, SIN, stride_c, POS, table_len,
                                   qk_scale, seed, h * T + row0, HALF, HPAD, HAS_POS, DROPOUT)
    dq1 = tl.zeros([BLOCK_M, HPAD], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, HPAD], dtype=tl.float32)
    if CAUSAL:
        diag = pid_m * BLOCK_M
        dq1, dq2 = _bwd_dq_inner(dq1, dq2, q1, q2, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, COS, SIN,
                                 stride_c, POS, table_len, 0, diag, seqlen, offs_m, offs_d, offs_dv, row_keys,
                                 threshold, drop_scale, HALF, HPAD, BLOCK_N, HEAD_DIM, False, False, DROPOUT,
                                 HAS_POS)
        hi = tl.minimum(diag + BLOCK_M, seqlen)
        dq1, dq2 = _bwd_dq_inner(dq1, dq2, q1, q2, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, COS, SIN,
                                 stride_c, POS, table_len, diag, hi, seqlen, offs_m, offs_d, offs_dv, row_keys,
                                 threshold, drop_scale, HALF, HPAD, BLOCK_N, HEAD_DIM, True, True, DROPOUT,
                                 HAS_POS)
    else:
        full = (seqlen // BLOCK_N) * BLOCK_N
        dq1, dq2 = _bwd_dq_inner(dq1, dq2, q1, q2, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, COS, SIN,
                                 stride_c, POS, table_len, 0, full, seqlen, offs_m, offs_d, offs_dv, row_keys,
                                 threshold, drop_scale, HALF, HPAD, BLOCK_N, HEAD_DIM, False, False, DROPOUT,
                                 HAS_POS)
        dq1, dq2 = _bwd_dq_inner(dq1, dq2, q1, q2, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, COS, SIN,
                                 stride_c, POS, table_len, full, seqlen, seqlen, offs_m, offs_d, offs_dv, row_keys,
                                 threshold, drop_scale, HALF, HPAD, BLOCK_N, HEAD_DIM, False, True, DROPOUT,
                                 HAS_POS)
    _store_unrotated(dq_base, stride_dqs, offs_m, offs_d, m_ok, COS, SIN, stride_c,
                     _table_rows(POS, offs_m, m_ok, table_len, HAS_POS),
                     dq1 * sm_scale, dq2 * sm_scale, HALF)


@triton.jit
def _bwd_dkdv_inner(dk1, dk2, dv, k1, k2, v, q_base, do_base, stride_qs, stride_dos, LSE_H, DELTA_H, COS, SIN,
                    stride_c, POS, table_len, lo, hi, seqlen, offs_n, offs_d, offs_dv, seed, row_base, threshold,
                    drop_scale, qk_scale,
                    HALF: tl.constexpr, HPAD: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
                    CAUSAL_MASK: tl.constexpr, DROPOUT: tl.constexpr, HAS_POS: tl.constexpr):
    """Accumulate over query blocks [lo, hi) of one head. Queries past the end load as zeros
    (q, dO, delta): they add nothing to dK or dV."""
    dtype = k1.dtype
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seqlen
        q1, q2 = load_rotated(q_base, stride_qs, offs_m, offs_d, m_ok, COS, SIN, stride_c,
                           _table_rows(POS, offs_m, m_ok, table_len, HAS_POS), HALF, HPAD,
                               qk_scale, True)
        q1, q2 = q1.to(dtype), q2.to(dtype)
        lse2 = tl.load(LSE_H + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA_H + offs_m, mask=m_ok, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_dv[None, :],
                     mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DIM), other=0.0)
        qk_t = tl.dot(k2, tl.trans(q2), tl.dot(k1, tl.trans(q1)))  # (BLOCK_N, BLOCK_M)
        p_t = tl.exp2(qk_t - lse2[None, :])
        if CAUSAL_MASK:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do))
        if DROPOUT:
            keep_t = _keep_t(seed, row_base, offs_m, offs_n, threshold)
            dv = tl.dot(tl.where(keep_t, p_t * drop_scale, 0.0).to(dtype), do, dv)
            dp_t = tl.where(keep_t, dp_t * drop_scale, 0.0)
        else:
            dv = tl.dot(p_t.to(dtype), do, dv)
        ds_t = (p_t * (dp_t - delta[None, :])).to(dtype)
        dk1 = tl.dot(ds_t, q1, dk1)
        dk2 = tl.dot(ds_t, q2, dk2)
    return dk1, dk2, dv




@triton.jit(do_not_specialize=["seed"])
def bwd_dkdv_kernel(
    Q, K, V, COS, SIN, DO, LSE, DELTA, DK, DV, CU, POS,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    stride_c, stride_lh,
    H, GROUP, S, T, table_len, qk_scale, seed, threshold, drop_scale,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HPAD: tl.constexpr, DPAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DROPOUT: tl.constexpr, HAS_POS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    n_kv = H // GROUP
    b = bhk // n_kv
    hk = bhk % n_kv
    row0, seqlen = _segment(CU, b, S, VARLEN)
    if pid_n * BLOCK_N >= seqlen:
        return
    POS = POS + row0
    q_b = _head(Q, b, row0, 0, stride_qb, stride_qs, stride_qh, VARLEN)
    do_b = _head(DO, b, row0, 0, stride_dob, stride_dos, stride_doh, VARLEN)
    k_base = _head(K, b, row0, hk, stride_kb, stride_ks, stride_kh, VARLEN)
    v_base = _head(V, b, row0, hk, stride_vb, stride_vs, stride_vh, VARLEN)
    dk_base = _head(DK, b, row0, hk, stride_dkb, stride_dks, stride_dkh, VARLEN)
    dv_base = _head(DV, b, row0, hk, stride_dvb, stride_dvs, stride_dvh, VARLEN)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HPAD)
    offs_dv = tl.arange(0, DPAD)
    n_ok = offs_n < seqlen
    dtype = Q.dtype.element_ty
    k1, k2 = load_rotated(k_base, stride_ks, offs_n, offs_d, n_ok, COS, SIN, stride_c,
                                   _table_rows(POS, offs_n, n_ok, table_len, HAS_POS), HALF, HPAD, 1.0, True)
    k1, k2 = k1.to(dtype), k2.to(dtype)
    row_mask = n_ok[:, None] & (offs_dv[None, :] < HEAD_DIM)
    v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_dv[None, :], mask=row_mask, other=0.0)
    dk1 = tl.zeros([BLOCK_N, HPAD], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, HPAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, DPAD], dtype=tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = q_b + h * stride_qh
        do_base = do_b + h * stride_doh
        lse_h = LSE + h * stride_lh + row0
        delta_h = DELTA + h * stride_lh + row0
        row_base = h * T + row0
        if CAUSAL:
            lo = pid_n * BLOCK_N  # earlier queries do not see these keys
            dk1, dk2, dv = _bwd_dkdv_inner(dk1, dk2, dv, k1, k2, v, q_base, do_base, stride_qs, stride_dos, lse_h,
                                           delta_h, COS, SIN, stride_c, POS, table_len, lo,
                                           tl.minimum(lo + BLOCK_N, seqlen), seqlen, offs_n, offs_d, offs_dv, seed,
                                           row_base, threshold, drop_scale, qk_scale, HALF, HPAD, BLOCK_M,
                                           HEAD_DIM, True, DROPOUT, HAS_POS)
            dk1, dk2, dv = _bwd_dkdv_inner(dk1, dk2, dv, k1, k2, v, q_base, do_base, stride_qs, stride_dos, lse_h,
                                           delta_h, COS, SIN, stride_c, POS, table_len, lo + BLOCK_N, seqlen,
                                           seqlen, offs_n, offs_d, offs_dv, seed, row_base, threshold, drop_scale,
                                           qk_scale, HALF, HPAD, BLOCK_M, HEAD_DIM, False, DROPOUT, HAS_POS)
        else:
            dk1, dk2, dv = _bwd_dkdv_inner(dk1, dk2, dv, k1, k2, v, q_base, do_base, stride_qs, stride_dos, lse_h,
                                           delta_h, COS, SIN, stride_c, POS, table_len, 0, seqlen, seqlen, offs_n,
                                           offs_d, offs_dv, seed, row_base, threshold, drop_scale, qk_scale, HALF,
                                           HPAD, BLOCK_M, HEAD_DIM, False, DROPOUT, HAS_POS)
    # ds was taken against q * scale * log2(e): dk = scale * ds^T q = ln(2) * ds^T (q * scale * log2 e).
    ln2 = 0.6931471805599453
    _store_unrotated(dk_base, stride_dks, offs_n, offs_d, n_ok, COS, SIN, stride_c,
                     _table_rows(POS, offs_n, n_ok, table_len, HAS_POS), dk1 * ln2, dk2 * ln2,
                     HALF)
    tl.store(dv_base + offs_n[:, None] * stride_dvs + offs_dv[None, :], dv.to(DV.dtype.element_ty), mask=row_mask)


# ----------------------------------------------------------------------------- launch configurations
# (BLOCK_M, BLOCK_N, num_warps, num_stages) by head-dim bucket, fixed (no autotuning: launches stay
# cheap and every config is compiled once). Causal masking needs BLOCK_M % BLOCK_N == 0 in the
# forward and dQ kernels, and BLOCK_N % BLOCK_M == 0 in the dK/dV kernel.
FWD_CONFIGS = {64: (128, 64, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)}
DQ_CONFIGS = {64: (128, 32, 4, 3), 128: (128, 64, 8, 3), 256: (64, 32, 8, 2)}
DKDV_CONFIGS = {64: (32, 128, 4, 3), 128: (64, 128, 8, 3), 256: (32, 64, 8, 2)}
_INTERPRETER_CONFIGS = {"fwd": (16, 16, 4, 1), "dq": (16, 16, 4, 1), "dkdv": (16, 32, 4, 1)}


def config(kind: str, head_dim: int) -> tuple[int, int, int, int]:
    if INTERPRET:
        return _INTERPRETER_CONFIGS[kind]
    table = {"fwd": FWD_CONFIGS, "dq": DQ_CONFIGS, "dkdv": DKDV_CONFIGS}[kind]
    bucket = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    return table[bucket]


def _strides3(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides in elements; the batch stride is unused for varlen."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _common(q, k, cu_seqlens, max_seqlen):
    varlen = cu_seqlens is not None
    if varlen:
        batch, seq, total = cu_seqlens.numel() - 1, max_seqlen, q.shape[0]
    else:
        batch, seq = q.shape[0], q.shape[1]
        total = batch * seq
    heads, head_dim = q.shape[-2], q.shape[-1]
    group = heads // k.shape[-2]
    cu = cu_seqlens if varlen else q  # unused pointer when dense
    return varlen, batch, seq, total, heads, head_dim, group, cu


def _dropout_args(dropout_p: float, seed: int) -> tuple[int, int, float]:
    if dropout_p <= 0:
        return 0, 0, 1.0
    threshold = min(int(round(dropout_p * 2**32)), 2**32 - 1)
    return seed & 0x7FFFFFFF, threshold, 1.0 / (1.0 - dropout_p)


def forward(q, k, v, cos, sin, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale, dropout_p, seed,
            positions=None, rotate_keys=True):
    """out (like q) and lse (H, tokens) fp32 are preallocated. `rotate_keys=False` is a timing
    hook for bench/tune_attention.py (what the key rotation costs); its results are wrong."""
    varlen, batch, seq, total, heads, head_dim, group, cu = _common(q, k, cu_seqlens, max_seqlen)
    seed, threshold, drop_scale = _dropout_args(dropout_p, seed)
    block_m, block_n, warps, stages = config("fwd", head_dim)
    grid = (triton.cdiv(seq, block_m), batch * heads)
    fwd_kernel[grid](
        q, k, v, cos, sin, out, lse, cu, cu if positions is None else positions,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(out, varlen),
        cos.stride(0), lse.stride(0),
        heads, group, seq, total, cos.shape[0], softmax_scale * LOG2E, seed, threshold, drop_scale,
        HEAD_DIM=head_dim, HALF=head_dim // 2, HPAD=half_pad(head_dim), DPAD=triton.next_power_of_2(head_dim),
        BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, VARLEN=varlen, DROPOUT=dropout_p > 0,
        ROTATE_K=rotate_keys, HAS_POS=positions is not None, num_warps=warps, num_stages=stages,
    )


def backward(do, q, k, v, out, lse, cos, sin, dq, dk, dv, cu_seqlens, max_seqlen, causal, softmax_scale,
             dropout_p, seed, positions=None):
    """dq, dk, dv (like q, k, v) are preallocated; delta is a workspace like lse."""
    varlen, batch, seq, total, heads, head_dim, group, cu = _common(q, k, cu_seqlens, max_seqlen)
    seed, threshold, drop_scale = _dropout_args(dropout_p, seed)
    delta = torch.empty_like(lse)
    pos = cu if positions is None else positions
    half, dpad = head_dim // 2, triton.next_power_of_2(head_dim)
    block_m, block_n, warps, stages = config("dq", head_dim)
    bwd_dq_kernel[(triton.cdiv(seq, block_m), batch * heads)](
        q, k, v, cos, sin, out, do, lse, delta, dq, cu, pos,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(out, varlen),
        *_strides3(do, varlen), *_strides3(dq, varlen), cos.stride(0), lse.stride(0),
        heads, group, seq, total, cos.shape[0], softmax_scale * LOG2E, softmax_scale, seed, threshold, drop_scale,
        HEAD_DIM=head_dim, HALF=half, HPAD=half_pad(head_dim), DPAD=dpad, BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, VARLEN=varlen, DROPOUT=dropout_p > 0, HAS_POS=positions is not None,
        num_warps=warps, num_stages=stages,
    )
    block_m, block_n, warps, stages = config("dkdv", head_dim)
    bwd_dkdv_kernel[(triton.cdiv(seq, block_n), batch * (heads // group))](
        q, k, v, cos, sin, do, lse, delta, dk, dv, cu, pos,
        *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen),
        *_strides3(do, varlen), *_strides3(dk, varlen), *_strides3(dv, varlen), cos.stride(0), lse.stride(0),
        heads, group, seq, total, cos.shape[0], softmax_scale * LOG2E, seed, threshold, drop_scale,
        HEAD_DIM=head_dim, HALF=half, HPAD=half_pad(head_dim), DPAD=dpad, BLOCK_M=block_m, BLOCK_N=block_n,
        CAUSAL=causal, VARLEN=varlen, DROPOUT=dropout_p > 0, HAS_POS=positions is not None,
        num_warps=warps, num_stages=stages,
    )
