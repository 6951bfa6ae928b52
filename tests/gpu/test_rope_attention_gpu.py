"""Fused RoPE attention on a GPU: Triton forward/backward and the decode kernels at real sizes,
in bf16 and fp16, against the fp64 reference (2x same-dtype PyTorch criterion)."""
import math

import pytest
import torch

import llama_kernels
from llama_kernels.ops.rope_attention import rope_attention_reference, rope_decode_attention_reference
from tests.attention_cases import check_training, cu_from_lengths, qkv, tables
from tests.helpers import assert_close, poisoned

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,seq,heads,kv_heads,head_dim,causal", [
    (1, 2048, 16, 16, 128, True),   # Sheared-LLaMA attention
    (2, 1000, 16, 16, 128, False),  # ragged, non-causal
    (2, 777, 32, 8, 64, True),      # GQA 4, D64, ragged
    (1, 513, 8, 1, 128, True),      # MQA
    (1, 300, 4, 2, 256, True),
    (2, 257, 4, 4, 32, False),
    (1, 200, 4, 2, 96, True),       # non-power-of-two half
])
def test_training_matches_reference(dtype, batch, seq, heads, kv_heads, head_dim, causal):
    q, k, v = qkv((batch, seq, heads, head_dim), kv_heads, dtype, "cuda")
    cos, sin = tables(seq + 7, head_dim, "cuda")
    check_training(q, k, v, cos, sin, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_sequences(dtype):
    lengths = [1000, 1, 0, 517, 2048, 63]
    cu = cu_from_lengths(lengths, "cuda")
    q, k, v = qkv((sum(lengths), 8, 128), 2, dtype, "cuda")
    cos, sin = tables(max(lengths), 128, "cuda")
    check_training(q, k, v, cos, sin, cu_seqlens=cu)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_explicit_positions(dtype):
    """A chunk continuing at position 3000 of a 4096-row table (chunked prefill, say)."""
    q, k, v = qkv((2, 700, 8, 128), 2, dtype, "cuda")
    cos, sin = tables(4096, 128, "cuda")
    positions = torch.arange(3000, 3700, device="cuda").expand(2, 700)
    check_training(q, k, v, cos, sin, positions=positions)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_matches_the_seeded_mask(dtype):
    q, k, v = qkv((2, 300, 4, 64), 2, dtype, "cuda")
    cos, sin = tables(300, 64, "cuda")
    out = check_training(q, k, v, cos, sin, dropout_p=0.2, seed=77)
    again = llama_kernels.rope_attention(q, k, v, cos, sin, dropout_p=0.2, dropout_seed=77)
    assert torch.equal(out, again)


def test_outputs_are_fully_written_and_forward_is_deterministic():
    from llama_kernels.triton import rope_attention as tri

    b, s, h, hk, d = 2, 1111, 8, 2, 128
    q, k, v = qkv((b, s, h, d), hk, torch.bfloat16, "cuda")
    cos, sin = tables(s, d, "cuda")
    outs = []
    for _ in range(2):
        out, lse = poisoned(q.shape, q.dtype, "cuda"), poisoned((h, b * s), torch.float32, "cuda")
        tri.forward(q, k, v, cos, sin, out, lse, None, s, True, 1 / math.sqrt(d), 0.0, 0)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    do = torch.randn_like(q)
    dq, dk, dv = (poisoned(t.shape, t.dtype, "cuda") for t in (q, k, v))
    tri.backward(do, q, k, v, outs[0], lse, cos, sin, dq, dk, dv, None, s, True, 1 / math.sqrt(d), 0.0, 0)
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))


def test_strided_inputs_from_a_fused_qkv_projection():
    """q, k, v as views into one (B, S, H + 2 Hkv, D) projection output (no copies)."""
    b, s, h, hk, d = 2, 333, 8, 2, 64
    qkv_out = torch.randn(b, s, h + 2 * hk, d, device="cuda", dtype=torch.float16)
    q, k, v = qkv_out[:, :, :h], qkv_out[:, :, h:h + hk], qkv_out[:, :, h + hk:]
    cos, sin = tables(s, d, "cuda")
    check_training(q, k, v, cos, sin)
    out = llama_kernels.rope_attention(q, k, v, cos, sin)
    assert_close(out, rope_attention_reference(q, k, v, cos, sin), torch.float16, scale=2)


def test_under_torch_compile():
    q, k, v = (t.requires_grad_() for t in qkv((2, 257, 8, 64), 4, torch.bfloat16, "cuda"))
    cos, sin = tables(257, 64, "cuda")

    def f(q, k, v):
        return llama_kernels.rope_attention(q, k, v, cos, sin).float().square().sum()

    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


