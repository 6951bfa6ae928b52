"""Causal attention with RoPE: llama_kernels.rope_attention / rope_decode_attention against peers.

Passes:

* ``fwd``, ``fwd+bwd``: RoPE on q and k, then causal attention, q (B, S, H, D), k and v
  (B, S, Hkv, D). fwd+bwd times forward plus the gradients of q, k and v for a random output
  gradient. TFLOP/s counts attention only, FlashAttention's convention: 4*B*H*S*S*D / 2 forward
  (causal halves it), 3.5x that for forward+backward (backward = 2.5x forward). RoPE's own
  traffic is not counted, so a peer that pays for it separately shows a lower figure.
* ``decode`` (CUDA-graph replays on a GPU: the kernel time) and ``decode-eager`` (GPU, full mode:
  the per-call time without graphs): one new token per sequence against a KV cache holding L
  positions. q and the new k are rotated at position L, k/v written into slot L of the cache,
  attention over slots 0..L. The cache length stays fixed between calls (the same slot is
  rewritten). GB/s counts the K and V cache bytes read (2*B*L*Hkv*D*s) plus the small terms: the
  new k/v read and written into the cache, q read and the output written. Caches rotate among
  enough copies to exceed twice the L2 (one copy suffices at long contexts).
  ``copy`` is a plain ``dst.copy_(src)`` moving the same number of bytes (half read, half
  written), so in the summary "vs copy" = our GB/s / copy GB/s = the fraction of the measured
  copy bandwidth that decode reaches.

Ours: ``llama_kernels-triton`` (GPU) or ``llama_kernels-torch`` (CPU, the reference) for the training passes;
``llama_kernels-cuda`` and ``llama_kernels-triton`` (GPU) or ``llama_kernels-cpu`` (the C++ kernel) and
``llama_kernels-torch`` (CPU) for decode, each under
its forced backend (``llama_kernels.use_backend``), decode with ``check_bounds=False`` (no host sync).

Peers (training passes), each taking q/k/v in the (B, S, H, D) layout a projection produces:

* ``eager-rope+sdpa-{flash,cudnn,efficient}``: RoPE as LLaMA code in Hugging Face does it
  (``x * cos + rotate_half(x) * sin`` in the input dtype, cos/sin tables precomputed in that dtype
  and not timed), on (B, S, H, D), then ``F.scaled_dot_product_attention(is_causal=True)`` on the
  (B, H, S, D) transposed views under ``sdpa_kernel(<backend>)``; the output is returned as the
  (B, S, H, D) view (no copy charged). On the CPU only the flash backend exists (cuDNN and
  efficient are recorded as missing).
* ``compiled-rope+sdpa-<best>``: the same RoPE function through ``torch.compile``, then SDPA with
  the best backend that takes the case (cuDNN, else flash, else efficient: cuDNN is the fastest
  on an H100, see shared/anchors).
* ``liger-rope+sdpa-<best>``: Liger-Kernel's ``liger_rotary_pos_emb`` (in place, on the
  (B, H, S, D) views, as Hugging Face calls it) + the same SDPA (GPU, full mode, when installed).
* ``flash-attn`` / ``flash-attn3``: ``flash_attn_func`` of FlashAttention 2 / 3 (native GQA, no
  transposes) after ``flash_attn.layers.rotary.apply_rotary_emb`` on q and k (GPU, full mode, when
  installed; the name says ``eager-rope+`` when flash_attn's rotary cannot be imported).

GQA (Hkv < H): SDPA gets ``enable_gqa=True`` (native grouped heads) where the backend takes it.
A backend that refuses grouped heads is recorded as unavailable for that pass with its reason and
measured instead with K and V expanded by ``repeat_interleave`` inside the timed call (what
Hugging Face's ``repeat_kv`` does), under the name ``...+repeat-kv``: that is what a user of
that backend pays. Which backend takes what is probed once per (backend, dtype, head dim, pass)
on tiny inputs while the plan is built; a backend that refuses a full-size case later is recorded
as an error with SDPA's reasons.

Peers (decode): ``eager-rope+sdpa-flash``: the rotation at position L (cos/sin gathered by the
position tensor), the cache write by ``index_copy_`` (as transformers' StaticCache does), then
SDPA of the single query over ``cache[:, :L + 1]`` with the flash backend (the default dispatch,
``-auto``, where flash refuses); ``flash-attn-kvcache``: ``flash_attn_with_kvcache`` with its
rotary and in-place cache append (GPU, when installed); ``copy`` (see above).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F

from bench.common import Bench, Item, SuiteContext, Unavailable, dtype_name, suite, with_backward, within

ROPE_BASE = 10000.0
# SDPA backends in the order "best first" for the compiled/Liger peers (cuDNN leads on an H100).
SDPA_BACKENDS = ("cudnn", "flash", "efficient")
SDPA_ENUM = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


@dataclass(frozen=True)
class Shape:
    b: int
    h: int
    hkv: int
    s: int  # training: sequence length; decode: positions already in the cache (L)
    d: int

    @property
    def case(self) -> dict:
        return {"B": self.b, "H": self.h, "Hkv": self.hkv, "S": self.s, "D": self.d}

    @property
    def decode_case(self) -> dict:
        return {"B": self.b, "H": self.h, "Hkv": self.hkv, "L": self.s, "D": self.d}

    @property
    def gqa(self) -> bool:
        return self.hkv != self.h


def _cases(ctx: SuiteContext):
    """(training shapes, {dtype: passes}, decode shapes, decode dtype)."""
    if ctx.is_cuda:
        train = [Shape(4, 16, 16, 2048, 128), Shape(2, 16, 16, 8192, 128), Shape(8, 32, 32, 1024, 64),
                 Shape(4, 32, 8, 2048, 128)]
        passes = {torch.bfloat16: ("fwd", "fwd+bwd"), torch.float16: ("fwd",)}
        decode = [Shape(b, 16, 16, ctxlen, 128) for b in (1, 8) for ctxlen in (1024, 4096, 8192, 16384, 32768)]
        decode.append(Shape(8, 16, 4, 8192, 128))
        if ctx.quick:
            train = [train[0], train[3]]
            passes = {torch.bfloat16: ("fwd", "fwd+bwd")}
            decode = [Shape(1, 16, 16, 8192, 128), Shape(1, 16, 16, 32768, 128), Shape(8, 16, 16, 8192, 128)]
        return train, passes, decode, torch.bfloat16
    if ctx.quick:
        return [Shape(1, 4, 4, 256, 64)], {torch.float32: ("fwd", "fwd+bwd")}, [Shape(1, 8, 8, 2048, 64)], torch.float32
    train = [Shape(1, 8, 8, 512, 64), Shape(2, 8, 8, 256, 64), Shape(1, 8, 2, 512, 64)]
    decode = [Shape(b, 8, 8, ctxlen, 64) for b in (1, 4) for ctxlen in (1024, 4096)] + [Shape(4, 8, 2, 4096, 64)]
    return train, {torch.float32: ("fwd", "fwd+bwd"), torch.bfloat16: ("fwd",)}, decode, torch.float32


# ----------------------------------------------------------------------------- RoPE
def rope_tables(length: int, d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (length, d/2) in fp32, llama.model.rope_tables' convention with base 10000."""
    inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
    angles = torch.outer(torch.arange(length, dtype=torch.float64, device=device), inv_freq)
    return angles.cos().float(), angles.sin().float()


