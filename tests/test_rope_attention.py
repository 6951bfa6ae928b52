"""Fused RoPE attention on the CPU: the Triton kernels under the interpreter (fp16, small ragged
shapes) and the reference, against fp64; input checks; the custom-op registration."""
import math
import sys

import pytest
import torch

import llama_kernels
from llama_kernels import dispatch
from llama_kernels.cpu import rope_decode as cpu_decode
from llama_kernels.ops import rope_attention as mod
from llama_kernels.ops.rope_attention import dropout_keep, rope_attention_reference, rope_decode_attention_reference
from tests.attention_cases import check_training, cu_from_lengths, qkv, tables
from tests.helpers import assert_close, poisoned

needs_triton = pytest.mark.skipif(
    dispatch.unavailable("triton", torch.device("cpu")) is not None, reason="needs triton (interpreter on CPU)")
F16 = torch.float16


def _tri():
    from llama_kernels.triton import rope_attention as tri

    return tri


def _tri_decode():
    from llama_kernels.triton import rope_decode as tri

    return tri


# ----------------------------------------------------------------------------- training
@needs_triton
@pytest.mark.parametrize("batch,seq,heads,kv_heads,head_dim,causal", [
    (2, 37, 4, 4, 32, True),    # ragged S, MHA
    (1, 50, 4, 2, 64, False),   # GQA 2, non-causal
    (2, 33, 8, 1, 32, True),    # GQA 8 (MQA)
    (1, 45, 2, 2, 96, True),    # head dim with a non-power-of-two half (padded in the kernel)
    (3, 9, 2, 1, 16, False),    # shorter than one block
])
def test_training_matches_reference(batch, seq, heads, kv_heads, head_dim, causal):
    q, k, v = qkv((batch, seq, heads, head_dim), kv_heads, F16)
    cos, sin = tables(seq + 5, head_dim)  # tables may be longer than S
    check_training(q, k, v, cos, sin, causal=causal)


@needs_triton
@pytest.mark.parametrize("causal", [True, False])
def test_packed_sequences_do_not_attend_across_documents(causal):
    lengths = [5, 23, 0, 1, 40]
    cu = cu_from_lengths(lengths)
    q, k, v = qkv((sum(lengths), 4, 32), 2, F16)
    cos, sin = tables(max(lengths), 32)
    out = check_training(q, k, v, cos, sin, causal=causal, cu_seqlens=cu)
    # The last document alone, unpacked, gives the same rows: nothing leaks across boundaries.
    with llama_kernels.use_backend("triton"):
        alone = llama_kernels.rope_attention(q[29:][None], k[29:][None], v[29:][None], cos, sin, causal=causal)
    torch.testing.assert_close(out[29:], alone[0], atol=1e-3, rtol=1e-3)


@needs_triton
@pytest.mark.parametrize("packed", [False, True])
def test_positions_pick_the_table_rows(packed):
    """Explicit positions (an offset chunk, repeated and out-of-order ids) rotate by those rows."""
    if packed:
        cu = cu_from_lengths([9, 20])
        q, k, v = qkv((29, 4, 32), 2, F16)
        positions = torch.cat([torch.arange(100, 109), torch.randint(0, 120, (20,))])
    else:
        cu = None
        q, k, v = qkv((2, 23, 4, 32), 2, F16)
        positions = torch.stack([torch.arange(50, 73), torch.randint(0, 120, (23,))])
    cos, sin = tables(120, 32)
    check_training(q, k, v, cos, sin, cu_seqlens=cu, positions=positions)
    # Without positions, rows 0.. are used: the same as passing them explicitly.
    default = torch.arange(23).expand(2, 23) if not packed else torch.cat([torch.arange(9), torch.arange(20)])
    with llama_kernels.use_backend("triton"):
        a = llama_kernels.rope_attention(q, k, v, cos, sin, cu_seqlens=cu)
        b = llama_kernels.rope_attention(q, k, v, cos, sin, cu_seqlens=cu, positions=default.int())
    assert torch.equal(a, b)


