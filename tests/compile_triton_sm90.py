"""Compile the Triton kernels (attention, RMSNorm, int4, SwiGLU, cross-entropy, masked matmul) for a Hopper GPU (sm_90a) without one.

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

from llama_kernels.triton import cross_entropy as tri_ce  # noqa: E402
from llama_kernels.triton import int4_matmul as tri_int4  # noqa: E402
from llama_kernels.triton import masked_matmul as tri_mm  # noqa: E402
from llama_kernels.triton import rms_norm as tri_rms  # noqa: E402
from llama_kernels.triton import rope_attention as tri  # noqa: E402
from llama_kernels.triton import rope_decode as tri_decode  # noqa: E402
from llama_kernels.triton import swiglu as tri_swiglu  # noqa: E402

TENSORS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "KN", "VN", "KC", "VC"}
FP32_TENSORS = {"COS", "SIN", "LSE", "DELTA", "PM", "PL", "PACC"}
FLOATS = {"qk_scale", "drop_scale", "sm_scale"}


def compile_for_sm90(kernel, constexprs: dict, warps: int, stages: int, dtype: str, types=None) -> None:
    """`types` names argument types that the attention kernels' naming would get wrong."""
    names = kernel.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif types and name in types:
            signature[name] = types[name].replace("DT", dtype)
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
        for kind, kernel in (("fwd", tri.fwd_kernel), ("dq", tri.bwd_dq_kernel), ("dkdv", tri.bwd_dkdv_kernel)):
            block_m, block_n, warps, stages = tri.config(kind, d)
            c = dict(flags, BLOCK_M=block_m, BLOCK_N=block_n)
            if kind == "fwd":
                c["ROTATE_K"] = True
            yield f"{kind} D{d} flags={on} {dtype}", kernel, c, warps, stages, dtype
    for d, group, splits in ((128, 1, 33), (64, 8, 33), (128, 4, 1)):
        c = dict(HEAD_DIM=d, HALF=d // 2, HPAD=d // 2, DPAD=d, G_PAD=max(16, group), BLOCK_N=tri_decode.DECODE_BLOCK_N,
                 SPLITS=splits)
        yield f"decode D{d} group {group} splits {splits}", tri_decode.decode_kernel, c, 4, 2, "bf16"
    c = dict(HEAD_DIM=128, DPAD=128, SPLITS=33, SPLITS_PAD=64)
    yield "decode combine", tri_decode.decode_combine_kernel, c, 4, 1, "bf16"


RMS_TYPES = {"X": "*DT", "H": "*DT", "Y": "*DT", "S": "*DT", "W": "*fp32", "DY": "*DT", "DS": "*DT", "DX": "*DT",
             "RSTD": "*fp32", "DW_PARTIAL": "*fp32", "eps": "fp32"}
SWIGLU_TYPES = {name: "*DT" for name in ("A", "B", "Y", "DY", "DA", "DB")}
CE_TYPES = {"X": "*fp32", "V": "i32", "T": "*i64", "LOSS": "*fp32", "LSE": "*fp32", "stride": "i64", "ignore_index": "i64",
            "smoothing": "fp32", "z_loss": "fp32", "scale": "fp32"}
MM_TYPES = {"K": "i32", "X": "*DT", "W": "*DT", "DY": "*DT", "R": "*fp32", "C": "*fp32", "BIAS": "*fp32", "DZ": "*fp32",
            "DW": "*DT", "Y": "*DT"}
INT4_TYPES = {"K": "i32", "X": "*DT", "P": "*u8", "S": "*fp16", "Z": "*fp16", "LUT": "*fp32", "Y": "*DT", "WS": "*fp32"}


