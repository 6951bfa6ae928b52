"""RMSNorm forward and forward+backward: ours (``llama_kernels.rms_norm``) against peers; and the
residual add before it (``llama_kernels.add_rms_norm``: y, s = norm(x + h), x + h).

GB/s counts the minimum traffic of an (M, N) input with an (N,) weight, element
size s (the weight shares x's dtype):

* fwd:          read x, read w, write y                                   = 2*M*N*s + N*s
* fwd+bwd:      fwd, then read dy, read x, read w, write dx, write dw     = 5*M*N*s + 3*N*s
* add+fwd:      read x, read h, read w, write s, write y                  = 4*M*N*s + N*s
* add+fwd+bwd:  add+fwd, then read dy, ds, s, w, write the one gradient
                of x and h, write dw                                      = 8*M*N*s + 3*N*s

The add's peers are eager `x + h` then the norm, the same compiled (Inductor fuses the add
into its norm kernel), `x + h` then `F.rms_norm`, and Liger's fused add + RMSNorm.

Per-row statistics saved for backward (rstd) are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F

from bench.common import Bench, Item, SuiteContext, Unavailable, dtype_name, suite, with_backward, within

EPS = 1e-6
# Our backends worth timing per device type ("torch" is the reference; Triton on CPU is the interpreter).
OUR_BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}

Norm = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Impl:
    """``prepare()`` runs once per measurement and returns bind(weight) -> norm(x).

    ``context`` (ours: the forced backend) wraps each timed call, backward included.
    """

    prepare: Callable[[], Callable[[torch.nn.Parameter], Norm]]
    context: Callable[[], ContextManager] | None = None


def llama_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """LLaMA's RMSNorm in eager PyTorch: normalize in fp32, cast back, scale."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _functional(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Impl:
    return Impl(lambda: lambda w: partial(fn, weight=w))


def _compile_prepare() -> Callable[[torch.nn.Parameter], Norm]:
    torch.compiler.reset()  # fresh caches: no recompile limit, no silent fallback to eager
    compiled = torch.compile(llama_rms_norm)
    return lambda w: partial(compiled, weight=w)


def _torch_functional(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, EPS)


def _ours(ops, backend: str) -> Impl:
    return Impl(lambda: lambda w: partial(ops.rms_norm, weight=w, eps=EPS),
                context=partial(ops.use_backend, backend))


