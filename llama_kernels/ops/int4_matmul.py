"""4-bit weight-only matmul: y = x @ dequant(W)^T for int4 and NF4 group-quantized weights
(the formats, QuantizedWeight and quantization are in llama_kernels/int4_format.py), and
dequantize(), whose op llama_kernels::int4_dequantize the backward and QuantizedWeight.dequantize
run.

Backends: the C++ CPU kernel (int4 by default with x quantized to int8 per block of 32 and
integer dot products, NF4 with fp32 activations; `llama_kernels.cpu.int4_matmul.ACTIVATIONS`
chooses, and int4_matmul_q8_reference below is the int8 path's maths), and past its row limit
(llama_kernels.cpu.int4_matmul.kernel_rows) panels of dequantized rows through BLAS (llama_kernels/cpu/int4_matmul.py); on CUDA the tensor-core kernel for few rows and dequantize +
cuBLAS for many (llama_kernels/cuda/int4_matmul.py), the Triton GEMV/GEMM in between and for fp32
activations (llama_kernels/triton/int4_matmul.py); the PyTorch reference anywhere.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import dispatch
from ..cpu import int4_matmul as cpu_int4
from ..cuda import int4_matmul as cuda_int4
from ..int4_format import QuantizedWeight, dequantize_reference, unpack_codes
from ..triton import kernels as triton_kernels

ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- dequantize
def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, K) weight the codes stand for, computed in fp32 (by the compiled kernels where
    they can take it, else by the PyTorch reference)."""
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"qw: expected a QuantizedWeight (from quantize_int4/quantize_nf4), got {type(qw).__name__}")
    qw.validate()  # fields can be reassigned after construction: the kernels trust what passes here
    return _dequantize_fast(qw.packed, qw.scales, qw.zeros, qw.lut, qw.group_size, dtype)


def _dequantize_fast(packed, scales, zeros, lut, group_size, dtype) -> torch.Tensor:
    if torch.compiler.is_compiling():  # traced: the opaque op (its fake gives the shape)
        return dequantize_op(packed, scales, zeros, lut, group_size, dtype)
    return _dequantize_any(packed, scales, zeros, lut, group_size, dtype)


