import logging
import threading

import pytest
import torch

import llama_kernels
from llama_kernels import dispatch
from llama_kernels.cpu import rms_norm as cpu_rms_norm
from llama_kernels.ops import rms_norm as rms_mod
from tests.helpers import assert_close, backend_variant, cpu_backends, poisoned

# Ragged hidden sizes (1000, 4097) and odd row counts, plus leading batch dims.
SHAPES = [(1, 8), (3, 1000), (5, 4097), (2, 3, 256), (17, 64)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = cpu_backends()


def _cases():
    ext = llama_kernels.capabilities().ext
    isas = [f"cpu@{isa}" for isa in ext.cpu_isas()] if "cpu" in BACKENDS else []
    for backend in BACKENDS + isas:
        for dtype in DTYPES:
            # The Triton interpreter computes bf16 wrongly; bf16 Triton is checked on the GPU.
            if backend == "triton" and dtype == torch.bfloat16:
                continue
            for w_dtype in (dtype, torch.float32):
                if backend == "triton" and w_dtype != dtype and dtype != torch.float32:
                    w_dtype = torch.float32
                yield backend, dtype, w_dtype


CASES = sorted(set(_cases()), key=str)




def _inputs(shape, dtype, w_dtype):
    x = torch.randn(shape, dtype=torch.float32).mul_(3).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1])).to(w_dtype)
    return x, w


def _reference_grads(x, w, dy, eps):
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    y = llama_kernels.rms_norm_reference(x64, w64, eps)
    return torch.autograd.grad(y, (x64, w64), dy.double())


