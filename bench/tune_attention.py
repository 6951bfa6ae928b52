#!/usr/bin/env python
"""Sweep the fused attention kernels' launch configurations on a GPU (block sizes, warps, stages).

    python bench/tune_attention.py [--out DIR] [--dtype bf16] [--shape B,H,HKV,S,D ...]

For each shape, times the forward with each forward configuration, then the backward with each
dQ configuration (dK/dV at its default) and each dK/dV configuration (dQ at its default), with
`triton.testing.do_bench`. Prints a table and writes one JSON line per measurement to
DIR/attention_configs_<timestamp>.jsonl. The winners belong in FWD_CONFIGS / DQ_CONFIGS /
DKDV_CONFIGS of llama_kernels/triton/rope_attention.py.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import time_cuda_graph  # noqa: E402
from bench.suites.attention import rope_tables  # noqa: E402

# (BLOCK_M, BLOCK_N, num_warps, num_stages); causal needs BLOCK_M % BLOCK_N == 0 (fwd, dQ) and
# BLOCK_N % BLOCK_M == 0 (dK/dV).
FWD = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (256, 64, 16, 2), (256, 64, 16, 3)]
# Decode: (batch, kv heads = heads, cache length) and the splits to try, for each backend.
DECODE = [(1, 16, 8192), (1, 16, 32768), (8, 16, 8192)]
DECODE_SPLITS = [8, 16, 32, 64]
DQ = [(128, 64, 8, 3), (128, 32, 8, 3), (128, 64, 8, 2)]
DKDV = [(64, 128, 8, 3), (32, 128, 8, 3), (64, 128, 8, 2)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--shape", action="append", help="B,H,HKV,S,D (default: 4,16,16,2048,128)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    from llama_kernels.triton import rope_attention as tri

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    shapes = [tuple(map(int, s.split(","))) for s in (args.shape or ["4,16,16,2048,128"])]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"attention_configs_{stamp}.jsonl"
    device = torch.cuda.get_device_name()
    with path.open("w") as f:
        for b, h, hkv, s, d in shapes:
            q = torch.randn(b, s, h, d, device="cuda", dtype=dtype)
            k = torch.randn(b, s, hkv, d, device="cuda", dtype=dtype)
            v = torch.randn_like(k)
            do = torch.randn_like(q)
            cos, sin = rope_tables(s, d, "cuda")
            out = torch.empty_like(q)
            lse = torch.empty((h, b * s), device="cuda", dtype=torch.float32)
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            scale = 1 / math.sqrt(d)
            fwd_flops = 4 * b * h * s * s * d / 2
            bucket = 64 if d <= 64 else 128 if d <= 128 else 256
            defaults = {"fwd": tri.FWD_CONFIGS[bucket], "dq": tri.DQ_CONFIGS[bucket], "dkdv": tri.DKDV_CONFIGS[bucket]}

            cos_lo, sin_lo = cos.to(dtype), sin.to(dtype)

            def fwd(rotate_keys=True, low_tables=False):
                c, t = (cos_lo, sin_lo) if low_tables else (cos, sin)
                tri.forward(q, k, v, c, t, out, lse, None, s, True, scale, 0.0, 0, rotate_keys=rotate_keys)

            def bwd():
                tri.backward(do, q, k, v, out, lse, cos, sin, dq, dk, dv, None, s, True, scale, 0.0, 0)

            # What rotating the keys costs (keys used as stored: wrong results), and what tables in
            # the input dtype instead of fp32 would save (half the table traffic).
            for kind, fn in (("fwd-keys-not-rotated", lambda: fwd(rotate_keys=False)),
                             ("fwd-tables-in-input-dtype", lambda: fwd(low_tables=True))):
                ms = triton.testing.do_bench(fn, warmup=25, rep=100)
                rec = {"kind": kind, "config": defaults["fwd"], "ms": ms, "tflops": fwd_flops / ms / 1e9,
                       "status": "ok", "shape": [b, h, hkv, s, d], "dtype": args.dtype, "device": device,
                       "default": True}
                f.write(json.dumps(rec) + "\n")
                print(f"B{b} H{h} Hkv{hkv} S{s} D{d} {kind} {defaults['fwd']} {ms:.3f} ms "
                      f"{rec['tflops']:.0f} TFLOP/s", flush=True)
            for kind, configs, fn, flops in (("fwd", FWD, fwd, fwd_flops), ("dq", DQ, bwd, 2.5 * fwd_flops),
                                             ("dkdv", DKDV, bwd, 2.5 * fwd_flops)):
                table = {"fwd": tri.FWD_CONFIGS, "dq": tri.DQ_CONFIGS, "dkdv": tri.DKDV_CONFIGS}[kind]
                fwd()  # the backward needs this forward's out and lse
                for cfg in configs:
                    table[bucket] = cfg
                    try:
                        ms = triton.testing.do_bench(fn, warmup=25, rep=100)
                        rec = {"ms": ms, "tflops": flops / ms / 1e9, "status": "ok"}
                    except Exception as exc:  # noqa: BLE001 - a config that does not compile or fit is recorded
                        rec = {"status": "error", "reason": f"{type(exc).__name__}: {str(exc)[:200]}"}
                    rec.update(kind=kind, config=cfg, shape=[b, h, hkv, s, d], dtype=args.dtype, device=device,
                               default=cfg == defaults[kind])
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    figure = f"{rec['ms']:.3f} ms {rec['tflops']:.0f} TFLOP/s" if rec["status"] == "ok" else rec["reason"]
                    print(f"B{b} H{h} Hkv{hkv} S{s} D{d} {kind:5s} {cfg}{' *' if rec['default'] else '  '} {figure}",
                          flush=True)
                table[bucket] = defaults[kind]
        for b, h, length in DECODE:
            _tune_decode(f, b, h, length, dtype, args.dtype, device)
    print(path)
    return 0


def _tune_decode(f, b, h, length, dtype, dtype_name, device, d=128):
    """Split counts for the Triton and CUDA decode kernels; one cache copy per call slot is enough
    past L2 at these lengths (the cache is 2*b*length*h*d*2 bytes)."""
    from llama_kernels import dispatch
    from llama_kernels.cuda import rope_decode as cuda_decode
    from llama_kernels.triton import rope_decode as tri

    capacity = length + 1
    q = torch.randn(b, 1, h, d, device="cuda", dtype=dtype)
    kn, vn = torch.randn(b, 1, h, d, device="cuda", dtype=dtype), torch.randn(b, 1, h, d, device="cuda", dtype=dtype)
    kc = torch.randn(b, capacity, h, d, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    lens = torch.full((b,), length, device="cuda", dtype=torch.int64)
    cos, sin = rope_tables(capacity, d, "cuda")
    out = torch.empty_like(q)
    cache_bytes = 2 * b * length * h * d * kc.element_size()
    copy_src = torch.empty(cache_bytes // 2, dtype=torch.uint8, device="cuda")
    copy_dst = torch.empty_like(copy_src)
    copy_ms = time_cuda_graph([lambda: copy_dst.copy_(copy_src)]).median_ms
    sms = dispatch.sm_count(q.device)
    defaults = {"triton": tri.decode_splits(b, h, capacity, sms),
                "cuda": cuda_decode.splits_for(b, h, capacity, sms, d)}
    for backend in ("triton", "cuda"):
        for splits in sorted(set(DECODE_SPLITS + [defaults[backend]])):
            if backend == "triton":
                fn = lambda: tri.decode(q, kn, vn, kc, vc, lens, cos, sin, out, 1 / math.sqrt(d), splits)  # noqa: E731
            else:
                fn = lambda: cuda_decode.decode(q, kn, vn, kc, vc, lens, cos, sin, out, 1 / math.sqrt(d), splits)  # noqa: E731
            ms = time_cuda_graph([fn]).median_ms  # launch overhead removed
            rec = {"kind": f"decode-{backend}", "splits": splits, "ms": ms, "gbps": cache_bytes / ms / 1e6,
                   "vs_copy": copy_ms / ms, "shape": [b, h, h, length, d], "dtype": dtype_name, "device": device,
                   "default": splits == defaults[backend], "status": "ok"}
            f.write(json.dumps(rec) + "\n")
            print(f"decode {backend:6s} B{b} H{h} L{length} splits {splits:3d}{' *' if rec['default'] else '  '} "
                  f"{ms * 1000:.1f} us {rec['gbps']:.0f} GB/s {rec['vs_copy']:.2f} of copy", flush=True)


if __name__ == "__main__":
    sys.exit(main())
