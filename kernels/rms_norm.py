"""RMSNorm: y = x * rsqrt(mean(x^2, -1) + eps) * weight, computed in fp32 for every dtype.

The pattern every op follows: a PyTorch reference, input checks that name the argument, one
custom op per pass (forward, backward) whose implementation picks a backend, and autograd
registered on the forward op. Each backend writes into outputs allocated here, so tests can
poison them first.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _dispatch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- reference
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The oracle: fp32 math (fp64 if x is fp64), result in x's dtype. Differentiable by autograd."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(compute)).to(x.dtype)


def _torch_fwd(x, w, eps, y, rstd):
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(dim=-1) + eps)
    rstd.copy_(r)
    y.copy_(xf * r[:, None] * w.float())


def _torch_bwd(dy, x, w, rstd, dx, dw):
    xhat = x.float() * rstd[:, None]
    g = dy.float()
    gw = g * w.float()
    mean = (gw * xhat).mean(dim=-1, keepdim=True)
    dx.copy_(rstd[:, None] * (gw - xhat * mean))
    dw.copy_((g * xhat).sum(dim=0))


# ----------------------------------------------------------------------------- compiled backends
def _code(t: torch.Tensor) -> int:
    return _dispatch.DTYPE_CODES[t.dtype]


def _cpu_fwd(x, w, eps, y, rstd):
    _cpu_fwd_rows(x, x.shape[0], x.stride(0), w, eps, y, y.stride(0), rstd)


def _cpu_fwd_rows(x, rows, x_stride, w, eps, y, y_stride, rstd):
    """The C++ forward over `rows` rows of x and y (row strides given, last dims contiguous)."""
    _dispatch.ext().rms_norm_fwd_cpu(
        x.data_ptr(), w.data_ptr(), y.data_ptr(), 0 if rstd is None else rstd.data_ptr(), rows, x.shape[-1],
        x_stride, y_stride, _code(x), _code(w), eps, torch.get_num_threads(),
    )


def _cpu_bwd(dy, x, w, rstd, dx, dw):
    _dispatch.ext().rms_norm_bwd_cpu(
        dy.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr(), dx.data_ptr(), dw.data_ptr(),
        x.shape[0], x.shape[1], dy.stride(0), x.stride(0), dx.stride(0), _code(x), _code(w),
        torch.get_num_threads(),
    )


def _cuda_fwd(x, w, eps, y, rstd):
    _dispatch.cuda_call(
        _dispatch.ext().rms_norm_fwd_cuda,
        x.data_ptr(), w.data_ptr(), y.data_ptr(), rstd.data_ptr(), x.shape[0], x.shape[1],
        x.stride(0), y.stride(0), _code(x), _code(w), eps, x.device.index, _dispatch.cuda_stream(x),
    )


def _cuda_bwd(dy, x, w, rstd, dx, dw):
    partials = max(1, min(x.shape[0], 2 * _dispatch.sm_count(x.device)))
    workspace = torch.empty((partials, x.shape[1]), dtype=torch.float32, device=x.device)
    _dispatch.cuda_call(
        _dispatch.ext().rms_norm_bwd_cuda,
        dy.data_ptr(), x.data_ptr(), w.data_ptr(), rstd.data_ptr(), dx.data_ptr(), dw.data_ptr(),
        workspace.data_ptr(), partials, x.shape[0], x.shape[1], dy.stride(0), x.stride(0),
        dx.stride(0), _code(x), _code(w), x.device.index, _dispatch.cuda_stream(x),
    )


def _cuda_unsupported(x: torch.Tensor, *others: torch.Tensor) -> Optional[str]:
    """Mirrors the CUDA kernel's limit: rows are held in registers, 2048 packs (vectors or elements) at most."""
    n = x.shape[-1]
    vec = 16 // x.element_size()
    aligned = n % vec == 0 and all(t.data_ptr() % 16 == 0 for t in (x, *others))
    limit = _dispatch.ext().rms_norm_max_cols_cuda(_code(x), aligned)
    return None if n <= limit else f"rows of {n} elements exceed the CUDA kernel's {limit}"


