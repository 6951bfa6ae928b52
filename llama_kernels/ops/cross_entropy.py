"""Linear + cross-entropy without the full logits: loss = CE(h @ weight^T (+ bias), target).

A language model's last step turns (tokens x dim) hidden states into (tokens x vocab) logits,
and a training step would keep those logits and their gradient: at 8 x 256 tokens and a 32k
vocabulary that is half a gigabyte in fp32. Here the tokens go through in chunks. For each chunk
the logits are computed (one GEMM), a row kernel turns them into the loss and, in place, into
their gradient, and two more GEMMs turn that gradient into the chunk's share of grad_h and
grad_weight. Only one chunk of logits ever exists; the backward then only scales the gradients
the forward already made by the incoming gradient of the loss.

Per token, with lse = logsumexp(logits), target t, label smoothing eps over V classes and z-loss
weight z (PaLM's auxiliary loss that keeps lse near 0):
    loss = lse - (1 - eps) x_t - (eps / V) sum_j x_j + z lse^2
    dloss/dx_j = softmax_j (1 + 2 z lse) - eps / V - (1 - eps) [j = t]
Tokens whose target is `ignore_index` count for nothing. reduction "mean" divides by the number
of counted tokens (NaN when there are none, as torch's cross_entropy gives), "sum" does not.
The smoothing term is torch's `label_smoothing`. Logits and the row math are fp32 for every
dtype; the GEMMs run in the inputs' dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import dispatch
from ..cpu import cross_entropy as cpu_cross_entropy
from ..triton import kernels as triton_kernels

SUPPORTED_DTYPES = dispatch.FLOAT_DTYPES
IMPLEMENTED = ("triton", "cpu", "torch")
REDUCTIONS = ("mean", "sum")
CHUNK_BYTES = 64 << 20  # fp32 logits of one chunk, by default


# ----------------------------------------------------------------------------- reference
def linear_cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                                   bias: Optional[torch.Tensor] = None, *, ignore_index: int = -100,
                                   label_smoothing: float = 0.0, z_loss: float = 0.0,
                                   reduction: str = "mean") -> torch.Tensor:
    """The oracle, with the full logits: fp32 (fp64 for fp64 inputs) F.cross_entropy plus the
    z-loss term. Differentiable by autograd."""
    compute = torch.float64 if h.dtype == torch.float64 else torch.float32
    logits = F.linear(h.reshape(-1, h.shape[-1]), weight, bias).to(compute)
    t = target.reshape(-1)
    loss = F.cross_entropy(logits, t, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction=reduction)
    if z_loss:
        keep = (t != ignore_index).to(compute)
        z = (torch.logsumexp(logits, -1).pow(2) * keep).sum()
        loss = loss + z_loss * (z / keep.sum() if reduction == "mean" else z)
    return loss


# Every backend: rows(logits, target, loss, lse, ignore_index, smoothing, z_loss, scale, write_grad)
# on fp32 logits (rows, V) with a contiguous last dim: writes each row's loss (and lse unless it
# is None) and, with write_grad, scale * dloss/dlogits over the logits.
def torch_rows(logits, target, loss, lse, ignore_index, smoothing, z_loss, scale, write_grad):
    v = logits.shape[1]
    keep = target != ignore_index
    t = torch.where(keep, target, 0)
    row_lse = torch.logsumexp(logits, -1)
    x_t = logits.gather(1, t[:, None])[:, 0]
    row_loss = row_lse - (1 - smoothing) * x_t + z_loss * row_lse * row_lse
    if smoothing:
        row_loss = row_loss - smoothing / v * logits.sum(-1)
    loss.copy_(torch.where(keep, row_loss, 0.0))
    if lse is not None:
        lse.copy_(torch.where(keep, row_lse, 0.0))
    if write_grad:
        logits.sub_(row_lse[:, None]).exp_().mul_((scale * (1 + 2 * z_loss * row_lse))[:, None]).sub_(scale * smoothing / v)
        logits.scatter_add_(1, t[:, None], torch.full_like(x_t[:, None], -scale * (1 - smoothing)))
        logits.mul_(keep[:, None])


def _triton_rows(*args):
    triton_kernels("cross_entropy").rows(*args)


ROWS = {"torch": torch_rows, "cpu": cpu_cross_entropy.rows, "triton": _triton_rows}


# ----------------------------------------------------------------------------- checks
def check_inputs(h, weight, target, bias, ignore_index, label_smoothing, z_loss, reduction, chunk_size) -> None:
    for name, t in (("h", h), ("weight", weight), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    for name, t in (("h", h), ("weight", weight)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}: dtype must be float32, float16 or bfloat16, got {t.dtype}")
    if weight.dtype != h.dtype:
        raise TypeError(f"weight: expected h's dtype {h.dtype}, got {weight.dtype}")
    if h.dim() < 1:
        raise ValueError("h: expected (..., dim), got a scalar")
    if weight.dim() != 2 or weight.shape[1] != h.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight: expected (vocab, {h.shape[-1]}) with vocab > 0, got {tuple(weight.shape)}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target: expected int64 class indices, got {target.dtype}")
    if tuple(target.shape) != tuple(h.shape[:-1]):
        raise ValueError(f"target: expected shape {tuple(h.shape[:-1])} (h without its last dim), got {tuple(target.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (weight.shape[0],) or bias.dtype != h.dtype:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},) and dtype {h.dtype}, "
                             f"got {tuple(bias.shape)} {bias.dtype}")
    for name, t in (("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and t.device != h.device:
            raise ValueError(f"{name}: is on {t.device} but h is on {h.device}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing: expected a number in [0, 1], got {label_smoothing!r}")
    if not (isinstance(z_loss, (int, float)) and 0.0 <= z_loss < float("inf")):
        raise ValueError(f"z_loss: expected a finite number >= 0, got {z_loss!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0):
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")


def check_targets(target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every target is a class index or ignore_index (one host sync on a GPU)."""
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        first = int(target[bad][0])
        raise ValueError(f"target: expected class indices in [0, {vocab}) or ignore_index {ignore_index}, got {first}")


