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

// Version of the CUDA runtime this module was built with, e.g. "13.0".
std::string runtime_version();

}  // namespace cuda
}  // namespace kernels
