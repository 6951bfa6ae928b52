"""AdamW: the fused step against torch.optim.AdamW step for step and against the fp64 reference
(correct_bias off too, gradient dtypes, many ragged tensors); the optimizer's parameter groups
(no decay on norms, biases and embeddings; layer-wise LR decay); the cosine schedule; named errors."""
import math

import pytest
import torch

import llama_kernels
from llama.config import ModelConfig
from llama.model import build
from llama.optim import AdamW, cosine_lr, cosine_schedule, param_groups
from llama_kernels.ops import adamw as adamw_mod
from tests.helpers import cpu_backends

SHAPES = [(1,), (7,), (33, 5), (4096 + 3,), (3, 1000)]  # ragged, and one past a 4096-element piece


def _state(shapes, grad_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g).to(grad_dtype) for s in shapes]
    ms = [torch.randn(s, generator=g) * 0.1 for s in shapes]
    vs = [torch.rand(s, generator=g) * 0.01 for s in shapes]
    return params, grads, ms, vs


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("correct_bias", [True, False])
def test_step_matches_the_reference(backend, grad_dtype, correct_bias):
    if backend == "triton":
        pytest.skip("AdamW has no Triton backend")
    got = _state(SHAPES, grad_dtype)
    want = [[t.clone() for t in lst] for lst in got]
    kw = dict(lr=3e-3, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1, correct_bias=correct_bias)
    for step in (1, 2, 7):
        with llama_kernels.use_backend(backend):
            llama_kernels.adamw_step_(*got, step=step, **kw)
        llama_kernels.adamw_reference_(*want, step=step, **kw)
    for a, b in zip(sum(got[:1] + got[2:], []), sum(want[:1] + want[2:], [])):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_optimizer_matches_torch_adamw_step_for_step(fused):
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=50, max_seq_len=16)
    ours, theirs = build(cfg), build(cfg)
    theirs.load_state_dict(ours.state_dict())
    opt = AdamW(ours.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=fused)
    ref = torch.optim.AdamW(theirs.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            foreach=False)
    tokens = torch.randint(0, 50, (2, 9))
    for _ in range(5):
        for model, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            logits = model(tokens[:, :-1])
            torch.nn.functional.cross_entropy(logits.reshape(-1, 50), tokens[:, 1:].reshape(-1)).backward()
            o.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_parameters_without_gradients_are_left_alone():
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = AdamW([p, q], lr=0.1, weight_decay=0.5)
    p.grad = torch.ones(3)
    opt.step()
    assert torch.equal(q, torch.ones(3)) and q not in opt.state
    assert opt.state[p]["step"] == 1 and not torch.equal(p, torch.ones(3))


def test_non_contiguous_parameter_is_updated_in_place():
    base = torch.randn(4, 6)
    p = torch.nn.Parameter(base.t())  # a transposed view: not contiguous
    ref = torch.nn.Parameter(base.t().clone())
    for param in (p, ref):
        param.grad = torch.ones_like(param)
    AdamW([p], lr=0.1).step()
    torch.optim.AdamW([ref], lr=0.1, weight_decay=0.0).step()
    torch.testing.assert_close(p, ref)


def test_param_groups_decay_and_layer_scales():
    cfg = ModelConfig(dim=32, n_layers=3, n_heads=4, vocab_size=50, max_seq_len=16, tie_embeddings=True)
    model = build(cfg)
    groups = param_groups(model, lr=1.0, weight_decay=0.1, layer_decay=0.5)
    by_name = {n: g for g in groups for n in g["names"]}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))  # tied head counted once
    assert by_name["tok_embeddings.weight"]["weight_decay"] == 0.0
    assert by_name["layers.0.attention_norm.weight"]["weight_decay"] == 0.0
    assert by_name["layers.0.attention.wq.weight"]["weight_decay"] == 0.1
    assert by_name["tok_embeddings.weight"]["lr_scale"] == 0.5**4
    assert by_name["layers.0.attention.wq.weight"]["lr_scale"] == 0.5**3
    assert by_name["layers.2.feed_forward.w1.weight"]["lr_scale"] == 0.5
    assert by_name["norm.weight"]["lr_scale"] == 1.0
    everything = param_groups(model, lr=1.0, weight_decay=0.1, decay_norms_and_embeddings=True)
    assert all(g["weight_decay"] == 0.1 for g in everything)


def test_lr_scale_multiplies_the_scheduled_lr():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = AdamW([{"params": [p], "lr_scale": 0.25}], lr=1.0)
    p.grad = torch.ones(1)
    opt.step()  # the first bias-corrected step moves by lr exactly
    torch.testing.assert_close(p, torch.tensor([-0.25]), atol=1e-6, rtol=0)


def test_cosine_schedule():
    assert cosine_lr(0, 10, 100) == pytest.approx(0.1)
    assert cosine_lr(9, 10, 100) == pytest.approx(1.0)
    assert cosine_lr(10, 10, 100) == pytest.approx(1.0)
    assert cosine_lr(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine_lr(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert cosine_lr(500, 10, 100, 0.1) == pytest.approx(0.1)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = AdamW([p], lr=2.0)
    sched = cosine_schedule(opt, 2, 6, 0.5)
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [2.0 * cosine_lr(s, 2, 6, 0.5) for s in range(7)]
    assert seen == pytest.approx(expected)
    assert math.isclose(seen[-1], 1.0)


@pytest.mark.parametrize("change,exc,match", [
    (lambda s: s[1].__setitem__(0, s[1][0][:-1]), ValueError, r"grads\[0\]: expected the parameter's shape"),
    (lambda s: s[0].__setitem__(1, s[0][1].double()), TypeError, r"params\[1\]: expected float32"),
    (lambda s: s[1].__setitem__(1, s[1][1].half()), TypeError, r"grads\[1\]: expected torch.float32 like grads\[0\]"),
    (lambda s: s[2].pop(), ValueError, r"exp_avgs: expected 2 tensors"),
    (lambda s: s[3].__setitem__(0, torch.zeros(3, 4)), ValueError, r"exp_avg_sqs\[0\]: expected the parameter's shape"),
    (lambda s: s[3].__setitem__(1, torch.zeros(6, 2).t()), ValueError, r"exp_avg_sqs\[1\]: expected a contiguous"),
    (lambda s: s[2].__setitem__(0, s[0][0]), ValueError, r"must not share memory"),
])
def test_bad_state_is_named(change, exc, match):
    state = [list(x) for x in _state([(2, 4), (2, 6)])]
    change(state)
    with pytest.raises(exc, match=match):
        llama_kernels.adamw_step_(*state, lr=0.1, step=1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0, step=1), r"lr: expected"), (dict(lr=0.1, beta1=1.0, step=1), r"beta1"),
    (dict(lr=0.1, eps=0.0, step=1), r"eps"), (dict(lr=0.1, step=0), r"step: expected the 1-based"),
    (dict(lr=0.1, weight_decay=float("nan"), step=1), r"weight_decay"),
])
def test_bad_hyperparameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        llama_kernels.adamw_step_(*_state([(3,)]), **kwargs)


def test_optimizer_refuses_half_precision_parameters():
    with pytest.raises(TypeError, match=r"params: AdamW keeps fp32 master weights"):
        AdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))])
    assert adamw_mod.IMPLEMENTED == ("cpu", "torch")