@torch.library.custom_op("llama_kernels::int4_dequantize", mutates_args=())
def dequantize_op(packed: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], lut: torch.Tensor,
                  group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized (N, K) weight in `dtype`, as one op for torch.compile and AOT autograd."""
    return _dequantize_any(packed, scales, zeros, lut, group_size, dtype)


@dequantize_op.register_fake
def _(packed, scales, zeros, lut, group_size, dtype):
    return packed.new_empty((packed.shape[0], packed.shape[1] * 2), dtype=dtype)


def _dequantize_any(packed, scales, zeros, lut, group_size, dtype) -> torch.Tensor:
    """The dequantized (N, K) weight in `dtype`: the C++ kernel on the CPU, the CUDA one for
    16-bit CUDA outputs, else the reference (also under a forced `torch` backend)."""
    forced = dispatch.forced_backend()
    if forced != "torch" and dispatch.capabilities().ext is not None and packed.dim() == 2:
        if packed.is_cpu and dispatch.unavailable("cpu", packed.device) is None:
            return cpu_int4.dequantize(packed, scales, zeros, lut, group_size, dtype)
        if (packed.is_cuda and dtype in (torch.float16, torch.bfloat16)
                and dispatch.unavailable("cuda", packed.device) is None):
            return cuda_int4.dequantize(packed, scales, zeros, lut, group_size, dtype)
    return dequantize_reference(packed, scales, zeros, lut, group_size).to(dtype)


# ----------------------------------------------------------------------------- matmul
def int4_matmul_reference(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The oracle: x @ dequantize(W)^T (+ bias) in fp32, result in x's dtype."""
    y = x.float() @ dequantize_reference(qw.packed, qw.scales, qw.zeros, qw.lut, qw.group_size).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def quantize_activations_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K), K a multiple of 32, as the CPU kernel's int8 path takes it: per block of 32
    elements d = amax / 127 (fp32) and xq = round(x * (1 / d)) (nearest-even) in [-127, 127];
    a block with d below FLT_MIN (2**-126) is all zero, with d = 0. Returns xq (M, K/32, 32) as
    fp32 integers and d (M, K/32)."""
    m, k = x.shape
    xb = x.float().reshape(m, k // 32, 32)
    d = xb.abs().amax(dim=-1) / 127
    inv = torch.where(d >= 2.0**-126, 1 / d, torch.zeros_like(d))
    xq = torch.round(xb * inv[..., None]).clamp_(-127, 127)
    return xq, torch.where(inv == 0, torch.zeros_like(d), d)


def int4_matmul_q8_reference(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """The maths of the CPU kernel's int8-activation path (llama_kernels/cpu/int4_matmul.py),
    in float64 for finite x (M, K), int4 weights: per 32-element block c of group g,
    s_g * d_c * (sum q xq - 8 sum xq) (an exact integer), plus z_g * (sum of x over g)."""
    if qw.format != "int4":
        raise ValueError(f"qw: the int8-activation path takes int4 weights, got {qw.format}")
    (n, k), g = qw.shape, qw.group_size
    xq, d = quantize_activations_q8(x)
    codes = unpack_codes(qw.packed).reshape(n, k // 32, 32).double() - 8
    acc = torch.einsum("mcj,ncj->mnc", xq.double(), codes)  # integers below 2**53: exact
    s = qw.scales.double().repeat_interleave(g // 32, dim=1)
    y = (acc * (d.double()[:, None, :] * s[None])).sum(-1)
    return y + x.double().reshape(x.shape[0], k // g, g).sum(-1) @ qw.zeros.double().t()


def check_inputs(x: torch.Tensor, qw: QuantizedWeight, bias: Optional[torch.Tensor], name: str = "qw") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(qw, QuantizedWeight):
        raise TypeError(f"{name}: expected a QuantizedWeight (from quantize_int4/quantize_nf4), got {type(qw).__name__}")
    # Fields can be reassigned after construction, and the kernels trust what passes here: check
    # the object again (attributes only, no data reads: about a microsecond).
    qw.validate(name)
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"x: dtype must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != qw.shape[1]:
        raise ValueError(f"x: last dim must equal the weight's in_features {qw.shape[1]}, got shape {tuple(x.shape)}")
    if x.device != qw.device:
        raise ValueError(f"{name}: is on {qw.device} but x is on {x.device}")
    if bias is not None:
        _check_bias(x, bias, qw.shape[0])


def _check_bias(x: torch.Tensor, bias: torch.Tensor, out_features: int) -> None:
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias: expected shape ({out_features},), got {tuple(getattr(bias, 'shape', ()))}")
    if bias.device != x.device:
        raise ValueError(f"bias: is on {bias.device} but x is on {x.device}")


def _triton(x2, packed, scales, zeros, lut, group_size, y):
    triton_kernels("int4_matmul").int4_matmul(x2, packed, scales, zeros, lut, group_size, y)


def _torch(x2, packed, scales, zeros, lut, group_size, y):
    y.copy_(x2.float() @ dequantize_reference(packed, scales, zeros, lut, group_size).t())


# Each backend writes y (M, N) from x2 (M, K); tests call them directly with poisoned outputs.
BACKENDS = {"torch": _torch, "cpu": cpu_int4.forward, "triton": _triton, "cuda": cuda_int4.forward}
_IMPLEMENTED = ("cuda", "triton", "cpu", "torch")


def _forward_parts(x, parts, lut, group_size, n=None):
    """x @ [W_0 | W_1 | ...]^T for parts[p] = (packed, scales, zeros), in one (..., sum N_p)
    output: the CPU kernel takes every part in one call; other backends run one part at a time."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if n is None:
        n = sum(p[0].shape[0] for p in parts)
    packed = parts[0][0]
    x2 = None if x.is_cpu else _rows(x)
    checks = None if x2 is None else {"cuda": lambda: cuda_int4.unsupported(x2, packed)}
    backend = dispatch.choose("int4_matmul", x.device, checks, implemented=_IMPLEMENTED)
    if len(parts) > 1 and backend != "cpu":
        return torch.cat([_forward_parts(x, [p], lut, group_size) for p in parts], dim=-1)
    if not k:  # an empty sum; QuantizedWeight refuses K = 0, but raw parts may still come here
        return x.new_zeros((*x.shape[:-1], n))
    y = x.new_empty((*x.shape[:-1], n))
    if not rows:
        return y
    if backend != "cpu":
        BACKENDS[backend](x2 if x2 is not None else _rows(x), *parts[0], lut, group_size, y.view(rows, n))
        return y
    if rows > cpu_int4.kernel_rows(parts):
        cpu_int4.panel_gemm(_rows(x), parts, lut, group_size, y.view(rows, n))
        return y
    # A contiguous x needs no 2-D view: the kernel takes its address, row count and row stride K.
    if x.is_contiguous():
        x2, x_stride = x, k
    else:
        x2 = _rows(x)
        x_stride = x2.stride(0)
    # The parts' outputs sit side by side in each row of y, each after the columns of those before.
    outs, address, size = [], y.data_ptr(), y.element_size()
    for p in parts:
        outs.append(address)
        address += p[0].shape[0] * size
    cpu_int4.forward_rows(x2, rows, x_stride, parts, lut, group_size, outs, n)
    return y


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as (rows, K) with a contiguous last dim."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _forward(x, packed, scales, zeros, lut, group_size):
    return _forward_parts(x, ((packed, scales, zeros),), lut, group_size)


