"""The CPU int4 kernel's int8-activation path (int4_matmul_q8_cpu; llama_kernels/cpu/int4_matmul.py):
x quantized per block of 32 to int8, integer dot products with the codes (VNNI, vpmaddubsw or plain
C++ per ISA build). Checked against the PyTorch reference of the same maths (exact integer sums:
tight tolerance) and against the dequantized fp32 reference (bounded error), on every ISA build."""
import pytest
import torch

import llama_kernels
from llama_kernels import int4_matmul, int4_matmul_reference, quantize_int4, quantize_nf4
from llama_kernels.cpu import int4_matmul as cpu_int4
from llama_kernels.ops.int4_matmul import int4_matmul_q8_reference, quantize_activations_q8
from tests.helpers import poisoned

EXT = llama_kernels.capabilities().ext
ISAS = EXT.cpu_isas() if EXT is not None else []
pytestmark = pytest.mark.skipif(EXT is None, reason="llama_kernels._C is not built")

# (M, N, K): M = 1..64, N not a multiple of the row block, K with tails past the widest block
# (96 = 3 chunks, 224 = 7, 416 = 13) as well as whole blocks; rows split across threads (N = 301).
# From gemm_rows(isa) rows of x (8 or 4) the kernel takes its many-rows path (weight rows
# interleaved, a lane each): M on both sides of it and of its blocks of x rows, N not a multiple
# of the 8, 16 or 32 rows of a tile (and below one), weights split across threads.
SHAPES = [(1, 1, 32), (1, 37, 64), (2, 5, 128), (3, 33, 96), (4, 100, 256), (5, 7, 384), (6, 13, 224),
          (7, 9, 416), (8, 70, 512), (9, 3, 128), (2, 301, 480),
          (10, 45, 160), (11, 1, 64), (13, 17, 96), (21, 300, 416), (31, 45, 160), (32, 45, 160),
          (37, 33, 224), (64, 129, 128)]
