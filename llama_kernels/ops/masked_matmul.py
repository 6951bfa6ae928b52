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
* torch: gathers the active rows and columns (torch.nonzero of each mask) and runs one fp32 torch
  GEMM on the compact operands, or on x and w as they are when nothing is masked (torch_fwd); its
  backward, shared with cpu, is the same on compact operands (compact_backward).
* cpu (llama_kernels/cpu/masked_matmul.py): up to cpu.MAX_ROWS rows of x, the fused C++ kernel
  (csrc/cpu/masked_matmul.cpp) over the active index lists; beyond, torch's GEMM on compact
  operands that C++ gathers, the product scattered into y by C++ (no gather or scatter at 0%
  sparsity); its backward recomputes u through the same paths and does the rest as torch
  matmuls on compact operands.
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
# The backward forms dw with one dense product once this fraction of its entries is active.
DENSE_DW_FRACTION = 0.75


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


def _all_ones(v: torch.Tensor) -> bool:
    return bool((v == 1).all())


# Every backend: fwd(x, w, r, c, bias, y) and bwd(dy, x, w, r, c, bias, dx, dw, dr, dc, db) on
# x (M, K), w (N, K) with contiguous last dims, r (N) and c (K) fp32, bias fp32 (N) or None;
# dr, dc and db are fp32, db None without a bias.
def torch_fwd(x, w, r, c, bias, y):
    """One fp32 GEMM: on x and w as they are when every row and column is active (a hard mask at
    0%: no gather, no copy), else on compact operands gathered once. A mask's values multiply in
    only where its active values are not all 1 (a soft mask). With rows pruned, the GEMM writes
    (M, N') beside one zero column and y gathers its columns from there (`where`): a gather along
    y's rows ran 2.5-3x faster than scattering the compact columns into y (index_copy_)."""
    n, k = w.shape
    rows, cols = cpu_masked_matmul.active(r), cpu_masked_matmul.active(c)
    n_act = rows.numel()
    all_rows, all_cols = n_act == n, cols.numel() == k
    z = x if all_cols else x.index_select(1, cols)
    z = z if z.dtype == torch.float32 else z.float()
    c_act = c if all_cols else c.index_select(0, cols)
    if not _all_ones(c_act):
        z = z * c_act if z is x else z.mul_(c_act)
    wc = w if all_rows else w.index_select(0, rows)
    wc = wc if all_cols else wc.index_select(1, cols)
    wc = wc if wc.dtype == torch.float32 else wc.float()
    r_act = r if all_rows else r.index_select(0, rows)
    b = bias if bias is None or all_rows else bias.index_select(0, rows)
    if all_rows:
        u = y if y.dtype == torch.float32 and y.is_contiguous() else torch.empty(y.shape, device=y.device)
    else:
        # Rows padded to 64 bytes: the GEMM writes in place at that row stride (at N' + 1, an odd
        # stride, MKL's stores run misaligned: up to 20% slower, measured).
        u_ext = torch.empty(x.shape[0], -(-(n_act + 1) // 16) * 16, device=x.device)
        u_ext[:, n_act].zero_()  # what the pruned rows of y read: exact zeros, bias and all
        u = u_ext[:, :n_act]
    if b is None:
        torch.mm(z, wc.t(), out=u)
    else:
        torch.addmm(b, z, wc.t(), out=u)
    if not _all_ones(r_act):
        u.mul_(r_act)
    if all_rows:
        if u is not y:
            y.copy_(u)
        return
    where = torch.full((n,), n_act, dtype=torch.int64, device=x.device)
    where.index_copy_(0, rows, torch.arange(n_act, device=x.device))
    if y.dtype == torch.float32 and y.is_contiguous():
        torch.index_select(u_ext, 1, where, out=y)
    else:
        y.copy_(u_ext.index_select(1, where))


def torch_unmasked_rows(x, w, c):
    """u = (x * c) @ w^T in fp32 for every row of w, over the columns with c != 0."""
    cols = cpu_masked_matmul.active(c)
    return (x[:, cols].float() * c[cols]) @ w[:, cols].float().t()


def compact_backward(dy, x, w, r, c, bias, dx, dw, dr, dc, db, unmasked_rows=torch_unmasked_rows):
    """The backward as fp32 torch matmuls on compact operands (see the module docstring for what
    is skipped); `unmasked_rows(x, w, c)` recomputes u. Where every row (column) is active, the
    operands are used as they are, not gathered, and dw is written in place, not index-put. An
    output given as None is not wanted and not computed: without dr, u is never recomputed (one
    GEMM less), and without dc, du @ w runs over the active columns only."""
    n, k = w.shape
    rows, cols = cpu_masked_matmul.active(r), cpu_masked_matmul.active(c)
    all_rows, all_cols = rows.numel() == n, cols.numel() == k
    g = dy.float()
    if dr is not None:
        u = unmasked_rows(x, w, c)
        if bias is not None:
            u = u + bias
        dr.copy_((g * u).sum(0))
    du = g * r if all_rows else g[:, rows] * r[rows]  # (M, N'): du is zero on the other rows
    w_rows = w if all_rows else w[rows]
    xf = x.float()
    if dc is not None:
        dz = du @ w_rows.float()  # (M, K), every column: dc needs them all
        dc.copy_((dz * xf).sum(0))
        if dx is not None:
            torch.mul(dz, c, out=dx) if dx.dtype == torch.float32 else dx.copy_(dz * c)
    elif dx is not None:  # dx is zero where c is
        if all_cols:
            dz = du @ w_rows.float()
            torch.mul(dz, c, out=dx) if dx.dtype == torch.float32 else dx.copy_(dz * c)
        else:
            dx.zero_()
            dx[:, cols] = ((du @ w_rows[:, cols].float()) * c[cols]).to(dx.dtype)
    if dw is not None:
        if rows.numel() * cols.numel() >= DENSE_DW_FRACTION * n * k:
            # Most of dw is active: one dense product of the masked operands writes it whole (zero
            # rows where r = 0, zero columns where c = 0, a NaN of x behind c = 0 kept out), with
            # no gather and no scattered write, which cost more than the few products they save.
            g_rows = du if all_rows else g * r
            z = xf * c if all_cols else torch.where(c != 0, xf * c, 0.0)
            if dw.dtype == torch.float32:
                torch.mm(g_rows.t(), z, out=dw)
            else:
                dw.copy_(g_rows.t() @ z)
        elif rows.numel() and cols.numel():
            z = xf * c if all_cols else xf[:, cols] * c[cols]
            if all_cols:
                dw.zero_()
                dw.index_copy_(0, rows, (du.t() @ z).to(dw.dtype))
            else:
                dw.zero_()
                dw[rows[:, None], cols[None, :]] = (du.t() @ z).to(dw.dtype)
        else:
            dw.zero_()
    if db is not None:
        db.zero_()
        db[rows] = du.sum(0)


def _triton_fwd(x, w, r, c, bias, y):
    triton_kernels("masked_matmul").forward(x, w, r, c, bias, y)


def _triton_bwd(dy, x, w, r, c, bias, dx, dw, dr, dc, db):
    tri = triton_kernels("masked_matmul")
    m, n = dy.shape
    g = dy.float()
    if dr is not None:
        u = torch.empty(m, n, dtype=torch.float32, device=x.device)
        tri.forward(x, w, r, c, None, u, has_row=False)
        if bias is not None:
            u += bias
        dr.copy_((g * u).sum(0))
    if dx is not None or dc is not None:
        dz = torch.empty(m, w.shape[1], dtype=torch.float32, device=x.device)
        tri.grad_z(dy, r, w, dz)
        if dc is not None:
            dc.copy_((dz * x.float()).sum(0))
        if dx is not None:
            dx.copy_(dz * c)
    if dw is not None:
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
                      col_mask: Optional[torch.Tensor], bias: Optional[torch.Tensor], needs: list[bool]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, d_row_mask, d_col_mask, d_bias), each in its input's dtype. `needs` says which of
    the five are wanted (autograd's needs_input_grad); one not wanted, or an absent mask or bias,
    gets an empty tensor and is not computed (a row-mask gradient costs a GEMM of its own)."""
    n, k = w.shape
    need_x, need_w, need_r, need_c, need_b = (bool(v) for v in needs)
    need_r, need_c, need_b = need_r and row_mask is not None, need_c and col_mask is not None, \
        need_b and bias is not None
    a, wr = _rows(x), _rows(w)
    dy = _rows(grad_y.to(x.dtype)).reshape(-1, n)
    f32 = dict(dtype=torch.float32, device=x.device)
    dx = torch.empty(a.shape, dtype=x.dtype, device=x.device) if need_x else None
    dw = torch.empty(w.shape, dtype=w.dtype, device=w.device) if need_w else None
    dr = torch.empty(n, **f32) if need_r else None
    dc = torch.empty(k, **f32) if need_c else None
    db = torch.empty(n, **f32) if need_b else None
    if a.shape[0] and n and k:
        r, c = _vector(row_mask, n, x.device), _vector(col_mask, k, x.device)
        b = None if bias is None else bias.to(torch.float32).contiguous()
        BACKWARD[_backend(x.device)](dy, a, wr, r, c, b, dx, dw, dr, dc, db)
    else:
        for t in (dx, dw, dr, dc, db):
            if t is not None:
                t.zero_()
        if db is not None and k == 0 and a.shape[0]:
            db.copy_((dy.float() * _vector(row_mask, n, x.device)).sum(0))
        if dr is not None and k == 0 and a.shape[0] and bias is not None:
            dr.copy_((dy.float() * bias.float()).sum(0))

    def out(t, like):
        return x.new_empty(0) if t is None else t.to(like.dtype)

    return (x.new_empty(0) if dx is None else dx.view(x.shape), x.new_empty(0) if dw is None else dw,
            out(dr, row_mask), out(dc, col_mask), out(db, bias))


@masked_matmul_bwd.register_fake
def _(grad_y, x, w, row_mask, col_mask, bias, needs):
    def like(t, wanted):
        return x.new_empty(0) if t is None or not wanted else torch.empty_like(t, memory_format=torch.contiguous_format)

    return tuple(like(t, wanted) for t, wanted in zip((x, w, row_mask, col_mask, bias), needs))


def _setup_context(ctx, inputs, output):
    x, w, row_mask, col_mask, bias = inputs
    ctx.save_for_backward(x, w, row_mask, col_mask, bias)
    ctx.forced_backend = dispatch.forced_backend()  # the backward may run on another thread


def _backward(ctx, grad_y):
    x, w, row_mask, col_mask, bias = ctx.saved_tensors
    needs = list(ctx.needs_input_grad)
    with dispatch.use_backend(ctx.forced_backend):
        grads = masked_matmul_bwd(grad_y, x, w, row_mask, col_mask, bias, needs)
    return tuple(g if wanted else None for g, wanted in zip(grads, needs))


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