def _hf_tables(length: int, d: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (length, d) in ``dtype``: both halves repeated, as transformers' rotary embedding."""
    cos, sin = rope_tables(length, d, device)
    return torch.cat((cos, cos), -1).to(dtype), torch.cat((sin, sin), -1).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_qk(q, k, cos, sin):
    """Hugging Face's apply_rotary_pos_emb on (B, S, H, D) with cos/sin (S, 1, D) in the input dtype."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ----------------------------------------------------------------------------- SDPA
def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return getattr(SDPBackend, SDPA_ENUM[name])


def _grouped(q, k, v, repeat: bool):
    """k, v and SDPA's keyword arguments for grouped heads (B, H, S, D): native, or repeated."""
    groups = q.shape[1] // k.shape[1]
    if groups == 1:
        return k, v, {}
    if repeat:
        return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), {}
    return k, v, {"enable_gqa": True}


def _sdpa(q, k, v, backend: str, repeat: bool, causal: bool = True):
    """SDPA on (B, H, S, D) under one forced backend; grouped heads native or repeated."""
    from torch.nn.attention import sdpa_kernel

    k, v, kwargs = _grouped(q, k, v, repeat)
    with sdpa_kernel(_sdpa_backend(backend)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **kwargs)


def _with_warnings(call: Callable[[], object]) -> object:
    """Run ``call``; a RuntimeError is re-raised with the warnings SDPA gave as its reasons."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return call()
        except RuntimeError as exc:
            reasons = "; ".join(dict.fromkeys(" ".join(str(w.message).split()) for w in caught))
            raise RuntimeError(f"{exc}" + (f" [{reasons}]" if reasons else "")) from exc


@lru_cache(maxsize=None)
def _probe(device: str, backend: str, dtype: torch.dtype, d: int, groups: int, repeat: bool, backward: bool,
           decode: bool) -> str | None:
    """None when ``backend`` runs a tiny case of this kind, else why not."""
    try:
        _sdpa_backend(backend)
    except (ImportError, AttributeError) as exc:
        return f"torch {torch.__version__} has no SDPA backend {backend}: {exc}"
    hkv, s = 2, 128
    q = torch.randn(1, hkv * groups, 1 if decode else s, d, device=device, dtype=dtype, requires_grad=backward)
    k = torch.randn(1, hkv, s + 1 if decode else s, d, device=device, dtype=dtype, requires_grad=backward)
    v = torch.randn_like(k, requires_grad=backward)

    def run():
        out = _sdpa(q, k, v, backend, repeat, causal=not decode)
        if backward:
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        if q.is_cuda:
            torch.cuda.synchronize()

    try:
        _with_warnings(run)
    except Exception as exc:  # TypeError (no enable_gqa), RuntimeError (no kernel), ...
        return f"{type(exc).__name__}: {exc}"[:600]
    return None


def _sdpa_choice(ctx: SuiteContext, backend: str, dtype, shape: Shape, backward: bool, decode: bool = False):
    """(repeat?, reason native refused) when ``backend`` can run the case at all; else (None, reason)."""
    probe = partial(_probe, str(ctx.device), backend, dtype, shape.d, shape.h // shape.hkv,
                    backward=backward, decode=decode)
    native = probe(repeat=False)
    if native is None:
        return False, None
    if shape.gqa and probe(repeat=True) is None:
        return True, native
    return None, native


# ----------------------------------------------------------------------------- impls
@dataclass(frozen=True)
class Impl:
    """``prepare(shape, dtype, device)`` runs once per measurement and returns forward(q, k, v).

    ``context`` (ours: the forced backend) wraps each timed call, backward included.
    """

    prepare: Callable[[Shape, torch.dtype, torch.device], Callable]
    context: Callable[[], ContextManager] | None = None


def _ours_prepare(ops, shape, dtype, device):
    cos, sin = rope_tables(shape.s, shape.d, device)
    return lambda q, k, v: ops.rope_attention(q, k, v, cos, sin, causal=True)


def _rope_sdpa_prepare(rope: str, backend: str, repeat: bool, shape, dtype, device):
    """rope: "eager" or "compiled" (HF's rotation on (B, S, H, D)), or "liger" (on (B, H, S, D))."""
    cos, sin = _hf_tables(shape.s, shape.d, device, dtype)
    if rope == "liger":
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        cos, sin = cos[None], sin[None]  # (1, S, D)

        def forward(q, k, v):
            qr, kr = liger_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            return _sdpa(qr, kr, v.transpose(1, 2), backend, repeat).transpose(1, 2)

        return forward

    cos, sin = cos[:, None], sin[:, None]  # (S, 1, D)
    fn = rope_qk
    if rope == "compiled":
        torch.compiler.reset()  # fresh caches: no recompile limit, no silent fallback to eager
        fn = torch.compile(rope_qk)

    def forward(q, k, v):
        qr, kr = fn(q, k, cos, sin)
        return _sdpa(qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2), backend, repeat).transpose(1, 2)

    return forward


