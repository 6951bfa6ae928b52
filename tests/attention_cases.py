"""Shared by the CPU and GPU attention tests: inputs, and the pass criterion.

The criterion (from the issue): a kernel's error against the fp64 reference is at most about
twice the error of the same computation done by PyTorch in the kernel's dtype (RoPE rounded to
the dtype, then attention in the dtype), plus a small floor for outputs that happen to be exact.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import llama_kernels
from llama_kernels.ops.rope_attention import dropout_keep, rope_attention_reference, rotate

FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


def tables(positions: int, head_dim: int, device="cpu", base: float = 10000.0):
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(positions, dtype=torch.float64), inv)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def qkv(shape_q, kv_heads, dtype, device="cpu"):
    """q (..., H, D), k and v (..., Hkv, D) with O(1) entries."""
    *lead, _, d = shape_q
    q = torch.randn(shape_q, device=device).to(dtype)
    k = torch.randn(*lead, kv_heads, d, device=device).to(dtype)
    v = torch.randn(*lead, kv_heads, d, device=device).to(dtype)
    return q, k, v


def cu_from_lengths(lengths, device="cpu"):
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def _same_dtype_segment(q, k, v, cos, sin, causal, scale, dropout_p, seed, total, tokens, pos):
    """PyTorch in q's dtype: RoPE rounded to the dtype, then SDPA (or explicit math with the
    dropout mask)."""
    s = q.shape[0]
    c, sn = cos[pos][:, None], sin[pos][:, None]
    qr = rotate(q, c, sn).to(q.dtype).transpose(0, 1)
    kr = rotate(k, c, sn).to(q.dtype).transpose(0, 1)
    vh = v.transpose(0, 1)
    group = q.shape[1] // k.shape[1]
    kr, vh = kr.repeat_interleave(group, 0), vh.repeat_interleave(group, 0)
    if dropout_p == 0:
        return F.scaled_dot_product_attention(qr, kr, vh, is_causal=causal, scale=scale).transpose(0, 1)
    scores = (qr @ kr.transpose(-1, -2)) * scale
    if causal:
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    keep = dropout_keep(seed, dropout_p, q.shape[1], total, tokens, s)
    return (((p * keep) / (1 - dropout_p)).to(q.dtype) @ vh).transpose(0, 1)


def same_dtype_attention(q, k, v, cos, sin, causal, dropout_p=0.0, seed=0, cu_seqlens=None, positions=None):
    scale = 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens is None:
        b, s = q.shape[:2]
        pos = torch.arange(s, device=q.device).expand(b, s) if positions is None else positions.long()
        return torch.stack([
            _same_dtype_segment(q[i], k[i], v[i], cos, sin, causal, scale, dropout_p, seed, b * s,
                                torch.arange(i * s, (i + 1) * s, device=q.device), pos[i])
            for i in range(b)])
    offsets = cu_seqlens.tolist()
    return torch.cat([
        _same_dtype_segment(q[a:e], k[a:e], v[a:e], cos, sin, causal, scale, dropout_p, seed, q.shape[0],
                            torch.arange(a, e, device=q.device),
                            torch.arange(e - a, device=q.device) if positions is None else positions[a:e].long())
        for a, e in zip(offsets[:-1], offsets[1:])])


def _grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def check_training(q, k, v, cos, sin, causal=True, dropout_p=0.0, seed=0, cu_seqlens=None, backend="triton",
                   positions=None):
    """Forward and all gradients of llama_kernels.rope_attention (forced backend) against the fp64
    reference, within 2x the same-dtype PyTorch error plus a floor."""
    dtype = q.dtype
    grad_out = torch.randn(q.shape, device=q.device)
    kwargs = dict(causal=causal, dropout_p=dropout_p, cu_seqlens=cu_seqlens, positions=positions)

    def ours(q_, k_, v_):
        with llama_kernels.use_backend(backend):
            return llama_kernels.rope_attention(q_, k_, v_, cos, sin, dropout_seed=seed, **kwargs)

    def oracle(q_, k_, v_):
        return rope_attention_reference(q_, k_, v_, cos, sin, dropout_seed=seed, **kwargs)

    def baseline(q_, k_, v_):
        return same_dtype_attention(q_, k_, v_, cos, sin, causal, dropout_p, seed, cu_seqlens, positions)

    out, grads = _grads(ours, (q, k, v), grad_out)
    ref_out, ref_grads = _grads(oracle, [t.double() for t in (q, k, v)], grad_out)
    base_out, base_grads = _grads(baseline, (q, k, v), grad_out)
    for name, a, r, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads), (base_out, *base_grads)):
        assert a.dtype == dtype and a.shape == r.shape, name
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        err = (a.double() - r).abs().max().item()
        base = (b.double() - r).abs().max().item()
        assert err <= 2 * base + FLOOR[dtype], f"{name}: error {err:.3g} vs same-dtype PyTorch {base:.3g}"
    return out
