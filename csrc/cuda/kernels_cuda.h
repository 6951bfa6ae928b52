// Host entry points of the CUDA kernels. Plain C++: bindings.cpp includes it without CUDA headers.
// Pointers are device addresses, `stream` is a cudaStream_t handle, `device` the CUDA ordinal.
#pragma once
#include <cstdint>
#include <string>

namespace kernels {
namespace cuda {

// x, y: (rows, cols) with row strides in elements; w: (cols,); rstd: (rows,) fp32.
// w_dtype must equal x_dtype or be float32.
void rms_norm_fwd(uintptr_t x, uintptr_t w, uintptr_t y, uintptr_t rstd, int64_t rows,
                  int64_t cols, int64_t x_stride, int64_t y_stride, int x_dtype, int w_dtype,
                  float eps, int device, uintptr_t stream);

// dw_partial: (num_partials, cols) fp32 workspace; dw = its column sums, in w_dtype.
void rms_norm_bwd(uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t rstd, uintptr_t dx,
                  uintptr_t dw, uintptr_t dw_partial, int64_t num_partials, int64_t rows,
                  int64_t cols, int64_t dy_stride, int64_t x_stride, int64_t dx_stride,
                  int x_dtype, int w_dtype, int device, uintptr_t stream);

// The largest row length the CUDA RMSNorm takes for a dtype and vector width (1 if unaligned).
int64_t rms_norm_max_cols(int x_dtype, bool aligned);

// y (m, n) = x (m, k) @ dequant(W)^T for m <= int4_matmul_max_rows(); x, y fp16 or bf16 with row
// strides in elements. packed (n, k/2) uint8, scales/zeros (n, k/group_size) fp16 (zeros may be
// 0), lut 16 fp32 values. int4_codes: lut is q - 8 (the bit-trick path); else the table is used.
// splits > 1 splits K; workspace then holds splits * m * n fp32 partial sums.
void int4_matmul(uintptr_t x, uintptr_t packed, uintptr_t scales, uintptr_t zeros, uintptr_t lut,
                 uintptr_t y, uintptr_t workspace, int64_t workspace_elems, int64_t m, int64_t n,
                 int64_t k, int64_t group_size, int64_t x_stride, int64_t y_stride, int x_dtype,
                 bool int4_codes, int64_t splits, int device, uintptr_t stream);
int64_t int4_matmul_max_rows();

// w (n, k) contiguous in w_dtype (fp16 or bf16) = the dequantized weight.
void int4_dequantize(uintptr_t packed, uintptr_t scales, uintptr_t zeros, uintptr_t lut, uintptr_t w,
                     int64_t n, int64_t k, int64_t group_size, int w_dtype, bool int4_codes, int device,
                     uintptr_t stream);

// Version of the CUDA runtime this module was built with, e.g. "13.0".
std::string runtime_version();

}  // namespace cuda
}  // namespace kernels