def test_positions_are_checked():
    q, k, v = qkv((1, 8, 4, 16), 2, torch.float32)
    cos, sin = tables(10, 16)
    with pytest.raises(ValueError, match=r"positions: must index the 10 rows of cos/sin, got \[0, 10\]"):
        llama_kernels.rope_attention(q, k, v, cos, sin, positions=torch.arange(3, 11)[None] - torch.tensor([[3] + [0] * 7]))
    with pytest.raises(ValueError, match="positions: expected an int32 or int64 tensor of shape"):
        llama_kernels.rope_attention(q, k, v, cos, sin, positions=torch.arange(8))
    # Positions decide the rows needed, not the sequence length.
    short_cos, short_sin = tables(4, 16)
    out = llama_kernels.rope_attention(q, k, v, short_cos, short_sin, positions=torch.zeros(1, 8, dtype=torch.long))
    assert out.shape == q.shape


@needs_triton
@pytest.mark.parametrize("packed", [False, True])
def test_dropout_uses_the_seeded_mask(packed):
    p = 0.3
    if packed:
        cu = cu_from_lengths([7, 30, 12])
        q, k, v = qkv((49, 4, 32), 2, F16)
    else:
        cu = None
        q, k, v = qkv((2, 29, 4, 32), 2, F16)
    cos, sin = tables(40, 32)
    out = check_training(q, k, v, cos, sin, dropout_p=p, seed=1234, cu_seqlens=cu)
    with llama_kernels.use_backend("triton"):
        again = llama_kernels.rope_attention(q, k, v, cos, sin, dropout_p=p, dropout_seed=1234, cu_seqlens=cu)
        other = llama_kernels.rope_attention(q, k, v, cos, sin, dropout_p=p, dropout_seed=99, cu_seqlens=cu)
    assert torch.equal(out, again)
    assert not torch.allclose(out.float(), other.float(), atol=1e-2)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_drops_the_requested_fraction(p):
    keep = dropout_keep(5, p, heads=4, total_tokens=512, tokens=torch.arange(512), n_keys=512)
    assert keep.shape == (4, 512, 512)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.005
    # Rows and columns are not correlated with their neighbours.
    assert abs((keep[:, 1:] == keep[:, :-1]).float().mean().item() - (p * p + (1 - p) ** 2)) < 0.005


@needs_triton
def test_kernels_write_every_output_element():
    """Outputs poisoned with NaN beforehand: every element of out, lse, dq, dk, dv is written."""
    tri = _tri()
    b, s, h, hk, d = 2, 41, 4, 2, 32
    q, k, v = qkv((b, s, h, d), hk, F16)
    cos, sin = tables(s, d)
    scale = 1 / math.sqrt(d)
    out, lse = poisoned(q.shape, F16), poisoned((h, b * s), torch.float32)
    tri.forward(q, k, v, cos, sin, out, lse, None, s, True, scale, 0.0, 0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref = rope_attention_reference(q, k, v, cos, sin)
    assert_close(out, ref, F16)
    do = torch.randn_like(q)
    dq, dk, dv = poisoned(q.shape, F16), poisoned(k.shape, F16), poisoned(v.shape, F16)
    tri.backward(do, q, k, v, out, lse, cos, sin, dq, dk, dv, None, s, True, scale, 0.0, 0)
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))


@needs_triton
def test_lse_is_the_log_normalizer():
    tri = _tri()
    q, k, v = qkv((1, 20, 2, 32), 2, F16)
    cos, sin = tables(20, 32)
    out, lse = poisoned(q.shape, F16), poisoned((2, 20), torch.float32)
    tri.forward(q, k, v, cos, sin, out, lse, None, 20, True, 0.2, 0.0, 0)
    qr = mod.rotate(q.double(), cos[:20, None], sin[:20, None])
    kr = mod.rotate(k.double(), cos[:20, None], sin[:20, None])
    scores = torch.einsum("shd,thd->hst", qr[0], kr[0]) * 0.2
    scores = scores.masked_fill(torch.ones(20, 20, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), atol=2e-3, rtol=1e-3)


