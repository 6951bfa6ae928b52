"""linear_cross_entropy: the chunked loss and its gradients against full-logits F.cross_entropy
in fp64, over every row backend, ragged vocabularies and chunkings, ignore_index, label
smoothing and z-loss; the row kernels on poisoned outputs; named errors; opcheck; and that no
(tokens x vocab) tensor is ever allocated."""
import contextlib

import pytest
import torch

import llama_kernels
from llama_kernels.ops import cross_entropy as ce_mod
from tests.helpers import backend_variant, cpu_backends, cpu_variants, poisoned


VARIANTS = cpu_variants()


@contextlib.contextmanager
def _variant(name):
    """The variant as the forced backend (and ISA)."""
    with backend_variant(name) as backend, llama_kernels.use_backend(backend):
        yield backend


def _problem(n, d, v, dtype=torch.float32, ignore=0, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g)).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * d**-0.5 * 3).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    if ignore:
        t[torch.randperm(n, generator=g)[:ignore]] = -100
    b = (torch.randn(v, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    return h, w, t, b


def _reference(h, w, t, b, **kw):
    args = [x.detach().double().requires_grad_() for x in (h, w)]
    bb = None if b is None else b.detach().double().requires_grad_()
    loss = llama_kernels.linear_cross_entropy_reference(args[0], args[1], t, bb, **kw)
    grads = torch.autograd.grad(loss, args + ([bb] if bb is not None else []))
    return loss, grads


OPTIONS = [
    dict(),
    dict(label_smoothing=0.1),
    dict(z_loss=1e-3),
    dict(label_smoothing=0.2, z_loss=1e-2, reduction="sum"),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("n,d,v,chunk,ignore,bias", [
    (1, 8, 5, None, 0, False), (13, 24, 100, 4, 3, True), (37, 16, 1000, 8, 0, False), (9, 32, 4099, 5, 4, False),
], ids=str)
def test_loss_and_gradients_match_full_logits(variant, options, n, d, v, chunk, ignore, bias):
    if variant == "triton" and v > 1000:
        pytest.skip("slow under the Triton interpreter; covered by smaller vocabularies")
    h, w, t, b = _problem(n, d, v, ignore=ignore, bias=bias)
    with _variant(variant):
        loss = llama_kernels.linear_cross_entropy(h, w, t, b, chunk_size=chunk, **options)
        grads = torch.autograd.grad(loss * 1.5, [h, w] + ([b] if b is not None else []))
    ref, ref_grads = _reference(h, w, t, b, **options)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    for got, want, name in zip(grads, ref_grads, ("h", "weight", "bias")):
        torch.testing.assert_close(got.double(), want * 1.5, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_half_precision_inputs(variant):
    if variant == "triton":
        pytest.skip("fp16 GEMMs under the interpreter are slow; the row kernel is fp32 either way")
    h, w, t, _ = _problem(11, 32, 300, torch.float16, ignore=2)
    with _variant(variant):
        loss = llama_kernels.linear_cross_entropy(h, w, t, chunk_size=4, label_smoothing=0.1)
        gh, gw = torch.autograd.grad(loss, [h, w])
    ref, (rh, rw) = _reference(h, w, t, None, label_smoothing=0.1)
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.float16
    torch.testing.assert_close(loss.double(), ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(gh.double(), rh, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(gw.double(), rw, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_row_kernel_on_poisoned_outputs_and_extreme_logits(variant):
    v = 70
    logits = torch.randn(6, v) * 5
    logits[1, :] = -1e30
    logits[1, 3] = 50.0  # one dominant class
    logits[2, 10] = 1e4  # exp overflow without the max shift
    logits[4, :] = 0.0
    target = torch.tensor([0, 3, 10, -100, 69, 5])
    expected = logits.clone()
    ref_loss = torch.empty(6)
    ref_lse = torch.empty(6)
    ce_mod.torch_rows(expected, target, ref_loss, ref_lse, -100, 0.1, 1e-4, 0.25, True)
    got = logits.clone()
    loss, lse = poisoned((6,), torch.float32), poisoned((6,), torch.float32)
    with _variant(variant) as name:
        ce_mod.ROWS[name](got, target, loss, lse, -100, 0.1, 1e-4, 0.25, True)
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)
    assert got[3].eq(0).all() and loss[3] == 0  # an ignored row: no loss, no gradient
    # over the classes the gradient sums to the z-loss share alone, scale * 2 z lse
    rows = [0, 2, 4, 5]
    torch.testing.assert_close(got[rows].sum(-1), 0.25 * 2e-4 * ref_lse[rows], atol=1e-5, rtol=1e-3)


def test_eval_makes_no_gradients_and_agrees():
    h, w, t, _ = _problem(10, 16, 50)
    with torch.no_grad():
        loss = llama_kernels.linear_cross_entropy(h, w, t, chunk_size=3)
    ref, _ = _reference(h, w, t, None)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    assert not loss.requires_grad


def test_only_the_parameters_that_need_gradients_get_them():
    h, w, t, _ = _problem(10, 16, 50)
    h = h.detach()
    loss = llama_kernels.linear_cross_entropy(h, w, t)
    (gw,) = torch.autograd.grad(loss, [w])
    _, (_, rw) = _reference(h, w, t, None)
    torch.testing.assert_close(gw.double(), rw, atol=1e-5, rtol=1e-4)


def test_all_ignored_mean_is_nan_like_torch():
    h, w, t, _ = _problem(4, 8, 20)
    t[:] = -100
    loss = llama_kernels.linear_cross_entropy(h, w, t)
    assert loss.isnan()
    assert llama_kernels.linear_cross_entropy(h, w, t, reduction="sum") == 0


def test_leading_dims_and_int32_targets():
    h, w, t, _ = _problem(12, 16, 40)
    h3 = h.detach().reshape(3, 4, 16)
    loss = llama_kernels.linear_cross_entropy(h3, w, t.reshape(3, 4).int())
    ref, _ = _reference(h, w, t, None)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)


def test_the_full_logits_are_never_allocated():
    """With 1000 tokens and a 4000-word vocabulary, the full fp32 logits are 16 MB; a chunk of 50
    tokens is 0.8 MB. No tensor near the full size may be created while the loss and all
    gradients are made."""
    from torch.utils._python_dispatch import TorchDispatchMode

    sizes = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor):
                    sizes.append(o.numel())
            return out

    h, w, t, _ = _problem(1000, 8, 4000)
    h, w = h.detach(), w.detach()
    grads = torch.empty_like(h), torch.zeros_like(w), None
    with Watch():  # the chunked pass itself (a mode does not see inside a custom op)
        ce_mod._run(h, w, t, None, -100, 0.0, 0.0, "mean", 50, *grads)
    assert max(sizes) < 1000 * 4000 // 4, max(sizes)
    assert max(sizes) >= 50 * 4000  # the chunk's logits were seen, so the watch works


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(target=torch.tensor([0, 1, 50])), ValueError, r"target: expected class indices in \[0, 20\)"),
    (dict(target=torch.tensor([0, -1, 2])), ValueError, r"target: expected class indices"),
    (dict(target=torch.tensor([0.0, 1.0, 2.0])), TypeError, r"target: expected int64"),
    (dict(target=torch.tensor([0, 1])), ValueError, r"target: expected shape \(3,\)"),
    (dict(weight=torch.randn(20, 7)), ValueError, r"weight: expected \(vocab, 8\)"),
    (dict(weight=torch.randn(20, 8).double()), TypeError, r"weight: dtype"),
    (dict(weight=torch.randn(20, 8).half()), TypeError, r"weight: expected h's dtype"),
    (dict(bias=torch.randn(19)), ValueError, r"bias: expected shape \(20,\)"),
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing"),
    (dict(z_loss=-1.0), ValueError, r"z_loss"),
    (dict(reduction="none"), ValueError, r"reduction: expected one of mean, sum"),
    (dict(chunk_size=0), ValueError, r"chunk_size"),
    (dict(ignore_index=1.0), TypeError, r"ignore_index"),
])
def test_bad_inputs_name_the_argument(kwargs, exc, match):
    args = dict(h=torch.randn(3, 8), weight=torch.randn(20, 8), target=torch.tensor([0, 1, 2]))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        llama_kernels.linear_cross_entropy(args.pop("h"), args.pop("weight"), args.pop("target"), **args)


def test_cpu_kernel_refuses_a_bad_target_itself():
    if "cpu" not in cpu_backends():
        pytest.skip("llama_kernels._C is not built")
    logits = torch.randn(2, 5)
    loss = torch.empty(2)
    with pytest.raises(ValueError, match=r"target: expected class indices in \[0, 5\)"):
        ce_mod.ROWS["cpu"](logits, torch.tensor([0, 5]), loss, None, -100, 0.0, 0.0, 1.0, True)


def test_opcheck():
    h, w, t, b = _problem(5, 8, 30, bias=True)
    torch.library.opcheck(torch.ops.llama_kernels.linear_cross_entropy_fwd.default,
                          (h, w, t, b, -100, 0.0, 0.0, "mean", 2, True, True, True))
