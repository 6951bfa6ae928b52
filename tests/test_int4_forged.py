"""Forged QuantizedWeights, K = 0 and weights beyond the fp16 scales: named errors, never
garbage. QuantizedWeight checks itself at construction, and int4_matmul/dequantize check the
object again (its fields can be reassigned), so a forged field is refused both ways."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import llama_kernels
from llama_kernels import int4_format
from llama_kernels.cpu import int4_matmul as cpu_int4
from llama_kernels.cpu import linear as cpu_linear
from llama_kernels.int4_format import QuantizedWeight, quantize_int4, quantize_nf4
from llama_kernels.ops import int4_matmul as int4_op
from tests.helpers import poisoned

EXT = llama_kernels.capabilities().ext
needs_ext = pytest.mark.skipif(EXT is None, reason="llama_kernels._C is not built")


@pytest.fixture(autouse=True)
def fp32_activations(monkeypatch):
    """The CPU kernel is held to the fp32 reference here: its fp32-activation path (the int8 one,
    the CPU default for int4, and its non-finite rows are tested in tests/test_int4_q8.py)."""
    monkeypatch.setattr(cpu_int4, "ACTIVATIONS", "fp32")


def _int4():
    return quantize_int4(torch.randn(8, 128), 64)


def _nf4():
    return quantize_nf4(torch.randn(8, 128), 64)


# (make the weight, field, forged value from the weight, exception, message)
FORGED = [
    (_int4, "packed", lambda q: q.packed.t().contiguous().t(), ValueError, r"qw\.packed: expected a contiguous"),
    (_int4, "packed", lambda q: torch.cat([q.packed, q.packed], 1)[:, ::2], ValueError, r"qw\.packed: expected a contiguous"),
    (_int4, "packed", lambda q: q.packed.to(torch.int8), TypeError, r"qw\.packed: expected uint8, got int8"),
    (_int4, "packed", lambda q: q.packed.reshape(-1), ValueError, r"qw\.packed: expected 2-D"),
    (_int4, "packed", lambda q: q.packed[:, :32].contiguous(), ValueError, r"qw\.shape: expected \(N, K\) = \(8, 64\)"),
    (_int4, "packed", lambda q: q.packed.numpy(), TypeError, r"qw\.packed: expected a torch\.Tensor"),
    (_int4, "shape", lambda q: (8, 256), ValueError, r"qw\.shape: expected \(N, K\) = \(8, 128\)"),
    (_int4, "shape", lambda q: (16, 128), ValueError, r"qw\.shape: expected \(N, K\) = \(8, 128\)"),
    (_int4, "shape", lambda q: (8,), ValueError, r"qw\.shape"),
    (_int4, "scales", lambda q: q.scales.float(), TypeError, r"qw\.scales: expected float16, got float32"),
    (_int4, "scales", lambda q: q.scales.to(torch.bfloat16), TypeError, r"qw\.scales: expected float16, got bfloat16"),
    (_int4, "scales", lambda q: q.scales.t().contiguous().t(), ValueError, r"qw\.scales: expected a contiguous"),
    (_int4, "scales", lambda q: q.scales[:, :1].contiguous(), ValueError, r"qw\.scales: expected shape \(8, 2\)"),
    (_int4, "scales", lambda q: q.scales.to("meta"), ValueError, r"qw\.scales: is on meta but packed is on cpu"),
    (_int4, "scales", lambda q: None, TypeError, r"qw\.scales: expected a torch\.Tensor"),
    (_int4, "zeros", lambda q: None, ValueError, r"qw\.zeros: int4 needs zeros"),
    (_int4, "zeros", lambda q: q.zeros.float(), TypeError, r"qw\.zeros: expected float16, got float32"),
    (_int4, "zeros", lambda q: q.zeros.t().contiguous().t(), ValueError, r"qw\.zeros: expected a contiguous"),
    (_int4, "zeros", lambda q: q.zeros[:4].contiguous(), ValueError, r"qw\.zeros: expected shape \(8, 2\)"),
    (_int4, "zeros", lambda q: q.zeros.to("meta"), ValueError, r"qw\.zeros: is on meta but packed is on cpu"),
    (_nf4, "zeros", lambda q: q.scales.clone(), ValueError, r"qw\.zeros: nf4 has no zeros"),
    (_nf4, "scales", lambda q: q.scales.float(), TypeError, r"qw\.scales: expected float16, got float32"),
    (_int4, "format", lambda q: "int8", ValueError, r"qw\.format: expected one of"),
    (_int4, "format", lambda q: "nf4", ValueError, r"qw\.zeros: nf4 has no zeros"),
    (_nf4, "format", lambda q: "int4", ValueError, r"qw\.zeros: int4 needs zeros"),
    (_int4, "group_size", lambda q: 32, ValueError, r"qw\.scales: expected shape \(8, 4\)"),
    (_int4, "group_size", lambda q: 48, ValueError, r"qw\.group_size: expected one of"),
    (_int4, "group_size", lambda q: 64.0, ValueError, r"qw\.group_size: expected one of"),
]
IDS = [f"{i}-{f[1]}" for i, f in enumerate(FORGED)]


@pytest.mark.parametrize("make,field,forge,exc,match", FORGED, ids=IDS)
def test_forged_field_is_refused_at_construction(make, field, forge, exc, match):
    qw = make()
    with pytest.raises(exc, match=match):
        dataclasses.replace(qw, **{field: forge(qw)})


@pytest.mark.parametrize("make,field,forge,exc,match", FORGED, ids=IDS)
def test_reassigned_field_is_refused_by_the_ops(make, field, forge, exc, match):
    qw = make()
    other = make()
    setattr(qw, field, forge(qw))  # a dataclass field: reassigning skips __post_init__
    x = torch.randn(3, 128)
    with pytest.raises(exc, match=match):
        llama_kernels.int4_matmul(x, qw)
    with pytest.raises(exc, match=match):
        llama_kernels.dequantize(qw)
    with pytest.raises(exc, match=match):
        qw.dequantize()
    # In a joined call the error names the weight's position.
    with pytest.raises(exc, match=match.replace(r"qw\.", r"qw\[1\]\.")):
        llama_kernels.int4_matmul(x, [other, qw])
    with pytest.raises(exc, match=match):
        llama_kernels.int4_matmul(x.requires_grad_(), qw)


def test_forged_lut_is_refused(monkeypatch):
    qw = _int4()
    monkeypatch.setitem(int4_format._LUTS, ("int4", torch.device("cpu")), torch.arange(16, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"qw\.lut: expected float32 \(16,\)"):
        dataclasses.replace(qw)


def test_forged_dtype_is_refused():
    qw = _int4()
    with pytest.raises(TypeError, match=r"qw\.dtype"):
        dataclasses.replace(qw, dtype=torch.int32)


def test_valid_weights_still_work_on_meta_and_joined():
    """What QuantLinear builds (meta buffers, row views of a joined weight) passes the checks."""
    qw = _int4()
    moved = qw.to("meta")
    assert moved.packed.is_meta
    a, b = _int4(), _int4()
    joined = QuantizedWeight("int4", torch.cat([a.packed, b.packed]), torch.cat([a.scales, b.scales]),
                             torch.cat([a.zeros, b.zeros]), 64, (16, 128))
    top = QuantizedWeight("int4", joined.packed[:8], joined.scales[:8], joined.zeros[:8], 64, (8, 128))
    x = torch.randn(2, 128)
    torch.testing.assert_close(llama_kernels.int4_matmul(x, top), int4_op.int4_matmul_reference(x, a))


# ----------------------------------------------------------------------------- K = 0
@pytest.mark.parametrize("quantize", [quantize_int4, quantize_nf4])
def test_quantizing_zero_in_features_is_refused(quantize):
    with pytest.raises(ValueError, match="w: in_features is 0"):
        quantize(torch.randn(4, 0), 64)


def test_constructing_zero_in_features_is_refused():
    qw = _int4()
    with pytest.raises(ValueError, match=r"qw\.shape: in_features 0 must be a positive multiple"):
        QuantizedWeight("int4", qw.packed[:, :0], qw.scales[:, :0], qw.zeros[:, :0], 64, (8, 0))


@needs_ext
def test_int4_backends_give_zeros_for_zero_in_features():
    """Raw parts (no QuantizedWeight can hold K = 0) still give an empty sum, not garbage."""
    packed = torch.empty((5, 0), dtype=torch.uint8)
    scales = torch.empty((5, 0), dtype=torch.float16)
    lut = int4_format.device_lut("int4", torch.device("cpu"))
    x = torch.randn(3, 0)
    for backend in ("cpu", "torch"):
        y = poisoned((3, 5), torch.float32)
        int4_op.BACKENDS[backend](x, packed, scales, scales, lut, 64, y)
        assert torch.equal(y, torch.zeros(3, 5)), backend
        with llama_kernels.use_backend(backend):
            out = int4_op._forward_parts(x, [(packed, scales, scales)], lut, 64)
        assert torch.equal(out, torch.zeros(3, 5)), backend
    ys = [poisoned((3, 5), torch.float32), poisoned((3, 2), torch.float32)]
    cpu_int4.forward_parts(x, [(packed, scales, scales), (packed[:2], scales[:2], scales[:2])], lut, 64, ys)
    assert all(torch.equal(y, torch.zeros_like(y)) for y in ys)


@needs_ext
@pytest.mark.parametrize("backend", [None, "cpu", "torch"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_with_zero_in_features_is_bias(backend, with_bias, dtype):
    x = torch.randn(2, 3, 0, dtype=dtype)
    w = torch.randn(5, 0, dtype=dtype)
    b = torch.randn(5, dtype=dtype) if with_bias else None
    ref = F.linear(x, w, b)
    assert torch.equal(ref, torch.zeros(2, 3, 5, dtype=dtype) + (0 if b is None else b))
    with llama_kernels.use_backend(backend):
        assert torch.equal(llama_kernels.linear(x, w, b), ref)
        w2 = torch.randn(2, 0, dtype=dtype)
        b2 = torch.randn(7, dtype=dtype) if with_bias else None
        joined = llama_kernels.linear(x, [w, w2], b2)
    assert torch.equal(joined, torch.zeros(2, 3, 7, dtype=dtype) + (0 if b2 is None else b2))


@needs_ext
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_linear_cpu_kernel_with_zero_in_features_writes_bias(with_bias):
    x = torch.randn(3, 0)
    w = torch.randn(5, 0)
    b = torch.randn(5) if with_bias else None
    y = poisoned((3, 5), torch.float32)
    cpu_linear.forward(x, w, b, y)
    assert torch.equal(y, F.linear(x, w, b))


# ----------------------------------------------------------------------------- fp16 range
@pytest.mark.parametrize("w", [
    torch.full((4, 128), 1e5),
    torch.full((4, 128), -7e4),
    torch.cat([torch.full((4, 64), -7e4), torch.full((4, 64), 7e4)], 1),
], ids=["1e5", "-7e4", "7e4-per-group"])
@pytest.mark.parametrize("quantize", [quantize_int4, quantize_nf4])
def test_weights_beyond_the_fp16_scales_are_refused(quantize, w):
    with pytest.raises(ValueError, match=r"w: magnitudes up to .* overflow the float16 scales.*up to 65504"):
        quantize(w, 64)


def test_nf4_double_quant_beyond_fp16_is_refused():
    w = torch.randn(4, 128)
    w[0, :64] = 1e5
    with pytest.raises(ValueError, match="w: magnitudes up to 100000 overflow"):
        quantize_nf4(w, 64, double_quant=True)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("quantize", [quantize_int4, quantize_nf4])
def test_non_finite_weights_are_refused(quantize, bad):
    w = torch.randn(4, 128)
    w[2, 5] = bad
    with pytest.raises(ValueError, match="w: contains non-finite values"):
        quantize(w, 64)


@pytest.mark.parametrize("quantize", [quantize_int4, quantize_nf4])
def test_weights_at_the_fp16_limit_still_quantize(quantize):
    w = torch.randn(4, 128)
    w[1, 7] = 6e4
    w[3, 0] = -6e4
    qw = quantize(w, 64)
    assert torch.isfinite(qw.dequantize()).all()
    assert torch.isfinite(qw.scales.float()).all()


@needs_ext
@pytest.mark.parametrize("isa", EXT.cpu_isas() if EXT is not None else [])
@pytest.mark.parametrize("fmt", ["int4", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_infinite_inputs_give_the_reference_infinities(isa, fmt, dtype):
    """The CPU kernel sums x once per group for the int4 zero term; an infinite x would make
    that inf - inf = NaN where the reference gives +-inf, so such rows are summed term by term.
    Rows without infinities keep the fast path's result; several weights share one x."""
    quantize = quantize_int4 if fmt == "int4" else quantize_nf4
    qws = [quantize(torch.randn(n, 160), 32) for n in (37, 5)]
    x = torch.randn(4, 160).to(dtype)
    x[0, 3], x[2, 100], x[2, 7] = float("inf"), float("-inf"), float("-inf")
    x[3, 50] = float("inf")
    x[3, 51] = float("-inf")  # opposite infinities: NaN in the reference as well
    out = poisoned((4, 42), dtype)
    ys = [out[:, :37], out[:, 37:]]
    EXT.set_cpu_isa(isa)
    try:
        cpu_int4.forward_parts(x, [(q.packed, q.scales, q.zeros) for q in qws], qws[0].lut, 32, ys)
    finally:
        EXT.set_cpu_isa("")
    for q, y in zip(qws, ys):
        ref = int4_format.dequantize_reference(q.packed, q.scales, q.zeros, q.lut, 32)
        ref = (x.double() @ ref.double().T)
        assert torch.equal(y[[0, 2]].isinf(), ref[[0, 2]].isinf()) and torch.equal(y.isnan(), ref.isnan())
        assert torch.equal(y[[0, 2]].sign(), ref[[0, 2]].sign().to(dtype))
        assert y[1].isfinite().all()
        torch.testing.assert_close(y[1].double(), ref[1], atol=2e-2, rtol=2e-3)