def test_cpu_default_is_the_reference_and_matches_rope_then_sdpa():
    """Without a forced backend, CPU (and fp32) inputs take the reference: RoPE, then SDPA."""
    from llama.model import apply_rope

    q, k, v = qkv((2, 13, 4, 16), 2, torch.float32)
    cos, sin = tables(13, 16)
    out = llama_kernels.rope_attention(q, k, v, cos, sin)
    qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    expect = torch.nn.functional.scaled_dot_product_attention(
        qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, expect.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_torch_backend_gradients_flow():
    q, k, v = (t.requires_grad_() for t in qkv((1, 8, 2, 16), 1, torch.float32))
    cos, sin = tables(8, 16)
    llama_kernels.rope_attention(q, k, v, cos, sin).sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


@needs_triton
def test_opcheck():
    q, k, v = qkv((1, 19, 2, 32), 1, F16)
    cos, sin = tables(19, 32)
    args = (q, k, v, cos, sin, None, None, 19, True, 0.25, 0.0, 0)
    torch.library.opcheck(torch.ops.llama_kernels.rope_attention_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# ----------------------------------------------------------------------------- input checks
def _bad(**change):
    q, k, v = qkv((1, 8, 4, 16), 2, torch.float32)
    cos, sin = tables(8, 16)
    args = dict(q=q, k=k, v=v, cos=cos, sin=sin)
    args.update(change)
    return args


@pytest.mark.parametrize("change,error,words", [
    (dict(k=torch.randn(1, 8, 2, 32)), ValueError, "head dim"),
    (dict(k=torch.randn(1, 8, 3, 16), v=torch.randn(1, 8, 3, 16)), ValueError, "multiple of k's 3"),
    (dict(cos=tables(5, 16)[0], sin=tables(5, 16)[1]), ValueError, "cos: has 5 positions"),
    (dict(cos=torch.randn(8, 16)), ValueError, "cos: expected shape (positions, 8)"),
    (dict(v=torch.randn(1, 8, 2, 16, dtype=torch.float64)), TypeError, "v: dtype"),
    (dict(k=torch.randn(1, 8, 2, 16).half()), TypeError, "k: dtype torch.float16 differs"),
    (dict(q=torch.randn(8, 4, 16)), ValueError, "q: expected 4 dims"),
    (dict(k=torch.randn(1, 8, 2, 16, device="meta"), v=torch.randn(1, 8, 2, 16, device="meta")), ValueError,
     "k: is on meta"),
    (dict(q=torch.randn(1, 8, 4, 15), k=torch.randn(1, 8, 2, 15), v=torch.randn(1, 8, 2, 15)), ValueError, "even"),
    (dict(q=[1.0]), TypeError, "q: expected a torch.Tensor"),
])
def test_bad_inputs_name_the_argument(change, error, words):
    with pytest.raises(error, match=None) as info:
        llama_kernels.rope_attention(**_bad(**change))
    assert words in str(info.value)


@pytest.mark.parametrize("kwargs,words", [
    (dict(dropout_p=1.0), "dropout_p"),
    (dict(softmax_scale=float("nan")), "softmax_scale"),
    (dict(causal=1), "causal"),
    (dict(max_seqlen=8), "max_seqlen"),
    (dict(cu_seqlens=torch.tensor([0, 8])), "cu_seqlens"),
])
def test_bad_options_name_the_argument(kwargs, words):
    args = _bad()
    if "cu_seqlens" in kwargs:
        args = {n: (t[0] if n in "qkv" else t) for n, t in args.items()}
    with pytest.raises((ValueError, TypeError)) as info:
        llama_kernels.rope_attention(**args, **kwargs)
    assert words in str(info.value)


def test_forced_backend_that_cannot_take_fp32_raises():
    with llama_kernels.use_backend("triton"), pytest.raises(RuntimeError, match="fp32 reference|float32"):
        llama_kernels.rope_attention(**_bad())


# ----------------------------------------------------------------------------- decode
def _decode_inputs(batch, heads, kv_heads, head_dim, capacity, lengths, dtype=F16):
    q = torch.randn(batch, 1, heads, head_dim).to(dtype)
    k_new = torch.randn(batch, 1, kv_heads, head_dim).to(dtype)
    v_new = torch.randn(batch, 1, kv_heads, head_dim).to(dtype)
    k_cache = torch.randn(batch, capacity, kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(batch, capacity, kv_heads, head_dim).to(dtype)
    return q, k_new, v_new, k_cache, v_cache, torch.tensor(lengths)


@needs_triton
@pytest.mark.parametrize("heads,kv_heads,head_dim,lengths,capacity", [
    (4, 4, 32, [0, 37, 99], 100),     # an empty cache, a ragged one, a full one
    (8, 4, 64, [1, 70], 77),           # GQA 2
    (8, 1, 32, [50, 3, 16, 0], 64),    # GQA 8
])
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_matches_reference(heads, kv_heads, head_dim, lengths, capacity, splits):
    tri = _tri_decode()
    q, k_new, v_new, k_cache, v_cache, seqlens = _decode_inputs(len(lengths), heads, kv_heads, head_dim, capacity, lengths)
    cos, sin = tables(capacity + 3, head_dim)
    ref_k, ref_v = k_cache.double(), v_cache.double()
    expect = rope_decode_attention_reference(q.double(), k_new.double(), v_new.double(), ref_k, ref_v, seqlens, cos, sin)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    out = poisoned(q.shape, F16)
    tri.decode(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, out, 1 / math.sqrt(head_dim), splits)
    assert_close(out, expect, F16)
    rows = torch.arange(len(lengths))
    assert_close(k_cache[rows, seqlens], ref_k[rows, seqlens], F16)
    assert torch.equal(v_cache[rows, seqlens], v_new[:, 0])
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    written[rows, seqlens] = True
    assert torch.equal(k_cache[~written], before_k[~written]) and torch.equal(v_cache[~written], before_v[~written])


@needs_triton
def test_decode_public_op_and_length_checks():
    q, k_new, v_new, k_cache, v_cache, seqlens = _decode_inputs(2, 4, 2, 32, 40, [5, 39])
    cos, sin = tables(40, 32)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    expect = rope_decode_attention_reference(q, k_new, v_new, ref_k, ref_v, seqlens, cos, sin)
    with llama_kernels.use_backend("triton"):
        out = llama_kernels.rope_decode_attention(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin)
        assert_close(out, expect, F16)
        with pytest.raises(ValueError, match=r"cache_seqlens: lengths must be in \[0, 39\]"):
            llama_kernels.rope_decode_attention(q, k_new, v_new, k_cache, v_cache, torch.tensor([5, 40]), cos, sin)
        # Unchecked, an out-of-range length gives NaN for that sequence and writes nothing.
        before = k_cache.clone()
        out = llama_kernels.rope_decode_attention(q, k_new, v_new, k_cache, v_cache, torch.tensor([5, 40]), cos, sin,
                                            check_bounds=False)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()
    assert torch.equal(k_cache[1], before[1])


needs_cpu_kernel = pytest.mark.skipif(dispatch.unavailable("cpu", torch.device("cpu")) is not None,
                                      reason="needs llama_kernels._C")


ISAS = dispatch.capabilities().ext.cpu_isas() if dispatch.capabilities().ext is not None else []


@pytest.fixture(params=ISAS)
def isa(request):
    """Each instruction set this build has and this CPU runs."""
    ext = dispatch.ext()
    ext.set_cpu_isa(request.param)
    yield request.param
    ext.set_cpu_isa("")


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim,lengths,capacity", [
    (4, 4, 64, [0, 37, 99], 100),
    (8, 2, 32, [1, 70, 5], 77),
    (8, 1, 128, [300, 0], 301),
    (4, 2, 40, [5, 40], 41),  # a head dim past the last whole 16-lane vector
])
@pytest.mark.parametrize("seq_dtype", [torch.int64, torch.int32], ids=str)
def test_decode_cpu_kernel_matches_reference(isa, dtype, heads, kv_heads, head_dim, lengths, capacity, seq_dtype):
    """The C++ decode kernel (the CPU default) against fp64, outputs poisoned, cache checked."""
    q, k_new, v_new, k_cache, v_cache, seqlens = _decode_inputs(len(lengths), heads, kv_heads, head_dim, capacity,
                                                                lengths, dtype)
    seqlens = seqlens.to(seq_dtype)
    cos, sin = tables(capacity + 2, head_dim)
    ref_k, ref_v = k_cache.double(), v_cache.double()
    expect = rope_decode_attention_reference(q.double(), k_new.double(), v_new.double(), ref_k, ref_v, seqlens, cos, sin)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    out = poisoned(q.shape, dtype)
    cpu_decode.decode(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, out, 1 / math.sqrt(head_dim))
    assert_close(out, expect, dtype)
    rows = torch.arange(len(lengths))
    assert_close(k_cache[rows, seqlens.long()], ref_k[rows, seqlens.long()], dtype)
    assert torch.equal(v_cache[rows, seqlens.long()], v_new[:, 0])
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    written[rows, seqlens.long()] = True
    assert torch.equal(k_cache[~written], before_k[~written]) and torch.equal(v_cache[~written], before_v[~written])
    # The public op takes the same kernel on CPU tensors.
    kc, vc = before_k.clone(), before_v.clone()
    again = llama_kernels.rope_decode_attention(q, k_new, v_new, kc, vc, seqlens, cos, sin)
    assert torch.equal(again, out) and torch.equal(kc, k_cache)


@needs_cpu_kernel
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim,lengths,capacity", [
    (4, 4, 64, [0, 37, 99], 100),
    (8, 2, 40, [5, 40], 41),  # a head dim past the last whole 16-lane vector
])
def test_decode_cpu_kernel_16_bit_cache_under_fp32_q(isa, cache_dtype, heads, kv_heads, head_dim, lengths, capacity):
    """fp32 q with a 16-bit cache (generation's CPU default): the new key and value are written
    rounded to the cache's dtype, and attention reads the cache in fp32, as the reference does
    with the same rounded cache; the public op takes the same kernel."""
    q, k_new, v_new, k_cache, v_cache, seqlens = _decode_inputs(len(lengths), heads, kv_heads, head_dim, capacity,
                                                                lengths, torch.float32)
    k_cache, v_cache = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    cos, sin = tables(capacity + 2, head_dim)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    expect = rope_decode_attention_reference(q, k_new, v_new, ref_k, ref_v, seqlens, cos, sin)
    before_k = k_cache.clone()
    out = poisoned(q.shape, torch.float32)
    cpu_decode.decode(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, out, 1 / math.sqrt(head_dim))
    rows = torch.arange(len(lengths))
    assert torch.equal(v_cache[rows, seqlens], v_new[:, 0].to(cache_dtype))  # rounded once, as written
    torch.testing.assert_close(k_cache[rows, seqlens].float(), ref_k[rows, seqlens].float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out, expect, atol=2e-2 if cache_dtype == torch.bfloat16 else 2e-3, rtol=1e-2)
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    written[rows, seqlens] = True
    assert torch.equal(k_cache[~written], before_k[~written])
    kc, vc = before_k.clone(), v_cache.clone()
    again = llama_kernels.rope_decode_attention(q, k_new, v_new, kc, vc, seqlens, cos, sin)
    assert torch.equal(again, out)
    with pytest.raises(TypeError, match="k_cache: dtype torch.float16 differs from q's torch.bfloat16"):
        llama_kernels.rope_decode_attention(q.bfloat16(), k_new.bfloat16(), v_new.bfloat16(), kc.half(), vc.half(),
                                            seqlens, cos, sin)
    with pytest.raises(TypeError, match="v_cache: dtype"):
        llama_kernels.rope_decode_attention(q, k_new, v_new, kc, vc.float(), seqlens, cos, sin)


