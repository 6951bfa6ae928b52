"""SwiGLU: y = silu(gate) * up, the gated activation of a LLaMA feed-forward block, with
silu(a) = a * sigmoid(a). fp32 math for every dtype; the output has the inputs' dtype.

The backward recomputes sigmoid(gate) from the saved inputs instead of keeping silu(gate), so a
training step holds two activations per FFN position rather than three:
    d_up = dy * silu(gate),   d_gate = dy * up * (s + silu(gate) * (1 - s)),   s = sigmoid(gate).
gate and up may be strided views (the two halves of one fused gate/up projection); only their
last dim must be contiguous, or they are copied.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch
from ..cpu import swiglu as cpu_swiglu
from ..triton import kernels as triton_kernels

SUPPORTED_DTYPES = dispatch.FLOAT_DTYPES
IMPLEMENTED = ("triton", "cpu", "torch")  # no CUDA kernel: an elementwise op gains nothing over Triton


# ----------------------------------------------------------------------------- reference
def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The oracle: fp32 math (fp64 for fp64 inputs), result in gate's dtype. Differentiable."""
    compute = torch.float64 if gate.dtype == torch.float64 else torch.float32
    return (F.silu(gate.to(compute)) * up.to(compute)).to(gate.dtype)


# Every backend: fwd(a, b, y) and bwd(dy, a, b, da, db) on (rows, cols) tensors with contiguous
# last dims, writing the outputs given.
def torch_fwd(a, b, y):
    y.copy_(F.silu(a.float()) * b.float())


def torch_bwd(dy, a, b, da, db):
    af, g = a.float(), dy.float()
    s = torch.sigmoid(af)
    silu = af * s
    db.copy_(g * silu)
    da.copy_(g * b.float() * (s + silu * (1 - s)))


def _triton_fwd(a, b, y):
    triton_kernels("swiglu").forward(a, b, y)


def _triton_bwd(dy, a, b, da, db):
    triton_kernels("swiglu").backward(dy, a, b, da, db)


FORWARD = {"torch": torch_fwd, "cpu": cpu_swiglu.forward, "triton": _triton_fwd}
BACKWARD = {"torch": torch_bwd, "cpu": cpu_swiglu.backward, "triton": _triton_bwd}


# ----------------------------------------------------------------------------- checks
def check_inputs(gate: torch.Tensor, up: torch.Tensor) -> None:
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: dtype must be float32, float16 or bfloat16, got {t.dtype}")
    if gate.dim() < 1:
        raise ValueError("gate: expected at least one dimension, got a scalar")
    if up.shape != gate.shape:
        raise ValueError(f"up: expected gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    if up.dtype != gate.dtype:
        raise TypeError(f"up: expected gate's dtype {gate.dtype}, got {up.dtype}")
    if up.device != gate.device:
        raise ValueError(f"up: is on {up.device} but gate is on {gate.device}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _backend(device: torch.device) -> str:
    return dispatch.choose("swiglu", device, implemented=IMPLEMENTED)


# ----------------------------------------------------------------------------- custom ops
def _forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    a, b = _rows(gate), _rows(up)
    y = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    if y.numel():
        FORWARD[_backend(a.device)](a, b, y)
    return y.view(gate.shape)


@torch.library.custom_op("llama_kernels::swiglu_fwd", mutates_args=())
def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, contiguous, in gate's dtype."""
    return _forward(gate, up)


@swiglu_fwd.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("llama_kernels::swiglu_bwd", mutates_args=())
def swiglu_bwd(grad_y: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_gate, grad_up), contiguous, in gate's dtype."""
    a, b = _rows(gate), _rows(up)
    dy = _rows(grad_y.to(gate.dtype))
    da = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    db = torch.empty_like(da)
    if da.numel():
        BACKWARD[_backend(a.device)](dy, a, b, da, db)
    return da.view(gate.shape), db.view(gate.shape)


@swiglu_bwd.register_fake
def _(grad_y, gate, up):
    like = torch.empty_like(gate, memory_format=torch.contiguous_format)
    return like, torch.empty_like(like)


def _setup_context(ctx, inputs, output):
    gate, up = inputs
    ctx.save_for_backward(gate, up)
    ctx.forced_backend = dispatch.forced_backend()  # the backward may run on another thread


def _backward(ctx, grad_y):
    gate, up = ctx.saved_tensors
    with dispatch.use_backend(ctx.forced_backend):
        return swiglu_bwd(grad_y, gate, up)


swiglu_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up elementwise, differentiable in both (see the module docstring).

    gate and up: the same shape, dtype (fp32, fp16 or bf16) and device; strided views are fine
    as long as the last dim is contiguous.
    """
    check_inputs(gate, up)
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return swiglu_fwd(gate, up)
    return _forward(gate, up)  # no autograd or tracing: skip the custom-op layer
