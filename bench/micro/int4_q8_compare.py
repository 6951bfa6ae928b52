"""The CPU int4 kernel with fp32 activations (the old path) against int8 activations (the new
default), interleaved in one run, on the decode-step projections of stories42M (dim 512, FFN
1376, vocab 32000, groups of 32 as bench/suites/decode.py quantizes them).

    python bench/micro/int4_q8_compare.py [--rows 1,4,16] [--threads 1,2] [--isas avx2,avx512vnni]

Each case rotates among copies of its weights totalling 8 MB (the whole model's int4 weights do
not sit in L2 during decode), times both paths in alternating rounds and prints the medians and
old / new. The calls go straight to the C++ entry points (as the ops' CPU glue makes them), so
the Python op layer's overhead, the same for both, is left out of the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import llama_kernels
from llama_kernels import dispatch, quantize_int4

SHAPES = {  # name: the (N, K) of the weights one call multiplies (fused parts share x)
    "wq|wk|wv|wo 512x512": [(512, 512)],
    "qkv fused 3x512x512": [(512, 512)] * 3,
    "w1+w3 fused 2x1376x512": [(1376, 512)] * 2,
    "w2 512x1376": [(512, 1376)],
    "output 32000x512": [(32000, 512)],
}


def _call(fn, x, qws, ys, threads):
    fn(x.data_ptr(), [q.packed.data_ptr() for q in qws], [q.scales.data_ptr() for q in qws],
       [q.zeros.data_ptr() for q in qws], qws[0].lut.data_ptr(), [y.data_ptr() for y in ys],
       [q.shape[0] for q in qws], x.shape[0], x.shape[1], qws[0].group_size, x.stride(0), ys[0].stride(0),
       dispatch.DTYPE_CODES[x.dtype], threads)


def main() -> None:
    ext = llama_kernels.capabilities().ext
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1", help="rows of x (M), comma-separated")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--isas", default=ext.cpu_isas()[-1], help=f"of {ext.cpu_isas()}")
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--rotate-bytes", type=int, default=8 << 20)
    args = p.parse_args()
    torch.manual_seed(0)
    kernels = {"fp32-act": ext.int4_matmul_cpu, "int8-act": ext.int4_matmul_q8_cpu}
    print(f"groups of {args.group}; median per call over interleaved rounds; speedup = fp32-act / int8-act")
    for name, parts in SHAPES.items():
        copies = max(1, args.rotate_bytes // sum(n * k // 2 for n, k in parts))
        qwss = [[quantize_int4(torch.randn(n, k) / k**0.5, args.group) for n, k in parts] for _ in range(copies)]
        k = parts[0][1]
        reps = max(3, int(2e6 / sum(n * k for n, k in parts)))
        for isa in args.isas.split(","):
            for threads in map(int, args.threads.split(",")):
                for m in map(int, args.rows.split(",")):
                    x = torch.randn(m, k)
                    ys = [torch.empty(m, n) for n, _ in parts]
                    times = {label: [] for label in kernels}
                    ext.set_cpu_isa(isa)
                    try:
                        for rnd in range(args.rounds):
                            for label in (list(kernels) if rnd % 2 else list(kernels)[::-1]):
                                t0 = time.perf_counter()
                                for i in range(reps):
                                    _call(kernels[label], x, qwss[i % copies], ys, threads)
                                times[label].append((time.perf_counter() - t0) / reps)
                    finally:
                        ext.set_cpu_isa("")
                    old, new = (statistics.median(times[label][2:]) for label in kernels)
                    print(f"{isa:10s} threads {threads} M {m:2d}  {name:24s} fp32-act {old * 1e6:8.1f} us  "
                          f"int8-act {new * 1e6:8.1f} us  x{old / new:.2f}", flush=True)


if __name__ == "__main__":
    main()