@needs_cpu_kernel
@pytest.mark.parametrize("sharpness", [8.0, 200.0])
def test_decode_cpu_kernel_peaked_softmax(isa, sharpness):
    """Large scores (weights from 1 down to underflow, past e^-87) through the kernel's vector exp."""
    q, k_new, v_new, k_cache, v_cache, seqlens = _decode_inputs(1, 4, 4, 64, 90, [85], torch.float32)
    q = q * sharpness
    cos, sin = tables(92, 64)
    expect = rope_decode_attention_reference(q.double(), k_new.double(), v_new.double(), k_cache.double(),
                                             v_cache.double(), seqlens, cos, sin)
    out = poisoned(q.shape, torch.float32)
    cpu_decode.decode(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, out, 1 / 8)
    torch.testing.assert_close(out.double(), expect, atol=1e-5 * sharpness, rtol=1e-4)


@needs_cpu_kernel
def test_decode_cpu_kernel_out_of_range_gives_nan_and_no_write():
    q, k_new, v_new, k_cache, v_cache, _ = _decode_inputs(3, 4, 2, 16, 12, [0, 0, 0], torch.float32)
    cos, sin = tables(10, 16)  # shorter than the cache: length 10 is in the cache but not the tables
    seqlens = torch.tensor([3, 10, -1])
    before = k_cache.clone()
    out = llama_kernels.rope_decode_attention(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, check_bounds=False)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1:]).all()
    assert torch.equal(k_cache[1:], before[1:])


