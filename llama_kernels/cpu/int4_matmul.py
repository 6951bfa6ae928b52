"""The C++ CPU entry points behind int4_matmul and dequantize (csrc/cpu/int4_matmul.cpp): the
int4/NF4 kernel that multiplies the 4-bit codes directly, the dequantization kernel, and, past the
rows where the kernel pays, panels of dequantized weight rows handed to a BLAS GEMM.

Inputs arrive validated by llama_kernels/ops/int4_matmul.py, which takes the kernel up to
kernel_rows() rows (MAX_CPU_ROWS, or MAX_CPU_ROWS_INT8 with int8 activations) and the panel GEMM
past it.

Activations (`ACTIVATIONS`, or the `activations` argument): the kernel multiplies int4 codes
either with x in fp32 ("fp32", the reference path: w = (q - 8) * s + z in fp32 FMAs) or with x
quantized to int8 once per call ("int8": per block of 32 elements, d = amax / 127, xq =
round(x / d), fp32 d; exact integer dot products of the unsigned codes with xq, AVX-512 VNNI
vpdpbusd where the CPU has it (the avx512vnni build), vpmaddubsw + vpmaddwd on AVX2 and
AVX-512BW; then y += s * d * (sum q xq - 8 sum xq) per block, plus z * (fp32 sum of x) per group).
The weights keep their packed layout; from 8 rows of x on AVX-512, 4 on AVX2 (a prompt, a batch;
the extension's int4_matmul_q8_gemm_rows()) each thread copies 16 weight rows at a time (8 on AVX2)
into an interleaved tile (8 x 8 word transposes), so that each SIMD lane accumulates one weight
row's whole 32-code chunk before the fp32 conversion, and y comes out in whole vectors. "int8" is
the default: 1.3-2x faster on the stories42M decode shapes (bench/micro/int4_q8_compare.py) at a
relative output error near 1e-2, and the held-out Botchan perplexity of int4 models
(examples/quantize_botchan.py's recipe, every row through this kernel) within 0.03% of "fp32". NF4
always takes the fp32 path: its code book is not integers, so an int8 dot product would need the
code book rounded to int8 (a second quantization of every weight) and a table lookup (vpshufb) per
byte. A row of x with inf or NaN is computed with fp32 activations, so it gives what the reference
gives.
LLAMA_KERNELS_INT4_CPU_ACTIVATIONS sets the default at import.
"""
from __future__ import annotations

import os

import torch

from .. import dispatch

# Rows up to which the C++ CPU kernel multiplies the 4-bit codes directly. Past it, the weight is
# dequantized (C++, into a scratch buffer) for a BLAS GEMM, whose efficiency grows with M while
# the kernel's cost per row stays flat; with fp32 activations the two meet near 64 rows on the
# shapes measured. With int8 activations the kernel's integer dot products keep it ahead: from
# 8 or 4 rows (int4_matmul_q8_gemm_rows()) it takes its many-rows path (weight rows interleaved
# per call, one lane per weight row), which took 0.47-0.70x the panel GEMM's time on the
# stories42M projections at 128 to 512 rows with AVX-512 VNNI, and 0.5x at 128 rows to 0.87x at
# 512 with AVX2 (2 threads), so prompts up to 512 tokens stay on the kernel.
MAX_CPU_ROWS = 64
MAX_CPU_ROWS_INT8 = 512
CPU_PANEL_BYTES = 1 << 21  # fp32 weight rows dequantized at a time past MAX_CPU_ROWS: cache-sized
ACTIVATION_CHOICES = ("int8", "fp32")
# How the kernel takes x for int4 weights (see the module docstring); NF4 always takes "fp32".
ACTIVATIONS = os.environ.get("LLAMA_KERNELS_INT4_CPU_ACTIVATIONS") or "int8"


def forward(x2, packed, scales, zeros, lut, group_size, y, activations=None):
    """The kernel for one weight: writes y (M, N) = x2 (M, K) @ dequant(W)^T."""
    forward_parts(x2, ((packed, scales, zeros),), lut, group_size, (y,), activations)


