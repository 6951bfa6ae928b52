"""The training optimizer: AdamW on llama_kernels' fused step, parameter groups with no decay on
norms, biases and embeddings and with layer-wise LR decay, and a cosine schedule with warmup.

    groups = param_groups(model, lr=3e-4, weight_decay=0.1, layer_decay=0.9)
    opt = AdamW(groups, lr=3e-4, betas=(0.9, 0.95))
    sched = cosine_schedule(opt, warmup_steps=100, total_steps=5000, min_lr_ratio=0.1)
    ...; opt.step(); sched.step()

AdamW's update is torch.optim.AdamW's (decoupled weight decay, bias correction), with the
`correct_bias` switch of the BERT-era AdamW (minllama's) to leave the moments uncorrected. Its
default is fused: one C++ call over every CPU parameter of a group, torch's foreach ops elsewhere
(`fused=False` takes the plain per-tensor reference, for comparison). Parameters must be fp32
(master weights); gradients may be fp32, fp16 or bf16. Parameters sharded by FSDP (DTensors) are
updated shard by shard: each rank steps its local part, the moments sharded alike.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Optional

import torch
from torch import nn

import llama_kernels

__all__ = ["AdamW", "cosine_lr", "cosine_schedule", "param_groups"]


class AdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov and Hutter), as torch.optim.AdamW computes it, on a fused step.

    lr, betas, eps, weight_decay: as torch's (weight_decay default 0.01 there, 0.0 here: decay is
    set per group by `param_groups`). correct_bias: bias-correct the moments (torch always does).
    fused: the fused step (default); False runs the per-tensor reference. Per group, `lr_scale`
    (set by `param_groups` for layer-wise decay) multiplies the group's lr.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, correct_bias: bool = True, fused: bool = True):
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"lr: expected a number >= 0, got {lr!r}")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas: expected two numbers in [0, 1), got {betas!r}")
        if not eps > 0:
            raise ValueError(f"eps: expected a positive number, got {eps!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay: expected a number >= 0, got {weight_decay!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        lr_scale=1.0)
        super().__init__(params, defaults)
        self.fused = fused
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.float32:
                    raise TypeError(f"params: AdamW keeps fp32 master weights; got a {p.dtype} parameter of "
                                    f"shape {tuple(p.shape)} (keep parameters fp32 and use autocast for bf16)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            by_kind: dict[tuple, list[list[torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not take sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                state["step"] += 1
                # Sharded parameters (DTensors, under FSDP): the step updates this rank's shards.
                param, grad, m, v = (_local(t) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"]))
                grad = grad if grad.is_contiguous() else grad.contiguous()
                # One call per (device, grad dtype, step): tensors that joined late have their own count.
                lists = by_kind.setdefault((param.device, grad.dtype, state["step"]), [[], [], [], []])
                for lst, t in zip(lists, (param, grad, m, v)):
                    lst.append(t)
            for (_device, _dtype, step), (ps, gs, ms, vs) in by_kind.items():
                contiguous = [p if p.is_contiguous() else p.contiguous() for p in ps]
                kwargs = dict(lr=group["lr"] * group["lr_scale"], beta1=beta1, beta2=beta2, eps=group["eps"],
                              weight_decay=group["weight_decay"], step=step, correct_bias=group["correct_bias"])
                if self.fused:
                    llama_kernels.adamw_step_(contiguous, gs, ms, vs, **kwargs)
                else:
                    llama_kernels.adamw_reference_(contiguous, gs, ms, vs, **kwargs)
                for p, c in zip(ps, contiguous):
                    if c is not p:
                        p.copy_(c)
        return loss


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a view: updating it updates the DTensor), else `t`."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


# ============================================================================ parameter groups
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _no_decay(name: str, p: nn.Parameter, model: nn.Module) -> bool:
    """Norm weights, biases and embeddings (anything 1-D, and the token embedding)."""
    return p.dim() < 2 or name.endswith(".bias") or "embed" in name


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, layer_decay: Optional[float] = None,
                 decay_norms_and_embeddings: bool = False) -> list[dict[str, Any]]:
    """Parameter groups for AdamW: those that train (requires_grad), split by whether they decay
    and, with `layer_decay`, by depth.

    Weight decay skips 1-D parameters (norms, biases) and embeddings unless
    `decay_norms_and_embeddings`. Layer-wise LR decay (ELECTRA/BEiT style): block i of n gets
    lr * layer_decay ** (n - i), the embeddings lr * layer_decay ** (n + 1), everything after the
    blocks (final norm, output head) the full lr. Each group carries `lr_scale`, which AdamW
    multiplies into the scheduled lr, so a schedule can set every group's `lr` alike.
    """
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay: expected a number in (0, 1], got {layer_decay!r}")
    n_layers = len(getattr(model, "layers", ()))
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # a tied head is the embedding: one parameter, one group
        decays = weight_decay > 0 and (decay_norms_and_embeddings or not _no_decay(name, p, model))
        scale = 1.0
        if layer_decay is not None:
            m = _LAYER_RE.search(name)
            if m is not None:
                depth = int(m[1]) + 1
            elif "embed" in name:
                depth = 0
            else:
                depth = n_layers + 1
            scale = layer_decay ** (n_layers + 1 - depth)
        key = (decays, scale)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": weight_decay if decays else 0.0,
                           "lr": lr, "lr_scale": scale}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


# ============================================================================ schedule
def cosine_lr(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """The LR multiplier at `step` (0-based): linear warmup from 1/warmup to 1 over warmup_steps,
    then a cosine from 1 down to min_lr_ratio at total_steps, and min_lr_ratio after."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying `cosine_lr` to every group (its state_dict resumes exactly)."""
    for name, value in (("warmup_steps", warmup_steps), ("total_steps", total_steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps: {warmup_steps} exceeds total_steps {total_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio: expected a number in [0, 1], got {min_lr_ratio!r}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_lr(step, warmup_steps, total_steps, min_lr_ratio))