@pytest.mark.parametrize("name,value,words", [
    ("q", torch.randn(2, 2, 4, 16), "one new token"),
    ("k_new", torch.randn(2, 1, 3, 16), "k_new: expected shape (2, 1, 2, 16)"),
    ("k_cache", torch.randn(2, 12, 3, 16), "multiple of the cache's 3"),
    ("v_cache", torch.randn(2, 11, 2, 16), "v_cache: shape"),
    ("cache_seqlens", torch.tensor([0.0, 1.0]), "cache_seqlens: expected an int32 or int64"),
    ("cos", torch.randn(12, 5), "cos: expected shape (positions, 8)"),
    ("v_new", torch.randn(2, 1, 2, 16).half(), "v_new: dtype"),
])
def test_decode_bad_inputs_name_the_argument(name, value, words):
    q, k_new, v_new, k_cache, v_cache, seqlens = _decode_inputs(2, 4, 2, 16, 12, [0, 3], torch.float32)
    cos, sin = tables(12, 16)
    args = dict(q=q, k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache, cache_seqlens=seqlens, cos=cos, sin=sin)
    args[name] = value
    if name == "k_cache":
        args["v_cache"] = torch.randn(2, 12, 3, 16)
        args["k_new"], args["v_new"] = torch.randn(2, 1, 3, 16), torch.randn(2, 1, 3, 16)
    with pytest.raises((ValueError, TypeError)) as info:
        llama_kernels.rope_decode_attention(**args)
    assert words in str(info.value)


