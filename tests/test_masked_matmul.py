"""masked_matmul: every backend against the fp64 reference (output and the gradients of x, w,
both masks and the bias) on ragged shapes, soft and hard masks, with poisoned outputs; autograd
through the public op; that pruned rows and columns are skipped, not multiplied; named errors;
opcheck."""
import pytest
import torch

import llama_kernels
from llama_kernels import dispatch
from llama_kernels.cpu import masked_matmul as cpu_mm
from llama_kernels.ops import masked_matmul as mm
from tests.helpers import assert_close, backend_variant, cpu_backends, cpu_variants, poisoned

SHAPES = [(1, 40, 1), (3, 96, 33), (17, 130, 64)]  # (M, K, N)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = [(variant, dtype) for variant in cpu_variants() for dtype in DTYPES
         if not (variant == "triton" and dtype == torch.bfloat16)]  # the interpreter gets bf16 wrong
MASKS = ["soft", "hard0", "hard25", "hard50", "hard75", "blocks", "zeros", "ones", "heads"]


def _mask(kind, size, gen):
    if kind == "soft":
        return torch.rand(size, generator=gen)
    if kind.startswith("hard"):
        sparsity = int(kind[4:]) / 100
        return (torch.rand(size, generator=gen) >= sparsity).float()
    if kind == "heads":  # whole "heads" of 16 pruned at random: runs of consecutive indices
        return (torch.rand(size // 16 + 1, generator=gen) >= 0.5).float().repeat_interleave(16)[:size]
    if kind == "blocks":  # whole tiles pruned (what the Triton kernels skip), the rest soft
        m = torch.rand(size, generator=gen) + 0.5
        m[: size // 2] = 0
        return m
    return torch.zeros(size) if kind == "zeros" else torch.ones(size)


def _expected(x, w, r, c, b, dy):
    leaves = [t.double().requires_grad_() for t in (x, w, r, c, b) if t is not None]
    it = iter(leaves)
    args = [next(it) if t is not None else None for t in (x, w, r, c, b)]
    y = mm.masked_matmul_reference(*args)
    grads = torch.autograd.grad(y, leaves, dy.double())
    it = iter(grads)
    return y.detach(), [next(it) if t is not None else None for t in (x, w, r, c, b)]


def _close(actual, expected, dtype, what):
    scale = max(1.0, expected.abs().max().item())  # sums of up to K products: tolerance by magnitude
    try:
        assert_close(actual, expected, dtype, scale)
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from None


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("backend,dtype", CASES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backends_match_the_reference(backend, dtype, shape, with_bias):
    m, k, n = shape
    gen = torch.Generator().manual_seed(m * 1000 + k + n)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen) if with_bias else None
    dy = torch.randn(m, n, generator=gen).to(dtype)
    for row_kind, col_kind in zip(MASKS, MASKS[3:] + MASKS[:3]):
        r, c = _mask(row_kind, n, gen), _mask(col_kind, k, gen)
        y = poisoned((m, n), dtype)
        dx, dw = poisoned((m, k), dtype), poisoned((n, k), dtype)
        dr, dc = poisoned((n,), torch.float32), poisoned((k,), torch.float32)
        db = poisoned((n,), torch.float32) if with_bias else None
        with backend_variant(backend) as name:
            mm.FORWARD[name](x, w, r, c, b, y)
            mm.BACKWARD[name](dy, x, w, r, c, b, dx, dw, dr, dc, db)
        y64, (dx64, dw64, dr64, dc64, db64) = _expected(x, w, r, c, b, dy)
        what = f"rows {row_kind}, cols {col_kind}"
        _close(y, y64, dtype, f"y ({what})")
        _close(dx, dx64, dtype, f"dx ({what})")
        _close(dw, dw64, dtype, f"dw ({what})")
        _close(dr, dr64, dtype, f"d row_mask ({what})")
        _close(dc, dc64, dtype, f"d col_mask ({what})")
        if with_bias:
            _close(db, db64, dtype, f"d bias ({what})")


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_public_op_autograd_with_batch_dims(backend, dtype):
    """(2, 3, K) input, soft and hard masks: values and all five gradients through the public op,
    masks and bias in fp32 beside fp16 x and w (each gradient comes back in its input's dtype)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 40, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(33, 40, generator=gen).to(dtype).requires_grad_()
    r = (torch.rand(33, generator=gen) * (torch.rand(33, generator=gen) > 0.5)).requires_grad_()
    c = (torch.rand(40, generator=gen) > 0.25).float().requires_grad_()
    b = torch.randn(33, generator=gen).requires_grad_()
    with dispatch.use_backend(backend):
        y = llama_kernels.masked_matmul(x, w, r, c, b)
        assert y.shape == (2, 3, 33) and y.dtype == dtype
        dy = torch.randn(y.shape, generator=gen).to(dtype)
        grads = torch.autograd.grad(y, (x, w, r, c, b), dy)
    y64, expected = _expected(x.detach(), w.detach(), r.detach(), c.detach(), b.detach(), dy)
    _close(y, y64, dtype, "y")
    for name, g, e, t in zip(("x", "w", "row_mask", "col_mask", "bias"), grads, expected, (x, w, r, c, b)):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        _close(g, e, dtype, name)


def test_optional_masks_and_no_grad_path():
    x, w = torch.randn(4, 24), torch.randn(8, 24)
    with torch.no_grad():
        torch.testing.assert_close(llama_kernels.masked_matmul(x, w), x @ w.t(), atol=1e-5, rtol=1e-5)
    r = torch.rand(8).requires_grad_()
    y = llama_kernels.masked_matmul(x, w, row_mask=r)
    (dr,) = torch.autograd.grad(y.sum(), (r,))
    torch.testing.assert_close(dr, (x @ w.t()).sum(0), atol=1e-5, rtol=1e-5)
    x1 = torch.randn(24)  # one vector: (K,) -> (N,)
    assert llama_kernels.masked_matmul(x1, w).shape == (8,)


def test_cpu_kernel_gets_only_the_active_rows_and_columns(monkeypatch):
    """The C++ kernel is handed the compact index lists: N' rows and K' columns."""
    if "cpu" not in cpu_backends():
        pytest.skip("the C++ extension is not built")
    calls = []
    launch = cpu_mm.launch

    def recording(x, w, r, c, bias, rows, cols, y):
        calls.append((rows.numel(), cols.numel()))
        launch(x, w, r, c, bias, rows, cols, y)

    monkeypatch.setattr(cpu_mm, "launch", recording)
    x, w, b = torch.randn(5, 64), torch.randn(48, 64), torch.randn(48)
    r = (torch.arange(48) % 2).float()  # 24 active rows
    c = (torch.arange(64) % 4 != 0).float() * 0.5  # 48 active columns, soft
    with dispatch.use_backend("cpu"):
        y = llama_kernels.masked_matmul(x, w, r, c, b)
        assert calls == [(24, 48)]
        torch.testing.assert_close(y, mm.masked_matmul_reference(x, w, r, c, b), atol=1e-5, rtol=1e-5)
        calls.clear()
        y = llama_kernels.masked_matmul(x, w, torch.zeros(48), c, b)
        assert calls == [(0, 48)]
        assert torch.equal(y, torch.zeros(5, 48))  # exact zeros, bias included
        calls.clear()
        xg = x.clone().requires_grad_()
        llama_kernels.masked_matmul(xg, w, r.clone().requires_grad_(), c, b).sum().backward()
        assert calls == [(24, 48), (48, 48)]  # forward; then u on every row, masked columns skipped


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["fused", "gemm"])
def test_cpu_paths_match_the_reference(path, dtype):
    """The cpu backend's two forward paths, each at any number of rows (the op picks by rows, see
    cpu.MAX_ROWS): the fused kernel, and torch's GEMM between the C++ gather and scatter, on every
    mask kind for rows and columns (runs of whole heads included), with and without a bias."""
    if "cpu" not in cpu_backends():
        pytest.skip("the C++ extension is not built")
    forward = cpu_mm.forward_fused if path == "fused" else cpu_mm.forward_gemm
    for m, k, n in SHAPES + [(40, 128, 96), (40, 5, 3)]:
        gen = torch.Generator().manual_seed(m * 7 + k + n)
        x = torch.randn(m, k, generator=gen).to(dtype)
        w = torch.randn(n, k, generator=gen).to(dtype)
        for with_bias in (False, True):
            b = torch.randn(n, generator=gen) if with_bias else None
            for row_kind, col_kind in zip(MASKS, MASKS[4:] + MASKS[:4]):
                r, c = _mask(row_kind, n, gen), _mask(col_kind, k, gen)
                y = poisoned((m, n), dtype)
                forward(x, w, r, c, b, y)
                y64 = mm.masked_matmul_reference(x.double(), w.double(), r.double(), c.double(),
                                                 None if b is None else b.double())
                _close(y, y64, dtype, f"{path} {m}x{k}x{n} rows {row_kind}, cols {col_kind}, bias {with_bias}")


def test_cpu_backend_takes_the_gemm_path_beyond_max_rows(monkeypatch):
    """Up to cpu.MAX_ROWS rows of x the fused kernel runs; beyond, the compact GEMM; forward and
    the backward's recomputation of u alike."""
    if "cpu" not in cpu_backends():
        pytest.skip("the C++ extension is not built")
    calls = []
    for name in ("launch", "forward_gemm"):
        monkeypatch.setattr(cpu_mm, name, (lambda f, name: lambda *a: (calls.append(name), f(*a)))(
            getattr(cpu_mm, name), name))
    w, c = torch.randn(24, 32), (torch.arange(32) % 2).float()
    r = (torch.arange(24) % 3 != 0).float().requires_grad_()  # its gradient needs u recomputed
    with dispatch.use_backend("cpu"):
        for m, path in ((cpu_mm.MAX_ROWS, "launch"), (cpu_mm.MAX_ROWS + 1, "forward_gemm")):
            calls.clear()
            x = torch.randn(m, 32, requires_grad=True)
            y = llama_kernels.masked_matmul(x, w, r, c)
            torch.testing.assert_close(y, mm.masked_matmul_reference(x, w, r, c), atol=1e-5, rtol=1e-5)
            y.sum().backward()
            assert calls == [path, path], (m, calls)


@pytest.mark.parametrize("backend", cpu_backends())
def test_pruned_rows_and_columns_are_not_multiplied(backend):
    """NaN in weight rows with r = 0 and in x's columns with c = 0 (whole tiles, so Triton skips
    them too) does not reach y: those products are skipped, not multiplied by zero."""
    x, w, b = torch.randn(3, 96), torch.randn(130, 96), torch.randn(130)
    r, c = torch.rand(130) + 0.5, torch.rand(96) + 0.5
    r[:64], c[32:64] = 0, 0
    w[:64] = float("nan")
    x[:, 32:64] = float("nan")
    y = poisoned((3, 130), torch.float32)
    mm.FORWARD[backend](x, w, r, c, b, y)
    keep = torch.ones(96, dtype=torch.bool)
    keep[32:64] = False
    expected = mm.masked_matmul_reference(x[:, keep], w[64:, keep], r[64:], c[keep], b[64:])
    assert torch.equal(y[:, :64], torch.zeros(3, 64))
    torch.testing.assert_close(y[:, 64:], expected, atol=1e-5, rtol=1e-5)


def test_empty_inputs():
    x = torch.randn(0, 7, requires_grad=True)
    w = torch.randn(5, 7, requires_grad=True)
    r = torch.rand(5, requires_grad=True)
    y = llama_kernels.masked_matmul(x, w, r)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert x.grad.shape == (0, 7) and torch.equal(w.grad, torch.zeros(5, 7)) and torch.equal(r.grad, torch.zeros(5))


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: llama_kernels.masked_matmul(_t(3, 4), _t(5, 6)), ValueError, r"x: expected last dimension K=6"),
    (lambda: llama_kernels.masked_matmul(_t(3, 4), _t(5, 4, 1)), ValueError, r"w: expected 2 dimensions"),
    (lambda: llama_kernels.masked_matmul(_t(3, 4), _t(5, 4).half()), TypeError, r"w: expected x's dtype"),
    (lambda: llama_kernels.masked_matmul(_t(3, 4).double(), _t(5, 4).double()), TypeError, r"x: dtype must be"),
    (lambda: llama_kernels.masked_matmul(_t(3, 4), _t(5, 4), _t(4)), ValueError, r"row_mask: expected N=5 elements"),
    (lambda: llama_kernels.masked_matmul(_t(3, 4), _t(5, 4), None, _t(5)), ValueError, r"col_mask: expected K=4"),
    (lambda: llama_kernels.masked_matmul(_t(3, 4), _t(5, 4), None, _t(2, 2)), ValueError, r"col_mask: expected K=4"),
    (lambda: llama_kernels.masked_matmul(_t(3, 4), _t(5, 4), bias=_t(6)), ValueError, r"bias: expected N=5"),
    (lambda: llama_kernels.masked_matmul(_t(3, 4), _t(5, 4), torch.ones(5, dtype=torch.int64)), TypeError,
     r"row_mask: dtype must be"),
    (lambda: llama_kernels.masked_matmul(_t(3, 4), [1.0]), TypeError, r"w: expected a torch.Tensor"),
    (lambda: llama_kernels.masked_matmul(_t(3, 4), _t(5, 4), None, _t(4, device="meta")), ValueError,
     r"col_mask: is on meta"),
    (lambda: llama_kernels.masked_matmul(torch.tensor(1.0), _t(5, 4)), ValueError, r"x: expected at least one"),
])
def test_bad_inputs_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("with_masks", [True, False], ids=["masks", "plain"])
def test_opcheck(dtype, with_masks):
    x = _t(3, 40).to(dtype).requires_grad_()
    w = _t(33, 40).to(dtype).requires_grad_()
    r = (torch.rand(33) * (torch.rand(33) > 0.5)).requires_grad_() if with_masks else None
    c = (torch.rand(40) > 0.25).float().requires_grad_() if with_masks else None
    b = _t(33).requires_grad_() if with_masks else None
    torch.library.opcheck(torch.ops.llama_kernels.masked_matmul_fwd.default, (x, w, r, c, b))
    detach = [None if t is None else t.detach() for t in (x, w, r, c, b)]
    for needs in ([True] * 5, [True, False, True, False, False]):
        torch.library.opcheck(torch.ops.llama_kernels.masked_matmul_bwd.default,
                              (_t(3, 33).to(dtype), *detach, needs))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("wanted", [("x",), ("w",), ("row_mask",), ("col_mask",), ("x", "col_mask"),
                                    ("x", "w", "row_mask")], ids=str)
def test_backward_computes_only_the_gradients_wanted(backend, wanted):
    """Inputs that need no gradient get none, and the ones that do are those of the full backward."""
    gen = torch.Generator().manual_seed(7)
    m, k, n = 37, 45, 29  # more rows than the fused kernel's limit, ragged
    base = {"x": torch.randn(m, k, generator=gen), "w": torch.randn(n, k, generator=gen),
            "row_mask": torch.rand(n, generator=gen) * (torch.rand(n, generator=gen) > 0.4),
            "col_mask": torch.rand(k, generator=gen) * (torch.rand(k, generator=gen) > 0.4)}
    dy = torch.randn(m, n, generator=gen)
    full = {name: t.clone().requires_grad_() for name, t in base.items()}
    part = {name: t.clone().requires_grad_(name in wanted) for name, t in base.items()}
    with backend_variant(backend):
        llama_kernels.masked_matmul(**full).backward(dy)
        llama_kernels.masked_matmul(**part).backward(dy)
    for name in base:
        if name in wanted:
            torch.testing.assert_close(part[name].grad, full[name].grad, msg=name)
        else:
            assert part[name].grad is None, name
