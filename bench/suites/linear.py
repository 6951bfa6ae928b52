"""Decode-sized linear layers on the CPU: llama_kernels.linear against F.linear (MKL/oneDNN).

GB/s counts the weight bytes streamed per call (activations are tiny). Weights rotate among
copies that together exceed twice the last-level cache, as they do in a real decode step.
`copy` (a reference, not a peer) copies half as many bytes from one buffer to another (the same
bytes moved, read + written), also rotated past the cache: the report gives each impl's GB/s as a
fraction of it, beside the run's copy bandwidth (`env.roofline`).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from bench.common import Bench, Item, SuiteContext, Unavailable, dtype_name, suite

# (in_features, out_features): stories42M's projections and head, Sheared-LLaMA-1.3B's MLP.
# (512, 1536) and (512, 2752) are its joined Q/K/V and gate/up projections, as a decode step calls them.
SHAPES = [(512, 512), (512, 1536), (512, 1376), (512, 2752), (1376, 512), (512, 32000), (2048, 5504), (5504, 2048)]


def _setup(ctx: SuiteContext, fn, m: int, k: int, n: int, dtype: torch.dtype):
    x = torch.randn(m, k, dtype=dtype)
    weights = ctx.rotating(lambda: torch.randn(n, k, dtype=dtype), n * k * dtype.itemsize)
    return [torch.no_grad()(partial(fn, x, w)) for w in weights]


def _copy_setup(ctx: SuiteContext, nbytes: int):
    half = max(1, nbytes // 8)  # fp32 elements per buffer: half the bytes read, half written
    pairs = ctx.rotating(lambda: (torch.randn(half), torch.empty(half)), nbytes)
    return [partial(lambda d, s: d.copy_(s), d, s) for s, d in pairs]


def headline(ctx: SuiteContext, bench: Bench) -> bool:
    """Default run: Sheared-LLaMA-1.3B's up projection at 1 and 16 rows, stories42M's head at one row."""
    case = bench.case
    return (case["k"], case["n"]) == (2048, 5504) and case["m"] in (1, 16) or \
        (case["k"], case["n"], case["m"]) == (512, 32000, 1)


@suite("linear", headline=headline, references=("copy",))
def linear(ctx: SuiteContext) -> list[Item]:
    if ctx.is_cuda:
        return [Unavailable("llama_kernels-cpu", "llama_kernels.linear has no GPU kernel; it calls cuBLAS there")]
    import llama_kernels

    if "cpu" not in llama_kernels.available_backends("cpu"):
        return [Unavailable("llama_kernels-cpu", "llama_kernels._C is not built", status="error")]
    shapes = SHAPES[4:6] if ctx.quick else SHAPES
    rows = (1,) if ctx.quick else (1, 4, 16)
    dtypes = (torch.float32,)  # llama_kernels.linear hands 16-bit weights to F.linear
    items: list[Item] = []
    for dtype in dtypes:
        for k, n in shapes:
            for m in rows:
                nbytes = n * k * dtype.itemsize
                for name, fn in (("llama_kernels-cpu", llama_kernels.linear), ("torch-F.linear", F.linear)):
                    items.append(Bench(name, {"m": m, "k": k, "n": n}, dtype_name(dtype), "fwd",
                                       partial(_setup, ctx, fn, m, k, n, dtype), bytes=nbytes,
                                       flops=2 * m * n * k))
                items.append(Bench("copy", {"m": m, "k": k, "n": n}, dtype_name(dtype), "fwd",
                                   partial(_copy_setup, ctx, nbytes), bytes=nbytes))
    return items
