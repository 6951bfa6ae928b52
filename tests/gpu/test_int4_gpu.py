"""int4/NF4 matmul on a GPU: the Triton kernels at LLaMA sizes in bf16/fp16 (and fp32), both
kernels forced at decode sizes, dispatch, and CUDA-graph capture of the decode path."""
import functools

import pytest
import torch

import llama_kernels
from llama_kernels import dequantize, quantize_int4, quantize_nf4
from llama_kernels.ops import int4_matmul as mod

pytestmark = pytest.mark.gpu

# (N, K): LLaMA-7B-ish projections (4096x4096, 11008 -> 5504 halves) and their transposes.
SHAPES = [(4096, 4096), (5504, 2048), (2048, 5504)]
MS = [1, 16, 64, 256, 2048]
# Mean relative error bound: output rounding plus, on the GEMM, the weight rounded to x's dtype.
REL_ERR = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}


def _op():
    return llama_kernels.int4_matmul


def _tri():
    from llama_kernels.triton import int4_matmul as tri

    return tri


@functools.lru_cache(maxsize=None)
def _weight(fmt, n, k, g):
    gen = torch.Generator(device="cuda").manual_seed(n * 7 + k + g)
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
    qw = quantize_int4(w, g) if fmt == "int4" else quantize_nf4(w, g, double_quant=True)
    return qw, dequantize(qw)  # the fp32 (N, K) weight the codes stand for


def _rel_err(y, ref):
    assert torch.isfinite(y).all(), "non-finite output (an element left unwritten?)"
    return ((y.float() - ref).abs().mean() / ref.abs().mean()).item()


def _run(fn, x, qw):
    y = torch.full((x.shape[0], qw.shape[0]), float("nan"), dtype=x.dtype, device="cuda")
    fn(x, qw.packed, qw.scales, qw.zeros, qw.lut, qw.group_size, y)
    return y


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", ["int4", "nf4"])
@pytest.mark.parametrize("g", [128, 64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("m", MS)
def test_triton_matches_reference(m, shape, g, fmt, dtype):
    n, k = shape
    qw, w = _weight(fmt, n, k, g)
    x = torch.randn(m, k, device="cuda").to(dtype)
    y = _run(_tri().int4_matmul, x, qw)
    ref = x.float() @ w.t()
    assert _rel_err(y, ref) < REL_ERR[dtype]


@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize("fmt", ["int4", "nf4"])
def test_triton_fp32(m, fmt):
    qw, w = _weight(fmt, 4096, 4096, 128)
    x = torch.randn(m, 4096, device="cuda")
    y = _run(_tri().int4_matmul, x, qw)
    assert _rel_err(y, x @ w.t()) < REL_ERR[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("fmt", ["int4", "nf4"])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_both_kernels_at_decode_sizes(path, m, fmt, dtype):
    """Each kernel forced at row counts the dispatcher may give to the other; K split or not."""
    qw, w = _weight(fmt, 2048, 5504, 128)
    x = torch.randn(m, 5504, device="cuda").to(dtype)
    ref = x.float() @ w.t()
    for split in (None, 1):
        y = _run(lambda *a: getattr(_tri(), path)(*a, split=split), x, qw)
        assert _rel_err(y, ref) < REL_ERR[dtype]


def test_public_op_on_cuda_reaches_triton(monkeypatch):
    calls = []
    real = mod.BACKENDS["triton"]
    monkeypatch.setitem(mod.BACKENDS, "triton", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    qw, w = _weight("nf4", 4096, 4096, 64)
    x = torch.randn(2, 5, 4096, device="cuda", dtype=torch.bfloat16)
    with llama_kernels.use_backend("triton"), torch.no_grad():
        y = _op()(x, qw)
    assert calls == [10] and y.shape == (2, 5, 4096) and y.dtype == torch.bfloat16
    assert _rel_err(y.reshape(10, -1), x.reshape(10, -1).float() @ w.t()) < REL_ERR[torch.bfloat16]


def test_autograd_bf16():
    qw, w = _weight("int4", 2048, 5504, 128)
    x = torch.randn(4, 64, 5504, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with llama_kernels.use_backend("triton"):
        y = _op()(x, qw)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert _rel_err(y, x.detach().float() @ w.t()) < REL_ERR[torch.bfloat16]
    assert _rel_err(dx, dy.float() @ w) < REL_ERR[torch.bfloat16]


@pytest.mark.parametrize("m", [1, 4])
def test_decode_path_in_a_cuda_graph(m):
    """The small-M kernel (with its split-K workspace and reduction) captured and replayed."""
    qw, w = _weight("int4", 4096, 4096, 128)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    op = _op()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), llama_kernels.use_backend("triton"), torch.no_grad():
        for _ in range(2):  # compile outside the capture
            op(x, qw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with llama_kernels.use_backend("triton"), torch.no_grad(), torch.cuda.graph(graph):
        out = op(x, qw)
    first = x.float() @ w.t()
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        ref = x.float() @ w.t()
        assert _rel_err(out, ref) < REL_ERR[torch.bfloat16]
        assert _rel_err(out, first) > 0.5  # it really recomputed
