"""RMSNorm: y = x * rsqrt(mean(x^2, -1) + eps) * weight, computed in fp32 for every dtype.

`add_rms_norm(x, h, weight)` is the same op on the residual stream: it adds a branch output h to
x and normalises the sum in one pass, returning both (one read of each input, no extra launch).
The sum is rounded to x's dtype before it is normalised, so the result equals adding first. Its
backward is RMSNorm's, with the gradient that reached the sum directly added in the same pass.

The pattern every op follows: a PyTorch reference, input checks that name the argument, one
custom op per pass (forward, backward) whose implementation picks a backend, and autograd
registered on the forward op. Each backend writes into outputs allocated here, so tests can
poison them first.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch
from ..cpu import rms_norm as cpu_rms_norm
from ..cuda import rms_norm as cuda_rms_norm
from ..triton import kernels as triton_kernels

SUPPORTED_DTYPES = dispatch.FLOAT_DTYPES


# ----------------------------------------------------------------------------- reference
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The oracle: fp32 math (fp64 if x is fp64), result in x's dtype. Differentiable by autograd."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(compute)).to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                           eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle for the fused residual add: (rms_norm(x + h), x + h), the sum in x's dtype."""
    s = x + h
    return rms_norm_reference(s, weight, eps), s


# Every forward backend: fwd(x, w, eps, y, rstd, h=None, s=None) writes y = norm(x) (and rstd
# unless it is None); with h it normalises s = x + h (rounded to x's dtype) and writes s too.
def torch_fwd(x, w, eps, y, rstd, h=None, s=None):
    if h is not None:
        x = torch.add(x, h, out=s)
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(dim=-1) + eps)
    if rstd is not None:
        rstd.copy_(r)
    y.copy_(xf * r[:, None] * w.float())


# Every backward backend: bwd(dy, x, w, rstd, dx, dw, ds=None) writes dx and dw; ds (like dy) is
# a gradient that reached x directly (the residual stream's, for add_rms_norm), added to dx.
def torch_bwd(dy, x, w, rstd, dx, dw, ds=None):
    xhat = x.float() * rstd[:, None]
    g = dy.float()
    gw = g * w.float()
    mean = (gw * xhat).mean(dim=-1, keepdim=True)
    grad = rstd[:, None] * (gw - xhat * mean)
    dx.copy_(grad if ds is None else grad + ds.float())
    dw.copy_((g * xhat).sum(dim=0))


# ----------------------------------------------------------------------------- Triton backend
def _triton_fwd(x, w, eps, y, rstd, h=None, s=None):
    triton_kernels("rms_norm").rms_norm_fwd(x, w, eps, y, rstd, h=h, s=s)


def _triton_bwd(dy, x, w, rstd, dx, dw, ds=None):
    triton_kernels("rms_norm").rms_norm_bwd(dy, x, w, rstd, dx, dw, ds=ds)


# The compiled backends are in llama_kernels/cpu/rms_norm.py and llama_kernels/cuda/rms_norm.py.
FORWARD = {"torch": torch_fwd, "cpu": cpu_rms_norm.forward, "cuda": cuda_rms_norm.forward, "triton": _triton_fwd}
BACKWARD = {"torch": torch_bwd, "cpu": cpu_rms_norm.backward, "cuda": cuda_rms_norm.backward, "triton": _triton_bwd}


# ----------------------------------------------------------------------------- checks
def check_inputs(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x: dtype must be float32, float16 or bfloat16, got {x.dtype}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"weight: dtype must be float32, float16 or bfloat16, got {weight.dtype}")
    if x.dim() < 1:
        raise ValueError("x: expected at least one dimension (..., hidden), got a scalar")
    if weight.dim() != 1:
        raise ValueError(f"weight: expected shape (hidden,), got {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"weight: has {weight.shape[0]} elements but the last dim of x is {x.shape[-1]}"
        )
    if x.shape[-1] == 0:
        raise ValueError("x: the last (normalized) dimension is empty")
    if x.device != weight.device:
        raise ValueError(f"weight: is on {weight.device} but x is on {x.device}")
    if not (isinstance(eps, (int, float)) and eps >= 0 and eps < float("inf")):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")