@torch.library.custom_op("llama_kernels::int4_matmul", mutates_args=())
def _int4_matmul_op(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
    lut: torch.Tensor, group_size: int,
) -> torch.Tensor:
    return _forward(x, packed, scales, zeros, lut, group_size)


@_int4_matmul_op.register_fake
def _(x, packed, scales, zeros, lut, group_size):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def _setup_context(ctx, inputs, output):
    _x, packed, scales, zeros, lut, group_size = inputs
    ctx.save_for_backward(packed, scales, zeros, lut)
    ctx.group_size = group_size
    ctx.forced_backend = dispatch.forced_backend()  # the backward may run on another thread


def _backward(ctx, grad_y):
    """grad_x = grad_y @ dequant(W); the 4-bit weight is frozen (QLoRA)."""
    packed, scales, zeros, lut = ctx.saved_tensors
    with dispatch.use_backend(ctx.forced_backend):
        w = dequantize_op(packed, scales, zeros, lut, ctx.group_size, grad_y.dtype)
    return grad_y @ w, None, None, None, None, None


_int4_matmul_op.register_autograd(_backward, setup_context=_setup_context)


def int4_matmul(
    x: torch.Tensor, qw: QuantizedWeight | Sequence[QuantizedWeight], bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y = x @ dequant(qw)^T (+ bias) over any leading dims of x, differentiable in x (and bias).

    x may be fp32, fp16 or bf16; y has x's dtype. The weight is frozen. `qw` may also be a
    sequence of weights that share x (the Q, K and V projections, say, in one format and group
    size): y is then x @ [W_0 | W_1 | ...]^T, the outputs side by side in one (..., sum N)
    tensor, computed in one pass (one CPU kernel call converts x once for all of them); `bias`
    then has sum N entries.
    """
    qws = _weights(qw)
    n = 0
    single = len(qws) == 1
    for i, q in enumerate(qws):
        check_inputs(x, q, None, "qw" if single else f"qw[{i}]")
        if i and (q.format, q.group_size, q.shape[1]) != (qws[0].format, qws[0].group_size, qws[0].shape[1]):
            raise ValueError(f"qw[{i}]: format {q.format}, group_size {q.group_size}, in_features {q.shape[1]} "
                             f"differ from qw[0]'s {qws[0].format}, {qws[0].group_size}, {qws[0].shape[1]}")
        n += q.shape[0]
    if bias is not None:
        _check_bias(x, bias, n)
    first = qws[0]
    lut = first.lut
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad):
        ys = [_int4_matmul_op(x, q.packed, q.scales, q.zeros, q.lut, q.group_size) for q in qws]
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
    else:
        y = _forward_parts(x, [(q.packed, q.scales, q.zeros) for q in qws], lut, first.group_size, n)
    return y if bias is None else y + bias.to(y.dtype)


def _weights(qw) -> list[QuantizedWeight]:
    """qw as a non-empty list of QuantizedWeights (int4_matmul checks that they agree)."""
    if isinstance(qw, QuantizedWeight):
        return [qw]
    if not isinstance(qw, (list, tuple)) or not qw:
        raise TypeError(f"qw: expected a QuantizedWeight or a non-empty sequence of them, got {type(qw).__name__}")
    qws = list(qw)
    for i, q in enumerate(qws):
        if not isinstance(q, QuantizedWeight):
            raise TypeError(f"qw[{i}]: expected a QuantizedWeight (from quantize_int4/quantize_nf4), "
                            f"got {type(q).__name__}")
    return qws
