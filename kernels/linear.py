"""Linear layer for decode-sized inputs: y = x @ weight^T + bias.

Generating a token multiplies a handful of activation rows by every weight matrix, so the
time is the time to stream the weights. On the CPU, the C++ kernel reads each fp32 weight row
once for all rows of x and runs near memory bandwidth (1.7-3.3x `F.linear` for 1-16 rows on two
cores); 16-bit weights, larger inputs, autograd and torch.compile go to `F.linear` (the `torch`
backend).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _dispatch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_ROWS = 16  # beyond this a blocked GEMM (MKL/oneDNN) wins


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The oracle: fp32 math (fp64 for fp64 inputs), result in x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(compute) @ weight.to(compute).t()
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


def _torch(x, weight, bias):
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _cpu(x2, weight, bias, y):
    codes = _dispatch.DTYPE_CODES
    _dispatch.ext().linear_cpu(
        x2.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(), y.data_ptr(),
        x2.shape[0], weight.shape[0], weight.shape[1], x2.stride(0), y.stride(0),
        codes[x2.dtype], codes[weight.dtype], codes[bias.dtype] if bias is not None else 0,
        torch.get_num_threads(),
    )


# Compiled backends write into a caller-allocated y (tests poison it first).
BACKENDS = {"cpu": _cpu}


def check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    for name, t in (("x", x), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: dtype must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name}: is on {t.device} but x is on {x.device}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape (out_features, in_features), got {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: last dim must equal weight's in_features {weight.shape[1]}, got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def _cpu_unsupported(x2: torch.Tensor, weight: torch.Tensor) -> str | None:
    if weight.dtype != torch.float32:
        # Measured on AVX-512: oneDNN's bf16/fp16 GEMV is as fast or faster; the kernel's 16-bit
        # paths exist (and are tested) for the 4-bit work to build on.
        return "16-bit weights (F.linear is as fast)"
    if x2.shape[0] > MAX_ROWS:
        return f"more than {MAX_ROWS} rows (a blocked GEMM is faster)"
    if not weight.is_contiguous():
        return "a non-contiguous weight"
    return None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight^T + bias over any leading dims of x; y has x's dtype."""
    check_inputs(x, weight, bias)
    if torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    ):
        return _torch(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    backend = _dispatch.choose(
        "linear", x.device, {"cpu": lambda: _cpu_unsupported(x2, weight)}, implemented=("cpu", "torch")
    )
    if backend == "torch":
        return _torch(x, weight, bias)
    y = torch.empty((x2.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        BACKENDS[backend](x2, weight, bias, y)
    return y.view(*x.shape[:-1], weight.shape[0])
