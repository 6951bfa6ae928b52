"""llama_kernels.linear_argmax (the fused head and argmax of greedy decoding): the C++ kernel in
every ISA against linear + argmax, ties, NaN, dispatch; greedy generation with and without it."""
import pytest
import torch

import llama
import llama_kernels
import llama.generate as gen
from llama import ModelConfig, build
from llama_kernels.cpu import linear as cpu_linear
from tests.helpers import poisoned

EXT = llama_kernels.capabilities().ext
ISAS = EXT.cpu_isas() if EXT is not None else []
pytestmark = pytest.mark.skipif(EXT is None, reason="llama_kernels._C is not built")

# Ragged: K around the 16-lane vector and the 64-wide loop, N around the 4-row block and the
# 256-row tile, M around the 4-row pass; and large enough N * K to use threads.
SHAPES = [(1, 1, 1), (1, 37, 17), (2, 5, 16), (3, 257, 15), (4, 1000, 100), (5, 33, 513), (7, 300, 64),
          (16, 9, 31), (1, 32000, 64), (3, 4099, 130)]
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
               (torch.float32, torch.bfloat16)]


def _linear_then_argmax(x, w, isa):
    """What the unfused path computes: the C++ linear kernel's logits, then torch.argmax."""
    y = poisoned((x.shape[0], w.shape[0]), x.dtype)
    EXT.set_cpu_isa(isa)
    try:
        cpu_linear.forward(x, w, None, y)
    finally:
        EXT.set_cpu_isa("")
    return y, y.float().argmax(-1)


def _fused(x, w, isa):
    index = torch.full((x.shape[0],), -7, dtype=torch.long)
    value = poisoned((x.shape[0],), torch.float32)
    EXT.set_cpu_isa(isa)
    try:
        cpu_linear.forward_argmax(x, x.shape[0], x.stride(0), w, index, value)
    finally:
        EXT.set_cpu_isa("")
    return index, value


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("x_dtype,w_dtype", DTYPE_PAIRS, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES, ids=str)
def test_kernel_gives_the_argmax_of_the_linear_kernel(isa, x_dtype, w_dtype, m, n, k):
    torch.manual_seed(m * 1000 + n + k)
    x, w = torch.randn(m, k).to(x_dtype), torch.randn(n, k).to(w_dtype)
    y, expected = _linear_then_argmax(x, w, isa)
    index, value = _fused(x, w, isa)
    torch.testing.assert_close(index, expected, rtol=0, atol=0)
    torch.testing.assert_close(value, y.gather(1, expected[:, None])[:, 0].float(), rtol=0, atol=0)
    # and against the fp64 reference: the picked logit is the largest up to rounding
    ref = llama_kernels.linear_reference(x.double(), w.double())
    slack = (2e-2 if x_dtype != torch.float32 or w_dtype != torch.float32 else 1e-4) * k**0.5
    assert (ref.gather(1, index[:, None])[:, 0] >= ref.max(-1).values - slack * ref.abs().max()).all()


@pytest.mark.parametrize("isa", ISAS)
def test_ties_take_the_first_index_and_nan_wins(isa):
    k, n = 32, 9000  # threads split the rows: the tie spans their ranges
    x = torch.ones(3, k)
    w = torch.zeros(n, k)
    w[[10, 4500, 8999]] = 1.0  # row 0 of x: three equal maxima
    x[1] = -1.0  # row 1: every other logit (0) beats the three -32s; the first zero row is 0
    x[2, 0] = float("nan")  # row 2: every logit is NaN: index 0
    index, _ = _fused(x, w, isa)
    assert index.tolist() == [10, 0, 0]
    _, expected = _linear_then_argmax(x, w, isa)
    assert index.tolist() == expected.tolist()
    w2 = torch.randn(n, k)
    w2[5000, 0] = float("nan")  # one NaN logit in the second thread's half wins over all
    x2 = torch.ones(1, k)
    assert _fused(x2, w2, isa)[0].tolist() == [5000] == _linear_then_argmax(x2, w2, isa)[1].tolist()


def test_op_dispatch_shapes_and_fallbacks():
    x, w = torch.randn(2, 3, 40), torch.randn(77, 40)
    out = llama_kernels.linear_argmax(x, w)
    assert out.shape == (2, 3) and out.dtype == torch.long
    assert torch.equal(out, llama_kernels.linear(x, w).argmax(-1))
    xt = torch.randn(40, 6).t()  # non-contiguous rows
    assert torch.equal(llama_kernels.linear_argmax(xt, w), llama_kernels.linear(xt, w).argmax(-1))
    with llama_kernels.use_backend("torch"):
        assert torch.equal(llama_kernels.linear_argmax(x, w), torch.nn.functional.linear(x, w).argmax(-1))
    big = torch.randn(20, 40)  # more rows than the GEMV takes: linear's GEMM, then argmax
    assert torch.equal(llama_kernels.linear_argmax(big, w), llama_kernels.linear(big, w).argmax(-1))
    wr = w.clone().requires_grad_()
    assert torch.equal(llama_kernels.linear_argmax(x, wr), llama_kernels.linear(x, w).argmax(-1))
    with pytest.raises(ValueError, match="x"):
        llama_kernels.linear_argmax(torch.randn(2, 41), w)


@pytest.mark.parametrize("plan", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_generation_same_tokens_with_and_without_the_fused_head(monkeypatch, batch, plan):
    """The eager step's fused head (linear_argmax, once per step after the prefill) and the decode
    plan's (which takes the argmax inside its C++ step) give the tokens of full logits + argmax."""
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=515, hidden_dim=96,
                      max_seq_len=128, tie_embeddings=False)
    torch.manual_seed(0)
    model = build(cfg).eval()
    with torch.no_grad():  # larger logits: more distinct greedy paths than a fresh init gives
        model.output.weight.mul_(20)
    prompts = [[5, 9, 300, 2][: 2 + i] for i in range(batch)]
    calls = []
    real = llama_kernels.linear_argmax
    monkeypatch.setattr(gen.llama_kernels, "linear_argmax", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(gen, "CPU_DECODE_PLAN", plan)
    fused = gen.generate(model, prompts, 24, gen.Sampling(temperature=0))
    assert len(calls) == (0 if plan else 23)  # the eager step: every step after the prefill
    monkeypatch.setattr(gen, "FUSED_GREEDY_HEAD", False)
    plain = gen.generate(model, prompts, 24, gen.Sampling(temperature=0))
    assert len(calls) == (0 if plan else 23)
    assert fused == plain
    assert len(set(fused[0])) > 1  # not one token repeated