def forward_parts(x2, parts, lut, group_size, ys, activations=None):
    """One kernel call for several weights against the same x2: parts[p] = (packed, scales,
    zeros) writes ys[p] (all with one row stride)."""
    if x2.shape[-1] == 0:  # an empty sum (QuantizedWeight refuses K = 0; raw parts may not)
        for y in ys:
            y.zero_()
        return
    forward_rows(x2, x2.shape[0], x2.stride(0), parts, lut, group_size, [y.data_ptr() for y in ys], ys[0].stride(0),
                 activations)


def int8_activations(parts, activations=None) -> bool:
    """Whether the kernel takes x in int8 for these parts: `activations` (default ACTIVATIONS) is
    "int8" and the weights are int4 (they have zeros; NF4 has none)."""
    activations = activations or ACTIVATIONS
    if activations not in ACTIVATION_CHOICES:
        raise ValueError(f"activations: expected one of {ACTIVATION_CHOICES} (or LLAMA_KERNELS_INT4_CPU_ACTIVATIONS), "
                         f"got {activations!r}")
    return activations == "int8" and all(z is not None for _, _, z in parts)


def kernel_rows(parts, activations=None) -> int:
    """Rows of x up to which the kernel serves these parts (past it: panel_gemm)."""
    return MAX_CPU_ROWS_INT8 if int8_activations(parts, activations) else MAX_CPU_ROWS


def forward_rows(x, rows, x_stride, parts, lut, group_size, outs, y_stride, activations=None):
    """The C++ kernel over `rows` rows of x (row stride x_stride, last dim contiguous): outs[p] is
    the address of part p's first output, y_stride the output row stride. `activations`: "int8"
    or "fp32" (default ACTIVATIONS; NF4 always "fp32")."""
    packed, scales, zeros, n = [], [], [], []
    for p, s, z in parts:
        packed.append(p.data_ptr())
        scales.append(s.data_ptr())
        zeros.append(0 if z is None else z.data_ptr())
        n.append(p.shape[0])
    ext = dispatch.ext()
    kernel = ext.int4_matmul_q8_cpu if int8_activations(parts, activations) else ext.int4_matmul_cpu
    kernel(
        x.data_ptr(), packed, scales, zeros, lut.data_ptr(), outs, n, rows, x.shape[-1], group_size, x_stride,
        y_stride, dispatch.DTYPE_CODES[x.dtype], torch.get_num_threads(),
    )


def panel_gemm(x2, parts, lut, group_size, y):
    """Past MAX_CPU_ROWS: panels of weight rows dequantized by the C++ kernel into one reused,
    cache-sized fp32 buffer, each followed by a BLAS GEMM into its columns of y (rows, sum N).
    The dense weight never exists whole, so there is no weight-sized allocation to fault in."""
    xf = x2.float()
    k = x2.shape[1]
    step = max(16, CPU_PANEL_BYTES // (4 * k) // 16 * 16)
    buffer = torch.empty((step, k), dtype=torch.float32)
    offset = 0
    for packed, scales, zeros in parts:
        n = packed.shape[0]
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            panel = buffer[: r1 - r0]
            dequantize_into(packed[r0:r1], scales[r0:r1], None if zeros is None else zeros[r0:r1], lut,
                            group_size, panel)
            y[:, offset + r0:offset + r1] = xf @ panel.t()
        offset += n


def dequantize(packed, scales, zeros, lut, group_size, dtype) -> torch.Tensor:
    """The dequantized (N, K) weight in `dtype`."""
    w = torch.empty((packed.shape[0], packed.shape[1] * 2), dtype=dtype)
    dequantize_into(packed, scales, zeros, lut, group_size, w)
    return w


def dequantize_into(packed, scales, zeros, lut, group_size, w) -> None:
    """Writes the dequantized rows into w (contiguous, fp32/fp16/bf16)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    packed, scales = packed.contiguous(), scales.contiguous()
    zeros = None if zeros is None else zeros.contiguous()
    dispatch.ext().int4_dequantize_cpu(
        packed.data_ptr(), scales.data_ptr(), 0 if zeros is None else zeros.data_ptr(), lut.contiguous().data_ptr(),
        w.data_ptr(), n, k, group_size, dispatch.DTYPE_CODES[w.dtype], torch.get_num_threads(),
    )
