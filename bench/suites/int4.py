"""4-bit weight-only matmul: llama_kernels.int4_matmul (int4 and NF4) against dense and 4-bit peers.

GB/s counts the bytes of the weight format itself (packed codes, scales, zeros) per call. On a
GPU every case is timed from CUDA-graph replays with weights rotating past twice the L2 size,
and again per eager call; on the CPU with a warm loop, weights rotating past the L3.

Peers: `F.linear` with the dense weight (bf16 on a GPU, fp32 on the CPU), tinygemm
(`torch._weight_int4pack_mm`, GPU), bitsandbytes NF4 (GPU, when installed).
"""
from __future__ import annotations

from functools import lru_cache, partial

import torch
import torch.nn.functional as F

from bench.common import Bench, Item, SuiteContext, Unavailable, dtype_name, suite

GPU_SHAPES = [(2048, 2048), (2048, 5504), (5504, 2048), (4096, 4096), (8192, 8192), (4096, 14336)]
GPU_ROWS = (1, 4, 16, 64, 256, 2048)
CPU_SHAPES = [(2048, 5504), (5504, 2048), (512, 32000)]  # (in_features, out_features)
CPU_ROWS = (1, 4, 16, 64, 256)  # past 64 rows the CPU path dequantizes panels for a GEMM
GROUP = 128


def _weights(ctx: SuiteContext, k: int, n: int, nbytes: int, make):
    return ctx.rotating(lambda: make(torch.randn(n, k, device=ctx.device) * 0.02), nbytes)


def _dense_calls(ctx, m, k, n, dtype):
    x = torch.randn(m, k, device=ctx.device, dtype=dtype)
    ws = _weights(ctx, k, n, n * k * dtype.itemsize, lambda w: w.to(dtype))
    return [partial(F.linear, x, w) for w in ws]


@lru_cache(maxsize=2)
def _quantized(ctx: SuiteContext, k: int, n: int, fmt: str) -> list:
    """The rotating 4-bit weights of one shape and format, kept for the next row count (quantizing a
    dozen copies takes seconds on a CPU; the weights do not depend on the rows)."""
    import llama_kernels

    quantize = partial(llama_kernels.quantize_int4, group_size=GROUP) if fmt == "int4" else partial(llama_kernels.quantize_nf4, block_size=64)
    return _weights(ctx, k, n, n * k // 2, quantize)


def _ours_calls(ctx, m, k, n, dtype, fmt, backend):
    import llama_kernels

    x = torch.randn(m, k, device=ctx.device, dtype=dtype)
    qws = _quantized(ctx, k, n, fmt)

    def call(qw):
        with llama_kernels.use_backend(backend), torch.no_grad():
            return llama_kernels.int4_matmul(x, qw)

    return [partial(call, qw) for qw in qws]


def _tinygemm_calls(ctx, m, k, n, dtype):
    """tinygemm's int4 (same (q - 8) * scale + zero convention as ours, group 128)."""
    import llama_kernels
    from llama_kernels.int4_format import unpack_codes

    def convert(w):
        qw = llama_kernels.quantize_int4(w, GROUP)
        q = unpack_codes(qw.packed).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
        sz = torch.stack([qw.scales, qw.zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        return packed, sz

    x = torch.randn(m, k, device=ctx.device, dtype=torch.bfloat16)
    ws = _weights(ctx, k, n, n * k // 2, convert)
    return [partial(torch.ops.aten._weight_int4pack_mm, x, p, GROUP, sz) for p, sz in ws]


def _bnb_calls(ctx, m, k, n, dtype):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    x = torch.randn(m, k, device=ctx.device, dtype=dtype)
    ws = _weights(ctx, k, n, n * k // 2, lambda w: bnbf.quantize_4bit(w.to(dtype), quant_type="nf4"))
    return [partial(bnb.matmul_4bit, x, q.t(), quant_state=state) for q, state in ws]


def _peers(ctx: SuiteContext) -> tuple[list[tuple[str, object]], list[Item]]:
    peers, missing = [], []
    if not ctx.is_cuda:
        return peers, [Unavailable("tinygemm", "CUDA only"), Unavailable("bitsandbytes-nf4", "measured on GPUs only")]
    if hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        peers.append(("tinygemm", _tinygemm_calls))
    else:
        missing.append(Unavailable("tinygemm", f"torch {torch.__version__} has no _weight_int4pack_mm"))
    try:
        import bitsandbytes  # noqa: F401

        peers.append(("bitsandbytes-nf4", _bnb_calls))
    except ImportError as exc:
        missing.append(Unavailable("bitsandbytes-nf4", f"bitsandbytes not importable: {exc}"))
    try:
        import gemlite  # noqa: F401

        missing.append(Unavailable("gemlite", "installed, but no adapter is written yet", status="error"))
    except ImportError as exc:
        missing.append(Unavailable("gemlite", f"gemlite not importable: {exc}"))
    return peers, missing


def headline(ctx: SuiteContext, bench: Bench) -> bool:
    """Default run: decode-sized rows (1, 16) at Sheared-LLaMA-1.3B's up projection and, on a GPU, at
    8192² (HBM-bound) also the 256-row GEMM, timed as graph replays; on the CPU 64 rows (the last
    row count the kernel multiplies codes for) and stories42M's head at one row."""
    case = bench.case
    shape, m = (case["k"], case["n"]), case["m"]
    if ctx.is_cuda:
        return bench.pass_ == "graph" and shape in ((2048, 5504), (8192, 8192)) and m in (1, 16, 256)
    return shape == (2048, 5504) and m in (1, 16, 64) or (shape, m) == ((512, 32000), 1)


@suite("int4", headline=headline)
def int4(ctx: SuiteContext) -> list[Item]:
    import llama_kernels

    ours = [b for b in ("cuda", "triton", "cpu") if b in llama_kernels.available_backends(ctx.device)]
    items: list[Item] = [] if ours else [Unavailable("llama_kernels", "no compiled backend for int4_matmul here", status="error")]
    peers, missing = _peers(ctx)
    items += missing
    dtype = torch.bfloat16 if ctx.is_cuda else torch.float32
    shapes, rows = (GPU_SHAPES, GPU_ROWS) if ctx.is_cuda else (CPU_SHAPES, CPU_ROWS)
    if ctx.quick:  # the sheared-1.3b MLP shapes and the HBM-bound 8192^2 on a GPU
        shapes, rows = ((shapes[1], shapes[2], shapes[4]), (1, 16, 64, 256)) if ctx.is_cuda else (shapes[:1], rows[:2])
    dense = f"torch-F.linear-{dtype_name(dtype)}"
    for k, n in shapes:
        for m in rows:
            case = {"m": m, "k": k, "n": n}
            packed_bytes = n * k // 2 + 2 * 2 * n * k // GROUP
            entries = [(dense, partial(_dense_calls, ctx, m, k, n, dtype), n * k * dtype.itemsize)]
            for backend in ours:
                for fmt in ("int4", "nf4"):
                    entries.append((f"llama_kernels-{backend}-{fmt}", partial(_ours_calls, ctx, m, k, n, dtype, fmt, backend),
                                    packed_bytes))
            entries += [(name, partial(fn, ctx, m, k, n, dtype), packed_bytes) for name, fn in peers]
            for name, setup, nbytes in entries:
                # Graph replays give the kernel time; on a GPU the eager per-call time is kept too.
                for graph in ((True, False) if ctx.is_cuda else (False,)):
                    items.append(Bench(name, case, dtype_name(dtype),
                                       "graph" if graph else "eager", setup, bytes=nbytes,
                                       flops=2 * m * n * k, cuda_graph=graph))
    return items
