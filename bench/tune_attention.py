#!/usr/bin/env python
"""Sweep the fused attention kernels' launch configurations on a GPU (block sizes, warps, stages).

    python bench/tune_attention.py [--out DIR] [--dtype bf16] [--shape B,H,HKV,S,D ...]

For each shape, times the forward with each forward configuration, then the backward with each
dQ configuration (dK/dV at its default) and each dK/dV configuration (dQ at its default), with
`triton.testing.do_bench`. Prints a table and writes one JSON line per measurement to
DIR/attention_configs_<timestamp>.jsonl. The winners belong in FWD_CONFIGS / DQ_CONFIGS /
DKDV_CONFIGS of kernels/triton/rope_attention.py.
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

# (BLOCK_M, BLOCK_N, num_warps, num_stages); causal needs BLOCK_M % BLOCK_N == 0 (fwd, dQ) and
# BLOCK_N % BLOCK_M == 0 (dK/dV).
FWD = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3)]
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

    from kernels.triton import rope_attention as tri

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
            inv = 1.0 / 10000 ** (torch.arange(0, d, 2, device="cuda", dtype=torch.float64) / d)
            ang = torch.outer(torch.arange(s, device="cuda", dtype=torch.float64), inv)
            cos, sin = ang.cos().float(), ang.sin().float()
            out = torch.empty_like(q)
            lse = torch.empty((h, b * s), device="cuda", dtype=torch.float32)
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            scale = 1 / math.sqrt(d)
            fwd_flops = 4 * b * h * s * s * d / 2
            bucket = 64 if d <= 64 else 128 if d <= 128 else 256
            defaults = {"fwd": tri.FWD_CONFIGS[bucket], "dq": tri.DQ_CONFIGS[bucket], "dkdv": tri.DKDV_CONFIGS[bucket]}

            def fwd(rotate_keys=True):
                tri.forward(q, k, v, cos, sin, out, lse, None, s, True, scale, 0.0, 0, rotate_keys=rotate_keys)

            def bwd():
                tri.backward(do, q, k, v, out, lse, cos, sin, dq, dk, dv, None, s, True, scale, 0.0, 0)

            # What rotating the keys costs: the default forward with keys used as stored (wrong results).
            ms = triton.testing.do_bench(lambda: fwd(False), warmup=25, rep=100)
            rec = {"kind": "fwd-keys-not-rotated", "config": defaults["fwd"], "ms": ms,
                   "tflops": fwd_flops / ms / 1e9, "status": "ok", "shape": [b, h, hkv, s, d],
                   "dtype": args.dtype, "device": device, "default": True}
            f.write(json.dumps(rec) + "\n")
            print(f"B{b} H{h} Hkv{hkv} S{s} D{d} fwd, keys not rotated {defaults['fwd']} {ms:.3f} ms "
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
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
