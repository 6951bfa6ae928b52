"""SwiGLU: every backend against the fp64 reference on ragged and strided shapes, with poisoned
outputs; autograd through the public op; named errors; opcheck."""
import pytest
import torch
import torch.nn.functional as F

import llama_kernels
from llama_kernels.ops import swiglu as swiglu_mod
from tests.helpers import assert_close, backend_variant, cpu_backends, cpu_variants, poisoned

SHAPES = [(1, 1), (3, 1000), (5, 4097), (2, 3, 256), (17, 65)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


CASES = [(variant, dtype) for variant in cpu_variants() for dtype in DTYPES
         if not (variant == "triton" and dtype == torch.bfloat16)]  # the interpreter gets bf16 wrong


def _fused(rows, cols, dtype, scale=4.0):
    """gate and up as the two halves of one (rows, 2 * cols) projection: strided rows."""
    both = (torch.randn(rows, 2 * cols) * scale).to(dtype)
    return both[:, :cols], both[:, cols:]


def _expected(a, b, dy):
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    y = F.silu(a64) * b64
    da, db = torch.autograd.grad(y, (a64, b64), dy.double())
    return y.detach(), da, db


@pytest.mark.parametrize("backend,dtype", CASES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backends_match_the_reference(backend, dtype, shape):
    cols = shape[-1]
    rows = 1
    for s in shape[:-1]:
        rows *= s
    a, b = _fused(rows, cols, dtype)
    a[0, 0] = 30.0  # far tails of the sigmoid
    if cols > 1:
        a[0, 1] = -30.0
    dy = torch.randn(rows, cols).to(dtype)
    y = poisoned((rows, cols), dtype)
    da, db = poisoned((rows, cols), dtype), poisoned((rows, cols), dtype)
    with backend_variant(backend) as name:
        swiglu_mod.FORWARD[name](a, b, y)
        swiglu_mod.BACKWARD[name](dy, a, b, da, db)
    y64, da64, db64 = _expected(a, b, dy)
    scale = 4.0  # values up to ~|4 * 4|, tolerances are relative to ~1
    assert_close(y, y64, dtype, scale)
    assert_close(da, da64, dtype, scale)
    assert_close(db, db64, dtype, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_public_op_autograd_on_views(dtype):
    """The public op on the halves of a fused projection, (B, S, 2H): values and gradients
    reach the projection's output, and the result has the inputs' dtype."""
    both = torch.randn(2, 5, 2 * 96).to(dtype).requires_grad_()
    gate, up = both[..., :96], both[..., 96:]
    y = llama_kernels.swiglu(gate, up)
    assert y.dtype == dtype and y.shape == (2, 5, 96)
    dy = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, both, dy)
    ref_both = both.detach().double().requires_grad_()
    ref = F.silu(ref_both[..., :96]) * ref_both[..., 96:]
    (g_ref,) = torch.autograd.grad(ref, ref_both, dy.double())
    assert_close(y, ref, dtype)
    assert_close(g, g_ref, dtype)


def test_no_grad_skips_the_custom_op_but_agrees():
    gate, up = torch.randn(3, 40), torch.randn(3, 40)
    with torch.no_grad():
        y = llama_kernels.swiglu(gate, up)
    torch.testing.assert_close(y, llama_kernels.swiglu_reference(gate, up))


def test_non_finite_inputs_follow_the_reference():
    gate = torch.tensor([[float("inf"), float("-inf"), float("nan"), 1.0, 100.0, -100.0]])
    up = torch.tensor([[1.0, 1.0, 1.0, float("inf"), 2.0, 2.0]])
    ref = llama_kernels.swiglu_reference(gate, up)
    for backend in cpu_backends():
        y = poisoned(gate.shape, torch.float32)
        swiglu_mod.FORWARD[backend](gate, up, y)
        # inf * sigmoid(inf) = inf; -inf * sigmoid(-inf) = -inf * 0 = NaN in the reference
        torch.testing.assert_close(y, ref, equal_nan=True, msg=backend)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: llama_kernels.swiglu(torch.randn(3, 4), torch.randn(3, 5)), ValueError, r"up: expected gate's shape"),
    (lambda: llama_kernels.swiglu(torch.randn(3, 4), torch.randn(3, 4).half()), TypeError, r"up: expected gate's dtype"),
    (lambda: llama_kernels.swiglu(torch.randn(3, 4).double(), torch.randn(3, 4).double()), TypeError, r"gate: dtype"),
    (lambda: llama_kernels.swiglu(torch.randn(3, 4), [1, 2]), TypeError, r"up: expected a torch.Tensor"),
    (lambda: llama_kernels.swiglu(torch.tensor(1.0), torch.tensor(1.0)), ValueError, r"gate: expected at least one"),
    (lambda: llama_kernels.swiglu(torch.randn(3, 4), torch.randn(3, 4, device="meta")), ValueError, r"up: is on meta"),
])
def test_bad_inputs_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_empty_inputs():
    gate = torch.randn(0, 7, requires_grad=True)
    y = llama_kernels.swiglu(gate, torch.randn(0, 7))
    assert y.shape == (0, 7)
    y.sum().backward()
    assert gate.grad.shape == (0, 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_opcheck(dtype):
    gate, up = _fused(3, 40, dtype)
    gate, up = gate.clone().requires_grad_(), up.clone().requires_grad_()
    torch.library.opcheck(torch.ops.llama_kernels.swiglu_fwd.default, (gate, up))
    torch.library.opcheck(torch.ops.llama_kernels.swiglu_bwd.default,
                          (torch.randn_like(gate), gate.detach(), up.detach()))
