"""A small, readable LLaMA: embeddings, RMSNorm, rotary attention with GQA, SwiGLU, norm, head.

Parameter names follow Meta's and llama2.c's layout (`tok_embeddings`, `layers.N.attention.wq`,
`feed_forward.w1/w2/w3`, `attention_norm`, `ffn_norm`, `norm`, `output`); the loaders in
`llama.checkpoint` map every other layout onto it.

RoPE convention: **half-split**. For head dim D, element i < D/2 of a query or key is paired
with element i + D/2, and the pair is rotated by angle `pos * theta**(-2i/D)`. This is the
Hugging Face layout and the one our fused kernels use. Meta and llama2.c checkpoints rotate
interleaved pairs (2i, 2i+1) instead; loading them permutes the rows of wq and wk (see
`llama.checkpoint.permute_interleaved_to_half`), which gives identical attention scores. The
cos/sin tables are built for the first ROPE_INITIAL_POSITIONS positions (at most max_seq_len)
and grown on demand up to max_seq_len (past it with RoPE scaling), so a config's max_seq_len
costs nothing until a sequence that long runs.

Tensor layout: activations are (batch, seq, heads, head_dim) straight out of the projections;
the KV cache is (batch, capacity, kv_heads, head_dim) per layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import llama_kernels
from llama_kernels.dispatch import host_sync_allowed
from llama_kernels.ops.rope_attention import cache_dtype_supported, rotate

from .config import ModelConfig


# ----------------------------------------------------------------------------- rotary embedding
# RoPE tables are built for this many positions (or max_seq_len if smaller) and grown on demand.
ROPE_INITIAL_POSITIONS = 4096


def rope_tables(cfg: ModelConfig, length: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (length, head_dim // 2) in fp32, for positions 0..length-1.

    "linear" scaling divides positions by rope_scaling_factor. "dynamic" (NTK) scaling keeps the
    trained frequencies up to max_seq_len and raises the base for longer tables, as
    base * (factor * length / max_seq_len - (factor - 1)) ** (D / (D - 2)).
    """
    d = cfg.head_dim
    base = cfg.rope_theta
    if cfg.rope_scaling == "dynamic" and length > cfg.max_seq_len:
        f = cfg.rope_scaling_factor
        base = base * ((f * length / cfg.max_seq_len) - (f - 1)) ** (d / (d - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
    pos = torch.arange(length, dtype=torch.float64, device=device)
    if cfg.rope_scaling == "linear":
        pos = pos / cfg.rope_scaling_factor
    angles = torch.outer(pos, inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, S, H, D) by cos/sin of shape (S, D/2) or (B, S, D/2); fp32 math."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    return rotate(x, cos[:, :, None, :], sin[:, :, None, :]).to(x.dtype)


# ----------------------------------------------------------------------------- KV cache
@dataclass
class KVCache:
    """Preallocated keys and values for every layer, and how many positions each sequence holds.

    k[layer], v[layer]: (batch, capacity, n_kv_heads, head_dim). seqlens: (batch,) int64. A
    forward pass with this cache writes its keys and values at positions seqlens[b] + i and then
    advances seqlens by the number of valid tokens of each sequence.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    seqlens: torch.Tensor
    # True until a forward pass writes to the cache (allocate, reset): a host-side flag, so a
    # prefill knows every sequence starts at position 0 without reading seqlens back.
    empty: bool = True

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, capacity: int, device=None, dtype=torch.float32) -> "KVCache":
        if batch <= 0 or capacity <= 0:
            raise ValueError(f"batch, capacity: expected positive sizes, got {batch}, {capacity}")
        shape = (batch, capacity, cfg.n_kv_heads, cfg.head_dim)
        return cls(
            k=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
            v=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
            seqlens=torch.zeros(batch, dtype=torch.long, device=device),
        )

    @property
    def batch(self) -> int:
        return self.seqlens.shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    def reset(self) -> None:
        self.seqlens.zero_()
        self.empty = True


# ----------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return llama_kernels.rms_norm(x, self.weight, self.eps)


class Linear(nn.Linear):
    """nn.Linear through llama_kernels.linear: a bandwidth-bound CPU kernel for decode-sized inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return llama_kernels.linear(x, self.weight, self.bias)

    def _apply(self, fn, recurse=True):
        # .to() and friends give the weight new storage under the same Parameter: a joined
        # copy (see join_projections) no longer stands for it.
        forget_joined(self)
        return super()._apply(fn, recurse)

    def __getstate__(self):
        return without_joined(self)

    @staticmethod
    def store_joined(layers: Sequence["Linear"]) -> Optional[torch.Tensor]:
        """Copy the layers' weights side by side into one (sum N, K) tensor and make each weight a
        view of its rows (no memory is added); returns that tensor, or None when they cannot be
        joined (biases, or weights of different dtypes or devices)."""
        w0 = layers[0].weight
        if any(layer.bias is not None or layer.weight.dtype != w0.dtype or layer.weight.device != w0.device
               for layer in layers):
            return None
        with torch.no_grad():
            joined = torch.cat([layer.weight.detach() for layer in layers])
        for layer, rows in zip(layers, joined.split([layer.out_features for layer in layers])):
            layer.weight = nn.Parameter(rows, requires_grad=layer.weight.requires_grad)
        return joined

    @staticmethod
    def joined_parts(layer: "Linear") -> tuple[torch.Tensor, ...]:
        """The tensors a joined copy stands for: replacing any of them makes the copy stale."""
        return (layer._parameters["weight"],)  # not through Module.__getattr__ (every decode step)

    @staticmethod
    def joined_forward(x: torch.Tensor, joined: torch.Tensor) -> torch.Tensor:
        return llama_kernels.linear(x, joined)

    @staticmethod
    def fused_forward(x: torch.Tensor, layers: Sequence["Linear"]) -> Optional[torch.Tensor]:
        """The layers' outputs side by side from one llama_kernels.linear call, or None when they have
        biases or weights of different dtypes (see project)."""
        dtype = layers[0].weight.dtype
        if any(layer.bias is not None or layer.weight.dtype != dtype for layer in layers):
            return None
        return llama_kernels.linear(x, [layer.weight for layer in layers])


# Inputs up to this many rows (decode steps) run projections that share them as one call; larger
# ones (prefill) are GEMMs of their own, where joining the outputs would only add a copy.
FUSED_PROJECTION_MAX_ROWS = 16


@dataclass(eq=False)
class _Joined:
    """Layers whose weights are stored side by side (see join_projections)."""

    layers: tuple[nn.Module, ...]
    parts: tuple[torch.Tensor, ...]  # the tensors `operand` stands for, by identity
    operand: object  # what `forward` takes: the joined weight, or a joined QuantizedWeight
    forward: object  # forward(x, operand) -> the layers' outputs side by side
    sizes: tuple[int, ...]  # the layers' output features
    addresses: tuple[int, ...]  # where the parts' memory was (an in-place `.data =` moves it)


def without_joined(layer: nn.Module) -> dict:
    """A layer's state for copy and pickle, unjoined: a copy's weights no longer share memory."""
    state = nn.Module.__getstate__(layer)
    state.pop("_joined", None)
    return state


def forget_joined(layer: nn.Module) -> None:
    """Drop `layer`'s record of being joined (see join): for a layer whose weights are about to
    move, so the joined copy no longer stands for them."""
    layer.__dict__.pop("_joined", None)


def _joined_parts(layers) -> tuple[torch.Tensor, ...]:
    parts_of = type(layers[0]).joined_parts
    return tuple(t for layer in layers for t in parts_of(layer))


def join(layers: Sequence[nn.Module]) -> bool:
    """Store the weights of `layers` (one class that defines `store_joined`, e.g. our Linear or
    QuantLinear, reading the same input) side by side in one tensor, each layer's weight a view
    of it, so that `project` runs them as one matrix product. True if they are joined."""
    layers = tuple(layers)
    cls = type(layers[0])
    store = getattr(cls, "store_joined", None)
    if store is None or any(type(layer) is not cls for layer in layers):
        return False
    if _usable_joined(layers, check_grad=False) is not None:
        return True
    if any(t is not None and t.is_meta for t in _joined_parts(layers)):
        return False
    operand = store(layers)
    if operand is None:
        return False
    parts = _joined_parts(layers)
    record = _Joined(layers, parts, operand, cls.joined_forward, tuple(layer.out_features for layer in layers),
                     _addresses(parts))
    for layer in layers:
        layer.__dict__["_joined"] = record
    return True


def _addresses(parts) -> tuple[int, ...]:
    return tuple(t.data_ptr() for t in parts if t is not None)


def _usable_joined(layers: tuple[nn.Module, ...], check_grad: bool = True) -> Optional[_Joined]:
    """The record of `layers` if they are still joined as recorded (same layers, same weight
    tensors, in eager mode also at the same addresses) and it may serve this call (a joined
    weight carries no gradient to the layers')."""
    record = layers[0].__dict__.get("_joined")
    if record is None:
        return None
    stale = len(record.layers) != len(layers) or any(
        a is not b or a.__dict__.get("_joined") is not record for a, b in zip(record.layers, layers))
    if not stale:
        parts = _joined_parts(layers)
        stale = len(parts) != len(record.parts) or any(a is not b for a, b in zip(parts, record.parts))
        if not stale and not torch.compiler.is_compiling():
            stale = _addresses(parts) != record.addresses
    if stale:
        if not torch.compiler.is_compiling():  # drop it, and the memory it holds
            for layer in (*layers, *record.layers):
                if layer.__dict__.get("_joined") is record:
                    del layer.__dict__["_joined"]
        return None
    if check_grad and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in record.parts):
        return None
    return record


def project(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> list[torch.Tensor]:
    """x through several layers that read it (Q, K and V; gate and up): a list of their outputs.

    Layers joined by `join` (Transformer.join_projections, which generation calls on a GPU) run as
    one matrix product over their side-by-side weights, split into views: one launch and one
    larger, better-streaming GEMV per group in a decode step.

    On the CPU a decode step is dozens of small matrix-vector products, and each call's Python and
    thread start-up costs about as much as its arithmetic. Layers of one class that define
    `fused_forward(x, layers)` (our Linear; QuantLinear of one format) then run as one kernel
    call, whose output is split into views, even when they are not joined. Everything else, and
    inputs with more than FUSED_PROJECTION_MAX_ROWS rows, runs one layer at a time, unless the
    class sets FUSED_ANY_ROWS (QuantLinear: one call quantizes a prompt's rows to int8 once for
    all its weights).
    """
    if "_joined" in layers[0].__dict__:
        record = _usable_joined(layers)
        if record is not None:
            return list(record.forward(x, record.operand).split(record.sizes, dim=-1))
    cls = type(layers[0])
    fused = getattr(cls, "fused_forward", None)
    sized = getattr(cls, "FUSED_ANY_ROWS", False) or x.numel() <= FUSED_PROJECTION_MAX_ROWS * x.shape[-1]
    if fused is not None and x.is_cpu and sized and all(type(layer) is cls for layer in layers):
        y = fused(x, layers)
        if y is not None:
            return list(y.split([layer.out_features for layer in layers], dim=-1))
    return [layer(x) for layer in layers]


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rms":
        return RMSNorm(cfg.dim, cfg.norm_eps)
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)


def add_norm(norm: nn.Module, x: torch.Tensor, h: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + h), x + h): a branch output h joins the residual stream x, which is normalised
    for the next branch. RMSNorm does both in one kernel (llama_kernels.add_rms_norm); h None adds nothing."""
    if h is None:
        return norm(x), x
    if isinstance(norm, RMSNorm) and h.dtype == x.dtype and h.shape == x.shape:
        return llama_kernels.add_rms_norm(x, h, norm.weight, norm.eps)
    x = x + h
    return norm(x), x


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.attn_dropout = cfg.attn_dropout

    def forward(self, x, cos, sin, cache_kv=None, positions=None, seqlens=None):
        """x: (B, S, dim). Four cases:

        * no cache: causal attention over x (llama_kernels.rope_attention: RoPE inside the kernel);
          cos/sin are the model's tables (positions, D/2).
        * a cache and `seqlens` (B,) (one new token per sequence): llama_kernels.rope_decode_attention
          rotates, appends to the cache at seqlens[b] and attends over it; cos/sin the tables.
        * a cache and `positions` (B, S) (prefill after earlier tokens): cos/sin (B, S, D/2) at
          those positions; keys and values are written there and attention reads the cache
          under a mask.
        * a cache and neither (prefill of an empty cache): rope_attention over x, then the
          rotated keys and values fill slots 0..S-1; cos/sin are the tables.
        """
        b, s, _ = x.shape
        q, k, v = project(x, (self.wq, self.wk, self.wv))
        q = q.view(b, s, self.n_heads, self.head_dim)
        k = k.view(b, s, self.n_kv_heads, self.head_dim)
        v = v.view(b, s, self.n_kv_heads, self.head_dim)
        dropout = self.attn_dropout if self.training else 0.0
        if cache_kv is None:
            out = llama_kernels.rope_attention(q, k, v, cos, sin, causal=True, dropout_p=dropout)
            return self.wo(out.reshape(b, s, -1))
        k_cache, v_cache = cache_kv
        if positions is None and seqlens is None:
            # Prefill of an empty cache: causal attention over the prompt (right padding cannot
            # reach earlier tokens), then its rotated keys and values fill slots 0..S-1.
            kr = apply_rope(k, cos[:s], sin[:s])
            if x.is_cpu and q.dtype == torch.float32 and dropout == 0:
                # The CPU op is RoPE then SDPA in fp32 (its torch backend): the same here, with the
                # keys rotated once for the attention and the cache, and no gather of the tables.
                qr = apply_rope(q, cos[:s], sin[:s])
                out = F.scaled_dot_product_attention(
                    qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                    enable_gqa=self.n_heads != self.n_kv_heads,
                ).transpose(1, 2)
            else:
                out = llama_kernels.rope_attention(q, k, v, cos, sin, causal=True, dropout_p=dropout)
            k_cache[:, :s] = kr.to(k_cache.dtype)
            v_cache[:, :s] = v.to(v_cache.dtype)
            return self.wo(out.reshape(b, s, -1))
        if seqlens is not None:
            # The model checked the lengths against the cache and the tables already.
            out = llama_kernels.rope_decode_attention(q, k, v, k_cache, v_cache, seqlens, cos, sin, check_bounds=False)
            return self.wo(out.reshape(b, s, -1))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rows = torch.arange(b, device=x.device)[:, None].expand(b, s)
        k_cache[rows, positions] = k.to(k_cache.dtype)
        v_cache[rows, positions] = v.to(v_cache.dtype)
        # Query i of sequence b sees cache slots 0..positions[b, i].
        slots = torch.arange(k_cache.shape[1], device=x.device)
        mask = slots[None, None, :] <= positions[:, :, None]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k_cache.transpose(1, 2).to(q.dtype), v_cache.transpose(1, 2).to(q.dtype),
            attn_mask=mask[:, None], dropout_p=dropout, enable_gqa=self.n_heads != self.n_kv_heads,
        )
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). The GELU variant drops w3: w2(gelu(w1 x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.fused = True  # training runs llama_kernels.swiglu (Transformer.use_fused_ops)
        self.w1 = Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = Linear(cfg.hidden_dim, cfg.dim, bias=False)
        if self.swiglu:
            self.w3 = Linear(cfg.dim, cfg.hidden_dim, bias=False)

    def forward(self, x):
        if self.swiglu:
            gate, up = project(x, (self.w1, self.w3))
            # Training: the backward recomputes the sigmoid, one activation less to keep. CPU
            # inference: one kernel instead of two ops, and the CPU decode plan's arithmetic.
            if self.fused and (self.training or x.device.type == "cpu"):
                return self.w2(llama_kernels.swiglu(gate, up))
            return self.w2(F.silu(gate) * up)
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = make_norm(cfg)
        self.attention = Attention(cfg)
        self.ffn_norm = make_norm(cfg)
        self.feed_forward = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, h, cos, sin, cache_kv=None, positions=None, seqlens=None):
        """(x, h) -> (x, h): the residual stream and the last branch output not yet added to it
        (None before the first block). Each add happens inside the next norm (add_norm), so the
        stream is read and written once per branch; the model's final norm adds the last h."""
        normed, x = add_norm(self.attention_norm, x, h)
        h = self.attention(normed, cos, sin, cache_kv, positions, seqlens)
        if self.training:  # dropout is the identity in eval mode: skip the module calls
            h = self.dropout(h)
        normed, x = add_norm(self.ffn_norm, x, h)
        h = self.feed_forward(normed)
        return x, (self.dropout(h) if self.training else h)