def _kernel_weight(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The compiled kernels take a weight in x's dtype or fp32; other mixes go through fp32."""
    return w if w.dtype in (x.dtype, torch.float32) else w.float()


def check_residual(x: torch.Tensor, h: torch.Tensor) -> None:
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"h: expected a torch.Tensor, got {type(h).__name__}")
    if h.shape != x.shape:
        raise ValueError(f"h: expected the shape of x {tuple(x.shape)}, got {tuple(h.shape)}")
    if h.dtype != x.dtype:
        raise TypeError(f"h: expected x's dtype {x.dtype}, got {h.dtype}")
    if h.device != x.device:
        raise ValueError(f"h: is on {h.device} but x is on {x.device}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _choose(x2: torch.Tensor, w: torch.Tensor, *others: torch.Tensor) -> str:
    checks = {"cuda": lambda: cuda_rms_norm.unsupported(x2, w, *others)} if x2.is_cuda else None
    return dispatch.choose("rms_norm", x2.device, checks)


# ----------------------------------------------------------------------------- custom ops
def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float, h: Optional[torch.Tensor] = None,
             rstd: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(y, s, rstd): s = x + h when h is given, rstd when asked for (the backward needs it)."""
    x2 = _rows(x)
    h2 = None if h is None else _rows(h)
    w = _kernel_weight(x2, weight.contiguous())
    backend = _choose(x2, w) if h2 is None else _choose(x2, w, h2)
    y = x2.new_empty(x2.shape)
    s = None if h2 is None else x2.new_empty(x2.shape)
    r = x2.new_empty(x2.shape[0], dtype=torch.float32) if rstd else None
    if x2.numel():
        FORWARD[backend](x2, w, float(eps), y, r, h2, s)
    return y.view(x.shape), None if s is None else s.view(x.shape), None if r is None else r.view(x.shape[:-1])


def _inference(x: torch.Tensor, weight: torch.Tensor, eps: float,
               h: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The forward without autograd, (y, s): no 1/rms is written for a backward."""
    # Decode's case, contiguous CPU tensors, needs no 2-D views: the C++ kernel takes their
    # addresses, the row count and the row stride.
    if x.is_cpu and x.is_contiguous() and (h is None or h.is_contiguous()):
        w = _kernel_weight(x, weight.contiguous())
        if _choose(x, w) == "cpu":
            y = torch.empty_like(x)
            s = None if h is None else torch.empty_like(x)
            cols = x.shape[-1]
            if x.numel():
                cpu_rms_norm.forward_rows(x, x.numel() // cols, cols, w, float(eps), y, cols, None, h, cols, s, cols)
            return y, s
    y, s, _ = _forward(x, weight, eps, h, rstd=False)
    return y, s


@torch.library.custom_op("llama_kernels::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y, rstd): y like x, rstd = 1/rms per row in fp32 with shape x.shape[:-1]."""
    y, _, rstd = _forward(x, weight, eps)
    return y, rstd


@rms_norm_fwd.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("llama_kernels::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
    grad_x_direct: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (grad_x, grad_weight) in the dtypes of x and weight. `grad_x_direct`, a gradient
    that reached x by another path (the residual stream's, in add_rms_norm), is added to grad_x."""
    x2 = _rows(x)
    dy = _rows(grad_y.to(x.dtype))
    ds = None if grad_x_direct is None else _rows(grad_x_direct.to(x.dtype))
    w = _kernel_weight(x2, weight.contiguous())
    r = rstd.reshape(-1).contiguous()
    backend = _choose(x2, w, dy) if ds is None else _choose(x2, w, dy, ds)
    dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    dw = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    if ds is None:
        BACKWARD[backend](dy, x2, w, r, dx, dw)
    else:
        BACKWARD[backend](dy, x2, w, r, dx, dw, ds)
    return dx.view(x.shape), dw.to(weight.dtype)


@rms_norm_bwd.register_fake
def _(grad_y, x, weight, rstd, grad_x_direct=None):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _eps = inputs
    ctx.save_for_backward(x, weight, output[1])
    # Autograd may run the backward on a worker thread that does not see use_backend().
    ctx.forced_backend = dispatch.forced_backend()


def _backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    if grad_y is None:
        return None, None, None
    with dispatch.use_backend(ctx.forced_backend):
        dx, dw = rms_norm_bwd(grad_y, x, weight, rstd)
    return dx, dw, None


rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("llama_kernels::add_rms_norm_fwd", mutates_args=())
def add_rms_norm_fwd(
    x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, s, rstd): s = x + h in x's dtype, y its RMSNorm, rstd = 1/rms of s per row."""
    return _forward(x, weight, eps, h)


@add_rms_norm_fwd.register_fake
def _(x, h, weight, eps):
    like = torch.empty_like(x, memory_format=torch.contiguous_format)
    return like, torch.empty_like(like), x.new_empty(x.shape[:-1], dtype=torch.float32)


def _add_setup_context(ctx, inputs, output):
    _x, _h, weight, _eps = inputs
    ctx.save_for_backward(output[1], weight, output[2])
    ctx.forced_backend = dispatch.forced_backend()


def _add_backward(ctx, grad_y, grad_s, _grad_rstd):
    """The sum's gradient is the norm's input gradient plus what reached s directly; x and h
    both receive it."""
    s, weight, rstd = ctx.saved_tensors
    if grad_y is None:
        return grad_s, grad_s, None, None
    with dispatch.use_backend(ctx.forced_backend):  # grad_s is added inside the kernel
        ds, dw = rms_norm_bwd(grad_y, s, weight, rstd, grad_s)
    return ds, ds, dw, None


add_rms_norm_fwd.register_autograd(_add_backward, setup_context=_add_setup_context)


# ----------------------------------------------------------------------------- public API
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim of x (any leading dims), differentiable in x and weight.

    fp32 math for fp32, fp16 and bf16 inputs; the output has x's dtype. weight may be in any of
    those dtypes (fp32 weights with bf16 activations is the usual mixed-precision case).
    """
    check_inputs(x, weight, eps)
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return rms_norm_fwd(x, weight, float(eps))[0]
    return _inference(x, weight, float(eps))[0]  # no autograd or tracing: skip the custom-op layer


def add_rms_norm(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                 eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + h, weight, eps), x + h) in one pass: the residual add before a norm.

    A transformer block adds each branch's output h to the residual stream x and normalises the
    result for the next branch; fused, the sum is written once and never read back. h must have
    x's shape, dtype and device. The sum is rounded to x's dtype first, as `x + h` would be.
    Differentiable in x, h and weight.
    """
    check_inputs(x, weight, eps)
    check_residual(x, h)
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and (x.requires_grad or h.requires_grad or weight.requires_grad)
    ):
        y, s, _ = add_rms_norm_fwd(x, h, weight, float(eps))
        return y, s
    return _inference(x, weight, float(eps), h)
