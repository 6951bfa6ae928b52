"""Structured pruning's matmuls: llama_kernels.masked_matmul(x, w, row_mask, col_mask) with hard 0/1
masks at 0/25/50/75% sparsity of the masked dimension, against what a user would run instead.

Layers (w is (N, K), x is (M, K)):

* ``w1`` (and ``w3``, the same shape): N = hidden_dim rows masked by the FFN intermediate mask;
* ``w2``: K = hidden_dim columns masked by the same mask;
* ``wq`` (and ``wk``, ``wv``): N = dim rows masked by whole heads of head_dim;
* ``wo``: K = dim columns masked by whole heads.

The pruned heads or FFN channels are a random subset of exactly that fraction (seeded, not
contiguous), as a hard-concrete pruning run leaves them.

Impls, on the same x, w and masks:

* ``llama_kernels``: ``llama_kernels.masked_matmul(x, w, row_mask, col_mask)``, backend as dispatched;
* ``torch-dense``: ``F.linear(x, w)``, masks ignored: the dense time;
* ``torch-dense-mask``: ``F.linear(x * col_mask, w) * row_mask``: the masks multiplied in on the fly;
* ``torch-compact``: ``F.linear`` on operands sliced once before timing (the model after pruning is
  made permanent): the best a masked matmul could do, less the cost of finding and gathering;
* ``torch-2:4``: ``torch.sparse.to_sparse_semi_structured`` on a weight pruned 2:4 (50% of each
  group of 4 along K, whatever the mask), in the 50% cases only, where the GPU supports it;
  recorded as unavailable elsewhere.

CPU: stories42M's shapes (dim 512, hidden 1376, 8 heads of 64) at M = 512 in fp32. GPU:
Sheared-LLaMA-1.3B's (dim 2048, hidden 5504, 16 heads of 128) at M = 2048 and 8192 in bf16.
Passes: ``fwd``, and ``fwd+bwd`` (forward and the gradients of x and w; the masks are fixed and
do not require grad, as when fine-tuning a pruned model, so no mask gradient is computed). flops
count the dense product, 2 M N K (6 M N K with the backward), for every impl and sparsity:
TFLOP/s is dense-equivalent.

A pruning training step (pass ``step``, layer ``model``): one optimizer step of a whole model
pruned toward half its heads, FFN channels and model dims (llama.prune.masked.masked_forward
with sampled masks, the Lagrangian, AdamW on the weights, gates and lambdas), its gates hardened
so that the given fraction of every row samples exactly 0: ``llama_kernels`` (the masked GEMMs
skip what the gates zero) against ``eager-masks`` (dense F.linear with the masks multiplied in,
the same function). CPU: stories42M at 4 x 256 tokens, fp32; GPU: sheared-1.3b at 1 x 2048, bf16
autocast. tokens/s counts the batch's tokens.

Headline: every layer at 0% and 50% sparsity, forward, at the largest M; the step at 0% and 50%.
"""
from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.nn.functional as F

from bench.common import Bench, Item, SuiteContext, Unavailable, dtype_name, suite, with_backward

SPARSITIES = (0, 25, 50, 75)
LAYERS = ("w1", "w2", "wq", "wo")
SEED = 0


def _model(ctx: SuiteContext) -> tuple[str, tuple[int, ...], torch.dtype]:
    """(preset, rows M, dtype)."""
    if ctx.is_cuda:
        return "sheared-1.3b", ((2048,) if ctx.quick else (2048, 8192)), torch.bfloat16
    return "stories42M", ((128,) if ctx.quick else (512,)), torch.float32


def _shapes(preset: str) -> dict[str, tuple[int, int, str, int, int]]:
    """layer -> (N, K, masked side "row"/"col", units in the mask, unit width)."""
    from llama.config import ModelConfig

    cfg = ModelConfig.preset(preset)
    dim, hidden, heads, head_dim = cfg.dim, cfg.hidden_dim, cfg.n_heads, cfg.head_dim
    return {"w1": (hidden, dim, "row", hidden, 1), "w2": (dim, hidden, "col", hidden, 1),
            "wq": (dim, dim, "row", heads, head_dim), "wo": (dim, dim, "col", heads, head_dim)}


def unit_mask(units: int, width: int, sparsity: int, seed: int = SEED) -> torch.Tensor:
    """A hard 0/1 mask of units * width entries with round(units * sparsity%) random units zeroed."""
    g = torch.Generator().manual_seed(seed)
    pruned = torch.randperm(units, generator=g)[: round(units * sparsity / 100)]
    keep = torch.ones(units)
    keep[pruned] = 0
    return keep.repeat_interleave(width)


