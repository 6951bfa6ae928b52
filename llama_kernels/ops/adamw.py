"""One AdamW step over many tensors at once, in place, as torch.optim.AdamW computes it:

    p <- p (1 - lr wd)
    m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
    p <- p - (lr / c1) m / (sqrt(v) / sqrt(c2) + eps),   c1 = 1 - b1^t,  c2 = 1 - b2^t

Weight decay is decoupled (applied to p, not added to g). With correct_bias=False, c1 = c2 = 1
(the "correct_bias" switch of the BERT-era AdamW that minllama's optimizer keeps). Parameters and
moments are fp32 (master weights); gradients may be fp32, fp16 or bf16. On the CPU the default
is one C++ call over every tensor; elsewhere torch's foreach ops (a few launches per step for all
tensors). llama.optim.AdamW is the optimizer built on this.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import dispatch
from ..cpu import adamw as cpu_adamw

GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IMPLEMENTED = ("cpu", "torch")


# ----------------------------------------------------------------------------- reference
def adamw_reference_(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, step,
                     correct_bias=True) -> None:
    """The oracle: one tensor at a time, in fp64 arithmetic, written back in place."""
    c1 = 1 - beta1**step if correct_bias else 1.0
    c2 = 1 - beta2**step if correct_bias else 1.0
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        p64, g64 = p.double() * (1 - lr * weight_decay), g.double()
        m64 = beta1 * m.double() + (1 - beta1) * g64
        v64 = beta2 * v.double() + (1 - beta2) * g64 * g64
        p64 -= (lr / c1) * m64 / (v64.sqrt() / c2**0.5 + eps)
        p.copy_(p64)
        m.copy_(m64)
        v.copy_(v64)


# Every backend: step(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay,
# c1, sqrt(c2)) on checked lists, in place.
def foreach_step(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, c1, c2_sqrt):
    g = [t if t.dtype == torch.float32 else t.float() for t in grads]
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, g, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, g, g, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, c2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, -lr / c1)


STEP = {"torch": foreach_step, "cpu": cpu_adamw.step}


# ----------------------------------------------------------------------------- checks
def check_inputs(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step) -> None:
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    for name, seq in lists.items():
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name}: expected a list of tensors, got {type(seq).__name__}")
        if len(seq) != len(params):
            raise ValueError(f"{name}: expected {len(params)} tensors (one per parameter), got {len(seq)}")
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        for name, t in (("params", p), ("grads", g), ("exp_avgs", m), ("exp_avg_sqs", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}]: expected a torch.Tensor, got {type(t).__name__}")
            if t.shape != p.shape:
                raise ValueError(f"{name}[{i}]: expected the parameter's shape {tuple(p.shape)}, got {tuple(t.shape)}")
            if t.device != params[0].device:
                raise ValueError(f"{name}[{i}]: is on {t.device} but params[0] is on {params[0].device}")
            if not t.is_contiguous():
                raise ValueError(f"{name}[{i}]: expected a contiguous tensor")
            if name == "grads":
                if t.dtype != grads[0].dtype or t.dtype not in GRAD_DTYPES:
                    raise TypeError(f"grads[{i}]: expected {grads[0].dtype} like grads[0] (float32, float16 or "
                                    f"bfloat16), got {t.dtype}")
            elif t.dtype != torch.float32:
                raise TypeError(f"{name}[{i}]: expected float32 (master weights and moments), got {t.dtype}")
        if len({p.data_ptr(), m.data_ptr(), v.data_ptr()}) != 3 and p.numel():
            raise ValueError(f"params[{i}], exp_avgs[{i}], exp_avg_sqs[{i}]: must not share memory")
    for name, value, lo, hi in (("lr", lr, 0.0, float("inf")), ("beta1", beta1, 0.0, 1.0),
                                ("beta2", beta2, 0.0, 1.0), ("eps", eps, 0.0, float("inf")),
                                ("weight_decay", weight_decay, 0.0, float("inf"))):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value < hi):
            raise ValueError(f"{name}: expected a number in [{lo}, {hi}), got {value!r}")
    if eps <= 0:
        raise ValueError(f"eps: expected a positive number, got {eps!r}")
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        raise ValueError(f"step: expected the 1-based step number, got {step!r}")


# ----------------------------------------------------------------------------- public API
def adamw_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                exp_avg_sqs: Sequence[torch.Tensor], *, lr: float, beta1: float = 0.9, beta2: float = 0.999,
                eps: float = 1e-8, weight_decay: float = 0.0, step: int, correct_bias: bool = True) -> None:
    """Apply one AdamW step (see the module docstring) to every parameter, in place.

    params, exp_avgs, exp_avg_sqs: contiguous fp32 tensors on one device; grads: their gradients
    (fp32, fp16 or bf16, one dtype for all); step: the 1-based number of this step (for the bias
    corrections).
    """
    params, grads, exp_avgs, exp_avg_sqs = (list(x) if isinstance(x, tuple) else x
                                            for x in (params, grads, exp_avgs, exp_avg_sqs))
    check_inputs(params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, step)
    if not params:
        return
    c1 = 1 - beta1**step if correct_bias else 1.0
    c2 = 1 - beta2**step if correct_bias else 1.0
    backend = dispatch.choose("adamw", params[0].device, implemented=IMPLEMENTED)
    with torch.no_grad():
        STEP[backend](params, grads, exp_avgs, exp_avg_sqs, float(lr), float(beta1), float(beta2), float(eps),
                      float(weight_decay), float(c1), float(c2) ** 0.5)
