"""4-bit formats and the CPU int4/NF4 matmul: quantization quality, packing, kernel vs reference."""
import pytest
import torch

import llama_kernels
from llama_kernels import QuantizedWeight, dequantize, int4_matmul, int4_matmul_reference, quantize_int4, quantize_nf4
from llama_kernels import int4_format
from llama_kernels.cpu import int4_matmul as cpu_int4
from llama_kernels.ops.int4_matmul import int4_matmul_q8_reference
from llama_kernels.cuda import int4_matmul as cuda_int4
from tests.helpers import poisoned

EXT = llama_kernels.capabilities().ext
ISAS = EXT.cpu_isas() if EXT is not None else []


@pytest.fixture(autouse=True)
def fp32_activations(monkeypatch):
    """These tests hold the CPU kernel to the fp32 reference: its fp32-activation path. The
    int8-activation path (the CPU default for int4) is tested in tests/test_int4_q8.py."""
    monkeypatch.setattr(cpu_int4, "ACTIVATIONS", "fp32")


def _quantize(fmt, w, group, double_quant=False):
    return quantize_int4(w, group) if fmt == "int4" else quantize_nf4(w, group, double_quant=double_quant)


def _sqnr_db(w, qw):
    err = (dequantize(qw) - w).pow(2).mean() / w.pow(2).mean()
    return float(-10 * torch.log10(err))


# Gaussian weights: int4 gains ~0.8 dB per halving of the group; NF4 suits them by design.
@pytest.mark.parametrize(
    "fmt,group,double_quant,min_db",
    [("int4", 32, False, 21.5), ("int4", 64, False, 20.5), ("int4", 128, False, 19.5),
     ("nf4", 32, False, 21.0), ("nf4", 64, False, 20.3), ("nf4", 64, True, 20.3), ("nf4", 128, False, 19.5)],
)
def test_quantization_quality(fmt, group, double_quant, min_db):
    w = torch.randn(256, 1024)
    qw = _quantize(fmt, w, group, double_quant)
    assert _sqnr_db(w, qw) > min_db
    assert qw.packed.dtype == torch.uint8 and qw.packed.shape == (256, 512)
    assert qw.scales.shape == (256, 1024 // group) and qw.scales.dtype == torch.float16
    assert (qw.zeros is None) == (fmt == "nf4")
    assert (qw.double_quant is not None) == double_quant


def test_pack_layout_and_round_trip():
    q = torch.randint(0, 16, (3, 64))
    packed = int4_format.pack_codes(q)
    # byte j of a 32-code chunk: code j in the low nibble, code j + 16 in the high nibble
    assert packed[1, 5].item() == q[1, 5].item() | (q[1, 21].item() << 4)
    assert packed[2, 16 + 3].item() == q[2, 32 + 3].item() | (q[2, 48 + 3].item() << 4)
    assert torch.equal(int4_format.unpack_codes(packed), q)


def test_nf4_code_book():
    code = int4_format.NF4_CODE
    assert code.shape == (16,) and code[0] == -1 and code[-1] == 1 and (code == 0).sum() == 1
    assert torch.all(code[1:] > code[:-1])
    torch.testing.assert_close(code[8], torch.tensor(0.0796), atol=1e-4, rtol=0)


def test_nf4_picks_the_nearest_code():
    """quantize_nf4 buckets between midpoints; every code must be the nearest one (argmin of the
    16 distances), up to rounding for values within an ulp of a midpoint."""
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(3))
    w[0, :64] = torch.linspace(-1, 1, 64)  # the block's absmax is 1: the values are the normalised ones
    qw = quantize_nf4(w, 64)
    codes = int4_format.unpack_codes(qw.packed)
    normalized = (w.reshape(256, 8, 64) / qw.scales.float()[..., None]).reshape(256, 512)
    nearest = (normalized[..., None] - int4_format.NF4_CODE).abs().argmin(dim=-1)
    differ = codes != nearest
    mids = (int4_format.NF4_CODE[1:] + int4_format.NF4_CODE[:-1]) / 2
    gap = (normalized[differ][:, None] - mids).abs().amin(dim=-1)
    assert differ.sum() <= 3 and torch.all(gap < 1e-6)


