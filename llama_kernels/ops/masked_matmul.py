"""Masked matmul: y = ((x * c) @ w^T + bias) * r for a weight w (N, K) pruned by a row mask r (N)
and a column mask c (K), without forming w * mask. The masks are floats: hard 0/1 gates or soft
values (any value multiplies in). The bias is added before the row mask, so a row with r = 0 is
exactly zero, bias and all: (x * c) @ (w * (r outer c))^T + bias * r is the same function.

Compute falls as the masks harden: only the rows of w with r != 0 and the columns with c != 0
are multiplied (every backend skips them; how finely differs, see below). Zero-mask rows and
columns are pruned, not multiplied: a NaN or inf of x or w behind a zero mask entry does not
reach y, where the reference (a dense product) would give NaN.

Backward, with z = x * c, u = z @ w^T and du = dy * r:
    dx = (du @ w) * c          dw = du^T @ z           db = sum_rows du
    dc = sum_rows((du @ w) * x)                        dr = sum_rows(dy * (u + bias))
What is skipped: rows of w with r = 0 in du @ w (their du is zero); columns with c = 0 in u (z
is zero there); every entry of dw outside (r != 0 rows) x (c != 0 columns), written as zeros.
What is not: dr needs u on every row, r = 0 included, and dc needs du @ w on every column,
c = 0 included, so u keeps all N rows and du @ w all K columns (dx is then zero where c = 0).

Backends, each writing outputs the op allocates:
* torch: gathers the active rows and columns (torch.nonzero of each mask) and runs fp32 torch
  matmuls on the compact operands; its backward, shared with cpu, is the same on compact
  operands (compact_backward).
* cpu: the C++ kernel (csrc/cpu/masked_matmul.cpp) over the active index lists; its backward
  recomputes u with the same kernel and does the rest as torch matmuls on compact operands.
* triton: tiled kernels that skip a tile, or a block of the reduction, whose mask slice is all
  zero (llama_kernels/triton/masked_matmul.py): the gain needs zeros grouped in whole tiles.
There is no CUDA kernel. The reference, masked_matmul_reference, is the dense formula in fp32.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import dispatch
from ..cpu import masked_matmul as cpu_masked_matmul
from ..triton import kernels as triton_kernels

IMPLEMENTED = ("triton", "cpu", "torch")


# ----------------------------------------------------------------------------- reference
def masked_matmul_reference(x: torch.Tensor, w: torch.Tensor, row_mask: Optional[torch.Tensor] = None,
                            col_mask: Optional[torch.Tensor] = None,
                            bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The oracle: ((x * col_mask) @ w^T + bias) * row_mask densely, in fp32 (fp64 for fp64 x),
    result in x's dtype. Differentiable in every input."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = x.to(compute)
    if col_mask is not None:
        z = z * col_mask.to(compute)
    u = z @ w.to(compute).t()
    if bias is not None:
        u = u + bias.to(compute)
    if row_mask is not None:
        u = u * row_mask.to(compute)
    return u.to(x.dtype)


# Every backend: fwd(x, w, r, c, bias, y) and bwd(dy, x, w, r, c, bias, dx, dw, dr, dc, db) on
# x (M, K), w (N, K) with contiguous last dims, r (N) and c (K) fp32, bias fp32 (N) or None;
# dr, dc and db are fp32, db None without a bias.
def torch_fwd(x, w, r, c, bias, y):
    rows, cols = cpu_masked_matmul.active(r), cpu_masked_matmul.active(c)
    z = x[:, cols].float() * c[cols]
    u = z @ w[rows][:, cols].float().t()
    if bias is not None:
        u = u + bias[rows]
    y.zero_()
    y[:, rows] = (u * r[rows]).to(y.dtype)


def torch_unmasked_rows(x, w, c):
    """u = (x * c) @ w^T in fp32 for every row of w, over the columns with c != 0."""
    cols = cpu_masked_matmul.active(c)
    return (x[:, cols].float() * c[cols]) @ w[:, cols].float().t()


def compact_backward(dy, x, w, r, c, bias, dx, dw, dr, dc, db, unmasked_rows=torch_unmasked_rows):
    """The backward as fp32 torch matmuls on compact operands (see the module docstring for what
    is skipped); `unmasked_rows(x, w, c)` recomputes u."""
    rows, cols = cpu_masked_matmul.active(r), cpu_masked_matmul.active(c)
    g = dy.float()
    u = unmasked_rows(x, w, c)
    if bias is not None:
        u = u + bias
    dr.copy_((g * u).sum(0))
    du = g[:, rows] * r[rows]  # (M, N'): du is zero on the other rows
    dz = du @ w[rows].float()  # (M, K), every column
    xf = x.float()
    dc.copy_((dz * xf).sum(0))
    dx.copy_(dz * c)
    dw.zero_()
    if rows.numel() and cols.numel():
        z = xf[:, cols] * c[cols]
        dw[rows[:, None], cols[None, :]] = (du.t() @ z).to(dw.dtype)
    if db is not None:
        db.zero_()
        db[rows] = du.sum(0)


def _triton_fwd(x, w, r, c, bias, y):
    triton_kernels("masked_matmul").forward(x, w, r, c, bias, y)


def _triton_bwd(dy, x, w, r, c, bias, dx, dw, dr, dc, db):
    tri = triton_kernels("masked_matmul")
    m, n = dy.shape
    u = torch.empty(m, n, dtype=torch.float32, device=x.device)
    tri.forward(x, w, r, c, None, u, has_row=False)
    if bias is not None:
        u += bias
    g = dy.float()
    dr.copy_((g * u).sum(0))
    dz = torch.empty(m, w.shape[1], dtype=torch.float32, device=x.device)
    tri.grad_z(dy, r, w, dz)
    dc.copy_((dz * x.float()).sum(0))
    dx.copy_(dz * c)
    tri.grad_w(dy, r, x, c, dw)
    if db is not None:
        db.copy_((g * r).sum(0))


FORWARD = {"torch": torch_fwd, "cpu": cpu_masked_matmul.forward, "triton": _triton_fwd}
BACKWARD = {
    "torch": compact_backward,
    "cpu": functools.partial(compact_backward, unmasked_rows=cpu_masked_matmul.unmasked_rows),
    "triton": _triton_bwd,
}


# ----------------------------------------------------------------------------- checks
def check_inputs(x, w, row_mask=None, col_mask=None, bias=None) -> None:
    named = (("x", x), ("w", w), ("row_mask", row_mask), ("col_mask", col_mask), ("bias", bias))
    for name, t in named:
        if t is not None or name in ("x", "w"):
            dispatch.check_float_tensor(name, t, x)
    if x.dim() < 1:
        raise ValueError("x: expected at least one dimension (..., K), got a scalar")
    if w.dim() != 2:
        raise ValueError(f"w: expected 2 dimensions (N, K), got shape {tuple(w.shape)}")
    if w.dtype != x.dtype:
        raise TypeError(f"w: expected x's dtype {x.dtype}, got {w.dtype}")
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x: expected last dimension K={k} (w's second), got shape {tuple(x.shape)}")
    for name, t, size, what in (("row_mask", row_mask, n, "N"), ("col_mask", col_mask, k, "K"),
                                ("bias", bias, n, "N")):
        if t is not None and (t.dim() != 1 or t.shape[0] != size):
            raise ValueError(f"{name}: expected {what}={size} elements as a vector, got shape {tuple(t.shape)}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _vector(t: Optional[torch.Tensor], size: int, device) -> torch.Tensor:
    if t is None:
        return torch.ones(size, dtype=torch.float32, device=device)
    return t.to(torch.float32).contiguous()


def _backend(device: torch.device) -> str:
    return dispatch.choose("masked_matmul", device, implemented=IMPLEMENTED)


# ----------------------------------------------------------------------------- custom ops
def _forward(x, w, row_mask, col_mask, bias):
    a, wr = _rows(x), _rows(w)
    n, k = w.shape
    y = torch.empty(a.shape[0], n, dtype=x.dtype, device=x.device)
    if y.numel():
        if k == 0:
            y.zero_()
            if bias is not None:
                y += (bias.float() * _vector(row_mask, n, x.device)).to(y.dtype)
        else:
            r, c = _vector(row_mask, n, x.device), _vector(col_mask, k, x.device)
            b = None if bias is None else bias.to(torch.float32).contiguous()
            FORWARD[_backend(x.device)](a, wr, r, c, b, y)
    return y.view(*x.shape[:-1], n)


@torch.library.custom_op("llama_kernels::masked_matmul_fwd", mutates_args=())
def masked_matmul_fwd(x: torch.Tensor, w: torch.Tensor, row_mask: Optional[torch.Tensor],
                      col_mask: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """((x * col_mask) @ w^T + bias) * row_mask, (..., N) in x's dtype."""
    return _forward(x, w, row_mask, col_mask, bias)