CASES = [(shape, g) for shape in SHAPES for g in (32, 64, 128) if shape[2] % g == 0]
OUT_TOL = {torch.float32: 0.0, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # the output's rounding


def gemm_rows(isa):
    """The rows of x from which `isa`'s build takes the many-rows path."""
    EXT.set_cpu_isa(isa)
    try:
        return EXT.int4_matmul_q8_gemm_rows()
    finally:
        EXT.set_cpu_isa("")


GEMM_ROWS = max(map(gemm_rows, ISAS), default=8)  # rows that take the many-rows path on every build


def _run(x, qws, ys, isa, activations="int8"):
    EXT.set_cpu_isa(isa)
    try:
        cpu_int4.forward_parts(x, [(q.packed, q.scales, q.zeros) for q in qws], qws[0].lut, qws[0].group_size, ys,
                               activations)
    finally:
        EXT.set_cpu_isa("")


def _bound(x, qw):
    """The size of the sum's terms, |s d| * sum |q xq - 8 xq| + |z| * sum |x|: the float rounding
    of the kernel is relative to it, not to the (possibly cancelled) result."""
    xq, d = quantize_activations_q8(x.float())
    k, g = qw.shape[1], qw.group_size
    s = qw.scales.double().abs().repeat_interleave(g // 32, dim=1)
    terms = torch.einsum("mcj,nc->mnc", xq.double().abs() * 15, s) * d.double()[:, None, :]
    return terms.sum(-1) + x.double().abs().reshape(x.shape[0], k // g, g).sum(-1) @ qw.zeros.double().abs().t()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,group", CASES, ids=str)
def test_matches_int8_reference(isa, dtype, shape, group):
    m, n, k = shape
    gen = torch.Generator().manual_seed(m * 1000 + n + k + group)
    qw = quantize_int4(torch.randn(n, k, generator=gen), group)
    x = torch.randn(m, k, generator=gen).to(dtype)
    y = poisoned((m, n), dtype)
    _run(x, [qw], [y], isa)
    ref = int4_matmul_q8_reference(x.float(), qw)
    err = (y.double() - ref).abs()
    assert torch.all(err <= 1e-6 * _bound(x, qw) + OUT_TOL[dtype] * ref.abs()), float(err.max())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape,group", CASES, ids=str)
def test_close_to_dequantized_reference(isa, shape, group):
    """The int8 rounding of x costs about 1% of the output's norm on Gaussian data (8 bits over
    about 5 standard deviations of a block, against 4-bit weights)."""
    m, n, k = shape
    gen = torch.Generator().manual_seed(k + n)
    qw = quantize_int4(torch.randn(n, k, generator=gen), group)
    x = torch.randn(m, k, generator=gen)
    y = poisoned((m, n), torch.float32)
    _run(x, [qw], [y], isa)
    ref = int4_matmul_reference(x, qw)
    assert float((y - ref).norm() / ref.norm()) < 0.03
    assert float((y - ref).abs().max()) < 0.05 * float(ref.abs().max()) + 1e-3


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m,k,group", [(1, 416, 32), (3, 448, 64), (9, 256, 128), (19, 416, 32), (33, 416, 32)], ids=str)
def test_several_weights_write_only_their_slices(isa, m, k, group):
    qws = [quantize_int4(torch.randn(n, k), group) for n in (13, 70, 5)]
    x = torch.randn(m, k)
    y = poisoned((m, 13 + 70 + 5 + 3), torch.float32)
    ys = [y[:, :13], y[:, 13:83], y[:, 83:88]]
    _run(x, qws, ys, isa)
    for q, yp in zip(qws, ys):
        ref = int4_matmul_q8_reference(x, q)
        assert torch.all((yp.double() - ref).abs() <= 1e-6 * _bound(x, q))
    assert torch.isnan(y[:, 88:]).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [5, 19, 33])
def test_isas_agree(isa, m):
    """The integer sums are exact on every ISA: only the fp32 order of the block sums differs."""
    qw = quantize_int4(torch.randn(67, 480), 32)
    x = torch.randn(m, 480)
    y, y_base = poisoned((m, 67), torch.float32), poisoned((m, 67), torch.float32)
    _run(x, [qw], [y], isa)
    _run(x, [qw], [y_base], "baseline")
    torch.testing.assert_close(y, y_base, atol=1e-5 * float(_bound(x, qw).max()), rtol=0)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group", [32, 128])
def test_many_rows_path_agrees_with_the_row_path(isa, group):
    """The same rows of x through the many-rows path (all at once) and the row path (a few at a
    time): equal integer sums, so the results differ only by the fp32 order of the chunk sums."""
    assert 3 < gemm_rows(isa) <= GEMM_ROWS
    qw = quantize_int4(torch.randn(77, 384), group)
    x = torch.randn(3 * GEMM_ROWS, 384)
    y_all, y_few = poisoned((x.shape[0], 77), torch.float32), poisoned((x.shape[0], 77), torch.float32)
    _run(x, [qw], [y_all], isa)
    for i in range(0, x.shape[0], 3):
        _run(x[i:i + 3], [qw], [y_few[i:i + 3]], isa)
    torch.testing.assert_close(y_all, y_few, atol=1e-5 * float(_bound(x, qw).max()), rtol=0)
    assert not torch.equal(y_all, torch.zeros_like(y_all))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("m", [3, GEMM_ROWS + 3])
def test_non_finite_rows_take_the_fp32_path(isa, bad, m):
    """A row of x holding inf or NaN has no int8 form: it is computed with fp32 activations (so
    it gives what the fp32 kernel and the reference give: inf/NaN where they do), and the other
    rows keep the int8 results."""
    qw = quantize_int4(torch.randn(21, 256), 64)
    x = torch.randn(m, 256)
    x[1, 70] = bad
    x[2, 200] = bad
    y, y_fp32 = poisoned((m, 21), torch.float32), poisoned((m, 21), torch.float32)
    _run(x, [qw], [y], isa)
    _run(x, [qw], [y_fp32], isa, activations="fp32")
    torch.testing.assert_close(y[[1, 2]], y_fp32[[1, 2]], equal_nan=True, atol=0, rtol=0)
    assert not torch.isfinite(y[[1, 2]]).any()  # inf times weights of both signs, or NaN
    ok = [0] + list(range(3, m))
    ref = int4_matmul_q8_reference(x[ok], qw)
    assert torch.all((y[ok].double() - ref).abs() <= 1e-6 * _bound(x[ok], qw))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [3, GEMM_ROWS + 1])
def test_zero_and_tiny_blocks(isa, m):
    """An all-zero block and one of subnormals (d below FLT_MIN) contribute nothing to the int8
    sums; the zero term still takes their fp32 sums. Huge finite values stay finite."""
    qw = quantize_int4(torch.randn(9, 128), 32)
    x = torch.randn(m, 128)
    x[0] = 0
    x[1, :32] = 1e-40
    x[2, 32:64] = 1e35
    y = poisoned((m, 9), torch.float32)
    _run(x, [qw], [y], isa)
    assert torch.isfinite(y).all()
    ref = int4_matmul_q8_reference(x, qw)
    assert torch.all((y.double() - ref).abs() <= 1e-6 * _bound(x, qw))
    torch.testing.assert_close(y[0], torch.zeros(9))


def test_reference_quantization_of_activations():
    x = torch.tensor([[127.0, -63.5, 0.5, 1.5] + [0.0] * 28])
    xq, d = quantize_activations_q8(x)
    assert d.item() == 1.0
    assert xq[0, 0, :4].tolist() == [127, -64, 0, 2]  # nearest-even, like the kernel
    xq, d = quantize_activations_q8(torch.full((1, 32), 1e-40))
    assert d.item() == 0 and not xq.any()


def test_nf4_keeps_fp32_activations():
    """NF4's code book is not integers: forward_rows sends NF4 to the fp32 kernel even under
    "int8", and the int8 entry point refuses its table."""
    qw = quantize_nf4(torch.randn(10, 128), 64)
    x = torch.randn(2, 128)
    y, y_fp32 = poisoned((2, 10), torch.float32), poisoned((2, 10), torch.float32)
    cpu_int4.forward(x, qw.packed, qw.scales, qw.zeros, qw.lut, 64, y, "int8")
    cpu_int4.forward(x, qw.packed, qw.scales, qw.zeros, qw.lut, 64, y_fp32, "fp32")
    assert torch.equal(y, y_fp32)
    with pytest.raises(ValueError, match="int8 activations take the int4 table"):
        EXT.int4_matmul_q8_cpu(x.data_ptr(), [qw.packed.data_ptr()], [qw.scales.data_ptr()], [0], qw.lut.data_ptr(),
                               [y.data_ptr()], [10], 2, 128, 64, 128, 10, llama_kernels.dispatch.DTYPE_CODES[x.dtype], 1)


def test_activations_setting(monkeypatch):
    """The module attribute picks the path for the public op; a bad value names the setting."""
    qw = quantize_int4(torch.randn(24, 256), 32)
    x = torch.randn(3, 256)
    with llama_kernels.use_backend("cpu"), torch.no_grad():
        monkeypatch.setattr(cpu_int4, "ACTIVATIONS", "int8")
        y8 = int4_matmul(x, qw)
        monkeypatch.setattr(cpu_int4, "ACTIVATIONS", "fp32")
        y32 = int4_matmul(x, qw)
        monkeypatch.setattr(cpu_int4, "ACTIVATIONS", "int4")
        with pytest.raises(ValueError, match="activations: expected one of"):
            int4_matmul(x, qw)
    assert torch.all((y8.double() - int4_matmul_q8_reference(x, qw)).abs() <= 1e-6 * _bound(x, qw))
    torch.testing.assert_close(y32, int4_matmul_reference(x, qw), atol=1e-4, rtol=1e-4)


def test_vnni_build_is_chosen_where_the_cpu_has_it():
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    if "avx512f" not in flags:
        pytest.skip("no AVX-512")
    assert ("avx512vnni" in ISAS) == ("avx512_vnni" in flags and "avx512bw" in flags)
    if "avx512vnni" in ISAS:
        assert EXT.cpu_isa() == "avx512vnni" or ISAS[-1] != "avx512vnni"