def _flash_attn_prepare(attn, rotary, shape, dtype, device):
    cos, sin = rope_tables(shape.s, shape.d, device)
    cos, sin = cos.to(dtype), sin.to(dtype)
    if rotary is None:
        hcos, hsin = _hf_tables(shape.s, shape.d, device, dtype)
        hcos, hsin = hcos[:, None], hsin[:, None]

    def forward(q, k, v):
        if rotary is None:
            qr, kr = rope_qk(q, k, hcos, hsin)
        else:
            qr, kr = rotary(q, cos, sin, interleaved=False), rotary(k, cos, sin, interleaved=False)
        out = attn(qr, kr, v, causal=True)
        return out[0] if isinstance(out, tuple) else out

    return forward


def _flash_attn_modules(ctx: SuiteContext) -> tuple[list[tuple[str, Impl]], list[Unavailable]]:
    """FlashAttention 2 and 3, with flash_attn's rotary where importable."""
    if not ctx.is_cuda:
        return [], [Unavailable("flash-attn", "FlashAttention runs on CUDA only")]
    impls, missing = [], []
    try:
        from flash_attn.layers.rotary import apply_rotary_emb as rotary
    except Exception:
        rotary = None
    prefix = "" if rotary is not None else "eager-rope+"
    try:
        from flash_attn import flash_attn_func
    except Exception as exc:
        missing.append(Unavailable("flash-attn", f"flash_attn not importable: {exc}"))
    else:
        impls.append((f"{prefix}flash-attn", Impl(partial(_flash_attn_prepare, flash_attn_func, rotary))))
    try:
        from flash_attn_interface import flash_attn_func as fa3_func
    except Exception as exc:
        missing.append(Unavailable("flash-attn3", f"flash_attn_interface (FlashAttention 3) not importable: {exc}"))
    else:
        impls.append((f"{prefix}flash-attn3", Impl(partial(_flash_attn_prepare, fa3_func, rotary))))
    return impls, missing


