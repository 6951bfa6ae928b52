"""Triton kernels for one decoding step of attention with the rotary embedding applied inside
(see llama_kernels/ops/rope_attention.py): flash-decoding over a KV cache.

`decode` launches one program per (sequence, kv head, split of the cache). Each rotates the new
token's queries of its GQA group, attends over its chunk of the cached slots, and the last split
also rotates the new key, takes it and the new value from registers and writes them into the
cache. With more than one split a second kernel merges the splits' partial results.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .rope_common import INTERPRET, LOG2E, half_pad, load_rotated

# ----------------------------------------------------------------------------- decode
@triton.jit
def decode_kernel(
    Q, KN, VN, KC, VC, LENS, COS, SIN, PM, PL, PACC, O,
    stride_qb, stride_qh, stride_knb, stride_knh, stride_vnb, stride_vnh, stride_cb, stride_cs, stride_ch,
    stride_vcb, stride_vcs, stride_vch, stride_c, stride_ob, stride_oh,
    H, GROUP, capacity, table_len, qk_scale,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HPAD: tl.constexpr, DPAD: tl.constexpr, G_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
):
    """Program (b, kv head, split): the GQA group's queries against one chunk of cache slots
    [0, L). The last split also takes the new key and value from registers and writes them to
    slot L, which no program reads from memory, so there is no race. With one split (short
    caches) the program writes the output itself and no merge launch follows."""
    b = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    L = tl.load(LENS + b).to(tl.int32)
    valid = (L >= 0) & (L < capacity) & (L < table_len)
    L = tl.where(valid, L, 0)
    b64 = b.to(tl.int64)
    dtype = Q.dtype.element_ty
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, HPAD)
    offs_dv = tl.arange(0, DPAD)
    d_ok = offs_d < HALF
    dv_ok = offs_dv < HEAD_DIM
    g_ok = offs_g < GROUP
    heads = hk * GROUP + offs_g
    q1, q2 = load_rotated(Q + b64 * stride_qb, stride_qh, heads, offs_d, g_ok, COS, SIN, stride_c,
                          L + offs_g * 0, HALF, HPAD, qk_scale, True)
    q1, q2 = q1.to(dtype), q2.to(dtype)

    chunk = tl.cdiv(tl.cdiv(L, SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, L)
    k_base = KC + b64 * stride_cb + hk * stride_ch
    v_base = VC + b64 * stride_vcb + hk * stride_vch
    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, DPAD], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        kp = k_base + offs_n[:, None].to(tl.int64) * stride_cs + offs_d[None, :]
        k1 = tl.load(kp, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        k2 = tl.load(kp + HALF, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        qk = tl.dot(q2, tl.trans(k2), tl.dot(q1, tl.trans(k1)))
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vcs + offs_dv[None, :],
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = tl.dot(p.to(dtype), v, acc * alpha[:, None])
        m_i = m_new

    if split == SPLITS - 1:
        kn = KN + b64 * stride_knb + hk * stride_knh
        c = tl.load(COS + L * stride_c + offs_d, mask=d_ok, other=0.0)
        s = tl.load(SIN + L * stride_c + offs_d, mask=d_ok, other=0.0)
        x1 = tl.load(kn + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        x2 = tl.load(kn + HALF + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        r1 = (x1 * c - x2 * s).to(KC.dtype.element_ty)
        r2 = (x2 * c + x1 * s).to(KC.dtype.element_ty)
        vn = tl.load(VN + b64 * stride_vnb + hk * stride_vnh + offs_dv, mask=dv_ok, other=0.0)
        score = tl.sum(q1.to(tl.float32) * r1.to(tl.float32)[None, :], 1) + \
            tl.sum(q2.to(tl.float32) * r2.to(tl.float32)[None, :], 1)
        m_new = tl.maximum(m_i, score)
        p = tl.exp2(score - m_new)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * vn.to(VC.dtype.element_ty).to(tl.float32)[None, :]
        m_i = m_new
        slot_k = KC + b64 * stride_cb + L.to(tl.int64) * stride_cs + hk * stride_ch
        slot_v = VC + b64 * stride_vcb + L.to(tl.int64) * stride_vcs + hk * stride_vch
        # An out-of-range length writes nothing (the bounds collapse to 0).
        half_w = tl.where(valid, HALF, 0)
        tl.store(slot_k + offs_d, r1, mask=offs_d < half_w)
        tl.store(slot_k + HALF + offs_d, r2, mask=offs_d < half_w)
        tl.store(slot_v + offs_dv, vn.to(VC.dtype.element_ty), mask=offs_dv < tl.where(valid, HEAD_DIM, 0))

    if SPLITS == 1:
        out = acc / l_i[:, None]
        out = tl.where(valid, out, float("nan"))
        o_ptr = O + b64 * stride_ob + heads[:, None] * stride_oh + offs_dv[None, :]
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=g_ok[:, None] & dv_ok[None, :])
    else:
        part = (b64 * H + heads) * SPLITS + split
        tl.store(PM + part, m_i, mask=g_ok)
        tl.store(PL + part, l_i, mask=g_ok)
        tl.store(PACC + part[:, None] * HEAD_DIM + offs_dv[None, :], acc, mask=g_ok[:, None] & dv_ok[None, :])


@triton.jit
def decode_combine_kernel(PM, PL, PACC, LENS, O, stride_ob, stride_oh, H, capacity, table_len,
                          HEAD_DIM: tl.constexpr, DPAD: tl.constexpr, SPLITS: tl.constexpr,
                          SPLITS_PAD: tl.constexpr):
    """Program (b, head): merge the splits' (max, sum, acc) in a fixed order; NaN for a sequence
    whose length was out of range."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    L = tl.load(LENS + b).to(tl.int32)
    valid = (L >= 0) & (L < capacity) & (L < table_len)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_dv = tl.arange(0, DPAD)
    s_ok = offs_s < SPLITS
    dv_ok = offs_dv < HEAD_DIM
    part = (b.to(tl.int64) * H + h) * SPLITS + offs_s
    m = tl.load(PM + part, mask=s_ok, other=float("-inf"))
    m_max = tl.max(m, 0)
    w = tl.exp2(m - m_max)
    l_sum = tl.sum(w * tl.load(PL + part, mask=s_ok, other=0.0), 0)
    acc = tl.load(PACC + part[:, None] * HEAD_DIM + offs_dv[None, :], mask=s_ok[:, None] & dv_ok[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / l_sum
    out = tl.where(valid, out, float("nan"))
    tl.store(O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_dv, out.to(O.dtype.element_ty), mask=dv_ok)


# ----------------------------------------------------------------------------- launch
DECODE_BLOCK_N = 64


@functools.lru_cache(maxsize=None)
def decode_splits(batch: int, kv_heads: int, capacity: int, sm_count: int) -> int:
    """Splits of the cache per (sequence, kv head): about four programs per multiprocessor (on an
    H200 at batch 1, 32 splits read an 8k cache at 0.74 of copy bandwidth against 0.67 for 16,
    and a 32k one at 0.94 against 0.83), each taking at least two blocks of keys at full capacity.
    Fixed by the shapes, so a captured graph stays valid."""
    want = triton.cdiv(4 * sm_count, batch * kv_heads)
    most = max(1, capacity // (2 * DECODE_BLOCK_N))
    return max(1, min(want, most, 128))


def decode(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, out, softmax_scale, splits):
    """q (B, 1, H, D), k_new/v_new (B, 1, Hkv, D), caches (B, capacity, Hkv, D); out like q."""
    batch, _, heads, head_dim = q.shape
    kv_heads, capacity = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    parts = splits if splits > 1 else 0  # one split writes the output directly
    partial_m = torch.empty((batch, heads, parts), dtype=torch.float32, device=q.device)
    partial_l = torch.empty_like(partial_m)
    partial_acc = torch.empty((batch, heads, parts, head_dim), dtype=torch.float32, device=q.device)
    half, dpad = head_dim // 2, triton.next_power_of_2(head_dim)
    block_n = 16 if INTERPRET else (DECODE_BLOCK_N if head_dim <= 128 else 32)
    decode_kernel[(batch, kv_heads, splits)](
        q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, partial_m, partial_l, partial_acc, out,
        q.stride(0), q.stride(2), k_new.stride(0), k_new.stride(2), v_new.stride(0), v_new.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), cos.stride(0), out.stride(0), out.stride(2),
        heads, group, capacity, cos.shape[0], softmax_scale * LOG2E,
        HEAD_DIM=head_dim, HALF=half, HPAD=half_pad(head_dim), DPAD=dpad,
        G_PAD=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, SPLITS=splits, num_warps=4, num_stages=2,
    )
    if splits == 1:
        return
    decode_combine_kernel[(batch, heads)](
        partial_m, partial_l, partial_acc, seqlens, out, out.stride(0), out.stride(2), heads, capacity,
        cos.shape[0], HEAD_DIM=head_dim, DPAD=dpad, SPLITS=splits,
        SPLITS_PAD=triton.next_power_of_2(splits), num_warps=4,
    )
