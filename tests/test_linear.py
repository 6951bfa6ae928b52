"""llama_kernels.linear: the C++ decode GEMV against the reference, in every ISA, plus dispatch."""
import logging

import pytest
import torch

import llama_kernels
from llama_kernels import dispatch
from llama_kernels.cpu import linear as cpu_linear
from llama_kernels.ops import linear as lin
from tests.helpers import TOLERANCE, poisoned

EXT = llama_kernels.capabilities().ext
ISAS = EXT.cpu_isas() if EXT is not None else []
pytestmark = pytest.mark.skipif(EXT is None, reason="llama_kernels._C is not built")

# Ragged on purpose: K around the 16-lane vector, N around the 4-row block, M around the 4-row pass.
SHAPES = [(1, 1, 1), (1, 37, 17), (2, 5, 16), (3, 4, 15), (4, 1000, 100), (5, 33, 513), (7, 6, 64), (16, 9, 31)]
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float16, torch.bfloat16),
]


def _close(y, ref, dtype, k):
    atol, rtol = TOLERANCE[dtype]
    # Each output sums k products; fp32 rounding grows with sqrt(k).
    scale = max(1.0, k**0.5 / 4)
    torch.testing.assert_close(y.double(), ref.double(), atol=atol * scale, rtol=rtol * scale)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("x_dtype,w_dtype", DTYPE_PAIRS, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_cpu_kernel_matches_reference(isa, x_dtype, w_dtype, m, n, k, with_bias):
    x = torch.randn(m, k).to(x_dtype)
    w = torch.randn(n, k).to(w_dtype)
    bias = torch.randn(n).to(w_dtype) if with_bias else None
    y = poisoned((m, n), x_dtype)
    EXT.set_cpu_isa(isa)
    try:
        cpu_linear.forward(x, w, bias, y)
    finally:
        EXT.set_cpu_isa("")
    _close(y, lin.linear_reference(x.double(), w.double(), None if bias is None else bias.double()), x_dtype, k)


@pytest.mark.parametrize("isa", ISAS)
def test_every_half_value_converts_exactly(isa):
    """fp16 weights times 1.0: every one of the 65536 half values (normal, subnormal, zero, inf,
    NaN) must come out as PyTorch converts it, in every build (the baseline converts in software)."""
    w = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)[:, None]
    y = poisoned((1, w.shape[0]), torch.float32)
    EXT.set_cpu_isa(isa)
    try:
        cpu_linear.forward(torch.ones(1, 1), w, None, y)
    finally:
        EXT.set_cpu_isa("")
    expected = w.float().t()
    nan = expected.isnan()
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y[~nan], expected[~nan])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k", [(1, 33), (3, 64), (6, 17)], ids=str)
def test_cpu_kernel_with_several_weights(isa, m, k):
    """One call over weights of ragged sizes writes each output slice (and nothing past them)."""
    ws = [torch.randn(n, k) for n in (13, 70, 5)]
    bias = torch.randn(88)
    x = torch.randn(m, k)
    y = poisoned((m, 88 + 3), torch.float32)
    ys = [y[:, :13], y[:, 13:83], y[:, 83:88]]
    EXT.set_cpu_isa(isa)
    try:
        cpu_linear.forward_parts(x, ws, [bias[:13], None, bias[83:]], ys)
    finally:
        EXT.set_cpu_isa("")
    for w, yp, b in zip(ws, ys, [bias[:13], None, bias[83:]]):
        _close(yp, lin.linear_reference(x.double(), w.double(), None if b is None else b.double()), torch.float32, k)
    assert torch.isnan(y[:, 88:]).all()


def test_several_weights_side_by_side():
    ws = [torch.randn(n, 24) for n in (4, 9)]
    bias = torch.randn(13)[None].expand(2, 13)[0]  # a strided view is fine
    x = torch.randn(2, 3, 24)
    ref = lin.linear_reference(x, torch.cat(ws), bias)
    with torch.no_grad():
        _close(llama_kernels.linear(x, ws, bias), ref, torch.float32, 24)
        with llama_kernels.use_backend("torch"):
            _close(llama_kernels.linear(x, tuple(ws), bias), ref, torch.float32, 24)
    xg = x.clone().requires_grad_()
    llama_kernels.linear(xg, ws).sum().backward()
    torch.testing.assert_close(xg.grad, torch.cat(ws).sum(0).expand(2, 3, 24))


