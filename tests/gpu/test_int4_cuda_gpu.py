"""The CUDA int4/NF4 kernels: the tensor-core small-M kernel (split K or not), the dequantize
kernel behind the large-M path, dispatch, errors, autograd and CUDA-graph capture."""
import functools

import pytest
import torch

import llama_kernels
from llama_kernels import dequantize, dispatch, quantize_int4, quantize_nf4
from llama_kernels.cuda import int4_matmul as cuda_int4
from llama_kernels.cuda.int4_matmul import cuda_iterations, cuda_splits
from llama_kernels.ops import int4_matmul as mod

pytestmark = pytest.mark.gpu

# (N, K): LLaMA projections, and ragged ones: N not a multiple of the 16-row tile, K = 65 chunks
# (the last iteration of 4 chunks is partial), and a tiny one.
SHAPES = [(4096, 4096), (2048, 5504), (5504, 2048), (1000, 2080), (37, 96)]
MS = [1, 3, 8, 9, 16, 17, 40, 64, 65, 300]
REL_ERR = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.bfloat16, torch.float16]


@functools.lru_cache(maxsize=None)
def _weight(fmt, n, k, g):
    gen = torch.Generator(device="cuda").manual_seed(n * 7 + k + g)
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
    qw = quantize_int4(w, g) if fmt == "int4" else quantize_nf4(w, g, double_quant=fmt == "nf4-dq")
    return qw, dequantize(qw)


def _rel_err(y, ref):
    assert torch.isfinite(y).all(), "non-finite output (an element left unwritten?)"
    return ((y.float() - ref).abs().mean() / ref.abs().mean()).item()


def _cuda(x, qw, lut=None):
    y = torch.full((x.shape[0], qw.shape[0]), float("nan"), dtype=x.dtype, device="cuda")
    mod.BACKENDS["cuda"](x, qw.packed, qw.scales, qw.zeros, qw.lut if lut is None else lut, qw.group_size, y)
    return y


def _group(k):
    return 128 if k % 128 == 0 else 32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["int4", "nf4"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("m", MS)
def test_matches_reference(m, shape, fmt, dtype):
    n, k = shape
    qw, w = _weight(fmt, n, k, _group(k))
    x = torch.randn(m, k, device="cuda").to(dtype)
    assert _rel_err(_cuda(x, qw), x.float() @ w.t()) < REL_ERR[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["int4", "nf4", "nf4-dq"])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 16])
def test_every_group_size(m, g, fmt, dtype):
    qw, w = _weight(fmt, 2048, 5504 if g != 128 else 4096, g)
    x = torch.randn(m, qw.shape[1], device="cuda").to(dtype)
    assert _rel_err(_cuda(x, qw), x.float() @ w.t()) < REL_ERR[dtype]


@pytest.mark.parametrize("m", [1, 12, 100])
def test_table_path_with_zeros(m):
    """An int4 weight given a copy of its table takes the lookup path (with zeros) instead of
    the bit tricks; both must agree with the reference."""
    qw, w = _weight("int4", 1000, 2080, 32)
    x = torch.randn(m, 2080, device="cuda", dtype=torch.float16)
    assert _rel_err(_cuda(x, qw, lut=qw.lut.clone()), x.float() @ w.t()) < REL_ERR[torch.float16]


@pytest.mark.parametrize("shape", [(64, 8192), (4096, 4096), (37, 96)], ids=str)
@pytest.mark.parametrize("m", [1, 16])
def test_split_k_is_deterministic_and_matches_one_split(m, shape):
    n, k = shape
    qw, w = _weight("int4", n, k, _group(k))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ext = dispatch.ext()
    iters = cuda_iterations(k)

    def run(splits):
        y = torch.full((m, n), float("nan"), dtype=x.dtype, device="cuda")
        ws = torch.empty(splits * m * n, dtype=torch.float32, device="cuda")
        arg = dispatch.tensor_arg
        dispatch.cuda_call(ext.int4_matmul_cuda, arg(x, "x"), arg(qw.packed, "qw.packed"), arg(qw.scales, "qw.scales"),
                           arg(qw.zeros, "qw.zeros"), arg(qw.lut, "qw.lut"), arg(y, "y"), arg(ws, "workspace"),
                           qw.group_size, True, splits, torch.cuda.current_stream().cuda_stream)
        return y

    one, most = run(1), run(iters)
    assert torch.equal(most, run(iters))
    torch.testing.assert_close(most.float(), one.float(), rtol=1e-2, atol=1e-2 * one.float().abs().max().item())
    assert _rel_err(most, x.float() @ w.t()) < REL_ERR[torch.bfloat16]
    assert cuda_splits(n, k, torch.cuda.get_device_properties(0).multi_processor_count) <= iters


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", ["int4", "nf4"])
def test_dequantize_kernel(fmt, dtype):
    qw, w = _weight(fmt, 1000, 2080, 32)
    got = cuda_int4.dequantize(qw.packed, qw.scales, qw.zeros, qw.lut, qw.group_size, dtype)
    eps = torch.finfo(dtype).eps
    # The kernel works in the output dtype: the fp16 scale and zero (and the NF4 table value) are
    # rounded to it first, then (q - 8) * scale + zero is rounded once. Bound per element:
    # eps * (|w| + 8 |scale| + |zero|), which for bf16 stays below 1/32 of a quantization step.
    g = qw.group_size
    s = qw.scales.float().repeat_interleave(g, dim=1)
    z = qw.zeros.float().repeat_interleave(g, dim=1) if qw.zeros is not None else torch.zeros_like(s)
    bound = eps * (w.abs() + 8 * s + z.abs()) + 1e-7
    assert ((got.float() - w).abs() <= bound).all()


