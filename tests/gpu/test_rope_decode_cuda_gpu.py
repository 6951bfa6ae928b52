"""The CUDA decode kernel (csrc/cuda/rope_decode.cu) called directly through
llama_kernels.cuda.rope_decode.decode: RoPE on q and k_new, the append to the cache and split-K
attention against an fp32 reference written here. Ragged lengths (0, 1, near capacity), GQA
groups of 1 to 24 heads, every head dim, both dtypes, two cache layouts, unaligned inputs, split
counts with empty splits; poisoned outputs and cache slots; determinism; CUDA-graph replay with
lengths that change between replays; out-of-range lengths; argument errors."""
import math

import pytest
import torch

from llama_kernels import dispatch
from llama_kernels.cuda import rope_decode as rdc

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # abs and rel, on O(1) outputs
NAN = float("nan")


def _tables(positions, head_dim, pad=0):
    """RoPE tables (positions, D/2) fp32; pad > 0 gives them a row stride of D/2 + pad."""
    inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.arange(positions, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = ang.cos().float().cuda(), ang.sin().float().cuda()
    if pad:
        wide = torch.zeros(2, positions, head_dim // 2 + pad, device="cuda")
        wide[0, :, : head_dim // 2], wide[1, :, : head_dim // 2] = cos, sin
        cos, sin = wide[0, :, : head_dim // 2], wide[1, :, : head_dim // 2]
    return cos, sin


def _rotate(x, c, s):
    """Half-split RoPE in fp32, in the reference's operation order."""
    half = x.shape[-1] // 2
    x = x.float()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def _reference(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, scale):
    """(out fp32 (B, 1, H, D), NaN rows for lengths out of range; expected k_cache; expected v_cache)."""
    batch, _, heads, _ = q.shape
    capacity, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    kc, vc = k_cache.clone(), v_cache.clone()
    out = torch.full(q.shape, NAN, dtype=torch.float32, device=q.device)
    limit = min(capacity, cos.shape[0])
    for b in range(batch):
        n = int(seqlens[b])
        if not 0 <= n < limit:
            continue
        c, s = cos[n], sin[n]
        qr = _rotate(q[b, 0], c, s).double()  # (H, D)
        kc[b, n] = _rotate(k_new[b, 0], c, s).to(kc.dtype)  # what the cache holds from now on
        vc[b, n] = v_new[b, 0]
        keys = kc[b, : n + 1].double().repeat_interleave(group, dim=1)  # (n + 1, H, D)
        values = vc[b, : n + 1].double().repeat_interleave(group, dim=1)
        p = torch.softmax(torch.einsum("hd,shd->hs", qr, keys) * scale, dim=-1)
        out[b, 0] = torch.einsum("hs,shd->hd", p, values).float()
    return out, kc, vc


def _bits(t):
    return t.view(torch.int16)


def _cache(batch, capacity, kv_heads, head_dim, dtype, layout):
    if layout == "bhsd":  # head-major storage seen as (B, capacity, Hkv, D)
        return torch.randn(batch, kv_heads, capacity, head_dim, device="cuda").to(dtype).transpose(1, 2)
    return torch.randn(batch, capacity, kv_heads, head_dim, device="cuda").to(dtype)


def _unaligned(shape, dtype):
    """A contiguous tensor whose data pointer is 2 bytes past a 16-byte boundary (the scalar path)."""
    flat = torch.randn(math.prod(shape) + 1, device="cuda").to(dtype)
    return flat[1:].view(shape)


def _inputs(batch, heads, kv_heads, head_dim, capacity, dtype, layout="bshd", inputs="packed", table_pad=0,
            positions=None):
    if inputs == "unaligned":
        q = _unaligned((batch, 1, heads, head_dim), dtype)
        k_new = _unaligned((batch, 1, kv_heads, head_dim), dtype)
        v_new = _unaligned((batch, 1, kv_heads, head_dim), dtype)
    else:  # views of one fused projection output, as the model produces them
        qkv = torch.randn(batch, 1, heads + 2 * kv_heads, head_dim, device="cuda").to(dtype)
        q, k_new, v_new = qkv.split([heads, kv_heads, kv_heads], dim=2)
    k_cache = _cache(batch, capacity, kv_heads, head_dim, dtype, layout)
    v_cache = _cache(batch, capacity, kv_heads, head_dim, dtype, layout)
    cos, sin = _tables(positions or capacity, head_dim, table_pad)
    return q, k_new, v_new, k_cache, v_cache, cos, sin


def _poison_after(cache, seqlens):
    """NaN in every slot from L_b on: a kernel that reads a slot it must not read gives NaN."""
    for b, n in enumerate(seqlens.tolist()):
        if n >= 0:
            cache[b, n:] = NAN


def _run_and_check(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, scale, splits):
    _poison_after(k_cache, seqlens)
    _poison_after(v_cache, seqlens)
    want, kc_want, vc_want = _reference(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, scale)
    out = torch.full_like(q, NAN)
    rdc.decode(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, out, scale, splits)
    torch.cuda.synchronize()
    tol = TOL[q.dtype]
    valid = ~want.isnan()
    assert torch.equal(out.isnan(), ~valid), "NaN where a length is valid, or a number where it is not"
    torch.testing.assert_close(out.float()[valid], want[valid], atol=tol, rtol=tol)
    eps = torch.finfo(q.dtype).eps
    for cache, expect in ((k_cache, kc_want), (v_cache, vc_want)):
        changed = ~torch.eq(_bits(cache), _bits(expect)).all(dim=-1)  # (B, capacity, Hkv)
        for b, n in enumerate(seqlens.tolist()):
            if 0 <= n < min(k_cache.shape[1], cos.shape[0]):
                # Slot n holds the rotated key (rounded once; 1 ulp of slack) and the value, exactly.
                torch.testing.assert_close(cache[b, n].float(), expect[b, n].float(), atol=1e-6, rtol=eps)
                if cache is v_cache:
                    assert torch.equal(_bits(cache[b, n]), _bits(expect[b, n]))
                changed[b, n] = False
        assert not changed.any(), "a cache slot other than L_b changed"
    return out


def _lengths(batch, capacity, gen):
    fixed = [0, 1, capacity - 1, capacity - 2, 15, 16, 17]
    rand = torch.randint(0, capacity, (batch,), generator=gen).tolist()
    return [fixed[i] if i < len(fixed) else rand[i] for i in range(batch)]


GROUPS = [(4, 4), (8, 4), (12, 4), (16, 2), (8, 1), (16, 1), (24, 1)]  # G = 1, 2, 3, 8, 8, 16, 24


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
@pytest.mark.parametrize("heads,kv_heads", GROUPS, ids=lambda v: str(v))
@pytest.mark.parametrize("splits", [1, 3, None, 40])
def test_matches_reference(splits, heads, kv_heads, head_dim, dtype):
    gen = torch.Generator().manual_seed(heads * 1000 + head_dim + kv_heads)
    batch, capacity = 9, 300
    q, k_new, v_new, k_cache, v_cache, cos, sin = _inputs(batch, heads, kv_heads, head_dim, capacity, dtype)
    seqlens = torch.tensor(_lengths(batch, capacity, gen), dtype=torch.int32, device="cuda")
    _run_and_check(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, 1 / math.sqrt(head_dim), splits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("inputs", ["packed", "unaligned"])
@pytest.mark.parametrize("table_pad", [0, 3])
def test_layouts_and_scalar_paths(table_pad, inputs, layout, head_dim, dtype):
    """Head-major caches, q / k_new / v_new that are not 16-byte aligned (element-wise loads),
    tables with a row stride that is not a multiple of 4 floats, int64 lengths, another scale,
    and tables longer than the cache."""
    gen = torch.Generator().manual_seed(7)
    batch, heads, kv_heads, capacity = 5, 8, 2, 200
    q, k_new, v_new, k_cache, v_cache, cos, sin = _inputs(batch, heads, kv_heads, head_dim, capacity, dtype, layout,
                                                          inputs, table_pad, positions=capacity + 50)
    seqlens = torch.tensor(_lengths(batch, capacity, gen), dtype=torch.int64, device="cuda")
    _run_and_check(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, 0.3, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (32, 32), (16, 2)], ids=str)
def test_long_context(heads, kv_heads, dtype):
    batch, head_dim, capacity = 2, 128, 9000
    q, k_new, v_new, k_cache, v_cache, cos, sin = _inputs(batch, heads, kv_heads, head_dim, capacity, dtype)
    seqlens = torch.tensor([8999, 4097], dtype=torch.int32, device="cuda")
    for splits in (1, None):
        _run_and_check(q, k_new, v_new, k_cache.clone(), v_cache.clone(), seqlens, cos, sin,
                       1 / math.sqrt(head_dim), splits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_and_split_counts_agree(dtype):
    batch, heads, kv_heads, head_dim, capacity = 4, 32, 8, 128, 2048
    q, k_new, v_new, k_cache, v_cache, cos, sin = _inputs(batch, heads, kv_heads, head_dim, capacity, dtype)
    seqlens = torch.tensor([2047, 0, 1000, 33], dtype=torch.int32, device="cuda")

    def run(splits):
        out = torch.full_like(q, NAN)
        kc, vc = k_cache.clone(), v_cache.clone()
        rdc.decode(q, k_new, v_new, kc, vc, seqlens, cos, sin, out, 1 / math.sqrt(head_dim), splits)
        return out, kc, vc

    first = run(None)
    for again, ref in zip(run(None), first):
        assert torch.equal(_bits(again), _bits(ref)), "two runs differ"
    tol = TOL[dtype]
    for splits in (1, 2, 16, 64):
        out, kc, vc = run(splits)
        torch.testing.assert_close(out.float(), first[0].float(), atol=tol, rtol=tol)
        assert torch.equal(_bits(kc), _bits(first[1])) and torch.equal(_bits(vc), _bits(first[2]))


@pytest.mark.parametrize("seq_dtype", [torch.int32, torch.int64], ids=str)
def test_in_a_cuda_graph_with_changing_lengths(seq_dtype):
    batch, heads, kv_heads, head_dim, capacity = 4, 16, 4, 128, 1024
    dtype, scale = torch.bfloat16, 1 / math.sqrt(128)
    q, k_new, v_new, k_cache, v_cache, cos, sin = _inputs(batch, heads, kv_heads, head_dim, capacity, dtype)
    seqlens = torch.tensor([3, 5, 7, 9], dtype=seq_dtype, device="cuda")
    out = torch.empty_like(q)
    splits = rdc.splits_for(batch, kv_heads, capacity, dispatch.sm_count(q.device), head_dim)
    assert splits > 1  # the merge kernel is in the graph too
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        rdc.decode(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, out, scale, splits)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rdc.decode(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, out, scale, splits)
    for lengths in ([0, 5, 1023, 300], [17, 1000, 0, 64], [512, 511, 2, 1023], [1, 1, 1, 1]):
        seqlens.copy_(torch.tensor(lengths, dtype=seq_dtype))
        for t in (q, k_new, v_new):
            t.copy_(torch.randn(t.shape, device="cuda").to(dtype))
        want, kc_want, vc_want = _reference(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, scale)
        out.fill_(NAN)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), want, atol=TOL[dtype], rtol=TOL[dtype])
        assert torch.equal(_bits(v_cache), _bits(vc_want))
        torch.testing.assert_close(k_cache.float(), kc_want.float(), atol=1e-6, rtol=torch.finfo(dtype).eps)


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("seq_dtype", [torch.int32, torch.int64], ids=str)
def test_out_of_range_length_gives_nan_and_no_cache_write(seq_dtype, splits):
    batch, heads, kv_heads, head_dim, capacity, positions = 5, 8, 2, 64, 64, 48
    dtype = torch.float16
    q, k_new, v_new, k_cache, v_cache, cos, sin = _inputs(batch, heads, kv_heads, head_dim, capacity, dtype,
                                                          positions=positions)
    lengths = [capacity, -1, 10, positions, 47]  # 47 is the last position both the cache and tables have
    if seq_dtype == torch.int64:
        lengths[0] = 2**40  # must not wrap to a valid 32-bit length
    seqlens = torch.tensor(lengths, dtype=seq_dtype, device="cuda")
    out = _run_and_check(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, 0.125, splits)
    assert out[[0, 1, 3]].isnan().all() and not out[[2, 4]].isnan().any()


def test_errors_name_the_argument():
    batch, heads, kv_heads, head_dim, capacity = 2, 8, 2, 64, 32
    dtype = torch.bfloat16
    q, k_new, v_new, k_cache, v_cache, cos, sin = _inputs(batch, heads, kv_heads, head_dim, capacity, dtype)
    seqlens = torch.tensor([3, 4], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    fn = dispatch.ext().rope_decode_attention_cuda

    def call(splits=1, workspace=True, **change):
        """The entry point on these tensors, with `change` (name -> tensor or None) replacing some."""
        ws = torch.empty(rdc.workspace_elems(batch, heads, head_dim, splits), dtype=torch.float32, device="cuda")
        args = rdc.entry_args(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, out, ws if workspace else None,
                              0.125, splits)
        assert set(change) <= set(args)
        scalars = ("softmax_scale", "splits", "stream")
        args.update({name: v if name in scalars else dispatch.tensor_arg(v, name) for name, v in change.items()})
        dispatch.cuda_call(fn, **args)

    def cuda(*shape, dtype=dtype):
        return torch.zeros(*shape, dtype=dtype, device="cuda")

    call()  # the unchanged call is fine
    with pytest.raises(ValueError, match="head_dim: the CUDA decode attention takes 32, 64, 128 or 256, got 48"):
        call(q=cuda(batch, 1, heads, 48))
    with pytest.raises(ValueError, match="kv_heads: 3 must be positive and divide heads = 8"):
        call(k_cache=cuda(batch, capacity, 3, head_dim))
    with pytest.raises(ValueError, match="q: the CUDA decode attention takes float16 or bfloat16, got float32"):
        call(q=q.float())
    with pytest.raises(ValueError, match="q: a CPU tensor"):
        call(q=q.cpu())
    with pytest.raises(ValueError, match="k_new: a CPU tensor"):
        call(k_new=k_new.cpu())
    with pytest.raises(ValueError, match=r"v_new: expected shape \(2, 1, 2, 64\)"):
        call(v_new=cuda(batch, 1, heads, head_dim))
    with pytest.raises(ValueError, match="out: dtype float16 must match q"):
        call(out=out.half())
    with pytest.raises(ValueError, match="out: required"):
        call(out=None)
    with pytest.raises(ValueError, match="seqlens: expected int32 or int64, got float32"):
        call(seqlens=seqlens.float())
    flat = cuda(k_cache.numel() + 8)
    with pytest.raises(ValueError, match="k_cache: must be 16-byte aligned"):
        shifted = flat[1: 1 + k_cache.numel()].view(k_cache.shape)
        call(k_cache=shifted, v_cache=shifted)
    with pytest.raises(ValueError, match="k_cache: strides must be multiples of 8"):
        wide = cuda(batch, capacity, kv_heads, head_dim + 4)[..., :head_dim]
        call(k_cache=wide, v_cache=wide)
    with pytest.raises(ValueError, match="v_cache: strides .* must be k_cache's"):
        call(v_cache=cuda(batch, kv_heads, capacity, head_dim).transpose(1, 2))
    with pytest.raises(ValueError, match="workspace: needs"):
        call(splits=2, workspace=False)
    with pytest.raises(ValueError, match="splits: expected 1..65535"):
        call(splits=0)
    with pytest.raises(ValueError, match="cos: row stride 3 is shorter than head_dim / 2 = 32"):
        call(cos=cos.as_strided(cos.shape, (3, 1)), sin=sin.as_strided(sin.shape, (3, 1)))
    with pytest.raises(ValueError, match="softmax_scale: must be finite"):
        call(softmax_scale=float("inf"))
    assert fn(**{**rdc.entry_args(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, out, None, 0.125, 1),
                 "q": dispatch.tensor_arg(cuda(batch, 1, heads, 65), "q")}) \
        .startswith("ValueError: head_dim:")  # returned, never thrown