def _ours(ctx: SuiteContext, wanted: dict[str, tuple[str, ...]], op: str):
    """(the llama_kernels module or None, our backends here, unavailable items)."""
    try:
        import llama_kernels

        getattr(llama_kernels, op)
        backends = llama_kernels.available_backends(ctx.device)
    except Exception as exc:
        return None, [], [Unavailable("llama_kernels", f"llama_kernels.{op}: {type(exc).__name__}: {exc}", status="error")]
    ours, missing = [], []
    for backend in wanted[ctx.device.type]:
        if backend in backends or backend == "torch":
            ours.append(backend)
        else:
            missing.append(Unavailable(f"llama_kernels-{backend}", f"{op}: not in llama_kernels.available_backends: {backends}"))
    return llama_kernels, ours, missing


def _train_impls(ctx: SuiteContext, shape: Shape, dtype, backward: bool, extra: list[tuple[str, Impl]],
                 liger: bool) -> tuple[list[tuple[str, Impl]], list[Unavailable]]:
    """The SDPA-based peers for one case, per what each backend takes."""
    impls, missing = [], []
    pass_ = "fwd+bwd" if backward else "fwd"
    where = f"{pass_} {dtype_name(dtype)} D{shape.d}" + (f" H{shape.h}/Hkv{shape.hkv}" if shape.gqa else "")
    backends = SDPA_BACKENDS if ctx.is_cuda else ("flash",)  # cuDNN and efficient have no CPU kernel
    choices = {b: _sdpa_choice(ctx, b, dtype, shape, backward) for b in backends}
    for backend in [b for b in ("flash", "cudnn", "efficient") if b in backends]:
        repeat, refused = choices[backend]
        name = f"eager-rope+sdpa-{backend}"
        if refused is not None:
            then = f"; measured with K/V repeated as {name}+repeat-kv" if repeat else ""
            missing.append(Unavailable(name, f"{where}: refused{then}: {refused}"))
        if repeat is not None:
            impls.append((name + ("+repeat-kv" if repeat else ""),
                          Impl(partial(_rope_sdpa_prepare, "eager", backend, repeat))))
    # The best backend: the first (cuDNN, flash, efficient) that runs the case natively, else repeated.
    best = next((b for b in backends if choices[b][0] is False), None) or \
        next((b for b in backends if choices[b][0] is True), None)
    if best is None:
        missing.append(Unavailable("compiled-rope+sdpa", f"{where}: no SDPA backend takes the case"))
        return impls + extra, missing
    repeat = choices[best][0]
    suffix = best + ("+repeat-kv" if repeat else "")
    for rope in ("compiled", "liger") if liger else ("compiled",):
        impls.append((f"{rope}-rope+sdpa-{suffix}", Impl(partial(_rope_sdpa_prepare, rope, best, repeat))))
    return impls + extra, missing


