"""RMSNorm on a GPU: the CUDA and Triton kernels against the reference at full sizes, in bf16 too."""
import pytest
import torch

import llama_kernels
from llama_kernels import dispatch
from llama_kernels.cuda import rms_norm as cuda_rms_norm
from llama_kernels.ops import rms_norm as rms_mod
from tests.helpers import assert_close, poisoned

pytestmark = pytest.mark.gpu

# LLaMA widths (2048, 4096, 8192, 16384), FFN 5504, and ragged ones that defeat vector loads.
SHAPES = [(4096, 2048), (333, 4097), (1000, 8192), (64, 16384), (7, 5504), (5, 1000), (2, 40000)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _backends():
    return [b for b in ("cuda", "triton") if b in llama_kernels.available_backends("cuda")]


def _fits_cuda(x2, w):
    return cuda_rms_norm.unsupported(x2, w) is None


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("w_fp32", [False, True], ids=["w_same", "w_fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward(backend, dtype, w_fp32, shape):
    if backend not in _backends():
        pytest.fail(f"{backend} backend unavailable on this GPU machine: {llama_kernels.build_info()}")
    x = (3 * torch.randn(shape, device="cuda")).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], device="cuda")).to(torch.float32 if w_fp32 else dtype)
    if backend == "cuda" and not _fits_cuda(x, w):
        pytest.skip("longer than the CUDA kernel takes; the dispatcher sends it to Triton")
    y, rstd = poisoned(shape, dtype, "cuda"), poisoned(shape[:1], torch.float32, "cuda")
    rms_mod.FORWARD[backend](x, w, 1e-5, y, rstd)
    assert_close(y, llama_kernels.rms_norm_reference(x, w, 1e-5), dtype)

    dy = torch.randn(shape, device="cuda").to(dtype)
    dx, dw = poisoned(shape, dtype, "cuda"), poisoned(w.shape, w.dtype, "cuda")
    rms_mod.BACKWARD[backend](dy, x, w, rstd, dx, dw)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref_dx, ref_dw = torch.autograd.grad(llama_kernels.rms_norm_reference(x64, w64, 1e-5), (x64, w64), dy.double())
    assert_close(dx, ref_dx, dtype)
    assert_close(dw, ref_dw, w.dtype, scale=max(1.0, shape[0] ** 0.5))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_forward(backend, dtype, shape):
    """The fused residual add: s = x + h exactly as PyTorch rounds it, y its norm; with and
    without the 1/rms buffer (inference passes none)."""
    if backend not in _backends():
        pytest.fail(f"{backend} backend unavailable on this GPU machine: {llama_kernels.build_info()}")
    x = (3 * torch.randn(shape, device="cuda")).to(dtype)
    h = (2 * torch.randn(shape, device="cuda")).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], device="cuda")).to(dtype)
    if backend == "cuda" and not _fits_cuda(x, w):
        pytest.skip("longer than the CUDA kernel takes; the dispatcher sends it to Triton")
    ref_y, ref_s = llama_kernels.add_rms_norm_reference(x, h, w, 1e-5)
    rstd = poisoned(shape[:1], torch.float32, "cuda")
    for r in (rstd, None):
        y, s = poisoned(shape, dtype, "cuda"), poisoned(shape, dtype, "cuda")
        rms_mod.FORWARD[backend](x, w, 1e-5, y, r, h, s)
        assert torch.equal(s, ref_s)
        assert_close(y, ref_y, dtype)
    torch.testing.assert_close(rstd, torch.rsqrt(ref_s.float().pow(2).mean(-1) + 1e-5), atol=1e-6, rtol=1e-5)

    # The backward with the residual stream's gradient added inside the kernel.
    dy, ds = torch.randn(shape, device="cuda").to(dtype), torch.randn(shape, device="cuda").to(dtype)
    dx, dw = poisoned(shape, dtype, "cuda"), poisoned(w.shape, w.dtype, "cuda")
    rms_mod.BACKWARD[backend](dy, s, w, rstd, dx, dw, ds)
    s64, w64 = s.double().requires_grad_(), w.double().requires_grad_()
    ref_dx, ref_dw = torch.autograd.grad(llama_kernels.rms_norm_reference(s64, w64, 1e-5), (s64, w64), dy.double())
    assert_close(dx, ref_dx + ds.double(), dtype)
    assert_close(dw, ref_dw, w.dtype, scale=max(1.0, shape[0] ** 0.5))