def default_chunk(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * vocab))


# ----------------------------------------------------------------------------- the chunked pass
def _run(h2, weight, t, bias, ignore_index, smoothing, z_loss, reduction, chunk, grad_h, grad_w, grad_b):
    """The loss (fp32 scalar); with grad_* not None, also the gradients of the loss (as reduced)
    with respect to h, weight and bias, in fp32 for weight and bias."""
    n, vocab = h2.shape[0], weight.shape[0]
    count = int((t != ignore_index).sum()) if reduction == "mean" else 1
    scale = 1.0 / count if count else 0.0
    backend = dispatch.choose("linear_cross_entropy", h2.device, implemented=IMPLEMENTED)
    write_grad = grad_h is not None or grad_w is not None or grad_b is not None
    row_loss = torch.empty(n, dtype=torch.float32, device=h2.device)
    # One chunk's buffers, reused: fresh (chunk x vocab) tensors per chunk would page-fault anew.
    rows = min(chunk, n)
    logits_buf = torch.empty(rows, vocab, dtype=h2.dtype, device=h2.device)
    fp32_buf = logits_buf if h2.dtype == torch.float32 else torch.empty(rows, vocab, dtype=torch.float32,
                                                                       device=h2.device)
    g_buf = logits_buf  # the gradient in h's dtype, for the GEMMs (written over the logits)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        hc = h2[s:e]
        out = logits_buf[: e - s]
        torch.matmul(hc, weight.t(), out=out)
        if bias is not None:
            out.add_(bias)
        logits = out if out.dtype == torch.float32 else fp32_buf[: e - s].copy_(out)
        ROWS[backend](logits, t[s:e], row_loss[s:e], None, ignore_index, float(smoothing), float(z_loss), scale,
                      write_grad)
        if not write_grad:
            continue
        g = logits if logits.dtype == h2.dtype else g_buf[: e - s].copy_(logits)
        if grad_h is not None:
            torch.matmul(g, weight, out=grad_h[s:e])
        if grad_w is not None:
            grad_w.addmm_(g.t(), hc) if grad_w.dtype == g.dtype else grad_w.add_(g.t() @ hc)
        if grad_b is not None:
            grad_b.add_(logits.sum(0))
    total = row_loss.sum()
    return total / count if reduction == "mean" else total