def _liger_state(ctx: SuiteContext) -> tuple[bool, list[Unavailable]]:
    if not ctx.is_cuda:
        return False, [Unavailable("liger-rope+sdpa", "Liger-Kernel runs on CUDA only")]
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb  # noqa: F401
    except Exception as exc:
        return False, [Unavailable("liger-rope+sdpa", f"liger_kernel not importable: {exc}")]
    return True, []


# ----------------------------------------------------------------------------- training setup
def _train_setup(ctx: SuiteContext, impl: Impl, shape: Shape, dtype, backward: bool) -> list[Callable]:
    b, h, hkv, s, d = shape.b, shape.h, shape.hkv, shape.s, shape.d

    def make_inputs():
        q = torch.randn(b, s, h, d, device=ctx.device, dtype=dtype, requires_grad=backward)
        k = torch.randn(b, s, hkv, d, device=ctx.device, dtype=dtype, requires_grad=backward)
        v = torch.randn(b, s, hkv, d, device=ctx.device, dtype=dtype, requires_grad=backward)
        return q, k, v, (torch.randn_like(q) if backward else None)

    nbytes = (2 * h + 2 * hkv if backward else h + 2 * hkv) * b * s * d * dtype.itemsize
    copies = ctx.rotating(make_inputs, nbytes)
    forward = impl.prepare(shape, dtype, ctx.device)
    calls = []
    for q, k, v, dout in copies:
        call = partial(forward, q, k, v)
        calls.append(within(impl.context, with_backward(call, (q, k, v), dout) if backward else call))
    _with_warnings(calls[0])  # a refusal surfaces here with SDPA's reasons; also the first warm-up
    return calls


def _train_items(ctx: SuiteContext) -> list[Item]:
    train, passes, _, _ = _cases(ctx)
    llama_kernels, ours, items = _ours(ctx, {"cpu": ("torch",), "cuda": ("triton",)}, "rope_attention")
    full_gpu = ctx.is_cuda and not ctx.quick
    liger, missing = _liger_state(ctx) if full_gpu or not ctx.is_cuda else (False, [])
    flash, fa_missing = _flash_attn_modules(ctx) if full_gpu or not ctx.is_cuda else ([], [])
    items += missing + fa_missing
    if not ctx.is_cuda:
        items += [Unavailable(f"eager-rope+sdpa-{b}", f"SDPA's {b} backend has no CPU kernel")
                  for b in ("cudnn", "efficient")]
    seen = {(u.impl, u.reason) for u in items}
    for dtype, pass_names in passes.items():
        for shape in train:
            for pass_ in pass_names:
                backward = pass_ == "fwd+bwd"
                fwd_flops = 2 * shape.b * shape.h * shape.s * shape.s * shape.d  # 4*B*H*S^2*D / 2
                flops = fwd_flops * 7 // 2 if backward else fwd_flops
                impls = [(f"llama_kernels-{b}", Impl(partial(_ours_prepare, llama_kernels),
                                               context=partial(llama_kernels.use_backend, b))) for b in ours]
                peers, refused = _train_impls(ctx, shape, dtype, backward, flash, liger)
                for u in refused:
                    if (u.impl, u.reason) not in seen:
                        seen.add((u.impl, u.reason))
                        items.append(u)
                for name, impl in impls + peers:
                    items.append(Bench(name, shape.case, dtype_name(dtype), pass_,
                                       partial(_train_setup, ctx, impl, shape, dtype, backward), flops=flops))
    return items


# ----------------------------------------------------------------------------- decode
def _decode_bytes(shape: Shape, dtype) -> int:
    s = dtype.itemsize
    return (2 * shape.b * shape.s * shape.hkv * shape.d + 4 * shape.b * shape.hkv * shape.d
            + 2 * shape.b * shape.h * shape.d) * s