def test_add_autograd_bf16():
    x = torch.randn(3, 100, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    h = torch.randn(3, 100, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.5 * torch.randn(2048, device="cuda")).requires_grad_()
    gy, gs = torch.randn_like(x, dtype=torch.float32), torch.randn_like(x, dtype=torch.float32)
    y, s = llama_kernels.add_rms_norm(x, h, w)
    dx, dh, dw = torch.autograd.grad((y.float() * gy).sum() + (s.float() * gs).sum(), (x, h, w))
    x64, h64, w64 = (t.detach().double().requires_grad_() for t in (x, h, w))
    y64, s64 = llama_kernels.add_rms_norm_reference(x64, h64, w64)
    rdx, rdh, rdw = torch.autograd.grad((y64 * gy.double()).sum() + (s64 * gs.double()).sum(), (x64, h64, w64))
    assert torch.equal(dx, dh)
    assert_close(y, y64, torch.bfloat16)
    assert_close(dx, rdx, torch.bfloat16, scale=4)
    torch.testing.assert_close(dw.double(), rdw, rtol=2e-2, atol=1e-2 * rdw.abs().max().item())


def test_unaligned_long_rows_fall_back_to_triton(caplog, monkeypatch):
    monkeypatch.setattr(dispatch, "logged", set())
    x = torch.randn(3, 10001, device="cuda", dtype=torch.float16)
    w = torch.randn(10001, device="cuda", dtype=torch.float16)
    with caplog.at_level("INFO", logger="llama_kernels"):
        y = llama_kernels.rms_norm(x, w)
    assert_close(y, llama_kernels.rms_norm_reference(x, w), torch.float16)
    assert any("using triton instead of cuda" in r.getMessage() for r in caplog.records)
    with llama_kernels.use_backend("cuda"), pytest.raises(RuntimeError, match="exceed the CUDA kernel"):
        llama_kernels.rms_norm(x, w)


def test_runs_on_the_current_stream_and_in_a_cuda_graph():
    x = torch.randn(512, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    expected = llama_kernels.rms_norm_reference(x, w)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for backend in _backends():  # warm up (Triton compiles) outside the capture
            with llama_kernels.use_backend(backend):
                llama_kernels.rms_norm(x, w)
    torch.cuda.current_stream().wait_stream(stream)
    h = torch.randn_like(x)
    for backend in _backends():
        with llama_kernels.use_backend(backend), torch.cuda.stream(stream):
            llama_kernels.add_rms_norm(x, h, w)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with llama_kernels.use_backend(backend), torch.cuda.graph(graph):
            out = llama_kernels.rms_norm(x, w)
            out_y, out_s = llama_kernels.add_rms_norm(x, h, w)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, llama_kernels.rms_norm_reference(x, w), torch.bfloat16)
        assert not torch.equal(out, expected)
        ref_y, ref_s = llama_kernels.add_rms_norm_reference(x, h, w)
        assert torch.equal(out_s, ref_s)
        assert_close(out_y, ref_y, torch.bfloat16)


def test_autograd_and_compile_bf16():
    # A random projection of y as the loss: sum(y^2) would be a constant for unit weights, whose
    # true gradient is ~0 and whose bf16 result is all rounding noise.
    torch._dynamo.reset()
    x = torch.randn(4, 256, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.5 * torch.randn(2048, device="cuda")).requires_grad_()
    g = torch.randn(4, 256, 2048, device="cuda")
    fn = torch.compile(lambda x, w: llama_kernels.rms_norm(x, w) * 2, fullgraph=True)
    y = fn(x, w)
    dx, dw = torch.autograd.grad((y.float() * g).sum(), (x, w))
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = llama_kernels.rms_norm_reference(x64, w64) * 2
    rdx, rdw = torch.autograd.grad((y64 * g.double()).sum(), (x64, w64))
    assert_close(y, y64, torch.bfloat16, scale=2)
    assert_close(dx, rdx, torch.bfloat16, scale=4)
    torch.testing.assert_close(dw.double(), rdw, rtol=2e-2, atol=1e-2 * rdw.abs().max().item())