def other_variants():
    """RMSNorm (plain and with the residual add, one block and chunked), the int4 kernels, SwiGLU,
    the cross-entropy rows and the masked matmul."""
    for dtype in ("bf16", "fp16"):
        for name, kernel in (("fwd", tri_swiglu.fwd_kernel), ("bwd", tri_swiglu.bwd_kernel)):
            yield (f"swiglu {name} {dtype}", kernel, dict(BLOCK=tri_swiglu.BLOCK), 4, 1, dtype, SWIGLU_TYPES)
    for grad, lse in ((True, False), (False, True)):
        yield (f"cross_entropy rows grad={grad} lse={lse}", tri_ce.rows_kernel,
               dict(WRITE_GRAD=grad, HAS_LSE=lse, BLOCK=tri_ce.BLOCK), 8, 1, "fp32", CE_TYPES)
    for dtype in ("bf16", "fp16"):
        for one_block, block in ((True, 2048), (False, 4096)):
            for has_h in (False, True):
                c = dict(BLOCK=block, ONE_BLOCK=one_block, HAS_H=has_h, HAS_RSTD=not has_h)
                yield (f"rms_norm fwd one_block={one_block} add={has_h} {dtype}", tri_rms.fwd_kernel, c,
                       tri_rms.num_warps_for(block), 3, dtype, RMS_TYPES)
            for has_ds in (False, True):
                yield (f"rms_norm bwd one_block={one_block} add={has_ds} {dtype}", tri_rms.bwd_kernel,
                       dict(BLOCK=block, ONE_BLOCK=one_block, HAS_DS=has_ds), tri_rms.num_warps_for(block), 3, dtype,
                       RMS_TYPES)
    for dtype in ("bf16", "fp16", "fp32"):
        fp32 = dtype == "fp32"
        for bm in (16, 64):
            blocks = dict(BLOCK_M=bm, BLOCK_N=tri_mm.BLOCK_N, BLOCK_K=tri_mm.BLOCK_K, FP32_DOT=fp32)
            for has_row in (True, False):
                yield (f"masked_matmul fwd M-block {bm} row={has_row} {dtype}", tri_mm.fwd_kernel,
                       dict(blocks, HAS_ROW=has_row, HAS_BIAS=has_row), 4, 2, dtype,
                       dict(MM_TYPES, Y="*DT" if has_row else "*fp32"))
            yield f"masked_matmul dz M-block {bm} {dtype}", tri_mm.dz_kernel, blocks, 4, 2, dtype, MM_TYPES
        yield (f"masked_matmul dw {dtype}", tri_mm.dw_kernel, dict(blocks, BLOCK_M=32), 4, 2, dtype, MM_TYPES)
    for group, linear in ((32, True), (128, False)):
        common = dict(GROUP=group, HAS_ZERO=linear, LINEAR_LUT=linear, SPLIT=True, EVEN_K=False)
        c = dict(common, GROUPS_PER_TILE=max(1, 256 // group), BLOCK_M=4, BLOCK_N=16)
        yield f"int4 gemv group {group} lut={not linear}", tri_int4.gemv_kernel, c, 4, 2, "bf16", INT4_TYPES
        for m in (16, 64, 256):
            cfg = tri_int4.gemm_config(m, None, group)
            c = dict(common, GROUPS_PER_TILE=max(1, cfg["block_k"] // group), BLOCK_M=cfg["block_m"],
                     BLOCK_N=cfg["block_n"], DOT_K=min(cfg["dot_k"], group // 2), GROUP_M=8, FP32_DOT=False)
            yield (f"int4 gemm M={m} group {group} lut={not linear}", tri_int4.gemm_kernel, c, cfg["num_warps"],
                   cfg["num_stages"], "bf16", INT4_TYPES)


def main() -> int:
    failed = 0
    for name, kernel, constexprs, warps, stages, dtype, *types in (*variants(), *other_variants()):
        try:
            compile_for_sm90(kernel, constexprs, warps, stages, dtype, *types)
            print(f"ok     {name}", flush=True)
        except Exception as exc:  # noqa: BLE001 - report every variant, then fail
            failed += 1
            print(f"FAILED {name}: {type(exc).__name__}: {exc}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