def _two_four(w: torch.Tensor) -> torch.Tensor:
    """w with the 2 smallest of each group of 4 along K zeroed (the 2:4 pattern)."""
    n, k = w.shape
    groups = w.reshape(n, k // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    return torch.zeros_like(groups).scatter_(-1, keep, groups.gather(-1, keep)).reshape(n, k)


def _setup(ctx: SuiteContext, impl: str, layer: tuple, m: int, sparsity: int, dtype: torch.dtype, backward: bool):
    n, k, side, units, width = layer
    dev = ctx.device
    mask = unit_mask(units, width, sparsity).to(dev)
    row = mask if side == "row" else torch.ones(n, device=dev)
    col = mask if side == "col" else torch.ones(k, device=dev)
    rows, cols = row.nonzero()[:, 0], col.nonzero()[:, 0]
    g = torch.Generator().manual_seed(SEED + 1)
    x = (torch.randn(m, k, generator=g) * k**-0.5).to(dev, dtype)
    dy = torch.randn(m, n, generator=g).to(dev, dtype)
    wbytes = n * k * dtype.itemsize
    weights = ctx.rotating(lambda: torch.randn(n, k, device=dev, dtype=dtype), wbytes)
    calls = []
    for w in weights:
        if impl == "llama_kernels":
            import llama_kernels

            rmask, cmask = (row, None) if side == "row" else (None, col)  # the mask the layer has
            args = [x, w]
            fn = partial(llama_kernels.masked_matmul, row_mask=rmask, col_mask=cmask)
        elif impl == "torch-dense":
            args, fn = [x, w], F.linear
        elif impl == "torch-dense-mask":
            args = [x, w]
            fn = (lambda x, w: F.linear(x, w) * row) if side == "row" else (lambda x, w: F.linear(x * col, w))
        elif impl == "torch-compact":
            args, fn = [x[:, cols].contiguous(), w[rows][:, cols].contiguous()], F.linear
        elif impl == "torch-2:4":
            from torch.sparse import to_sparse_semi_structured

            args, fn = [x, to_sparse_semi_structured(_two_four(w))], F.linear
        else:
            raise ValueError(f"impl: unknown {impl!r}")
        if backward:
            if impl == "torch-2:4":
                raise NotImplementedError("the 2:4 peer times the forward only")
            leaves = [a.detach().requires_grad_() for a in args]
            grad = dy[:, : leaves[1].shape[0]] if impl == "torch-compact" else dy
            calls.append(with_backward(partial(fn, *leaves), leaves, grad))
        else:
            calls.append(torch.no_grad()(partial(fn, *args)))
    return calls


def _two_four_missing(ctx: SuiteContext, dtype: torch.dtype) -> str | None:
    """Why torch-2:4 cannot run here, or None."""
    if not ctx.is_cuda:
        return "torch.sparse.to_sparse_semi_structured needs a CUDA GPU of compute capability 8.0 or newer"
    if torch.cuda.get_device_capability(ctx.device) < (8, 0):
        return f"to_sparse_semi_structured needs compute capability 8.0+, got {torch.cuda.get_device_capability()}"
    try:
        from torch.sparse import to_sparse_semi_structured

        w = _two_four(torch.randn(128, 128, device=ctx.device, dtype=dtype))
        to_sparse_semi_structured(w)
    except Exception as exc:  # noqa: BLE001 - whatever stops it is the reason recorded
        return f"to_sparse_semi_structured failed here: {type(exc).__name__}: {exc}"[:300]
    return None


# ----------------------------------------------------------------------------- a pruning step
def _step_shape(ctx: SuiteContext) -> tuple[str, int, int, torch.dtype | None]:
    """(preset, batch, sequence, autocast dtype) of the pruning-step cases."""
    if ctx.is_cuda:
        return "sheared-1.3b", 1, (512 if ctx.quick else 2048), torch.bfloat16
    return "stories42M", (1 if ctx.quick else 4), (128 if ctx.quick else 256), None


def _hardened_masks(model_cfg, sparsity: float):
    """PruningMasks toward half the heads, FFN channels and model dims, their gates hardened so
    that a `sparsity` fraction of each row samples exactly 0 and the rest exactly 1 (log_alpha at
    -/+ LOG_ALPHA_LIMIT): the state of a run whose masks have converged that far."""
    from llama.prune import LOG_ALPHA_LIMIT, PruningMasks

    target = model_cfg.replace(dim=model_cfg.dim // 2, n_heads=model_cfg.n_heads // 2,
                               n_kv_heads=model_cfg.n_kv_heads // 2, hidden_dim=model_cfg.hidden_dim // 2)
    masks = PruningMasks(model_cfg, target, modules=("head", "intermediate", "hidden"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in masks.gates.values():
            n = gate.shape[-1]
            pruned = int(round(sparsity * n))
            order = torch.rand(gate.shape, generator=g).argsort(-1)
            values = torch.full(gate.shape, LOG_ALPHA_LIMIT)
            values.scatter_(-1, order[..., :pruned], -LOG_ALPHA_LIMIT)
            gate.log_alpha.copy_(values)
    return masks.train()


def _prune_step(ctx: SuiteContext, sparsity: float, eager: bool):
    def setup():
        from llama.config import ModelConfig
        from llama.model import build
        from llama.optim import AdamW
        from llama.prune import param_groups
        from llama.prune.masked import masked_forward

        preset, batch, seq, dtype = _step_shape(ctx)
        torch.manual_seed(0)
        cfg = ModelConfig.preset(preset).replace(max_seq_len=seq)
        model = build(cfg, device=ctx.device).train()
        masks = _hardened_masks(cfg, sparsity).to(ctx.device)
        opt = AdamW([{"params": list(model.parameters())}, *param_groups(masks, mask_lr=0.1, lag_lr=0.1)], lr=1e-4)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(ctx.device)
        x, y = tokens[:, :-1], tokens[:, 1:]

        def step():
            opt.zero_grad(set_to_none=True)
            with (torch.autocast(ctx.device.type, dtype=dtype) if dtype else contextlib.nullcontext()):
                loss = masked_forward(model, x, masks(), y, eager=eager)
            (loss + masks.lagrangian_loss(1)[0]).backward()
            opt.step()
            return loss

        return [step]

    return setup


def _step_items(ctx: SuiteContext) -> list[Item]:
    preset, batch, seq, dtype = _step_shape(ctx)
    items: list[Item] = []
    for sparsity in ((0, 50) if not ctx.full else SPARSITIES):
        case = {"layer": "model", "m": batch * seq, "model": preset, "batch": batch, "seq": seq,
                "sparsity": sparsity}
        for impl, eager in (("llama_kernels", False), ("eager-masks", True)):
            items.append(Bench(impl, case, "bf16" if dtype else "fp32", "step",
                               _prune_step(ctx, sparsity / 100, eager), tokens=batch * seq))
    return items


def headline(ctx: SuiteContext, bench: Bench) -> bool:
    """Default run: forward, every layer at 0% and 50% sparsity, at the largest M; the step at
    0% and 50%."""
    _, rows, _ = _model(ctx)
    if bench.pass_ == "step":
        return bench.case["sparsity"] in (0, 50)
    return bench.pass_ == "fwd" and bench.case["sparsity"] in (0, 50) and bench.case["m"] == max(rows)


@suite("pruned", headline=headline)
def pruned(ctx: SuiteContext) -> list[Item]:
    preset, rows, dtype = _model(ctx)
    shapes = _shapes(preset)
    items: list[Item] = []
    two_four = _two_four_missing(ctx, dtype)
    if two_four:
        items.append(Unavailable("torch-2:4", two_four))
    impls = ("llama_kernels", "torch-dense", "torch-dense-mask", "torch-compact")
    sparsities = (0, 50) if ctx.quick else SPARSITIES
    passes = ("fwd",) if ctx.quick else ("fwd", "fwd+bwd")
    for pass_ in passes:
        for m in rows:
            for name in LAYERS:
                n, k = shapes[name][:2]
                for sparsity in sparsities:
                    case = {"layer": name, "m": m, "n": n, "k": k, "sparsity": sparsity}
                    names = impls + (("torch-2:4",) if sparsity == 50 and not two_four and pass_ == "fwd" else ())
                    for impl in names:
                        items.append(Bench(impl, case, dtype_name(dtype), pass_,
                                           partial(_setup, ctx, impl, shapes[name], m, sparsity, dtype,
                                                   pass_ == "fwd+bwd"),
                                           flops=(2 if pass_ == "fwd" else 6) * m * n * k))
    return items + (_step_items(ctx) if not ctx.quick or not ctx.is_cuda else [])