def _decode_inputs(ctx: SuiteContext, shape: Shape, dtype):
    """Rotating (q, k_new, v_new, k_cache, v_cache) copies; the capacity leaves room past slot L."""
    capacity = shape.s + 256
    b, h, hkv, d = shape.b, shape.h, shape.hkv, shape.d

    def make():
        def rand(*size):
            return torch.randn(*size, device=ctx.device, dtype=dtype)

        return rand(b, 1, h, d), rand(b, 1, hkv, d), rand(b, 1, hkv, d), rand(b, capacity, hkv, d), \
            rand(b, capacity, hkv, d)

    return capacity, ctx.rotating(make, 2 * b * shape.s * hkv * d * dtype.itemsize)


def _decode_ours(ctx, ops, backend, shape, dtype):
    capacity, copies = _decode_inputs(ctx, shape, dtype)
    cos, sin = rope_tables(capacity, shape.d, ctx.device)
    seqlens = torch.full((shape.b,), shape.s, device=ctx.device, dtype=torch.int32)

    def call(q, kn, vn, kc, vc):
        with ops.use_backend(backend), torch.no_grad():
            return ops.rope_decode_attention(q, kn, vn, kc, vc, seqlens, cos, sin, check_bounds=False)

    return [partial(call, *c) for c in copies]


def _decode_eager(ctx, backend, repeat, shape, dtype):
    """backend None: SDPA's default dispatch."""
    from torch.nn.attention import sdpa_kernel

    capacity, copies = _decode_inputs(ctx, shape, dtype)
    cos, sin = _hf_tables(capacity, shape.d, ctx.device, dtype)
    positions = torch.full((shape.b,), shape.s, device=ctx.device, dtype=torch.long)
    cache_position = positions[:1].clone()  # every sequence at the same length: one slot index
    length = shape.s + 1

    @torch.no_grad()
    def call(q, kn, vn, kc, vc):
        c, s = cos[positions][:, None, None, :], sin[positions][:, None, None, :]  # (B, 1, 1, D)
        qr, kr = q * c + rotate_half(q) * s, kn * c + rotate_half(kn) * s
        kc.index_copy_(1, cache_position, kr)
        vc.index_copy_(1, cache_position, vn)
        k, v, kwargs = _grouped(qr.transpose(1, 2), kc[:, :length].transpose(1, 2),
                                vc[:, :length].transpose(1, 2), repeat)
        if backend is None:
            out = F.scaled_dot_product_attention(qr.transpose(1, 2), k, v, **kwargs)
        else:
            with sdpa_kernel(_sdpa_backend(backend)):
                out = F.scaled_dot_product_attention(qr.transpose(1, 2), k, v, **kwargs)
        return out.transpose(1, 2)

    calls = [partial(call, *c) for c in copies]
    _with_warnings(calls[0])
    return calls


def _decode_flash_attn(ctx, fn, shape, dtype):
    capacity, copies = _decode_inputs(ctx, shape, dtype)
    cos, sin = (t.to(dtype) for t in rope_tables(capacity, shape.d, ctx.device))
    seqlens = torch.full((shape.b,), shape.s, device=ctx.device, dtype=torch.int32)

    def call(q, kn, vn, kc, vc):
        out = fn(q, kc, vc, k=kn, v=vn, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens, causal=True,
                 rotary_interleaved=False)
        return out[0] if isinstance(out, tuple) else out

    return [partial(call, *c) for c in copies]


def _decode_copy(ctx, shape, dtype):
    """dst.copy_(src) moving _decode_bytes in all: half of it read, half written."""
    numel = _decode_bytes(shape, dtype) // (2 * dtype.itemsize)
    pairs = ctx.rotating(lambda: (torch.empty(numel, device=ctx.device, dtype=dtype),
                                  torch.randn(numel, device=ctx.device, dtype=dtype)), 2 * numel * dtype.itemsize)
    return [partial(torch.Tensor.copy_, dst, src) for dst, src in pairs]


