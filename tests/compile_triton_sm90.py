"""Compile the attention kernels for a Hopper GPU (sm_90a) without one.

The Triton interpreter, which runs the CPU tests, accepts code that the GPU compiler rejects
(mismatched return types, for one). This script lowers a set of constexpr variants through
Triton's real pipeline for the target, on any machine, and prints one line per kernel. Run by
tests/test_rope_attention.py in a subprocess, since TRITON_INTERPRET must be unset before the
kernels are imported.

    python tests/compile_triton_sm90.py
"""
from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels.triton import rope_attention as tri  # noqa: E402

TENSORS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "KN", "VN", "KC", "VC"}
FP32_TENSORS = {"COS", "SIN", "LSE", "DELTA", "PM", "PL", "PACC"}
FLOATS = {"qk_scale", "drop_scale", "sm_scale"}


def compile_for_sm90(kernel, constexprs: dict, warps: int, stages: int, dtype: str) -> None:
    names = kernel.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in TENSORS:
            signature[name] = f"*{dtype}"
        elif name in FP32_TENSORS:
            signature[name] = "*fp32"
        elif name in ("CU",):
            signature[name] = "*i32"
        elif name in ("POS", "LENS"):
            signature[name] = "*i64"
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in constexprs.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def variants():
    """(name, kernel, constexprs, warps, stages, dtype): every flag on, every flag off, odd head dims."""
    for d, on, dtype in ((128, True, "bf16"), (64, False, "fp16"), (96, True, "fp16")):
        flags = dict(HEAD_DIM=d, HALF=d // 2, HPAD=tri.half_pad(d), DPAD=triton.next_power_of_2(d), CAUSAL=on,
                     VARLEN=on, DROPOUT=on, HAS_POS=on)
        for kind, kernel in (("fwd", tri._fwd_kernel), ("dq", tri._bwd_dq_kernel), ("dkdv", tri._bwd_dkdv_kernel)):
            block_m, block_n, warps, stages = tri._config(kind, d)
            c = dict(flags, BLOCK_M=block_m, BLOCK_N=block_n)
            if kind == "fwd":
                c["ROTATE_K"] = True
            yield f"{kind} D{d} flags={on} {dtype}", kernel, c, warps, stages, dtype
    for d, group, splits in ((128, 1, 33), (64, 8, 33), (128, 4, 1)):
        c = dict(HEAD_DIM=d, HALF=d // 2, HPAD=d // 2, DPAD=d, G_PAD=max(16, group), BLOCK_N=tri.DECODE_BLOCK_N,
                 SPLITS=splits)
        yield f"decode D{d} group {group} splits {splits}", tri._decode_kernel, c, 4, 2, "bf16"
    c = dict(HEAD_DIM=128, DPAD=128, SPLITS=33, SPLITS_PAD=64)
    yield "decode combine", tri._decode_combine_kernel, c, 4, 1, "bf16"


def main() -> int:
    failed = 0
    for name, kernel, constexprs, warps, stages, dtype in variants():
        try:
            compile_for_sm90(kernel, constexprs, warps, stages, dtype)
            print(f"ok     {name}", flush=True)
        except Exception as exc:  # noqa: BLE001 - report every variant, then fail
            failed += 1
            print(f"FAILED {name}: {type(exc).__name__}: {exc}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