def eager_add_rms_norm(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + h
    return llama_rms_norm(s, weight), s


def _functional_add_rms_norm(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + h
    return F.rms_norm(s, (s.shape[-1],), weight, EPS), s


def _compile_add_prepare() -> Callable:
    torch.compiler.reset()
    compiled = torch.compile(eager_add_rms_norm)
    return lambda w: partial(compiled, weight=w)


def _add_impls(ctx: SuiteContext, impls: dict[str, Impl]) -> dict[str, Impl]:
    """The fused-add counterpart of each impl in `impls` (bind(w) -> fn(x, h) -> (y, s))."""
    import llama_kernels

    add: dict[str, Impl] = {}
    for name, impl in impls.items():
        if name.startswith("llama_kernels-"):
            add[name] = Impl(lambda: lambda w: partial(llama_kernels.add_rms_norm, weight=w, eps=EPS), context=impl.context)
    add["torch-eager"] = _functional(eager_add_rms_norm)
    add["torch-compile"] = Impl(_compile_add_prepare)
    if "torch-F.rms_norm" in impls:
        add["torch-F.rms_norm"] = _functional(_functional_add_rms_norm)
    if "liger" in impls:
        from liger_kernel.transformers import LigerFusedAddRMSNorm

        def bind(w: torch.nn.Parameter):
            module = LigerFusedAddRMSNorm(w.numel(), eps=EPS, casting_mode="llama", in_place=False)
            module.weight = w
            return module

        add["liger"] = Impl(lambda: bind)
    return add


def _liger(module_cls) -> Impl:
    def bind(w: torch.nn.Parameter) -> Norm:
        try:
            module = module_cls(w.numel(), eps=EPS, casting_mode="llama", in_place=False)
        except TypeError:  # releases before casting_mode/in_place: llama casting, not in place
            module = module_cls(w.numel(), eps=EPS)
        module.weight = w
        return module

    return Impl(lambda: bind)


def _impls(ctx: SuiteContext) -> tuple[dict[str, Impl], list[Unavailable]]:
    impls: dict[str, Impl] = {}
    unavailable: list[Unavailable] = []
    try:
        import llama_kernels

        backends = llama_kernels.available_backends(ctx.device)
    except Exception as exc:
        unavailable.append(Unavailable("llama_kernels", f"{type(exc).__name__}: {exc}", status="error"))
    else:
        for backend in OUR_BACKENDS[ctx.device.type]:
            if backend in backends:
                impls[f"llama_kernels-{backend}"] = _ours(llama_kernels, backend)
            else:
                unavailable.append(Unavailable(f"llama_kernels-{backend}", f"not in llama_kernels.available_backends: {backends}"))

    impls["torch-eager"] = _functional(llama_rms_norm)
    impls["torch-compile"] = Impl(_compile_prepare)
    if hasattr(F, "rms_norm"):
        impls["torch-F.rms_norm"] = _functional(_torch_functional)
    else:
        unavailable.append(Unavailable("torch-F.rms_norm", f"torch {torch.__version__} has no F.rms_norm"))

    if not ctx.is_cuda:
        unavailable.append(Unavailable("liger", "Liger-Kernel runs on CUDA only"))
    else:
        try:
            from liger_kernel.transformers import LigerRMSNorm
        except ImportError as exc:
            unavailable.append(Unavailable("liger", f"liger_kernel not importable: {exc}"))
        else:
            impls["liger"] = _liger(LigerRMSNorm)
    return impls, unavailable


def _cases(ctx: SuiteContext) -> list[tuple[int, int, torch.dtype, bool]]:
    """(tokens, hidden, dtype, decode) to measure; decode cases use the CUDA-graph timer."""
    if ctx.is_cuda:
        shapes = [(4 * 2048, 2048), (8192, 4096), (4096, 8192), (16384, 2048)]
        decode = [(1, 4096), (32, 4096)]
        dtypes = [torch.bfloat16, torch.float16]
        if ctx.quick:
            shapes, decode, dtypes = shapes[1:2], decode[:1], dtypes[:1]
    else:
        shapes = [(2048, 512), (2048, 2048), (1000, 4097)]
        decode = []
        dtypes = [torch.float32, torch.bfloat16]
        if ctx.quick:
            shapes, dtypes = [(2048, 2048)], dtypes[:1]
    return [(m, n, dt, False) for dt in dtypes for m, n in shapes] + \
        [(m, n, dt, True) for dt in dtypes for m, n in decode]


def _setup(ctx: SuiteContext, impl: Impl, m: int, n: int, dtype: torch.dtype, backward: bool,
           add: bool = False) -> list[Callable]:
    """Calls over rotating inputs: norm(x), or with `add` norm(x, h) -> (y, s)."""
    def make_inputs():
        def activation():
            return torch.randn(m, n, device=ctx.device, dtype=dtype, requires_grad=backward)

        xs = (activation(), activation()) if add else (activation(),)
        w = torch.nn.Parameter(1 + 0.1 * torch.randn(n, device=ctx.device, dtype=dtype), requires_grad=backward)
        grads = tuple(torch.randn_like(xs[0]) for _ in xs) if backward else None
        return xs, w, grads

    size = dtype.itemsize
    copies = ctx.rotating(make_inputs, (2 if backward else 1) * (2 if add else 1) * m * n * size + n * size)
    bind = impl.prepare()
    calls = []
    for xs, w, grads in copies:
        forward = partial(bind(w), *xs)
        if backward:  # the add's outputs (y, s) each get a gradient, as in a transformer block
            forward = with_backward(forward, (*xs, w), grads if add else grads[0])
        calls.append(within(impl.context, forward))
    return calls


def headline(ctx: SuiteContext, bench: Bench) -> bool:
    """Default run: one mid-sized case per pass (fp32 2048x2048 on the CPU, bf16 8192x4096 on a GPU)."""
    if ctx.is_cuda:
        return bench.dtype == "bf16" and bench.case == {"tokens": 8192, "hidden": 4096}
    return bench.dtype == "fp32" and bench.case == {"tokens": 2048, "hidden": 2048}


@suite("rms_norm", headline=headline)
def rms_norm(ctx: SuiteContext) -> list[Item]:
    impls, items = _impls(ctx)
    add_impls = _add_impls(ctx, impls) if any(name.startswith("llama_kernels-") for name in impls) else {}
    for m, n, dtype, decode in _cases(ctx):
        size = dtype.itemsize
        passes = (("fwd", False, False, 2 * m * n * size + n * size, impls),
                  ("fwd+bwd", True, False, 5 * m * n * size + 3 * n * size, impls),
                  ("add+fwd", False, True, 4 * m * n * size + n * size, add_impls),
                  ("add+fwd+bwd", True, True, 8 * m * n * size + 3 * n * size, add_impls))
        for pass_, backward, add, nbytes, pass_impls in passes:
            for name, impl in pass_impls.items():
                items.append(Bench(
                    impl=name,
                    case={"tokens": m, "hidden": n},
                    dtype=dtype_name(dtype),
                    pass_=pass_,
                    setup=partial(_setup, ctx, impl, m, n, dtype, backward, add),
                    bytes=nbytes,
                    cuda_graph=decode,
                ))
    return items