def test_int4_represents_group_extremes_closely():
    w = torch.randn(4, 128)
    qw = quantize_int4(w, 64)
    d = dequantize(qw).reshape(4, 2, 64)
    g = w.reshape(4, 2, 64)
    step = (g.amax(-1) - g.amin(-1)) / 15
    assert torch.all((d.amax(-1) - g.amax(-1)).abs() <= step * 0.51 + 1e-3)
    assert torch.all((d - g).abs() <= step[..., None] * 0.51 + 1e-3)


SHAPES = [(1, 1, 32), (1, 37, 64), (2, 5, 128), (3, 33, 96), (4, 100, 256), (5, 7, 384), (16, 9, 128)]
# (shape, group) pairs where K is a multiple of the group
CASES = [(shape, g) for shape in SHAPES for g in (32, 64, 128) if shape[2] % g == 0]


@pytest.mark.skipif(EXT is None, reason="llama_kernels._C is not built")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["int4", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,group", CASES, ids=str)
def test_cpu_kernel_matches_reference(isa, fmt, dtype, shape, group):
    m, n, k = shape
    qw = _quantize(fmt, torch.randn(n, k), group)
    x = torch.randn(m, k).to(dtype)
    y = poisoned((m, n), dtype)
    EXT.set_cpu_isa(isa)
    try:
        cpu_int4.forward(x, qw.packed, qw.scales, qw.zeros, qw.lut, group, y)
    finally:
        EXT.set_cpu_isa("")
    ref = int4_matmul_reference(x.float(), qw)
    # The kernel accumulates in fp32 like the reference; only the output rounding differs.
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype] * max(1.0, k**0.5 / 8)
    torch.testing.assert_close(y.float(), ref, atol=tol, rtol=tol)