def test_decode_splits_fill_the_gpu_but_not_past_the_cache():
    tri = _tri_decode()
    assert tri.decode_splits(1, 16, 8192, 132) == 33  # 16 * 33 programs: four per multiprocessor
    assert tri.decode_splits(8, 32, 8192, 132) == 3
    assert tri.decode_splits(1, 16, 100, 132) == 1  # a short cache is not cut into slivers


# ----------------------------------------------------------------------------- in the model
@needs_triton
def test_model_on_the_fused_kernels_matches_the_reference_path(monkeypatch):
    """A tiny fp16 LLaMA: full forward (rope_attention) and a decode step (rope_decode_attention)
    through the Triton kernels agree with the reference path."""
    import types

    from llama.config import ModelConfig
    from llama.model import KVCache, build

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=64)
    model = build(cfg, dtype=F16).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 21))
    with torch.no_grad():
        expect = model(tokens).float()
    # Only the attention ops take Triton (the other ops have no CPU Triton path to force).
    shim = types.SimpleNamespace(**{n: getattr(dispatch, n) for n in dir(dispatch) if not n.startswith("__")})
    chosen = []
    shim.choose = lambda op, *a, **k: chosen.append(op) or "triton"
    monkeypatch.setattr(mod, "dispatch", shim)
    with torch.no_grad():
        got = model(tokens).float()
        cache = KVCache.allocate(cfg, 2, 32, dtype=F16)
        first = model(tokens[:, :12], cache=cache).float()  # empty cache: the fused training op
        assert not cache.empty
        second = model(tokens[:, 12:20], cache=cache).float()  # continued: masked attention over the cache
        step = model(tokens[:, 20:], cache=cache, last_only=True).float()  # decode op
    assert set(chosen) == {"rope_attention", "rope_decode_attention"}
    torch.testing.assert_close(got, expect, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(torch.cat([first, second], 1), expect[:, :20], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(step, expect[:, -1], atol=2e-2, rtol=2e-2)
    assert cache.seqlens.tolist() == [21, 21]
    cache.reset()
    assert cache.empty and cache.seqlens.tolist() == [0, 0]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_empty_inputs(backend):
    """No batch, no tokens, no packed tokens, no sequences to decode: empty results, no launch."""
    cos, sin = tables(8, 32)
    with llama_kernels.use_backend(backend):
        for shape in [(0, 5, 4, 32), (2, 0, 4, 32)]:
            q, k, v = (t.requires_grad_() for t in qkv(shape, 2, F16))
            out = llama_kernels.rope_attention(q, k, v, cos, sin)
            out.sum().backward()
            assert out.shape == shape and q.grad.shape == shape and k.grad.shape == k.shape
        q, k, v = qkv((0, 4, 32), 2, F16)
        assert llama_kernels.rope_attention(q, k, v, cos, sin, cu_seqlens=cu_from_lengths([0, 0])).shape == (0, 4, 32)
        q, k, v = qkv((0, 1, 4, 32), 2, F16)
        cache = torch.zeros(0, 8, 2, 32, dtype=F16)
        out = llama_kernels.rope_decode_attention(q, k, v, cache, cache.clone(), torch.zeros(0, dtype=torch.long), cos, sin)
        assert out.shape == (0, 1, 4, 32)


@needs_triton
def test_kernels_compile_for_hopper():
    """The GPU compiler (Triton's pipeline for sm_90a, no GPU needed) accepts every kernel variant
    (attention, RMSNorm, int4): the interpreter behind the other CPU tests lets through code it
    rejects."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(root / "tests" / "compile_triton_sm90.py")], env=env,
                         capture_output=True, text=True, timeout=900)
    report = run.stdout + run.stderr[-3000:]
    assert run.returncode == 0, report
    assert report.count("ok ") >= 37, report  # attention 13, RMSNorm 16, int4 8


@needs_cpu_kernel
def test_decode_takes_strided_lengths():
    q, k_new, v_new, k_cache, v_cache, _ = _decode_inputs(2, 4, 2, 16, 12, [0, 0], torch.float32)
    cos, sin = tables(12, 16)
    lengths = torch.tensor([3, 99, 7, 99])[::2]  # a strided view: 3 and 7
    kc, vc = k_cache.clone(), v_cache.clone()
    out = llama_kernels.rope_decode_attention(q, k_new, v_new, k_cache, v_cache, lengths, cos, sin)
    expect = rope_decode_attention_reference(q, k_new, v_new, kc, vc, lengths.contiguous(), cos, sin)
    assert_close(out, expect, torch.float32)
