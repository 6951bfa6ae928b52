"""The CUDA entry points behind int4_matmul and dequantize (csrc/cuda/int4_matmul.cu): the
tensor-core small-M kernel (K split over the grid when the output alone cannot fill the GPU) and
the dequantization kernel, which with cuBLAS takes the large-M case.

Inputs arrive validated by llama_kernels/ops/int4_matmul.py; `unsupported` names what these
kernels leave to Triton. The C++ entry points check their arguments again and return them as
ValueError naming the argument.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch
from ..int4_format import device_lut

# The tensor-core kernel up to 16 rows, the Triton GEMM below 128, dequantize + cuBLAS from 128
# (crossovers measured on an H200, bench/results/int4_cuda_*.jsonl).
CUDA_MMA_MAX_ROWS = 16
CUDA_DEQUANT_MIN_ROWS = 128


def cuda_iterations(k: int) -> int:
    """Iterations of the CUDA small-M kernel over K, 128 codes (4 chunks of 32) each."""
    return -(-(k // 32) // 4)


def cuda_splits(n: int, k: int, sm_count: int) -> int:
    """How many parts the CUDA kernel splits K into: enough warps (one per 16 rows and split)
    for about 32 per multiprocessor, each split keeping at least two iterations of 128 codes."""
    tiles = -(-n // 16)
    iters = cuda_iterations(k)
    want = max(1, min(iters // 2, (32 * sm_count) // tiles))
    per = -(-iters // want)
    return -(-iters // per)


def _int4_codes(lut: torch.Tensor) -> bool:
    """Whether `lut` is the int4 table (q - 8), which the CUDA kernels decode with bit tricks."""
    return lut.data_ptr() == device_lut("int4", lut.device).data_ptr()


def dequantize(packed, scales, zeros, lut, group_size, dtype) -> torch.Tensor:
    """The dequantized (N, K) weight in `dtype` (float16 or bfloat16)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    w = torch.empty((n, k), dtype=dtype, device=packed.device)
    arg = dispatch.tensor_arg
    dispatch.cuda_call(
        dispatch.ext().int4_dequantize_cuda,
        packed=arg(packed, "qw.packed"), scales=arg(scales, "qw.scales"), zeros=arg(zeros, "qw.zeros"),
        lut=arg(lut, "qw.lut"), w=arg(w, "w"), group_size=group_size, int4_codes=_int4_codes(lut),
        stream=dispatch.cuda_stream(packed),
    )
    return w


def forward(x2, packed, scales, zeros, lut, group_size, y):
    """The tensor-core kernel up to CUDA_MMA_MAX_ROWS rows, else dequantize + cuBLAS."""
    m, n, k = x2.shape[0], packed.shape[0], packed.shape[1] * 2
    if m > CUDA_MMA_MAX_ROWS:
        torch.matmul(x2, dequantize(packed, scales, zeros, lut, group_size, x2.dtype).t(), out=y)
        return
    device = x2.device
    splits = cuda_splits(n, k, dispatch.sm_count(device))
    workspace = torch.empty(splits * m * n if splits > 1 else 0, dtype=torch.float32, device=device)
    arg = dispatch.tensor_arg
    dispatch.cuda_call(
        dispatch.ext().int4_matmul_cuda,
        x=arg(x2, "x"), packed=arg(packed, "qw.packed"), scales=arg(scales, "qw.scales"), zeros=arg(zeros, "qw.zeros"),
        lut=arg(lut, "qw.lut"), y=arg(y, "y"), workspace=arg(workspace, "workspace"), group_size=group_size,
        int4_codes=_int4_codes(lut), splits=splits, stream=dispatch.cuda_stream(x2),
    )


def unsupported(x2: torch.Tensor, packed: torch.Tensor) -> Optional[str]:
    """Why the CUDA kernels cannot take this call (or are not the fastest for it), or None."""
    if x2.dtype not in (torch.float16, torch.bfloat16):
        return f"{x2.dtype} activations (the CUDA kernels take float16 and bfloat16)"
    if x2.data_ptr() % 16 or x2.stride(0) % 8 or packed.data_ptr() % 16:
        return "x or the packed weight is not 16-byte aligned"
    if CUDA_MMA_MAX_ROWS < x2.shape[0] < CUDA_DEQUANT_MIN_ROWS:
        return (f"{x2.shape[0]} rows (the Triton GEMM is faster from {CUDA_MMA_MAX_ROWS + 1} "
                f"to {CUDA_DEQUANT_MIN_ROWS - 1})")
    return None