# ----------------------------------------------------------------------------- the model
class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.output = Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        # The tables cover the first positions only and grow on demand (setup_rope): max_seq_len
        # is a limit, and a config may declare one far beyond what any run uses.
        cos, sin = rope_tables(cfg, min(cfg.max_seq_len, ROPE_INITIAL_POSITIONS),
                               device=self.tok_embeddings.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.gradient_checkpointing = False
        self.fused = True  # training: fused SwiGLU, and the loss without full logits (use_fused_ops)

    # ------------------------------------------------------------------ set-up
    def _apply(self, fn, recurse=True):
        # .to(bf16) and friends would round the RoPE tables too; they stay fp32, recomputed.
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32 and not self.rope_cos.is_meta:
            self.rope_cos, self.rope_sin = rope_tables(self.config, self.rope_cos.shape[0], self.rope_cos.device)
        return self

    def join_projections(self) -> "Transformer":
        """Store each block's Q, K and V weights side by side in one tensor, and its gate and up
        weights in another (each layer's weight becomes a view of its rows: no memory is added),
        so a decode step reads each group in one matrix product. Parameter names, state_dict()
        and checkpoints are unchanged. Generation on a GPU calls this; replacing a weight
        (load_weights, quantize_, .to()) undoes it for that group, and calling it again redoes
        it. Layers that cannot be joined (biases, mixed dtypes) are left alone."""
        for block in self.layers:
            join((block.attention.wq, block.attention.wk, block.attention.wv))
            if block.feed_forward.swiglu:
                join((block.feed_forward.w1, block.feed_forward.w3))
        return self

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def reset_parameters(self, seed: Optional[int] = None) -> "Transformer":
        """Fresh weights for training from scratch: N(0, 0.02), and 0.02/sqrt(2 n_layers) for the
        projections that feed the residual stream (wo, w2); norms at one."""
        gen = torch.Generator(device=self.tok_embeddings.weight.device)
        gen.manual_seed(0 if seed is None else seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith(("wo.weight", "w2.weight")):
                    p.normal_(0.0, residual_std, generator=gen)
                elif name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith("norm.bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, 0.02, generator=gen)
        return self

    def __getstate__(self):
        """Copies and pickles leave out the decoders that generate() keeps on the model (their
        KV caches and captured CUDA graphs belong to this instance)."""
        state = self.__dict__.copy()
        state.pop("_decoders", None)
        return state

    def setup_rope(self, length: Optional[int] = None) -> None:
        """(Re)compute the RoPE tables on the model's device, for `length` positions at least.

        Up to max_seq_len the rows of a table do not depend on its length, so a table is only
        ever grown there (to `length`, at least doubling, at most max_seq_len), never rebuilt
        shorter. Past max_seq_len ("linear" or "dynamic" scaling), the table is built for exactly
        `length` positions: dynamic scaling raises the base with the length.
        """
        cfg = self.config
        length = max(length or 0, min(cfg.max_seq_len, ROPE_INITIAL_POSITIONS))
        device = self.tok_embeddings.weight.device
        current = self.rope_cos.shape[0]
        usable = self.rope_cos.device == device and not self.rope_cos.is_meta
        if usable and current == length:
            return
        if length <= cfg.max_seq_len:
            if usable and length <= current <= cfg.max_seq_len:
                return  # a prefix of the table is the table for `length`
            if usable and current < length:
                length = min(cfg.max_seq_len, max(length, 2 * current))
        self.rope_cos, self.rope_sin = rope_tables(cfg, length, device=device)

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> "Transformer":
        """Take the tensors of `state_dict` as the parameters (no copy: works from the meta device).

        Strict: a missing, unexpected or mis-shaped tensor raises ValueError naming it. With tied
        embeddings, `output.weight` may be absent (or must equal the embedding).
        """
        expected = {k: v.shape for k, v in self.state_dict().items()}
        given = dict(state_dict)
        if self.config.tie_embeddings and "output.weight" in given:
            if not torch.equal(given["output.weight"], given.get("tok_embeddings.weight", given["output.weight"])):
                raise ValueError("output.weight: differs from tok_embeddings.weight but the config ties them")
        if self.config.tie_embeddings:
            given.pop("output.weight", None)
            expected.pop("output.weight", None)
        missing = sorted(set(expected) - set(given))
        unexpected = sorted(set(given) - set(expected))
        if missing or unexpected:
            raise ValueError(f"state_dict: missing tensors {missing}, unexpected tensors {unexpected}")
        for name, shape in expected.items():
            if tuple(given[name].shape) != tuple(shape):
                raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(given[name].shape)}")
        self.load_state_dict(given, strict=False, assign=True)  # strictness checked above
        self.tie_weights()
        self.setup_rope(self.rope_cos.shape[0])
        return self

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        tokens: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        *,
        cache: Optional[KVCache] = None,
        lengths: Optional[torch.Tensor] = None,
        last_only: bool = False,
        return_hidden: bool = False,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
    ) -> torch.Tensor:
        """tokens (B, S) -> logits (B, S, vocab); or the mean cross-entropy if `targets` (B, S) is
        given (-100 marks ignored positions; `label_smoothing` and `z_loss` as in `loss`); or the
        final hidden states (B, S, dim) if `return_hidden`.

        With a `cache`, each sequence continues at its own position cache.seqlens[b]; `lengths`
        (B,) says how many of the S tokens are real (right padding), and the cache advances by
        that much. `last_only` returns only the logits of each sequence's last real token, (B, vocab).
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens: expected shape (batch, seq), got {tuple(tokens.shape)}")
        b, s = tokens.shape
        h = self.tok_embeddings(tokens)
        if self.training:
            h = self.dropout(h)
        if cache is None:
            if s > self.rope_cos.shape[0]:
                if (s > self.config.max_seq_len and self.config.rope_scaling == "none"
                        and not torch.compiler.is_compiling()):
                    raise ValueError(
                        f"tokens: {s} positions exceed max_seq_len {self.config.max_seq_len}; "
                        "set rope_scaling=linear or dynamic to run longer sequences"
                    )
                self.setup_rope(s)
            cos, sin = self.rope_cos, self.rope_sin
            positions = seqlens = None
        else:
            if cache.batch != b:
                raise ValueError(f"cache: holds {cache.batch} sequences but tokens has {b}")
            # The cache holds the model's dtype, or 16 bits under an fp32 model (written rounded).
            cache_ok = cache_dtype_supported(h.dtype, cache.k[0].dtype)
            fresh = cache.empty and s > 1 and cache_ok
            if host_sync_allowed(tokens):
                needed = s if fresh else int(cache.seqlens.max()) + s
                if needed > cache.capacity:
                    raise ValueError(f"cache: {needed} positions needed but its capacity is {cache.capacity}")
                if needed > self.rope_cos.shape[0]:
                    self.setup_rope(needed)
            if fresh:  # prefill from position 0: the fused training op, tables as they are
                cos, sin, seqlens, positions = self.rope_cos, self.rope_sin, None, None
            elif s == 1 and cache_ok:  # decode: the fused op reads the tables itself
                cos, sin, seqlens = self.rope_cos, self.rope_sin, cache.seqlens
                positions = None
            else:
                positions = cache.seqlens[:, None] + torch.arange(s, device=tokens.device)[None, :]
                cos, sin, seqlens = self.rope_cos[positions], self.rope_sin[positions], None

        branch = None  # the last block's FFN output, added to h inside the final norm
        for i, layer in enumerate(self.layers):
            cache_kv = None if cache is None else (cache.k[i], cache.v[i])
            if self.gradient_checkpointing and self.training and cache is None:
                h, branch = torch.utils.checkpoint.checkpoint(layer, h, branch, cos, sin, use_reentrant=False)
            else:
                h, branch = layer(h, branch, cos, sin, cache_kv, positions, seqlens)
        h = add_norm(self.norm, h, branch)[0]

        if cache is not None:
            cache.seqlens += s if lengths is None else lengths.to(cache.seqlens.dtype)
            if cache.empty:
                cache.empty = False
        if last_only:
            last = (s - 1) if lengths is None else (lengths.to(torch.long) - 1)
            h = h[:, -1] if lengths is None else h[torch.arange(b, device=h.device), last]
        if return_hidden:
            return h
        if targets is None:
            return self.output(h)
        return self.loss(h, targets, label_smoothing=label_smoothing, z_loss=z_loss)

    def loss(self, h: torch.Tensor, targets: torch.Tensor, *, label_smoothing: float = 0.0,
             z_loss: float = 0.0) -> torch.Tensor:
        """The mean cross-entropy of the output head's logits for final hidden states h against
        `targets` (-100 marks ignored positions), with label smoothing and z-loss (z_loss times
        the mean squared log-sum-exp over the counted positions).

        Trained on fused ops (use_fused_ops) with a plain head, the logits are never formed
        whole: llama_kernels.linear_cross_entropy makes them one chunk at a time. Otherwise (the
        eager ops, a 4-bit or adapted head) the head runs and the loss follows in fp32."""
        if self.fused and type(self.output) is Linear and self.output.bias is None:
            return llama_kernels.linear_cross_entropy(h, self.output.weight.to(h.dtype), targets,
                                                      label_smoothing=label_smoothing, z_loss=z_loss)
        logits = self.output(h).float().reshape(-1, self.config.vocab_size)
        t = targets.reshape(-1)
        loss = F.cross_entropy(logits, t, ignore_index=-100, label_smoothing=label_smoothing)
        if z_loss:
            keep = t != -100
            loss = loss + z_loss * torch.logsumexp(logits[keep], -1).pow(2).mean()
        return loss

    def use_fused_ops(self, fused: bool = True) -> "Transformer":
        """Train on the fused ops (llama_kernels.swiglu in every FFN, linear_cross_entropy for the
        loss given targets), or, with False, on the eager PyTorch ops, for comparison."""
        self.fused = bool(fused)
        for module in self.modules():
            if isinstance(module, FeedForward):
                module.fused = self.fused
        return self


def build(cfg: ModelConfig, device="cpu", dtype: Optional[torch.dtype] = None, init: bool = True) -> Transformer:
    """A model with fresh weights (`init`), or on the meta device ready for `load_weights`."""
    with torch.device("meta" if not init else device):
        model = Transformer(cfg)
    if init:
        model.reset_parameters()
    if dtype is not None:
        model.to(dtype)
    return model
