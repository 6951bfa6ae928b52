"""Triton int4/NF4 matmul under the interpreter (CPU): both kernels against the reference, then the
public op through dispatch. fp16 and fp32 only: the interpreter computes bf16 wrongly (bf16 is
covered by tests/gpu/test_int4_gpu.py)."""
import math

import pytest
import torch

import llama_kernels
from llama_kernels import dequantize, int4_matmul_reference
from llama_kernels.int4_format import GROUP_SIZES, quantize_int4, quantize_nf4
from llama_kernels.ops import int4_matmul as int4_op
from tests.helpers import TOLERANCE, cpu_backends, poisoned

pytestmark = pytest.mark.skipif("triton" not in cpu_backends(), reason="triton (interpreter) is not available")

DTYPES = [torch.float32, torch.float16]
FORMATS = ["int4", "nf4", "nf4-dq"]
PATHS = ["gemv", "gemm"]
# Ragged against every block size; each (path, format, group, dtype) case runs two of these.
MS = [1, 3, 5, 17, 33]
NS = [1, 7, 33, 100]
KS = {32: [32, 64, 96, 256], 64: [64, 192, 256], 128: [128, 256, 384]}


def _tri():
    from llama_kernels.triton import int4_matmul as tri

    return tri


def _op():
    """The public op, llama_kernels.int4_matmul."""
    return llama_kernels.int4_matmul


def _quantize(fmt, n, k, g):
    w = torch.randn(n, k)
    if fmt == "int4":
        return quantize_int4(w, g)
    return quantize_nf4(w, g, double_quant=fmt == "nf4-dq")


def _close(y, ref, dtype, scale):
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(y.double(), ref.double(), atol=atol * scale, rtol=rtol * scale)


def _check(y, x, qw, tensor_core, bias=None):
    """y against the fp32 reference. Each output sums k products, so rounding errors grow like
    sqrt(k). The GEMV computes in fp32. The GEMM rounds each dequantized weight to x's dtype for
    the tensor cores, a random error of about sqrt(k) weight half-ulps in each sum: it gets a
    looser bound against the reference, and the tight one against the reference whose weight is
    rounded the same way."""
    k, dtype = x.shape[-1], x.dtype
    x = x.detach().float()
    ref = int4_matmul_reference(x, qw, bias)
    rounded = dtype != torch.float32 and tensor_core
    _close(y, ref, dtype, max(1.0, math.sqrt(k) / (1 if rounded else 4)))
    if rounded:
        ref16 = x @ dequantize(qw, dtype).float().t() + (0 if bias is None else bias.float())
        _close(y, ref16, dtype, max(1.0, math.sqrt(k) / 4))


def _run(path, x, qw, y, lut=None, **config):
    getattr(_tri(), path)(x, qw.packed, qw.scales, qw.zeros, qw.lut if lut is None else lut, qw.group_size, y, **config)


def _cases():
    i = 0
    for path in PATHS:
        for fmt in FORMATS:
            for g in GROUP_SIZES:
                for dtype in DTYPES:
                    shapes = []
                    for _ in range(2):
                        shapes.append((MS[i % len(MS)], NS[i % len(NS)], KS[g][i % len(KS[g])]))
                        i += 1
                    yield path, fmt, g, dtype, shapes


CASES = list(_cases())


def test_cases_cover_every_size():
    seen = [set(), set(), set()]
    for path, _fmt, _g, _dtype, shapes in CASES:
        for shape in shapes:
            for s, v in zip(seen, shape):
                s.add((path, v))
    for path in PATHS:
        assert {m for p, m in seen[0] if p == path} == set(MS)
        assert {n for p, n in seen[1] if p == path} == set(NS)
        assert {k for p, k in seen[2] if p == path} == {k for ks in KS.values() for k in ks}


@pytest.mark.parametrize("path,fmt,g,dtype,shapes", CASES, ids=lambda v: str(v) if not isinstance(v, list) else "")
def test_kernel_matches_reference(path, fmt, g, dtype, shapes):
    for m, n, k in shapes:
        qw = _quantize(fmt, n, k, g)
        x = torch.randn(m, k).to(dtype)
        y = poisoned((m, n), dtype)
        _run(path, x, qw, y)
        _check(y, x, qw, path == "gemm")


# Forced configurations at one size: split-K (even and uneven), several groups per K tile with a
# partial last tile, small tiles (many programs, the grouped tile order), a group fed to the dots
# in two slices (dot_k), and the int4 table looked up instead of computed (a copy of the table is
# not recognised as int4's).
CONFIGS = [
    ("gemv", dict(split=3)),
    ("gemv", dict(block_k=128, split=4)),
    ("gemv", dict(block_m=2, block_n=16, block_k=192)),
    ("gemv", dict(block_m=1, block_n=8, split=2, num_warps=1)),
    ("gemm", dict(split=3)),
    ("gemm", dict(block_m=16, block_n=16, block_k=128, split=2)),
    ("gemm", dict(block_m=16, block_n=32, block_k=192)),
    ("gemm", dict(block_m=32, block_n=16, block_k=64, split=7)),
    ("gemm", dict(block_m=16, block_n=32, dot_k=16, num_stages=1)),
]