@pytest.mark.skipif(EXT is None, reason="llama_kernels._C is not built")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["int4", "nf4"])
@pytest.mark.parametrize("m,k,group", [(1, 416, 32), (3, 448, 64), (5, 256, 128)], ids=str)
def test_cpu_kernel_with_several_weights(isa, fmt, m, k, group):
    """One call over weights of ragged sizes (13, 70, 5 rows: not multiples of the row block)
    writes each output slice, and only its own, as the reference does."""
    qws = [_quantize(fmt, torch.randn(n, k), group) for n in (13, 70, 5)]
    x = torch.randn(m, k)
    y = poisoned((m, 13 + 70 + 5 + 3), torch.float32)  # 3 columns past the parts stay untouched
    ys = [y[:, :13], y[:, 13:83], y[:, 83:88]]
    EXT.set_cpu_isa(isa)
    try:
        cpu_int4.forward_parts(x, [(q.packed, q.scales, q.zeros) for q in qws], qws[0].lut, group, ys)
    finally:
        EXT.set_cpu_isa("")
    for q, yp in zip(qws, ys):
        torch.testing.assert_close(yp, int4_matmul_reference(x, q), atol=1e-4 * k**0.5, rtol=1e-4)
    assert torch.isnan(y[:, 88:]).all()


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if EXT is not None else []))
def test_public_op_with_several_weights(backend):
    """A list of weights gives the outputs side by side, with and without autograd."""
    qws = [quantize_int4(torch.randn(n, 96), 32) for n in (8, 24, 3)]
    bias = torch.randn(35)
    x = torch.randn(2, 3, 96, requires_grad=True)
    ref = torch.cat([int4_matmul_reference(x.detach(), q) for q in qws], dim=-1) + bias
    with llama_kernels.use_backend(backend):
        y = int4_matmul(x, qws, bias)
        with torch.no_grad():
            y_nograd = int4_matmul(x, tuple(qws), bias)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y_nograd, ref, atol=1e-4, rtol=1e-4)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(dx, dy @ torch.cat([dequantize(q) for q in qws]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch"] + (["cpu"] if EXT is not None else []))
@pytest.mark.parametrize("fmt", ["int4", "nf4"])
def test_public_op_forward_backward_and_bias(backend, fmt):
    qw = _quantize(fmt, torch.randn(24, 128), 64)
    x = torch.randn(2, 3, 128, requires_grad=True)
    bias = torch.randn(24)
    with llama_kernels.use_backend(backend):
        y = int4_matmul(x, qw, bias)
        with torch.no_grad():
            y_nograd = int4_matmul(x, qw, bias)  # the path without the custom-op layer
    ref = int4_matmul_reference(x.detach(), qw, bias)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y_nograd, ref, atol=1e-4, rtol=1e-4)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(dx, dy @ dequantize(qw), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make_x", [
    lambda: torch.randn(3, 5, 160)[:, :, :128],  # rows 160 apart
    lambda: torch.randn(4, 3, 128)[:, 1:2, :],   # (4, 1, 128) with rows 384 apart
    lambda: torch.randn(128, 2).t(),             # last dim strided: copied first
    lambda: torch.randn(2, 1, 128),
], ids=["row-stride", "size-1-dim", "column-major", "contiguous"])
def test_strided_inputs(make_x):
    x = make_x()
    qws = [quantize_int4(torch.randn(n, 128), 32) for n in (7, 12)]
    with torch.no_grad():
        y = int4_matmul(x, qws)
    ref = torch.cat([int4_matmul_reference(x, q) for q in qws], dim=-1)
    assert y.shape == (*x.shape[:-1], 19)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(EXT is None, reason="llama_kernels._C is not built")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["int4", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,k,group", [(1, 32, 32), (37, 192, 64), (5, 384, 128), (70, 96, 32)], ids=str)
def test_cpu_dequantize_matches_reference(isa, fmt, dtype, n, k, group):
    qw = _quantize(fmt, torch.randn(n, k), group)
    w = poisoned((n, k), dtype)
    EXT.set_cpu_isa(isa)
    try:
        cpu_int4.dequantize_into(qw.packed, qw.scales, qw.zeros, qw.lut, group, w)
    finally:
        EXT.set_cpu_isa("")
    ref = int4_format.dequantize_reference(qw.packed, qw.scales, qw.zeros, qw.lut, group)
    torch.testing.assert_close(w, ref.to(dtype), atol=0, rtol=0)  # the same fp32 math, one rounding
    assert torch.equal(dequantize(qw, dtype), w)  # the public helper takes the kernel


@pytest.mark.skipif(EXT is None, reason="llama_kernels._C is not built")
@pytest.mark.parametrize("fmt", ["int4", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_many_rows_dequantize_panels_then_gemm(fmt, dtype, monkeypatch):
    """Past MAX_CPU_ROWS the CPU backend dequantizes panels of weight rows (here 32 rows, so the
    parts span several panels and end in ragged ones) and multiplies them with a GEMM."""
    monkeypatch.setattr(cpu_int4, "CPU_PANEL_BYTES", 32 * 4 * 128)
    qws = [_quantize(fmt, torch.randn(n, 128), 32) for n in (45, 70, 3)]
    x = torch.randn(cpu_int4.MAX_CPU_ROWS + 13, 128).to(dtype)
    y = poisoned((x.shape[0], 45 + 70 + 3), dtype)
    cpu_int4.panel_gemm(x, [(q.packed, q.scales, q.zeros) for q in qws], qws[0].lut, 32, y)
    ref = torch.cat([int4_matmul_reference(x.float(), q) for q in qws], dim=-1)
    tol = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2}[dtype] * 2
    torch.testing.assert_close(y.float(), ref, atol=tol, rtol=tol)


@pytest.mark.skipif(EXT is None, reason="llama_kernels._C is not built")
def test_cpu_dispatch_by_rows(monkeypatch):
    """Up to the kernel's row limit (MAX_CPU_ROWS_INT8 for int4 with int8 activations,
    MAX_CPU_ROWS with fp32 ones) the kernel multiplies the codes; more go to dequantize + GEMM; the
    backward dequantizes with the C++ kernel too."""
    calls = []
    real_call, real_gemm, real_deq = cpu_int4.forward_rows, cpu_int4.panel_gemm, cpu_int4.dequantize_into
    monkeypatch.setattr(cpu_int4, "forward_rows", lambda *a: calls.append("kernel") or real_call(*a))
    monkeypatch.setattr(cpu_int4, "panel_gemm", lambda *a: calls.append("gemm") or real_gemm(*a))
    monkeypatch.setattr(cpu_int4, "dequantize_into", lambda *a: calls.append("dequantize") or real_deq(*a))
    qw = quantize_int4(torch.randn(8, 64), 32)
    parts = [(qw.packed, qw.scales, qw.zeros)]
    for activations, limit in (("int8", cpu_int4.MAX_CPU_ROWS_INT8), ("fp32", cpu_int4.MAX_CPU_ROWS)):
        monkeypatch.setattr(cpu_int4, "ACTIVATIONS", activations)
        assert cpu_int4.kernel_rows(parts) == limit
        with torch.no_grad():
            x = torch.randn(limit, 64)  # the kernel: the int8 path's maths, or the fp32 reference's
            ref = int4_matmul_q8_reference(x, qw).float() if activations == "int8" else int4_matmul_reference(x, qw)
            torch.testing.assert_close(int4_matmul(x, qw), ref, atol=1e-4, rtol=1e-4)
            x = torch.randn(limit + 1, 64)  # the panels: the fp32 reference
            torch.testing.assert_close(int4_matmul(x, qw), int4_matmul_reference(x, qw), atol=1e-4, rtol=1e-4)
        assert calls == ["kernel", "gemm", "dequantize"]
        calls.clear()
    x = torch.randn(3, 64, requires_grad=True)
    (dx,) = torch.autograd.grad(int4_matmul(x, qw).sum(), x)
    assert calls == ["kernel", "dequantize"]
    w = int4_format.dequantize_reference(qw.packed, qw.scales, qw.zeros, qw.lut, 32)
    torch.testing.assert_close(dx, torch.ones(3, 8) @ w)


def test_opcheck():
    qw = quantize_nf4(torch.randn(16, 64), 32)
    x = torch.randn(3, 64, requires_grad=True)
    torch.library.opcheck(torch.ops.llama_kernels.int4_matmul.default, (x, qw.packed, qw.scales, qw.zeros, qw.lut, 32))
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.llama_kernels.int4_dequantize.default,
                              (qw.packed, qw.scales, qw.zeros, qw.lut, 32, dtype))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: quantize_int4(torch.randn(4, 100), 32), ValueError, "in_features 100 is not a multiple of group_size 32"),
        (lambda: quantize_int4(torch.randn(4, 96), 48), ValueError, r"group_size: expected one of \(32, 64, 128\)"),
        (lambda: quantize_nf4(torch.randn(4, 4, 64)), ValueError, "w: expected a 2-D"),
        (lambda: quantize_int4(torch.ones(4, 64, dtype=torch.int32)), TypeError, "w: expected a floating-point"),
        (lambda: int4_matmul(torch.randn(2, 63), quantize_int4(torch.randn(4, 64), 32)), ValueError,
         "x: last dim must equal the weight's in_features 64"),
        (lambda: int4_matmul(torch.randn(2, 64).double(), quantize_int4(torch.randn(4, 64), 32)), TypeError, "x: dtype"),
        (lambda: int4_matmul(torch.randn(2, 64), torch.randn(4, 64)), TypeError, "qw: expected a QuantizedWeight"),
        (lambda: int4_matmul(torch.randn(2, 64), quantize_int4(torch.randn(4, 64), 32), torch.randn(5)), ValueError,
         r"bias: expected shape \(4,\)"),
        (lambda: int4_matmul(torch.randn(2, 64), []), TypeError, "qw: expected a QuantizedWeight or a non-empty"),
        (lambda: int4_matmul(torch.randn(2, 64), [quantize_int4(torch.randn(4, 64), 32), torch.randn(4, 64)]),
         TypeError, r"qw\[1\]: expected a QuantizedWeight"),
        (lambda: int4_matmul(torch.randn(2, 64), [quantize_int4(torch.randn(4, 64), 32),
                                                  quantize_int4(torch.randn(4, 64), 64)]),
         ValueError, r"qw\[1\]: format int4, group_size 64, in_features 64 differ"),
        (lambda: int4_matmul(torch.randn(2, 64), [quantize_int4(torch.randn(4, 64), 32)] * 2, torch.randn(4)),
         ValueError, r"bias: expected shape \(8,\)"),
    ],
)
def test_bad_inputs_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_quantized_weight_helpers():
    qw = quantize_nf4(torch.randn(8, 64), 64, double_quant=True)
    assert isinstance(qw, QuantizedWeight) and qw.nbytes() == 8 * 32 + 8 * 2
    moved = qw.to("meta")
    assert moved.packed.is_meta and moved.scales.is_meta and moved.double_quant["absmax_q"].is_meta
    assert qw.dequantize(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("n,k", [(2048, 2048), (2048, 5504), (8192, 8192), (32000, 2048), (37, 96), (16, 32)])
@pytest.mark.parametrize("sms", [1, 78, 132])
def test_cuda_splits_are_ones_the_kernel_accepts(n, k, sms):
    """The C++ side refuses a split count that its even division of iterations would not reproduce."""
    iters = cuda_int4.cuda_iterations(k)
    splits = cuda_int4.cuda_splits(n, k, sms)
    per = -(-iters // splits)
    assert 1 <= splits <= iters and -(-iters // per) == splits
    assert splits == 1 or iters // splits >= 2


def test_cuda_entry_points_check_arguments_before_touching_a_device():
    """The CUDA kernel's argument checks run on the host, so a CUDA build tests them anywhere
    (descriptors of tensors on cuda:0 at fake addresses; every entry point's checks are in
    tests/test_rope_decode_cuda_entry.py)."""
    ext = llama_kernels.dispatch.ext()
    if not llama_kernels.build_info()["cuda"]:
        pytest.skip("llama_kernels._C was built without CUDA")
    codes = llama_kernels.dispatch.DTYPE_CODES

    def t(shape, dtype, address=1 << 20):
        return ext.TensorArg(address, codes[dtype], 0, list(shape),
                             list(torch.empty(shape, device="meta").stride()))

    def args(m=1, k=256, group=128, x=4096, packed=4096, splits=1):
        n = 64
        return (t((m, k), torch.bfloat16, x), t((n, k // 2), torch.uint8, packed), t((n, k // group), torch.float16),
                ext.TensorArg(), t((16,), torch.float32), t((m, n), torch.bfloat16), ext.TensorArg(), group, True,
                splits, 0)

    def call(**change):
        llama_kernels.dispatch.cuda_call(ext.int4_matmul_cuda, *args(**change))

    with pytest.raises(ValueError, match="x: the CUDA int4 kernel takes at most 16 rows, got 17"):
        call(m=17)
    with pytest.raises(ValueError, match="in_features must be a positive multiple of 32"):
        call(k=100, group=50)
    with pytest.raises(ValueError, match="group_size: expected 32, 64 or 128"):
        call(group=48)
    with pytest.raises(ValueError, match="x: rows must start 16-byte aligned"):
        call(x=4098)
    with pytest.raises(ValueError, match="qw.packed: must be 16-byte aligned"):
        call(packed=4100)
    with pytest.raises(ValueError, match="splits: expected 1..2"):
        call(splits=3)
    with pytest.raises(ValueError, match="workspace: needs"):
        call(splits=2)
    assert ext.int4_matmul_cuda(*args(m=17)).startswith(
        "ValueError: x: the CUDA int4 kernel takes at most 16 rows")  # returned, never thrown
    # The dispatcher's row limit is the kernel's.
    assert ext.int4_matmul_max_rows_cuda() == cuda_int4.CUDA_MMA_MAX_ROWS