def test_errors_name_the_argument():
    qw, _ = _weight("int4", 256, 256, 128)
    ext, arg = dispatch.ext(), dispatch.tensor_arg
    stream = torch.cuda.current_stream().cuda_stream

    def call(x2, splits=1):
        y = torch.empty(x2.shape[0], 256, dtype=x2.dtype, device="cuda")
        dispatch.cuda_call(ext.int4_matmul_cuda, arg(x2, "x"), arg(qw.packed, "qw.packed"), arg(qw.scales, "qw.scales"),
                           arg(qw.zeros, "qw.zeros"), arg(qw.lut, "qw.lut"), arg(y, "y"), arg(None, "workspace"),
                           128, True, splits, stream)

    x = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="x: the CUDA int4 kernel takes at most 16 rows"):
        call(x[:17])
    with pytest.raises(ValueError, match="x: rows must start 16-byte aligned"):
        call(x.as_strided((2, 256), (255, 1)))
    with pytest.raises(ValueError, match="x: rows must start 16-byte aligned"):
        call(x.view(-1)[1:1 + 2 * 256].view(2, 256))
    with pytest.raises(ValueError, match="x: the CUDA int4 kernels take float16 or bfloat16"):
        call(x.float()[:1])
    with pytest.raises(ValueError, match="workspace: needs"):
        call(x[:1], splits=2)
    with pytest.raises(ValueError, match="x: a CPU tensor"):
        call(x[:1].cpu())
    with pytest.raises(ValueError, match=r"y: expected shape \(1, 256\)"):
        dispatch.cuda_call(ext.int4_matmul_cuda, arg(x[:1], "x"), arg(qw.packed, "qw.packed"),
                           arg(qw.scales, "qw.scales"), arg(qw.zeros, "qw.zeros"), arg(qw.lut, "qw.lut"),
                           arg(torch.empty(1, 128, dtype=x.dtype, device="cuda"), "y"), arg(None, "workspace"),
                           128, True, 1, stream)

def test_dispatch_by_dtype(monkeypatch, caplog):
    calls = []
    real = mod.BACKENDS["cuda"]
    monkeypatch.setitem(mod.BACKENDS, "cuda", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    monkeypatch.setattr(dispatch, "logged", set())
    qw, w = _weight("nf4", 4096, 4096, 64)
    x = torch.randn(2, 5, 4096, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        y = llama_kernels.int4_matmul(x, qw)
    assert calls == [10] and y.shape == (2, 5, 4096) and y.dtype == torch.float16
    assert _rel_err(y.reshape(10, -1), x.reshape(10, -1).float() @ w.t()) < REL_ERR[torch.float16]
    with caplog.at_level("INFO", logger="llama_kernels"), torch.no_grad():
        llama_kernels.int4_matmul(x.float(), qw)  # fp32 activations go to Triton
        llama_kernels.int4_matmul(torch.randn(40, 4096, device="cuda", dtype=torch.float16), qw)  # so do 17..127 rows
        llama_kernels.int4_matmul(torch.randn(200, 4096, device="cuda", dtype=torch.float16), qw)  # dequantize + cuBLAS
    assert calls == [10, 200]
    assert any("using triton instead of cuda" in r.getMessage() for r in caplog.records)


def test_autograd_uses_the_cuda_dequantize():
    qw, w = _weight("int4", 2048, 5504, 128)
    x = torch.randn(4, 64, 5504, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = llama_kernels.int4_matmul(x, qw)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert _rel_err(y, x.detach().float() @ w.t()) < REL_ERR[torch.bfloat16]
    assert _rel_err(dx, dy.float() @ w) < REL_ERR[torch.bfloat16]


@pytest.mark.parametrize("m", [1, 5, 16, 200])
def test_in_a_cuda_graph(m):
    qw, w = _weight("int4", 2048, 5504, 128)
    x = torch.randn(m, 5504, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        llama_kernels.int4_matmul(x, qw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with llama_kernels.use_backend("cuda"), torch.no_grad(), torch.cuda.graph(graph):
        out = llama_kernels.int4_matmul(x, qw)
    first = x.float() @ w.t()
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel_err(out, x.float() @ w.t()) < REL_ERR[torch.bfloat16]
        assert _rel_err(out, first) > 0.5