def test_opcheck():
    q, k, v = qkv((1, 130, 4, 64), 2, torch.bfloat16, "cuda")
    cos, sin = tables(130, 64, "cuda")
    torch.library.opcheck(torch.ops.llama_kernels.rope_attention_fwd.default,
                          (q, k, v, cos, sin, None, None, 130, True, 0.125, 0.0, 0))


def test_wrong_device_is_named():
    q, k, v = qkv((1, 16, 4, 64), 2, torch.bfloat16, "cuda")
    cos, sin = tables(16, 64)  # left on the CPU
    with pytest.raises(ValueError, match="cos: is on cpu"):
        llama_kernels.rope_attention(q, k, v, cos, sin)


# ----------------------------------------------------------------------------- decode
def _decode_backends():
    return [b for b in ("cuda", "triton") if b in llama_kernels.available_backends("cuda")]


def _decode_case(batch, heads, kv_heads, head_dim, capacity, lengths, dtype):
    q = torch.randn(batch, 1, heads, head_dim, device="cuda").to(dtype)
    k_new = torch.randn(batch, 1, kv_heads, head_dim, device="cuda").to(dtype)
    v_new = torch.randn(batch, 1, kv_heads, head_dim, device="cuda").to(dtype)
    k_cache = torch.randn(batch, capacity, kv_heads, head_dim, device="cuda").to(dtype)
    v_cache = torch.randn(batch, capacity, kv_heads, head_dim, device="cuda").to(dtype)
    return q, k_new, v_new, k_cache, v_cache, torch.tensor(lengths, device="cuda")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim,lengths,capacity", [
    (16, 16, 128, [8191], 8192),
    (16, 4, 128, [0, 1, 4095, 333, 8000, 17, 2048, 5000], 8192),
    (32, 4, 64, [100, 3000], 4096),
    (8, 1, 128, [31999], 32768),
    (8, 8, 64, [5, 1000, 0], 1024),
])
def test_decode_matches_reference(backend, dtype, heads, kv_heads, head_dim, lengths, capacity):
    if backend not in _decode_backends():
        pytest.fail(f"{backend} unavailable on this GPU machine: {llama_kernels.build_info()}")
    q, k_new, v_new, k_cache, v_cache, seqlens = _decode_case(len(lengths), heads, kv_heads, head_dim, capacity,
                                                              lengths, dtype)
    cos, sin = tables(capacity, head_dim, "cuda")
    ref_k, ref_v = k_cache.double(), v_cache.double()
    expect = rope_decode_attention_reference(q.double(), k_new.double(), v_new.double(), ref_k, ref_v, seqlens, cos, sin)
    before_k = k_cache.clone()
    with llama_kernels.use_backend(backend):
        out = llama_kernels.rope_decode_attention(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin)
    assert_close(out, expect, dtype)
    rows = torch.arange(len(lengths), device="cuda")
    assert_close(k_cache[rows, seqlens], ref_k[rows, seqlens], dtype)
    assert torch.equal(v_cache[rows, seqlens], v_new[:, 0])
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device="cuda")
    written[rows, seqlens] = True
    assert torch.equal(k_cache[~written], before_k[~written])


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_decode_in_a_cuda_graph_follows_the_lengths(backend):
    if backend not in _decode_backends():
        pytest.fail(f"{backend} unavailable on this GPU machine")
    q, k_new, v_new, k_cache, v_cache, seqlens = _decode_case(4, 16, 4, 128, 4096, [10, 0, 4000, 77], torch.bfloat16)
    cos, sin = tables(4096, 128, "cuda")
    with llama_kernels.use_backend(backend):
        llama_kernels.rope_decode_attention(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin)  # compile, warm up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = llama_kernels.rope_decode_attention(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin)
    for lengths in ([11, 1, 4001, 78], [2000, 3, 5, 4095]):
        seqlens.copy_(torch.tensor(lengths))
        ref_k, ref_v = k_cache.double(), v_cache.double()
        expect = rope_decode_attention_reference(q.double(), k_new.double(), v_new.double(), ref_k, ref_v, seqlens,
                                                 cos, sin)
        graph.replay()
        assert_close(out, expect, torch.bfloat16)


def test_decode_under_torch_compile_matches_eager():
    q, k_new, v_new, k_cache, v_cache, seqlens = _decode_case(2, 16, 16, 128, 1024, [100, 900], torch.bfloat16)
    cos, sin = tables(1024, 128, "cuda")
    kc, vc = k_cache.clone(), v_cache.clone()
    eager = llama_kernels.rope_decode_attention(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin)
    compiled = torch.compile(llama_kernels.rope_decode_attention, fullgraph=True)(q, k_new, v_new, kc, vc, seqlens, cos, sin)
    assert torch.equal(eager, compiled) and torch.equal(k_cache, kc) and torch.equal(v_cache, vc)