@masked_matmul_fwd.register_fake
def _(x, w, row_mask, col_mask, bias):
    return x.new_empty(*x.shape[:-1], w.shape[0])


@torch.library.custom_op("llama_kernels::masked_matmul_bwd", mutates_args=())
def masked_matmul_bwd(grad_y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, row_mask: Optional[torch.Tensor],
                      col_mask: Optional[torch.Tensor], bias: Optional[torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, d_row_mask, d_col_mask, d_bias), each in its input's dtype; an absent mask or
    bias gets an empty tensor."""
    n, k = w.shape
    a, wr = _rows(x), _rows(w)
    dy = _rows(grad_y.to(x.dtype)).reshape(-1, n)
    dx = torch.empty(a.shape, dtype=x.dtype, device=x.device)
    dw = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    dr = torch.empty(n, dtype=torch.float32, device=x.device)
    dc = torch.empty(k, dtype=torch.float32, device=x.device)
    db = None if bias is None else torch.empty(n, dtype=torch.float32, device=x.device)
    if a.shape[0] and n and k:
        r, c = _vector(row_mask, n, x.device), _vector(col_mask, k, x.device)
        b = None if bias is None else bias.to(torch.float32).contiguous()
        BACKWARD[_backend(x.device)](dy, a, wr, r, c, b, dx, dw, dr, dc, db)
    else:
        dx.zero_(), dw.zero_(), dr.zero_(), dc.zero_()
        if db is not None:
            db.zero_()
            if k == 0 and a.shape[0]:
                db.copy_((dy.float() * _vector(row_mask, n, x.device)).sum(0))
        if k == 0 and a.shape[0] and row_mask is not None and bias is not None:
            dr.copy_((dy.float() * bias.float()).sum(0))

    def out(t, like):
        return x.new_empty(0) if like is None else t.to(like.dtype)

    return dx.view(x.shape), dw, out(dr, row_mask), out(dc, col_mask), out(db, bias) if db is not None else x.new_empty(0)


@masked_matmul_bwd.register_fake
def _(grad_y, x, w, row_mask, col_mask, bias):
    def like(t):
        return x.new_empty(0) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)

    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(w, memory_format=torch.contiguous_format), like(row_mask), like(col_mask), like(bias))


def _setup_context(ctx, inputs, output):
    x, w, row_mask, col_mask, bias = inputs
    ctx.save_for_backward(x, w, row_mask, col_mask, bias)
    ctx.forced_backend = dispatch.forced_backend()  # the backward may run on another thread


def _backward(ctx, grad_y):
    x, w, row_mask, col_mask, bias = ctx.saved_tensors
    with dispatch.use_backend(ctx.forced_backend):
        dx, dw, dr, dc, db = masked_matmul_bwd(grad_y, x, w, row_mask, col_mask, bias)
    return (dx, dw, None if row_mask is None else dr, None if col_mask is None else dc,
            None if bias is None else db)


masked_matmul_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def masked_matmul(x: torch.Tensor, w: torch.Tensor, row_mask: Optional[torch.Tensor] = None,
                  col_mask: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """((x * col_mask) @ w^T + bias) * row_mask without forming the masked weight, skipping the
    rows and columns the masks zero; differentiable in all five (see the module docstring).

    x (..., K); w (N, K) of x's dtype (fp32, fp16 or bf16); row_mask (N,), col_mask (K,) and bias
    (N,) optional, any of those float dtypes, on x's device. Returns (..., N) in x's dtype.
    """
    check_inputs(x, w, row_mask, col_mask, bias)
    tensors = (x, w, row_mask, col_mask, bias)
    if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        return masked_matmul_fwd(x, w, row_mask, col_mask, bias)
    return _forward(x, w, row_mask, col_mask, bias)  # no autograd or tracing: skip the custom-op layer
