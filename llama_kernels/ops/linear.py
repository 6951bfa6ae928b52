"""Linear layer for decode-sized inputs: y = x @ weight^T + bias.

Generating a token multiplies a handful of activation rows by every weight matrix, so the
time is the time to stream the weights. On the CPU, the C++ kernel reads each fp32 weight row
once for all rows of x and runs near memory bandwidth (1.7-3.3x `F.linear` for 1-16 rows on two
cores; llama_kernels/cpu/linear.py); 16-bit weights, larger inputs, autograd and torch.compile go
to `F.linear` (the `torch` backend).

`linear_argmax` is greedy decoding's head: the index of the largest logit, from the same kernel
walk without writing the logits out (llama.generate uses it for temperature 0 on the CPU).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .. import dispatch
from ..cpu import linear as cpu_linear



def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The oracle: fp32 math (fp64 for fp64 inputs), result in x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(compute) @ weight.to(compute).t()
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


def _torch(x, weight, bias):
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    for name, t in (("x", x), ("weight", weight)):
        dispatch.check_float_tensor(name, t, x)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape (out_features, in_features), got {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: last dim must equal weight's in_features {weight.shape[1]}, got shape {tuple(x.shape)}")
    if bias is not None:
        _check_bias(x, bias, weight.shape[0])


def _check_bias(x: torch.Tensor, bias: torch.Tensor, out_features: int) -> None:
    dispatch.check_float_tensor("bias", bias, x)
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias: expected shape ({out_features},), got {tuple(bias.shape)}")


def linear(
    x: torch.Tensor, weight: torch.Tensor | Sequence[torch.Tensor], bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ weight^T + bias over any leading dims of x; y has x's dtype.

    `weight` may also be a sequence of weights that share x (the Q, K and V projections, say):
    y is then x @ [W_0 | W_1 | ...]^T, the outputs side by side in one (..., sum N) tensor, and
    `bias` has sum N entries. On the CPU one kernel call converts x once for all of them.
    """
    weights = _weights(weight)
    n, grad = 0, torch.is_grad_enabled() and x.requires_grad
    for w in weights:  # a plain loop: this runs for every projection of every decode step
        check_inputs(x, w, None)
        n += w.shape[0]
        grad = grad or (w.requires_grad and torch.is_grad_enabled())
    if bias is not None:
        _check_bias(x, bias, n)
        grad = grad or (bias.requires_grad and torch.is_grad_enabled())
    if grad or torch.compiler.is_compiling():
        return _torch_parts(x, weights, bias)
    k = x.shape[-1]
    if not k:  # an empty sum: zeros (+ bias), as F.linear gives; the kernel takes no K = 0
        y = x.new_zeros((*x.shape[:-1], n))
        return y if bias is None else y + bias.to(y.dtype)
    rows = x.numel() // k
    backend = dispatch.choose("linear", x.device, {"cpu": lambda: cpu_linear.unsupported(rows, weights)},
                              implemented=("cpu", "torch"))
    if backend == "torch":
        return _torch_parts(x, weights, bias)
    y = x.new_empty((*x.shape[:-1], n))
    if not rows:
        return y
    x2, x_stride = _row_view(x, rows, k)
    if bias is not None:
        bias = bias.contiguous()
    # The parts' outputs (and biases) sit side by side, each after the columns of those before.
    outs, bias_ptrs, offset, size = [], [], 0, y.element_size()
    for w in weights:
        outs.append(y.data_ptr() + offset * size)
        bias_ptrs.append(0 if bias is None else bias.data_ptr() + offset * bias.element_size())
        offset += w.shape[0]
    cpu_linear.forward_rows(x2, rows, x_stride, weights, bias_ptrs,
                            0 if bias is None else dispatch.DTYPE_CODES[bias.dtype], outs, n)
    return y


def _row_view(x: torch.Tensor, rows: int, k: int) -> tuple[torch.Tensor, int]:
    """x as the kernels take it, (tensor, row stride): a contiguous x needs no 2-D view (the
    kernel takes its address, row count and row stride K); otherwise rows of contiguous K."""
    if x.is_contiguous():
        return x, k
    x2 = x.reshape(rows, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, x2.stride(0)


def linear_argmax(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The index of the largest logit of x @ weight^T: `linear(x, weight).float().argmax(-1)`, int64
    of shape x.shape[:-1] (greedy decoding's next token from the final hidden state and the head).

    The C++ CPU kernel makes the logits exactly as `linear` does and keeps each thread's running
    maximum, so the 32k-wide logits are never written or read back, and the result is the same
    index (the first of equal maxima; a NaN counts as the largest, as in torch.argmax). Every
    other case (a backend `linear` would not give the CPU kernel, autograd, torch.compile) runs
    `linear` and then argmax.
    """
    check_inputs(x, weight, None)
    if x.shape[-1] == 0 or weight.shape[0] == 0 or torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad) or torch.compiler.is_compiling():
        return linear(x, weight).float().argmax(-1)
    k = x.shape[-1]
    rows = x.numel() // k
    backend = dispatch.choose("linear", x.device, {"cpu": lambda: cpu_linear.unsupported(rows, (weight,))},
                              implemented=("cpu", "torch"))
    if backend == "torch":
        return linear(x, weight).float().argmax(-1)
    index = torch.empty(x.shape[:-1], dtype=torch.long, device=x.device)
    if not rows:
        return index
    x2, x_stride = _row_view(x, rows, k)
    cpu_linear.forward_argmax(x2, rows, x_stride, weight, index)
    return index


def _torch_parts(x, weights, bias):
    if len(weights) == 1:
        return _torch(x, weights[0], bias)
    y = torch.cat([_torch(x, w, None) for w in weights], dim=-1)
    return y if bias is None else y + bias.to(y.dtype)


def _weights(weight) -> list[torch.Tensor]:
    """weight as a non-empty list of (N_p, K) weights of one dtype."""
    if isinstance(weight, torch.Tensor):
        return [weight]
    if not isinstance(weight, (list, tuple)) or not weight:
        raise TypeError(f"weight: expected a torch.Tensor or a non-empty sequence of them, got {type(weight).__name__}")
    weights = list(weight)
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"weight[{i}]: expected a torch.Tensor, got {type(w).__name__}")
        if w.dtype != weights[0].dtype:
            raise TypeError(f"weight[{i}]: dtype {w.dtype} differs from weight[0]'s {weights[0].dtype}")
    return weights