@pytest.mark.parametrize("path,config", CONFIGS, ids=str)
@pytest.mark.parametrize("fmt", ["int4", "int4-lut", "nf4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forced_configs(path, config, fmt, dtype):
    # 10 groups: uneven against 128, 192 and 256; rows span several row blocks.
    m, n, k, g = 5 if path == "gemv" else 37, 40, 640, 64
    qw = _quantize("nf4" if fmt == "nf4" else "int4", n, k, g)
    lut = qw.lut.clone() if fmt == "int4-lut" else None
    x = torch.randn(m, k).to(dtype)
    y = poisoned((m, n), dtype)
    _run(path, x, qw, y, lut=lut, **config)
    _check(y, x, qw, path == "gemm")


@pytest.mark.parametrize("path", PATHS)
def test_strided_rows_in_and_out(path):
    """x and y with row strides beyond their widths; nothing is written outside y's columns."""
    m, n, k = 6, 20, 128
    qw = _quantize("int4", n, k, 32)
    x = torch.randn(m, k + 40, dtype=torch.float16)[:, 8 : 8 + k]
    out = poisoned((m, n + 5), torch.float16)
    y = out[:, 2 : 2 + n]
    _run(path, x, qw, y)
    _check(y, x, qw, path == "gemm")
    assert out[:, :2].isnan().all() and out[:, 2 + n :].isnan().all()


def test_entry_point_picks_the_kernel_by_rows(monkeypatch):
    tri = _tri()
    calls = []
    monkeypatch.setattr(tri, "gemv", lambda *a, **kw: calls.append("gemv"))
    monkeypatch.setattr(tri, "gemm", lambda *a, **kw: calls.append("gemm"))
    qw = _quantize("int4", 8, 64, 32)
    for m in (1, tri.SMALL_M_MAX, tri.SMALL_M_MAX + 1, 64):
        x = torch.randn(m, 64)
        tri.int4_matmul(x, qw.packed, qw.scales, qw.zeros, qw.lut, 32, torch.empty(m, 8))
    assert calls == ["gemv", "gemv", "gemm", "gemm"]


def test_bad_shapes_raise():
    qw = _quantize("int4", 8, 64, 32)
    tri = _tri()
    with pytest.raises(ValueError, match="y: expected"):
        tri.int4_matmul(torch.randn(2, 64), qw.packed, qw.scales, qw.zeros, qw.lut, 32, torch.empty(2, 8).half())
    with pytest.raises(ValueError, match="scales/zeros"):
        tri.int4_matmul(torch.randn(2, 64), qw.packed, qw.scales, qw.zeros, qw.lut, 64, torch.empty(2, 8))
    with pytest.raises(ValueError, match="packed: expected uint8"):
        signed = qw.packed.view(torch.int8)
        tri.int4_matmul(torch.randn(2, 64), signed, qw.scales, qw.zeros, qw.lut, 32, torch.empty(2, 8))
    with pytest.raises(ValueError, match="block_k"):
        tri.gemm(torch.randn(2, 64), qw.packed, qw.scales, qw.zeros, qw.lut, 32, torch.empty(2, 8), block_k=48)


# ----------------------------------------------------------------------------- the public op
@pytest.mark.parametrize("fmt", ["int4", "nf4-dq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead", [(2,), (2, 3)], ids=["gemv", "gemm"])  # 2 rows, 6 rows
def test_public_op_forward_and_grad(fmt, dtype, lead):
    n, k = 33, 128
    qw = _quantize(fmt, n, k, 64)
    x = torch.randn(*lead, k).to(dtype).requires_grad_()
    bias = torch.randn(n).to(dtype)
    with llama_kernels.use_backend("triton"):
        y = _op()(x, qw, bias)
        dy = torch.randn_like(y)
        (dx,) = torch.autograd.grad(y, x, dy)
    assert y.shape == (*lead, n) and y.dtype == dtype
    _check(y, x, qw, lead == (2, 3), bias)
    # The backward is a torch matmul in x's dtype (on the CPU, fp16 sums in fp16): allow sqrt(n) ulps.
    _close(dx, dy.float() @ dequantize(qw), dtype, math.sqrt(n))


def test_public_op_without_grad_uses_triton(monkeypatch):
    calls = []
    real = int4_op.BACKENDS["triton"]
    monkeypatch.setitem(int4_op.BACKENDS, "triton", lambda *a: calls.append(a[0].shape) or real(*a))
    qw = _quantize("nf4", 16, 64, 32)
    x = torch.randn(3, 64, dtype=torch.float16)
    with llama_kernels.use_backend("triton"), torch.no_grad():
        y = _op()(x, qw)
    assert calls == [torch.Size([3, 64])]
    _check(y, x, qw, tensor_core=False)