@torch.library.custom_op("llama_kernels::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: Optional[torch.Tensor],
    ignore_index: int, label_smoothing: float, z_loss: float, reduction: str, chunk_size: int,
    grad_h_wanted: bool, grad_w_wanted: bool, grad_b_wanted: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_h, grad_weight, grad_bias): the gradients of the loss, made on the way (empty
    where not wanted), in the dtypes of h, weight and bias."""
    h2 = h.reshape(-1, h.shape[-1])
    h2 = h2 if h2.stride(-1) == 1 else h2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    t = target.reshape(-1).long()
    check_targets(t, w.shape[0], ignore_index)
    acc = torch.float32 if h.dtype != torch.float32 else h.dtype
    grad_h = torch.empty_like(h2) if grad_h_wanted else None
    grad_w = torch.zeros(w.shape, dtype=acc, device=w.device) if grad_w_wanted else None
    grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if grad_b_wanted else None
    loss = _run(h2, w, t, bias, ignore_index, label_smoothing, z_loss, reduction, chunk_size, grad_h, grad_w, grad_b)
    return (  # an output not wanted is a new empty tensor (outputs may not alias each other)
        loss,
        h.new_empty(0) if grad_h is None else grad_h.view(h.shape),
        h.new_empty(0) if grad_w is None else grad_w.to(weight.dtype),
        h.new_empty(0) if grad_b is None else grad_b.to(bias.dtype),
    )


@linear_cross_entropy_fwd.register_fake
def _(h, weight, target, bias, ignore_index, label_smoothing, z_loss, reduction, chunk_size,
      grad_h_wanted, grad_w_wanted, grad_b_wanted):
    return (
        h.new_empty((), dtype=torch.float32),
        torch.empty_like(h, memory_format=torch.contiguous_format) if grad_h_wanted else h.new_empty(0),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if grad_w_wanted else h.new_empty(0),
        torch.empty_like(bias) if grad_b_wanted else h.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    _loss, grad_h, grad_w, grad_b = output
    ctx.save_for_backward(grad_h, grad_w, grad_b)
    ctx.wanted = inputs[9:12]


def _backward(ctx, grad_loss, *_unused):
    grad_h, grad_w, grad_b = ctx.saved_tensors
    want_h, want_w, want_b = ctx.wanted
    scale = grad_loss.to(torch.float32)
    return (
        (grad_h * scale).to(grad_h.dtype) if want_h else None,
        (grad_w * scale).to(grad_w.dtype) if want_w else None,
        None,
        (grad_b * scale).to(grad_b.dtype) if want_b else None,
        None, None, None, None, None, None, None, None,
    )


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, *, ignore_index: int = -100,
                         label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "mean",
                         chunk_size: Optional[int] = None) -> torch.Tensor:
    """Cross-entropy of the logits h @ weight^T (+ bias) against `target`, without the full logits.

    h: (..., dim); weight: (vocab, dim), h's dtype; target: h.shape[:-1] class indices (int64 or
    int32), `ignore_index` for tokens that do not count; reduction "mean" or "sum". chunk_size:
    tokens per chunk (default: as many as make 64 MiB of fp32 logits). Returns an fp32 scalar,
    differentiable in h, weight and bias; the gradients are made during the forward, so a
    backward costs one scaling.
    """
    check_inputs(h, weight, target, bias, ignore_index, label_smoothing, z_loss, reduction, chunk_size)
    chunk = chunk_size or default_chunk(weight.shape[0])
    grad = torch.is_grad_enabled()
    wanted = (grad and h.requires_grad, grad and weight.requires_grad, grad and bias is not None and bias.requires_grad)
    return linear_cross_entropy_fwd(h, weight, target, bias, ignore_index, float(label_smoothing), float(z_loss),
                                    reduction, chunk, *wanted)[0]
