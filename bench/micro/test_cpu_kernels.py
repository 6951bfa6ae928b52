"""Micro-benchmarks of the C++ CPU kernels against PyTorch, with pytest-benchmark.

    pytest bench/micro --benchmark-only [--benchmark-group-by=group] [--benchmark-compare]

They sit outside `tests/`, so the normal test run never collects them. Each group holds our
kernel (forced to the `cpu` backend) and the PyTorch computation a user would otherwise run, on
the same inputs, at the decode-time shapes of Sheared-LLaMA-1.3B (d_model 2048, FFN 5504, 16
heads of 128). Repeated calls find their operands in cache, so these are warm-cache times;
`bench/run.py` rotates inputs, times cold, and remains the place for suites, peers and charts.
These exist to time one kernel quickly while changing it, with pytest-benchmark's saved runs and
comparisons (`--benchmark-autosave`, `--benchmark-compare`).
"""
import pytest
import torch
import torch.nn.functional as F

import llama_kernels
from llama.optim import AdamW
from llama_kernels.cpu import int4_matmul as cpu_int4

if "cpu" not in llama_kernels.available_backends("cpu"):
    pytest.skip("llama_kernels._C (the C++ CPU kernels) is not built", allow_module_level=True)

D, FFN, HEADS, HEAD_DIM = 2048, 5504, 16, 128


def _ours(fn):
    def call(*args, **kwargs):
        with llama_kernels.use_backend("cpu"), torch.no_grad():
            return fn(*args, **kwargs)

    return call


def _torch(fn):
    def call(*args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)

    return call


