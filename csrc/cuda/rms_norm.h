// RMSNorm on CUDA: the op's host interface (plain C++, no CUDA headers).
// The params struct is the launcher's input (csrc/cuda/rms_norm.cu); the entry point
// (csrc/cuda/rms_norm_entry.cpp) checks the TensorArg descriptors, fills it and calls the launcher.
#pragma once
#include <cstdint>
#include <string>

#include "cuda/kernels_cuda.h"
#include "tensor_arg.h"

namespace llama_kernels {
namespace cuda {

// x, y: (rows, cols) with row strides; w: (cols,); rstd: (rows,) fp32, or 0 to skip. w_dtype equals
// x_dtype or is float32. h (or 0), s: (rows, cols) like x; with h, the row normalised is s = x + h,
// rounded to x's dtype and written to s.
struct RmsNormFwdParams {
  uintptr_t x, h, w, y, s, rstd;
  int64_t rows, cols, x_stride, h_stride, y_stride, s_stride;
  int x_dtype, w_dtype;
  float eps;
  int device;
};

// dw_partial: (num_partials, cols) fp32 workspace; dw = its column sums, in w_dtype. ds (or 0),
// like dy, is added to dx: a gradient that reached x directly (a fused residual add's).
struct RmsNormBwdParams {
  uintptr_t dy, ds, x, w, rstd, dx, dw, dw_partial;
  int64_t num_partials, rows, cols, dy_stride, ds_stride, x_stride, dx_stride;
  int x_dtype, w_dtype;
  int device;
};

// Entry points. x, y, h, s: (rows, cols) with a contiguous last dim; w: (cols,); rstd: (rows,)
// float32 or absent; h and s absent together, or s given. Backward: dy, ds (or absent), x, dx
// like x; dw (cols,) in w's dtype; dw_partial (num_partials, cols) float32 contiguous.
std::string rms_norm_fwd(const TensorArg& x, const TensorArg& h, const TensorArg& w, const TensorArg& y,
                         const TensorArg& s, const TensorArg& rstd, float eps, uintptr_t stream);
std::string rms_norm_bwd(const TensorArg& dy, const TensorArg& ds, const TensorArg& x, const TensorArg& w,
                         const TensorArg& rstd, const TensorArg& dx, const TensorArg& dw,
                         const TensorArg& dw_partial, uintptr_t stream);

// The largest row length the CUDA RMSNorm takes for a dtype and vector width (1 if unaligned).
int64_t rms_norm_max_cols(int x_dtype, bool aligned);

int launch_rms_norm_fwd(const RmsNormFwdParams& p, uintptr_t stream);
int launch_rms_norm_bwd(const RmsNormBwdParams& p, uintptr_t stream);

}  // namespace cuda
}  // namespace llama_kernels