def test_strided_rows_and_leading_dims():
    x = torch.randn(2, 3, 40)[:, :, :33]  # row stride 40, last dim contiguous
    w = torch.randn(11, 33)
    y = llama_kernels.linear(x, w)
    assert y.shape == (2, 3, 11)
    _close(y, lin.linear_reference(x, w), torch.float32, 33)


@pytest.mark.parametrize("make_x", [
    lambda: torch.randn(4, 3, 1, 40)[:, :, 0, :33],  # rows 40 apart
    lambda: torch.randn(4, 3, 33)[:, 1:2, :],        # (4, 1, 33) with rows 99 apart
    lambda: torch.randn(33, 2).t(),                  # last dim strided: copied first
], ids=["row-stride", "size-1-dim", "column-major"])
def test_strided_inputs(make_x):
    x = make_x()
    ws, bias = [torch.randn(5, 33), torch.randn(6, 33)], torch.randn(11)
    with torch.no_grad():
        y = llama_kernels.linear(x, ws, bias)
    _close(y, lin.linear_reference(x, torch.cat(ws), bias), torch.float32, 33)


def test_dispatch_uses_the_kernel_for_few_rows(monkeypatch, caplog):
    calls = []
    real = cpu_linear.forward_rows
    monkeypatch.setattr(cpu_linear, "forward_rows", lambda *a: calls.append(a[1]) or real(*a))
    monkeypatch.setattr(dispatch, "logged", set())
    w = torch.randn(8, 32)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="llama_kernels"):
        llama_kernels.linear(torch.randn(3, 32), w)
        llama_kernels.linear(torch.randn(40, 32), w)  # too many rows: F.linear
    assert calls == [3]
    assert any("more than 16 rows" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    with llama_kernels.use_backend("cpu"), pytest.raises(RuntimeError, match="more than 16 rows"):
        llama_kernels.linear(torch.randn(40, 32), w)
    with llama_kernels.use_backend("triton"), pytest.raises(RuntimeError, match="linear has no triton implementation"):
        llama_kernels.linear(torch.randn(2, 32), w)


def test_autograd_goes_through_torch():
    x = torch.randn(2, 16, requires_grad=True)
    w = torch.randn(5, 16, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    llama_kernels.linear(x, w, b).sum().backward()
    torch.testing.assert_close(x.grad, w.detach().sum(0).expand(2, 16))
    torch.testing.assert_close(b.grad, torch.full((5,), 2.0))


@pytest.mark.parametrize(
    "x,w,b,exc,match",
    [
        (torch.randn(2, 8), torch.randn(3, 7), None, ValueError, "x: last dim must equal weight's in_features 7"),
        (torch.randn(2, 8), torch.randn(8), None, ValueError, "weight: expected shape"),
        (torch.randn(2, 8), torch.randn(3, 8), torch.randn(4), ValueError, r"bias: expected shape \(3,\)"),
        (torch.randn(2, 8).double(), torch.randn(3, 8), None, TypeError, "x: dtype must be"),
        (torch.randn(2, 8), torch.ones(3, 8, dtype=torch.int8), None, TypeError, "weight: dtype must be"),
        (torch.randn(2, 8), torch.randn(3, 8, device="meta"), None, ValueError, "weight: is on meta"),
        (torch.randn(2, 8), [], None, TypeError, "weight: expected a torch.Tensor or a non-empty sequence"),
        (torch.randn(2, 8), [torch.randn(3, 8), torch.randn(3, 8).half()], None, TypeError,
         r"weight\[1\]: dtype torch.float16 differs"),
        (torch.randn(2, 8), [torch.randn(3, 8), torch.randn(2, 8)], torch.randn(3), ValueError,
         r"bias: expected shape \(5,\)"),
    ],
)
def test_bad_inputs_name_the_argument(x, w, b, exc, match):
    with pytest.raises(exc, match=match):
        llama_kernels.linear(x, w, b)
