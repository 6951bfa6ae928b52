"""The pruning forward: a model run under structured-pruning masks (Sheared LLaMA, Xia et al., 2023).

    masks = PruningMasks(model.config, target_cfg, modules=("layer", "head", "intermediate", "hidden"))
    loss = masked_forward(model, tokens, masks(), targets)      # masks() samples in training
    (loss + masks.lagrangian_loss(step)[0]).backward()           # reaches the weights and log_alpha

Where each mask multiplies in (a kind missing from z counts as all ones):

    head          each head's attention output: the column mask of wo, one gate per head_dim columns
    intermediate  the FFN's up projection: the row mask of w3 (GELU FFN, which has no w3: of w1)
    hidden        the embeddings, and every branch output (the row masks of wo and w2), so the
                  residual stream is exactly zero at a pruned model dimension
    layer         both branch outputs of a block; head_layer: the attention branch's; mlp: the
                  FFN branch's. These scalars are folded into the row masks of wo and w2.

Norms over the kept dimensions. RMSNorm divides by the root mean square over the model dims whose
hidden gate is nonzero (sum of x^2 over the kept n, divided by n), not over all D: the stream is
zero at the others, and after compaction (llama.prune.compact slices them away) the dense model's
norm averages over exactly those n. LayerNorm likewise takes its mean and variance over the kept
dims (and its output is zeroed at the others, where its bias would otherwise leak in). Without a
hidden mask both are the model's own norms.

What is only skipped. A mask that only says "this is zero anyway" is passed as a binary mask
(gate != 0), which carries no gradient and lets `llama_kernels.masked_matmul` skip the work:

    columns of wq, wk, wv, w1, w3 by hidden      (their input is zero there already)
    rows of wq, wk, wv by head                   (a pruned head's output is zeroed by wo's column mask)
    rows of w1 by intermediate, columns of w2 by intermediate
    rows of wq, wk, wv by layer * head_layer, of w1 and w3 by layer * mlp   (a dropped branch)
    columns of the output head by hidden (the fused loss, too, multiplies only the kept columns)

The soft values multiply in once, where the outputs are masked (the list above). A consequence:
a gate that is exactly 0 passes no gradient to its own z through the work it skipped. That loses
nothing: a hard-concrete sample is exactly 0 only through the clamp, whose gradient there is 0,
so the gradient of log_alpha is the exact one. The eager path applies the same binary masks, so
both paths compute the same function and the same gradients.

Attention runs over all heads: q, k and v of a pruned head are zero (rows skipped), so its output
is the mean of zero values, zero, and wo ignores it. Running only the kept heads would need their
count on the host (a device sync per layer and a changing shape every sampled step); with the
trained masks most heads are open most of the time, so the saving would be small.

Fused and eager. The default runs every projection through `llama_kernels.masked_matmul` (the
masked weight is never formed, and rows and columns whose mask is 0 are not multiplied) and the
norms through `llama_kernels.rms_norm`. A soft mask that needs a gradient goes to the kernel as
its binary part, and its values multiply the kernel's input or output outside it: autograd then
takes the mask's gradient from saved tensors, as for the dense product, where the kernel's own
row-mask gradient would recompute the layer's output on every row (one GEMM more per layer). `eager=True` computes the same thing with dense
`F.linear` and elementwise mask multiplies, as a baseline to measure the fused path against.
A projection with no mask at all runs its layer's own forward, so with z = {} the fused path is
the model's forward, bit for bit (for inputs of more than llama.model.FUSED_PROJECTION_MAX_ROWS
tokens, where the model runs each projection on its own); all-ones masks agree with it up to
rounding, as the masked kernels sum in another order.

LoRA-based pruning. A `llama.lora.LoRALinear` runs its frozen base under the masks (through
masked_matmul; a 4-bit base through its `int4_matmul` with the masks multiplied in, as 4-bit codes
cannot skip rows) and its adapter term masked the same way, so the adapters and the masks train
while the base stays as it is. A bare 4-bit `QuantLinear` is masked by multiplication too.
`model.gradient_checkpointing` (in training mode) recomputes each block in the backward.

Checks (ValueError naming the argument): z must be a dict of floating-point tensors on the model's
device, with kinds among llama.prune.MODULE_KINDS and each of its gate shape for the model's config
(`gate_shapes`); head masks need n_kv_heads == n_heads, as PruningMasks does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import llama_kernels

from ..config import ModelConfig
from ..lora import LoRALinear
from ..model import Linear, RMSNorm, Transformer
from ..quantize import QuantLinear
from .masks import MODULE_KINDS, gate_shapes

__all__ = ["check_masks", "masked_forward", "masked_linear"]


# ----------------------------------------------------------------------------- checks
def check_masks(cfg: ModelConfig, z: Mapping[str, torch.Tensor],
                device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
    """z as a plain dict after checking it against `cfg` (kinds, shapes, dtypes, device); a
    ValueError naming the kind and the expected shape otherwise."""
    if not isinstance(z, Mapping):
        raise ValueError(f"z: expected a dict {{kind: mask tensor}}, got {type(z).__name__}")
    shapes = gate_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    for kind, mask in z.items():
        if kind not in shapes:
            raise ValueError(f"z: unknown mask kind {kind!r}; expected kinds among {', '.join(MODULE_KINDS)}")
        expected = shapes[kind]
        if not isinstance(mask, torch.Tensor) or not mask.is_floating_point():
            what = type(mask).__name__ if not isinstance(mask, torch.Tensor) else f"a {mask.dtype} tensor"
            raise ValueError(f"z[{kind!r}]: expected a floating-point tensor of shape {expected}, got {what}")
        if tuple(mask.shape) != expected:
            raise ValueError(f"z[{kind!r}]: expected shape {expected} for this model "
                             f"(n_layers={cfg.n_layers}, n_heads={cfg.n_heads}, hidden_dim={cfg.hidden_dim}, "
                             f"dim={cfg.dim}), got {tuple(mask.shape)}")
        if device is not None and mask.device != device:
            raise ValueError(f"z[{kind!r}]: expected a tensor on the model's device {device}, got {mask.device}")
        out[kind] = mask
    if "head" in out and cfg.n_kv_heads != cfg.n_heads:
        raise ValueError(f"z['head']: head masks need multi-head attention (n_kv_heads == n_heads); this model "
                         f"has {cfg.n_kv_heads} key/value heads for {cfg.n_heads} query heads")
    return out


# ----------------------------------------------------------------------------- masks per layer
@dataclass
class _LayerMasks:
    """The masks one block's projections take (None: no mask). *_row multiplies a projection's
    outputs, *_col its inputs; binary ones only skip (see the module docstring)."""

    hidden: Optional[torch.Tensor]  # binary (D,): columns of every input projection
    q_row: Optional[torch.Tensor]  # binary (H * hd,)
    kv_row: Optional[torch.Tensor]  # binary (Hkv * hd,)
    wo_col: Optional[torch.Tensor]  # soft (H * hd,): the head gates
    wo_row: Optional[torch.Tensor]  # soft (D,): hidden * layer * head_layer
    w1_row: Optional[torch.Tensor]  # binary (F,) for SwiGLU; soft for GELU
    w3_row: Optional[torch.Tensor]  # soft (F,): the intermediate gates
    w2_col: Optional[torch.Tensor]  # binary (F,)
    w2_row: Optional[torch.Tensor]  # soft (D,): hidden * layer * mlp


def _times(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if a is None:
        return b
    return a if b is None else a * b


def _binary(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else (t != 0).to(t.dtype)


def _spread(t: Optional[torch.Tensor], size: int) -> Optional[torch.Tensor]:
    """A per-layer scalar as a (size,) vector (a view), or None."""
    return None if t is None else t.reshape(1).expand(size)


def _layer_masks(cfg: ModelConfig, z: dict[str, torch.Tensor]) -> list[_LayerMasks]:
    hd, L = cfg.head_dim, cfg.n_layers
    hidden = z.get("hidden")
    hidden_bin = _binary(hidden)
    attn = _times(z.get("layer"), z.get("head_layer"))  # (L,) soft, or None
    ffn = _times(z.get("layer"), z.get("mlp"))
    attn_on, ffn_on = _binary(attn), _binary(ffn)
    head = z.get("head")
    head_soft = None if head is None else head.repeat_interleave(hd, dim=1)  # (L, H * hd)
    head_bin = _binary(head_soft)
    inter = z.get("intermediate")
    inter_bin = _binary(inter)
    swiglu = cfg.mlp == "swiglu"
    out = []
    for i in range(L):
        a_on = None if attn_on is None else attn_on[i]
        f_on = None if ffn_on is None else ffn_on[i]
        q_row = _times(None if head_bin is None else head_bin[i], _spread(a_on, cfg.n_heads * hd))
        kv_row = q_row if head_bin is not None else _spread(a_on, cfg.n_kv_heads * hd)
        inter_i = None if inter is None else inter[i]
        inter_bin_i = None if inter_bin is None else inter_bin[i]
        w3_row = _times(inter_i, _spread(f_on, cfg.hidden_dim))
        out.append(_LayerMasks(
            hidden=hidden_bin,
            q_row=q_row,
            kv_row=kv_row,
            wo_col=None if head_soft is None else head_soft[i],
            wo_row=_times(hidden, _spread(None if attn is None else attn[i], cfg.dim)),
            w1_row=_times(inter_bin_i, _spread(f_on, cfg.hidden_dim)) if swiglu else w3_row,
            w3_row=w3_row,
            w2_col=inter_bin_i,
            w2_row=_times(hidden, _spread(None if ffn is None else ffn[i], cfg.dim)),
        ))
    return out


# ----------------------------------------------------------------------------- masked layers
def _mul(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return x if mask is None else x * mask.to(x.dtype)


def _masked_matmul(x: torch.Tensor, w: torch.Tensor, row: Optional[torch.Tensor], col: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor]) -> torch.Tensor:
    """llama_kernels.masked_matmul with a mask that needs a gradient split in two: its binary
    part goes to the kernel (which skips the zeros) and its values multiply in outside. The
    kernel then computes no mask gradient, which for a row mask would cost a GEMM (u recomputed
    on every row); autograd takes the soft row mask's gradient from the saved output, as for
    any product, and it is zero where the gate is (a hard-concrete gate at exactly 0 passes no
    gradient to log_alpha anyway, through the clamp)."""
    soft_row = row is not None and row.requires_grad
    soft_col = col is not None and col.requires_grad
    if soft_col:
        x = x * col.to(x.dtype)
    y = llama_kernels.masked_matmul(x, w, row_mask=_binary(row.detach()) if soft_row else row,
                                    col_mask=_binary(col.detach()) if soft_col else col, bias=bias)
    return y * row.to(y.dtype) if soft_row else y


def masked_linear(layer: nn.Module, x: torch.Tensor, row: Optional[torch.Tensor] = None,
                  col: Optional[torch.Tensor] = None, eager: bool = False) -> torch.Tensor:
    """layer((x * col)) * row for an nn.Linear (our Linear included), a 4-bit QuantLinear or a
    LoRALinear over either; see the module docstring for how each is masked."""
    if isinstance(layer, LoRALinear):
        y = masked_linear(layer.base, x, row, col, eager)
        if layer.merged:
            return y
        a, b = layer.lora_A, layer.lora_B
        low = F.linear(layer.dropout(_mul(x, col)).to(a.dtype), a)  # (..., rank): nothing to skip
        if eager or row is None:
            delta = _mul(F.linear(low, b), row)
        else:
            delta = _masked_matmul(low, b, row, None, None)
        return y + (delta * layer.scale).to(y.dtype)
    if isinstance(layer, QuantLinear):  # 4-bit codes: no rows to skip, the masks multiply in
        return _mul(layer(_mul(x, col)), row)
    if isinstance(layer, nn.Linear):
        w = layer.weight
        if row is None and col is None and not eager:  # nothing masked: the layer's own kernel
            return layer(x)
        if eager:
            return _mul(F.linear(_mul(x, col), w, layer.bias), row)
        return _masked_matmul(x, w.to(x.dtype), row, col, layer.bias)
    raise TypeError(f"layer: expected an nn.Linear, QuantLinear or LoRALinear, got {type(layer).__name__}")


def _norm(norm: nn.Module, x: torch.Tensor, hidden: Optional[torch.Tensor], kept: Optional[torch.Tensor],
          eager: bool) -> torch.Tensor:
    """`norm` (RMSNorm or LayerNorm) of x over the kept model dims (the nonzero hidden gates,
    `kept` of them); without a hidden mask, over all of them."""
    if isinstance(norm, RMSNorm):
        if not eager:
            if kept is None:
                return llama_kernels.rms_norm(x, norm.weight, norm.eps)
            # rms_norm averages over all D; scaling x by c = sqrt(D / kept) makes that average
            # sum / kept, and dividing the weight by c takes the scale back out of the output.
            c = torch.sqrt(x.shape[-1] / kept)
            return llama_kernels.rms_norm(x * c, norm.weight / c, norm.eps)
        xf = x.float()
        n = x.shape[-1] if kept is None else kept
        rstd = torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) / n + norm.eps)
        return (xf * rstd * norm.weight.float()).to(x.dtype)
    if isinstance(norm, nn.LayerNorm):
        if kept is None:
            return norm(x)
        xf = x.float()
        keep = hidden.float()
        mean = xf.sum(-1, keepdim=True) / kept
        centred = (xf - mean) * keep
        var = centred.pow(2).sum(-1, keepdim=True) / kept
        y = centred * torch.rsqrt(var + norm.eps)
        if norm.weight is not None:
            y = y * norm.weight.float()
        if norm.bias is not None:
            y = y + norm.bias.float()
        return (y * keep).to(x.dtype)
    raise TypeError(f"norm: expected RMSNorm or nn.LayerNorm, got {type(norm).__name__}")


def _block(block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, m: _LayerMasks,
           kept: Optional[torch.Tensor], eager: bool) -> torch.Tensor:
    """One block under its masks: the residual stream in, the residual stream out."""
    training = block.training
    attn = block.attention
    b, s, _ = x.shape
    normed = _norm(block.attention_norm, x, m.hidden, kept, eager)
    q = masked_linear(attn.wq, normed, m.q_row, m.hidden, eager).view(b, s, attn.n_heads, attn.head_dim)
    k = masked_linear(attn.wk, normed, m.kv_row, m.hidden, eager).view(b, s, attn.n_kv_heads, attn.head_dim)
    v = masked_linear(attn.wv, normed, m.kv_row, m.hidden, eager).view(b, s, attn.n_kv_heads, attn.head_dim)
    out = llama_kernels.rope_attention(q, k, v, cos, sin, causal=True,
                                       dropout_p=attn.attn_dropout if training else 0.0)
    h = masked_linear(attn.wo, out.reshape(b, s, -1), m.wo_row, m.wo_col, eager)
    x = x + (block.dropout(h) if training else h)

    ff = block.feed_forward
    normed = _norm(block.ffn_norm, x, m.hidden, kept, eager)
    if ff.swiglu:
        gate = masked_linear(ff.w1, normed, m.w1_row, m.hidden, eager)
        up = masked_linear(ff.w3, normed, m.w3_row, m.hidden, eager)
        if not eager and ff.fused and (training or x.device.type == "cpu"):  # as FeedForward.forward
            act = llama_kernels.swiglu(gate, up)
        else:
            act = F.silu(gate) * up
    else:
        act = F.gelu(masked_linear(ff.w1, normed, m.w1_row, m.hidden, eager), approximate="tanh")
    h = masked_linear(ff.w2, act, m.w2_row, m.w2_col, eager)
    return x + (block.dropout(h) if training else h)


# ----------------------------------------------------------------------------- the forward
def masked_forward(model: Transformer, tokens: torch.Tensor, z: Mapping[str, torch.Tensor],
                   targets: Optional[torch.Tensor] = None, *, eager: bool = False, label_smoothing: float = 0.0,
                   z_loss: float = 0.0, return_hidden: bool = False) -> torch.Tensor:
    """`model` (whose config has the masks' source shape) on tokens (B, S) under the masks z
    ({kind: tensor} as PruningMasks gives them; a missing kind is all ones): the logits
    (B, S, vocab); the loss (`model.loss`, with label_smoothing and z_loss) if `targets` is given;
    the final hidden states (B, S, dim) if `return_hidden`. Differentiable in the weights (or the
    adapters) and in every mask. `eager` runs the dense comparison path (module docstring)."""
    if not isinstance(model, Transformer):
        raise ValueError(f"model: expected a llama.model.Transformer, got {type(model).__name__}")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens: expected an integer tensor of shape (batch, seq), got {shape}")
    if targets is not None and return_hidden:
        raise ValueError("return_hidden: expected False when targets are given (the loss is returned)")
    if targets is not None and (not isinstance(targets, torch.Tensor) or targets.shape != tokens.shape):
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets: expected tokens' shape {tuple(tokens.shape)}, got {shape}")
    cfg = model.config
    device = model.tok_embeddings.weight.device
    z = check_masks(cfg, z, device)
    s = tokens.shape[1]
    if s > model.rope_cos.shape[0]:
        if s > cfg.max_seq_len and cfg.rope_scaling == "none":
            raise ValueError(f"tokens: {s} positions exceed max_seq_len {cfg.max_seq_len}; "
                             "set rope_scaling=linear or dynamic to run longer sequences")
        model.setup_rope(s)
    cos, sin = model.rope_cos, model.rope_sin

    layer_masks = _layer_masks(cfg, z)
    hidden = z.get("hidden")
    hidden_bin = _binary(hidden)
    kept = None if hidden_bin is None else hidden_bin.float().sum().clamp(min=1.0)
    x = _mul(model.tok_embeddings(tokens), hidden)
    if model.training:
        x = model.dropout(x)
    for block, m in zip(model.layers, layer_masks):
        if model.gradient_checkpointing and model.training:
            x = torch.utils.checkpoint.checkpoint(_block, block, x, cos, sin, m, kept, eager, use_reentrant=False)
        else:
            x = _block(block, x, cos, sin, m, kept, eager)
    h = _norm(model.norm, x, hidden_bin, kept, eager)
    if return_hidden:
        return h
    if targets is not None:
        out = model.output
        if (hidden_bin is not None and not eager and model.fused and type(out) is Linear and out.bias is None):
            # The fused loss over the kept model dims only: h is zero at the others, so the head's
            # product loses nothing, and its cost falls with the hidden mask like every GEMM's.
            cols = torch.nonzero(hidden_bin).squeeze(1)  # a host sync, as the masked GEMMs' own
            if cols.numel() < cfg.dim:
                return llama_kernels.linear_cross_entropy(
                    h.index_select(-1, cols), out.weight.index_select(1, cols).to(h.dtype), targets,
                    label_smoothing=label_smoothing, z_loss=z_loss)
        # (h times the binary hidden mask: the same function as the kept-column loss above, whose
        # gradient does not reach the pruned dims either)
        return model.loss(_mul(h, hidden_bin), targets, label_smoothing=label_smoothing, z_loss=z_loss)
    return masked_linear(model.output, h, None, hidden_bin, eager)