@pytest.mark.parametrize("impl", ["llama_kernels", "torch"])
@pytest.mark.parametrize("rows", [1, 64])
def test_rms_norm(benchmark, impl, rows):
    benchmark.group = f"rms_norm {rows}x{D} fp32"
    x, w = torch.randn(rows, D), torch.rand(D) + 0.5
    fn = _ours(llama_kernels.rms_norm) if impl == "llama_kernels" else _torch(
        lambda x, w, eps: F.rms_norm(x, (D,), w, eps))
    y = benchmark(fn, x, w, 1e-5)
    torch.testing.assert_close(y, llama_kernels.rms_norm_reference(x, w, 1e-5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["llama_kernels", "torch"])
def test_add_rms_norm(benchmark, impl):
    benchmark.group = f"add_rms_norm 1x{D} fp32"
    x, h, w = torch.randn(1, D), torch.randn(1, D), torch.rand(D) + 0.5

    def eager(x, h, w, eps):
        s = x + h
        return F.rms_norm(s, (D,), w, eps), s

    fn = _ours(llama_kernels.add_rms_norm) if impl == "llama_kernels" else _torch(eager)
    y, s = benchmark(fn, x, h, w, 1e-5)
    torch.testing.assert_close(s, x + h)
    torch.testing.assert_close(y, llama_kernels.rms_norm_reference(x + h, w, 1e-5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["llama_kernels", "torch"])
def test_linear_gemv(benchmark, impl):
    benchmark.group = f"linear 1x{D} @ {FFN}x{D} fp32"
    x, w = torch.randn(1, D), torch.randn(FFN, D) / D**0.5
    fn = _ours(llama_kernels.linear) if impl == "llama_kernels" else _torch(F.linear)
    y = benchmark(fn, x, w)
    torch.testing.assert_close(y, x @ w.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["llama_kernels-int4", "llama_kernels-int4-fp32act", "llama_kernels-nf4",
                                  "torch-dense"])
def test_int4_gemv(benchmark, impl, monkeypatch):
    """int4 takes int8 activations on the CPU by default; -fp32act is its fp32-activation path."""
    benchmark.group = f"4-bit matmul 1x{D} @ {FFN}x{D}, groups of 64, fp32 x"
    x, w = torch.randn(1, D), torch.randn(FFN, D) / D**0.5
    if impl == "torch-dense":
        y = benchmark(_torch(F.linear), x, w)
        torch.testing.assert_close(y, x @ w.T, atol=1e-4, rtol=1e-4)
        return
    monkeypatch.setattr(cpu_int4, "ACTIVATIONS", "fp32" if impl.endswith("fp32act") else "int8")
    qw = llama_kernels.quantize_nf4(w, 64) if impl.endswith("nf4") else llama_kernels.quantize_int4(w, 64)
    y = benchmark(_ours(llama_kernels.int4_matmul), x, qw)
    ref = llama_kernels.int4_matmul_reference(x, qw)
    if impl == "llama_kernels-int4":  # x rounded to int8 per block of 32: about 1% of the norm
        assert float((y - ref).norm() / ref.norm()) < 3e-2
    else:
        torch.testing.assert_close(y, ref, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("activations", ["int8", "fp32"])
@pytest.mark.parametrize("n,k", [(512, 512), (1376, 512), (512, 1376), (32000, 512)], ids=str)
def test_int4_gemv_stories42m(benchmark, activations, n, k, monkeypatch):
    """The decode projections of stories42M (groups of 32, as bench/suites/decode.py quantizes
    them), int8 against fp32 activations; bench/micro/int4_q8_compare.py interleaves the two."""
    benchmark.group = f"int4 matmul 1x{k} @ {n}x{k}, groups of 32, stories42M decode"
    monkeypatch.setattr(cpu_int4, "ACTIVATIONS", activations)
    x, qw = torch.randn(1, k), llama_kernels.quantize_int4(torch.randn(n, k) / k**0.5, 32)
    y = benchmark(_ours(llama_kernels.int4_matmul), x, qw)
    ref = llama_kernels.int4_matmul_reference(x, qw)
    assert float((y - ref).norm() / ref.norm()) < (3e-2 if activations == "int8" else 1e-5)


@pytest.mark.parametrize("impl", ["llama_kernels", "torch"])
@pytest.mark.parametrize("context", [1024, 4096])
def test_rope_decode_attention(benchmark, impl, context):
    benchmark.group = f"decode attention B1 H{HEADS} D{HEAD_DIM} context {context} fp32"
    capacity = context + 1
    q = torch.randn(1, 1, HEADS, HEAD_DIM)
    k_new, v_new = torch.randn(1, 1, HEADS, HEAD_DIM), torch.randn(1, 1, HEADS, HEAD_DIM)
    k_cache, v_cache = torch.randn(1, capacity, HEADS, HEAD_DIM), torch.randn(1, capacity, HEADS, HEAD_DIM)
    seqlens = torch.tensor([context], dtype=torch.int32)
    angles = torch.arange(capacity)[:, None] * 10000.0 ** (-torch.arange(HEAD_DIM // 2) / (HEAD_DIM // 2))
    cos, sin = angles.cos(), angles.sin()
    fn = (_ours(llama_kernels.rope_decode_attention) if impl == "llama_kernels"
          else _torch(llama_kernels.rope_decode_attention_reference))
    out = benchmark(fn, q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin)
    expected = llama_kernels.rope_decode_attention_reference(
        q, k_new, v_new, k_cache.clone(), v_cache.clone(), seqlens, cos, sin)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("impl", ["llama_kernels", "torch"])
def test_swiglu(benchmark, impl):
    benchmark.group = f"swiglu 512x{FFN} fp32"
    gate, up = torch.randn(512, FFN), torch.randn(512, FFN)
    fn = _ours(llama_kernels.swiglu) if impl == "llama_kernels" else _torch(lambda g, u: F.silu(g) * u)
    y = benchmark(fn, gate, up)
    torch.testing.assert_close(y, llama_kernels.swiglu_reference(gate, up), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["llama_kernels", "torch"])
def test_linear_cross_entropy(benchmark, impl):
    """Loss and the gradients of h and the head, 512 tokens, the stories15M head (288 x 32000)."""
    benchmark.group = "linear_cross_entropy 512x288 -> 32000 fp32, fwd+bwd"
    h = torch.randn(512, 288, requires_grad=True)
    w = (torch.randn(32000, 288) * 0.05).requires_grad_()
    t = torch.randint(0, 32000, (512,))

    def ours():
        with llama_kernels.use_backend("cpu"):
            return torch.autograd.grad(llama_kernels.linear_cross_entropy(h, w, t), (h, w))

    def eager():
        return torch.autograd.grad(F.cross_entropy(F.linear(h, w), t), (h, w))

    gh, gw = benchmark(ours if impl == "llama_kernels" else eager)
    ref_h, ref_w = torch.autograd.grad(llama_kernels.linear_cross_entropy_reference(h, w, t), (h, w))
    torch.testing.assert_close(gh, ref_h, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(gw, ref_w, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("impl", ["llama_kernels", "torch-foreach"])
def test_adamw_step(benchmark, impl):
    """One step over the parameters of a stories15M-sized model (tensors of its shapes, fp32)."""
    benchmark.group = "adamw step, stories15M parameter shapes"
    shapes = [(32000, 288)] + [(288, 288)] * 24 + [(768, 288), (288, 768), (768, 288)] * 6 + [(288,)] * 13
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    if impl == "llama_kernels":
        opt = AdamW(params, lr=1e-4, weight_decay=0.1)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, foreach=True)
    benchmark(opt.step)


@pytest.mark.parametrize("impl", ["llama_kernels", "torch-mask", "torch-compact"])
def test_masked_matmul_half_pruned(benchmark, impl):
    """The FFN up-projection with half of its rows and columns masked to zero: ours skips them,
    the dense GEMM multiplies the masks in, the compact GEMM has them sliced away."""
    benchmark.group = f"masked_matmul 64x{D} -> {FFN}, 50% rows and columns masked, fp32"
    x, w = torch.randn(64, D), torch.randn(FFN, D) * D**-0.5
    row, col = (torch.rand(FFN) < 0.5).float(), (torch.rand(D) < 0.5).float()
    keep_r, keep_c = row.nonzero()[:, 0], col.nonzero()[:, 0]
    w_compact, x_compact = w[keep_r][:, keep_c].contiguous(), x[:, keep_c].contiguous()
    calls = {
        "llama_kernels": _ours(lambda: llama_kernels.masked_matmul(x, w, row, col)),
        "torch-mask": _torch(lambda: F.linear(x * col, w) * row),
        "torch-compact": _torch(lambda: F.linear(x_compact, w_compact)),
    }
    y = benchmark(calls[impl])
    if impl != "torch-compact":
        torch.testing.assert_close(y, llama_kernels.masked_matmul_reference(x, w, row, col), atol=1e-4, rtol=1e-4)