def _triton_fwd(x, w, eps, y, rstd):
    from .triton import rms_norm as tri

    tri.rms_norm_fwd(x, w, eps, y, rstd)


def _triton_bwd(dy, x, w, rstd, dx, dw):
    from .triton import rms_norm as tri

    tri.rms_norm_bwd(dy, x, w, rstd, dx, dw)


FORWARD = {"torch": _torch_fwd, "cpu": _cpu_fwd, "cuda": _cuda_fwd, "triton": _triton_fwd}
BACKWARD = {"torch": _torch_bwd, "cpu": _cpu_bwd, "cuda": _cuda_bwd, "triton": _triton_bwd}


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


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _choose(x2: torch.Tensor, w: torch.Tensor, *others: torch.Tensor) -> str:
    checks = {"cuda": lambda: _cuda_unsupported(x2, w, *others)} if x2.is_cuda else None
    return _dispatch.choose("rms_norm", x2.device, checks)


# ----------------------------------------------------------------------------- custom ops
def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = _rows(x)
    w = _kernel_weight(x2, weight.contiguous())
    backend = _choose(x2, w)
    y = x2.new_empty(x2.shape)
    rstd = x2.new_empty(x2.shape[0], dtype=torch.float32)
    if x2.numel():
        FORWARD[backend](x2, w, float(eps), y, rstd)
    return y.view(x.shape), rstd.view(x.shape[:-1])


def _inference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The forward without autograd: the C++ kernel skips the 1/rms it would save for a backward."""
    # Decode's case, a contiguous CPU x, needs no 2-D view: the C++ kernel takes its address,
    # row count and row stride.
    direct = x.is_cpu and x.is_contiguous()
    x2 = x if direct else _rows(x)
    w = _kernel_weight(x2, weight.contiguous())
    backend = _choose(x2, w)
    if direct and backend == "cpu":
        y = torch.empty_like(x)
        cols = x.shape[-1]
        if x.numel():
            _cpu_fwd_rows(x, x.numel() // cols, cols, w, float(eps), y, cols, None)
        return y
    if direct:
        x2 = _rows(x)
    y = x2.new_empty(x2.shape)
    rstd = None if backend == "cpu" else x2.new_empty(x2.shape[0], dtype=torch.float32)
    if x2.numel():
        FORWARD[backend](x2, w, float(eps), y, rstd)
    return y.view(x.shape)


@torch.library.custom_op("kernels::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y, rstd): y like x, rstd = 1/rms per row in fp32 with shape x.shape[:-1]."""
    return _forward(x, weight, eps)


@rms_norm_fwd.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("kernels::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (grad_x, grad_weight) in the dtypes of x and weight."""
    x2 = _rows(x)
    dy = _rows(grad_y.to(x.dtype))
    w = _kernel_weight(x2, weight.contiguous())
    r = rstd.reshape(-1).contiguous()
    backend = _choose(x2, w, dy)
    dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    dw = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    BACKWARD[backend](dy, x2, w, r, dx, dw)
    return dx.view(x.shape), dw.to(weight.dtype)


@rms_norm_bwd.register_fake
def _(grad_y, x, weight, rstd):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _eps = inputs
    ctx.save_for_backward(x, weight, output[1])
    # Autograd may run the backward on a worker thread that does not see use_backend().
    ctx.forced_backend = _dispatch.forced_backend()


def _backward(ctx, grad_y, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    if grad_y is None:
        return None, None, None
    with _dispatch.use_backend(ctx.forced_backend):
        dx, dw = rms_norm_bwd(grad_y, x, weight, rstd)
    return dx, dw, None


rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim of x (any leading dims), differentiable in x and weight.

    fp32 math for fp32, fp16 and bf16 inputs; the output has x's dtype. weight may be in any of
    those dtypes (fp32 weights with bf16 activations is the usual mixed-precision case).
    """
    check_inputs(x, weight, eps)
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return rms_norm_fwd(x, weight, float(eps))[0]
    return _inference(x, weight, float(eps))  # no autograd or tracing: skip the custom-op layer