def _decode_items(ctx: SuiteContext) -> list[Item]:
    _, _, decode, dtype = _cases(ctx)
    llama_kernels, ours, items = _ours(ctx, {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton")}, "rope_decode_attention")
    flash_kvcache = []
    if not ctx.is_cuda:
        items.append(Unavailable("flash-attn-kvcache", "FlashAttention runs on CUDA only"))
    else:
        try:
            from flash_attn import flash_attn_with_kvcache
        except Exception as exc:
            items.append(Unavailable("flash-attn-kvcache", f"flash_attn not importable: {exc}"))
        else:
            flash_kvcache.append(("flash-attn-kvcache", flash_attn_with_kvcache))
        if not ctx.quick:
            try:
                from flash_attn_interface import flash_attn_with_kvcache as fa3_kvcache
            except Exception as exc:
                items.append(Unavailable("flash-attn3-kvcache", f"flash_attn_interface not importable: {exc}"))
            else:
                flash_kvcache.append(("flash-attn3-kvcache", fa3_kvcache))

    # Graph replays give the kernel time; on a GPU in full mode the eager per-call time is kept too.
    modes = [("decode", True)] + ([("decode-eager", False)] if ctx.is_cuda and not ctx.quick else [])
    seen = set()
    for shape in decode:
        nbytes = _decode_bytes(shape, dtype)
        flops = 4 * shape.b * shape.h * (shape.s + 1) * shape.d
        entries = [(f"llama_kernels-{b}", partial(_decode_ours, ctx, llama_kernels, b, shape, dtype)) for b in ours]
        repeat, refused = _sdpa_choice(ctx, "flash", dtype, shape, backward=False, decode=True)
        if refused is not None:
            where = f"decode {dtype_name(dtype)} D{shape.d}" + (f" H{shape.h}/Hkv{shape.hkv}" if shape.gqa else "")
            fallback = "sdpa-flash+repeat-kv" if repeat else "sdpa-auto (default dispatch)"
            u = Unavailable("eager-rope+sdpa-flash", f"{where}: refused; measured as eager-rope+{fallback}: {refused}")
            if (u.impl, u.reason) not in seen:
                seen.add((u.impl, u.reason))
                items.append(u)
        if repeat is None:
            name, backend, repeat = "eager-rope+sdpa-auto", None, False
        else:
            name, backend = "eager-rope+sdpa-flash" + ("+repeat-kv" if repeat else ""), "flash"
        entries.append((name, partial(_decode_eager, ctx, backend, repeat, shape, dtype)))
        entries += [(n, partial(_decode_flash_attn, ctx, fn, shape, dtype)) for n, fn in flash_kvcache]
        for pass_, graph in modes:
            for name, setup in entries:
                items.append(Bench(name, shape.decode_case, dtype_name(dtype), pass_, setup, bytes=nbytes,
                                   flops=flops, cuda_graph=graph and ctx.is_cuda))
            items.append(Bench("copy", shape.decode_case, dtype_name(dtype), pass_,
                               partial(_decode_copy, ctx, shape, dtype), bytes=nbytes,
                               cuda_graph=graph and ctx.is_cuda))
    return items


def headline(ctx: SuiteContext, bench: Bench) -> bool:
    """Default run: the first MHA and the GQA training shape in the first dtype (forward; MHA also
    forward+backward), decode at batch 1 and 8 (4 on the CPU) with long contexts, graph replays."""
    c = bench.case
    if ctx.is_cuda:
        train = {(4, 16, 16, 2048, 128): ("fwd", "fwd+bwd"), (4, 32, 8, 2048, 128): ("fwd",)}
        decode = {(1, 16, 16, 8192, 128), (1, 16, 16, 32768, 128), (8, 16, 16, 8192, 128)}
        dtype = "bf16"
    else:
        train = {(1, 8, 8, 512, 64): ("fwd", "fwd+bwd"), (1, 8, 2, 512, 64): ("fwd",)}
        decode = {(1, 8, 8, 4096, 64), (4, 8, 2, 4096, 64)}
        dtype = "fp32"
    if bench.dtype != dtype:
        return False
    if bench.pass_ == "decode":
        return (c["B"], c["H"], c["Hkv"], c["L"], c["D"]) in decode
    return bench.pass_ in train.get((c["B"], c["H"], c["Hkv"], c["S"], c["D"]), ())


@suite("attention", headline=headline, references=("copy",))
def attention(ctx: SuiteContext) -> list[Item]:
    return _train_items(ctx) + _decode_items(ctx)