@pytest.mark.parametrize("backend,dtype,w_dtype", CASES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backend_matches_reference(backend, dtype, w_dtype, shape):
    x, w = _inputs(shape, dtype, w_dtype)
    x2 = x.reshape(-1, shape[-1])
    y = poisoned(x2.shape, dtype)
    rstd = poisoned(x2.shape[:1], torch.float32)
    with backend_variant(backend) as b:
        rms_mod.FORWARD[b](x2, w, 1e-5, y, rstd)

    expected = llama_kernels.rms_norm_reference(x2, w, 1e-5)
    assert_close(y, expected, dtype)
    expected_rstd = torch.rsqrt(x2.float().pow(2).mean(-1) + 1e-5)
    torch.testing.assert_close(rstd, expected_rstd, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend,dtype,w_dtype", CASES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_ds", [False, True], ids=["", "plus_ds"])
def test_backward_backend_matches_reference(backend, dtype, w_dtype, shape, with_ds):
    """with_ds: a second gradient of x (the residual stream's, for add_rms_norm) is added to dx."""
    x, w = _inputs(shape, dtype, w_dtype)
    x2 = x.reshape(-1, shape[-1])
    dy = torch.randn(x2.shape).to(dtype)
    ds = torch.randn(x2.shape).to(dtype) if with_ds else None
    rstd = torch.rsqrt(x2.float().pow(2).mean(-1) + 1e-5)
    dx = poisoned(x2.shape, dtype)
    dw = poisoned(w.shape, w_dtype)
    with backend_variant(backend) as b:
        rms_mod.BACKWARD[b](dy, x2, w, rstd, dx, dw, *([ds] if with_ds else []))

    ref_dx, ref_dw = _reference_grads(x2, w, dy, 1e-5)
    if with_ds:
        ref_dx = ref_dx + ds.double()
    assert_close(dx, ref_dx, dtype)
    # dw sums over rows, so its error grows with their number.
    assert_close(dw, ref_dw, w_dtype, scale=max(1.0, x2.shape[0] ** 0.5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_public_op_autograd(backend, dtype):
    x, w = _inputs((2, 5, 300), dtype, dtype)
    x.requires_grad_()
    w.requires_grad_()
    with llama_kernels.use_backend(backend):
        y = llama_kernels.rms_norm(x, w, eps=1e-6)
        dy = torch.randn_like(y)
        dx, dw = torch.autograd.grad(y, (x, w), dy)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, llama_kernels.rms_norm_reference(x.detach(), w.detach(), 1e-6), dtype)
    ref_dx, ref_dw = _reference_grads(x.detach(), w.detach(), dy, 1e-6)
    assert_close(dx, ref_dx, dtype)
    assert_close(dw, ref_dw, dtype, scale=4.0)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not available")
@pytest.mark.parametrize("n", [1000, 4097])
def test_triton_chunked_rows(n):
    """Rows longer than one block take the looping path; force it with a small block."""
    from llama_kernels.triton import rms_norm as tri

    x, w = _inputs((3, n), torch.float16, torch.float16)
    y, rstd = poisoned(x.shape, x.dtype), poisoned((3,), torch.float32)
    tri.rms_norm_fwd(x, w, 1e-5, y, rstd, max_block=256)
    assert_close(y, llama_kernels.rms_norm_reference(x, w, 1e-5), x.dtype)

    dy = torch.randn_like(x)
    dx, dw = poisoned(x.shape, x.dtype), poisoned(w.shape, w.dtype)
    tri.rms_norm_bwd(dy, x, w, rstd, dx, dw, max_block=256)
    ref_dx, ref_dw = _reference_grads(x, w, dy, 1e-5)
    assert_close(dx, ref_dx, x.dtype)
    assert_close(dw, ref_dw, w.dtype, scale=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_mixed_weight_dtype(backend):
    x = torch.randn(64, 6).t()  # (6, 64) with column stride 6
    w = torch.randn(64, dtype=torch.bfloat16)  # neither x's dtype nor fp32
    with llama_kernels.use_backend(backend):
        y = llama_kernels.rms_norm(x, w)
    assert_close(y, llama_kernels.rms_norm_reference(x, w), torch.float32)


@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                           (torch.bfloat16, torch.bfloat16), (torch.float16, torch.bfloat16)],
                         ids=str)
def test_inference_path(dtype, w_dtype):
    """Without autograd a contiguous CPU input goes straight to the kernel (no 2-D views)."""
    x = torch.randn(2, 3, 40).to(dtype)
    w = torch.randn(40).to(w_dtype)
    with torch.no_grad():
        y = llama_kernels.rms_norm(x, w, 1e-5)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, llama_kernels.rms_norm_reference(x, w, 1e-5), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 3, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    with llama_kernels.use_backend(backend):
        y = llama_kernels.rms_norm(x, w)
        y.sum().backward()
    assert y.shape == (0, 3, 32)
    assert torch.equal(w.grad, torch.zeros(32))


@pytest.mark.parametrize(
    "x,w,eps,exc,match",
    [
        (torch.randn(4, 8), torch.randn(7), 1e-6, ValueError, "weight: has 7 elements"),
        (torch.randn(4, 8), torch.randn(2, 8), 1e-6, ValueError, r"weight: expected shape \(hidden,\)"),
        (torch.randn(4, 8).double(), torch.randn(8), 1e-6, TypeError, "x: dtype must be"),
        (torch.randn(4, 8), torch.randn(8).double(), 1e-6, TypeError, "weight: dtype must be"),
        (torch.ones(4, 8, dtype=torch.int32), torch.randn(8), 1e-6, TypeError, "x: dtype"),
        (torch.randn(4, 8), torch.randn(8), -1.0, ValueError, "eps: expected a finite number"),
        (torch.randn(4, 8), torch.randn(8), float("nan"), ValueError, "eps:"),
        (torch.randn(4, 0), torch.randn(0), 1e-6, ValueError, "x: the last"),
        (torch.tensor(1.0), torch.randn(1), 1e-6, ValueError, "x: expected at least one dimension"),
        ([1.0, 2.0], torch.randn(2), 1e-6, TypeError, "x: expected a torch.Tensor"),
        (torch.randn(4, 8), torch.randn(8, device="meta"), 1e-6, ValueError, "weight: is on meta"),
    ],
)
def test_bad_inputs_name_the_argument(x, w, eps, exc, match):
    with pytest.raises(exc, match=match):
        llama_kernels.rms_norm(x, w, eps)


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    x, w = torch.randn(2, 8), torch.randn(8)
    with llama_kernels.use_backend("cuda"), pytest.raises(RuntimeError, match="backend 'cuda' was forced"):
        llama_kernels.rms_norm(x, w)
    monkeypatch.setenv("LLAMA_KERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda backend needs CUDA tensors"):
        llama_kernels.rms_norm(x, w)
    monkeypatch.setenv("LLAMA_KERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="LLAMA_KERNELS_BACKEND: unknown backend 'fastest'"):
        llama_kernels.rms_norm(x, w)
    with pytest.raises(ValueError, match="name: unknown backend"):
        with llama_kernels.use_backend("gpu"):
            pass


def test_env_backend_is_honoured(monkeypatch):
    calls = []
    monkeypatch.setitem(rms_mod.FORWARD, "torch", lambda *a: calls.append("torch") or rms_mod.torch_fwd(*a))
    monkeypatch.setenv("LLAMA_KERNELS_BACKEND", "torch")
    llama_kernels.rms_norm(torch.randn(2, 8), torch.randn(8))
    assert calls == ["torch"]


def test_automatic_fallback_is_logged_once(monkeypatch, caplog, request):
    caps = dispatch.capabilities()
    missing = type(caps)(**{**caps.__dict__, "ext": None, "ext_error": "llama_kernels._C is not importable (test)"})
    monkeypatch.setattr(dispatch, "capabilities", lambda: missing)
    monkeypatch.setattr(dispatch, "logged", set())
    dispatch.clear_caches()  # availability is cached per backend and device type
    request.addfinalizer(dispatch.clear_caches)
    x, w = torch.randn(3, 16), torch.randn(16)
    with caplog.at_level(logging.WARNING, logger="llama_kernels"):
        for _ in range(3):
            y = llama_kernels.rms_norm(x, w)
    assert_close(y, llama_kernels.rms_norm_reference(x, w), torch.float32)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["rms_norm: using torch instead of cpu (llama_kernels._C is not importable (test))"]


def test_cpu_kernel_without_rstd_gives_the_same_output():
    """Inference passes no rstd buffer; the output must not change."""
    if "cpu" not in BACKENDS:
        pytest.skip("llama_kernels._C is not built")
    x, w = torch.randn(5, 37), torch.randn(37)
    y, y_none, rstd = poisoned((5, 37), torch.float32), poisoned((5, 37), torch.float32), torch.empty(5)
    cpu_rms_norm.forward(x, w, 1e-5, y, rstd)
    cpu_rms_norm.forward(x, w, 1e-5, y_none, None)
    assert torch.equal(y, y_none)
    assert_close(y_none, llama_kernels.rms_norm_reference(x, w, 1e-5), torch.float32)


def test_default_backend_on_cpu_is_the_compiled_kernel(monkeypatch):
    if "cpu" not in BACKENDS:
        pytest.skip("llama_kernels._C is not built")
    calls, real = [], cpu_rms_norm.forward_rows
    monkeypatch.setattr(cpu_rms_norm, "forward_rows", lambda *a: calls.append("cpu") or real(*a))
    llama_kernels.rms_norm(torch.randn(2, 8), torch.randn(8))  # contiguous: straight to the kernel
    llama_kernels.rms_norm(torch.randn(2, 12)[:, :8], torch.randn(8))  # strided rows: through FORWARD
    assert calls == ["cpu", "cpu"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck(dtype):
    x, w = _inputs((3, 40), dtype, dtype)
    x.requires_grad_()
    w.requires_grad_()
    torch.library.opcheck(torch.ops.llama_kernels.rms_norm_fwd.default, (x, w, 1e-6))
    rstd = torch.rsqrt(x.detach().float().pow(2).mean(-1) + 1e-6)
    torch.library.opcheck(
        torch.ops.llama_kernels.rms_norm_bwd.default, (torch.randn_like(x), x.detach(), w.detach(), rstd)
    )
    torch.library.opcheck(
        torch.ops.llama_kernels.rms_norm_bwd.default,
        (torch.randn_like(x), x.detach(), w.detach(), rstd, torch.randn_like(x)),
    )


@pytest.mark.slow
def test_torch_compile_on_cpu():
    torch._dynamo.reset()

    def block(x, w):
        return llama_kernels.rms_norm(x * 2, w, 1e-6).sum(dim=-1)

    x = torch.randn(4, 7, 96, requires_grad=True)
    w = torch.randn(96, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x, w)
    dx, dw = torch.autograd.grad(out.sum(), (x, w))
    ref = llama_kernels.rms_norm_reference(x.detach() * 2, w.detach(), 1e-6).sum(dim=-1)
    assert_close(out, ref, torch.float32)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rdx, rdw = torch.autograd.grad(llama_kernels.rms_norm_reference(xr * 2, wr, 1e-6).sum(), (xr, wr))
    assert_close(dx, rdx, torch.float32, scale=10)
    assert_close(dw, rdw, torch.float32, scale=10)


def test_forced_backend_reaches_a_backward_on_another_thread(monkeypatch):
    """Autograd runs CUDA backwards on worker threads; use_backend() must still hold there."""
    seen = []
    monkeypatch.setitem(rms_mod.BACKWARD, "torch", lambda *a: seen.append("torch") or rms_mod.torch_bwd(*a))
    x = torch.randn(3, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    with llama_kernels.use_backend("torch"):
        y = llama_kernels.rms_norm(x, w)
    result = []
    thread = threading.Thread(target=lambda: result.append(torch.autograd.grad(y.sum(), (x, w))))
    thread.start()
    thread.join()
    assert seen == ["torch"] and len(result) == 1


# ----------------------------------------------------------------------------- add_rms_norm
def _add_inputs(shape, dtype, w_dtype):
    x, w = _inputs(shape, dtype, w_dtype)
    h = torch.randn(shape).mul_(2).to(dtype)
    return x, h, w


@pytest.mark.parametrize("backend,dtype,w_dtype", CASES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("with_rstd", [True, False], ids=["rstd", "no_rstd"])
def test_add_forward_backend_matches_reference(backend, dtype, w_dtype, shape, with_rstd):
    x, h, w = _add_inputs(shape, dtype, w_dtype)
    x2, h2 = x.reshape(-1, shape[-1]), h.reshape(-1, shape[-1])
    y, s = poisoned(x2.shape, dtype), poisoned(x2.shape, dtype)
    rstd = poisoned(x2.shape[:1], torch.float32) if with_rstd else None
    with backend_variant(backend) as b:
        rms_mod.FORWARD[b](x2, w, 1e-5, y, rstd, h2, s)

    ref_y, ref_s = llama_kernels.add_rms_norm_reference(x2, h2, w, 1e-5)
    assert torch.equal(s, ref_s)  # one rounding of the fp32 sum, as `x + h` does
    assert_close(y, ref_y, dtype)
    if with_rstd:
        torch.testing.assert_close(rstd, torch.rsqrt(ref_s.float().pow(2).mean(-1) + 1e-5), atol=1e-6, rtol=1e-5)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not available")
def test_add_triton_chunked_rows():
    from llama_kernels.triton import rms_norm as tri

    x, h, w = _add_inputs((3, 1000), torch.float16, torch.float16)
    y, s, rstd = poisoned(x.shape, x.dtype), poisoned(x.shape, x.dtype), poisoned((3,), torch.float32)
    tri.rms_norm_fwd(x, w, 1e-5, y, rstd, max_block=256, h=h, s=s)
    ref_y, ref_s = llama_kernels.add_rms_norm_reference(x, h, w, 1e-5)
    assert torch.equal(s, ref_s)
    assert_close(y, ref_y, x.dtype)

    dy, ds = torch.randn_like(x), torch.randn_like(x)
    dx, dw = poisoned(x.shape, x.dtype), poisoned(w.shape, w.dtype)
    tri.rms_norm_bwd(dy, s, w, rstd, dx, dw, max_block=256, ds=ds)
    ref_dx, ref_dw = _reference_grads(s, w, dy, 1e-5)
    assert_close(dx, ref_dx + ds.double(), x.dtype)
    assert_close(dw, ref_dw, w.dtype, scale=2.0)


def _add_reference_grads(x, h, w, gy, gs, eps):
    x64, h64, w64 = (t.detach().double().requires_grad_() for t in (x, h, w))
    y, s = llama_kernels.add_rms_norm_reference(x64, h64, w64, eps)
    return torch.autograd.grad((y * gy.double()).sum() + (s * gs.double()).sum(), (x64, h64, w64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_public_op_autograd(backend, dtype):
    """Both outputs feed the loss, so the sum's gradient has a direct part and the norm's part."""
    x, h, w = _add_inputs((2, 5, 300), dtype, dtype)
    for t in (x, h, w):
        t.requires_grad_()
    gy, gs = torch.randn(x.shape).to(dtype), torch.randn(x.shape).to(dtype)
    with llama_kernels.use_backend(backend):
        y, s = llama_kernels.add_rms_norm(x, h, w, eps=1e-6)
        dx, dh, dw = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), (x, h, w))
    ref_y, ref_s = llama_kernels.add_rms_norm_reference(x.detach(), h.detach(), w.detach(), 1e-6)
    assert torch.equal(s, ref_s)
    assert_close(y, ref_y, dtype)
    ref_dx, ref_dh, ref_dw = _add_reference_grads(x, h, w, gy, gs, 1e-6)
    assert_close(dx, ref_dx, dtype, scale=2.0)
    assert_close(dh, ref_dh, dtype, scale=2.0)
    assert_close(dw, ref_dw, dtype, scale=4.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_gradient_through_the_norm_only(backend):
    """When only the normalised output reaches the loss, the sum's gradient is the norm's alone."""
    x, h, w = _add_inputs((3, 64), torch.float32, torch.float32)
    x.requires_grad_()
    gy = torch.randn(3, 64)
    with llama_kernels.use_backend(backend):
        y, _ = llama_kernels.add_rms_norm(x, h, w)
        (dx,) = torch.autograd.grad((y * gy).sum(), (x,))
    ref_dx, _, _ = _add_reference_grads(x, h, w, gy, torch.zeros(3, 64), 1e-6)
    assert_close(dx, ref_dx, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
def test_add_inference_path(dtype, contiguous):
    x, h, w = _add_inputs((2, 3, 40), dtype, torch.float32)
    if not contiguous:
        h = torch.randn(2, 3, 80).to(dtype)[..., ::2]
    with torch.no_grad():
        y, s = llama_kernels.add_rms_norm(x, h, w, 1e-5)
    ref_y, ref_s = llama_kernels.add_rms_norm_reference(x, h, w, 1e-5)
    assert s.shape == y.shape == x.shape and y.dtype == s.dtype == dtype
    assert torch.equal(s, ref_s)
    assert_close(y, ref_y, dtype)


def test_add_matches_the_unfused_ops_exactly_in_fp32():
    """The model swaps `x + h` then rms_norm for the fused op; on the CPU kernel nothing moves."""
    if "cpu" not in BACKENDS:
        pytest.skip("llama_kernels._C is not built")
    x, h, w = _add_inputs((4, 7, 96), torch.float32, torch.float32)
    with torch.no_grad():
        y, s = llama_kernels.add_rms_norm(x, h, w)
        assert torch.equal(s, x + h)
        assert torch.equal(y, llama_kernels.rms_norm(x + h, w))


@pytest.mark.parametrize(
    "h,exc,match",
    [
        (torch.randn(4, 9), ValueError, r"h: expected the shape of x \(4, 8\)"),
        (torch.randn(8), ValueError, "h: expected the shape of x"),
        (torch.randn(4, 8).half(), TypeError, "h: expected x's dtype torch.float32"),
        (torch.randn(4, 8, device="meta"), ValueError, "h: is on meta"),
        ([[1.0] * 8] * 4, TypeError, "h: expected a torch.Tensor"),
    ],
)
def test_add_bad_inputs_name_the_argument(h, exc, match):
    with pytest.raises(exc, match=match):
        llama_kernels.add_rms_norm(torch.randn(4, 8), h, torch.randn(8))
    with pytest.raises(ValueError, match="weight: has 7 elements"):
        llama_kernels.add_rms_norm(torch.randn(4, 8), torch.randn(4, 8), torch.randn(7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_opcheck(dtype):
    x, h, w = _add_inputs((3, 40), dtype, dtype)
    for t in (x, h, w):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.llama_kernels.add_rms_norm_fwd.default, (x, h, w, 1e-6))


@pytest.mark.slow
def test_add_torch_compile_on_cpu():
    torch._dynamo.reset()

    def block(x, h, w):
        y, s = llama_kernels.add_rms_norm(x, h * 2, w, 1e-6)
        return y.sum(dim=-1) + s.mean(dim=-1)

    x, h, w = (torch.randn(*shape, requires_grad=True) for shape in ((4, 7, 96), (4, 7, 96), (96,)))
    out = torch.compile(block, fullgraph=True)(x, h, w)
    grads = torch.autograd.grad(out.sum(), (x, h, w))
    x64, h64, w64 = (t.detach().double().requires_grad_() for t in (x, h, w))
    y64, s64 = llama_kernels.add_rms_norm_reference(x64, h64 * 2, w64, 1e-6)
    ref = y64.sum(dim=-1) + s64.mean(dim=-1)
    assert_close(out, ref, torch.float32)
    for got, expected in zip(grads, torch.autograd.grad(ref.sum(), (x64, h64, w64))):
        assert_close(got, expected, torch.float32, scale=10)
