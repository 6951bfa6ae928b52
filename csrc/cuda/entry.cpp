// The CUDA kernels' validating entry points: argument checks and exceptions live here, in
// code compiled by the C++ compiler; the nvcc-compiled launchers only return a status.
#include <stdexcept>
#include <string>

#include "common.h"
#include "cuda/kernels_cuda.h"

namespace kernels {
namespace cuda {
namespace {

void raise_on(int status, const char* op) {
  if (status != 0) throw std::runtime_error(std::string(op) + ": CUDA error: " + status_string(status));
}

void check_x_w(int x_dtype, int w_dtype) {
  const DType xt = to_dtype(x_dtype, "x");
  const DType wt = to_dtype(w_dtype, "weight");
  KERNELS_CHECK(wt == xt || wt == DType::F32,
                "weight: dtype " << dtype_name(wt) << " must be float32 or match x (" << dtype_name(xt) << ")");
}

void check_rows(int status, int64_t cols, int x_dtype) {
  KERNELS_CHECK(status != kStatusRowsTooLong,
                "x: rows of " << cols << " elements are longer than the CUDA RMSNorm takes ("
                              << rms_norm_max_cols(x_dtype, true) << " when 16-byte aligned, "
                              << rms_norm_max_cols(x_dtype, false) << " otherwise)");
}

void check_half(int dtype, const char* name) {
  const DType d = to_dtype(dtype, name);
  KERNELS_CHECK(d == DType::F16 || d == DType::BF16,
                name << ": the CUDA int4 kernels take float16 or bfloat16, got " << dtype_name(d));
}

void check_layout(int64_t n, int64_t k, int64_t group_size, uintptr_t packed) {
  KERNELS_CHECK(n > 0 && n <= 0x7fffffff, "qw: expected 1..2^31-1 output features, got " << n);
  KERNELS_CHECK(k > 0 && k % 32 == 0 && k <= 0x7fffffff,
                "qw: in_features must be a positive multiple of 32, got " << k);
  KERNELS_CHECK(group_size == 32 || group_size == 64 || group_size == 128,
                "group_size: expected 32, 64 or 128, got " << group_size);
  KERNELS_CHECK(k % group_size == 0, "group_size: " << group_size << " does not divide K = " << k);
  KERNELS_CHECK(packed % 16 == 0, "qw.packed: must be 16-byte aligned for the CUDA kernel");
}

}  // namespace

void rms_norm_fwd(uintptr_t x, uintptr_t w, uintptr_t y, uintptr_t rstd, int64_t rows,
                  int64_t cols, int64_t x_stride, int64_t y_stride, int x_dtype, int w_dtype,
                  float eps, int device, uintptr_t stream) {
  KERNELS_CHECK(rows >= 0 && cols > 0, "x: expected a non-empty last dimension, got " << cols);
  KERNELS_CHECK(rows <= 0x7fffffff, "x: at most 2^31-1 rows, got " << rows);
  check_x_w(x_dtype, w_dtype);
  const int status = launch_rms_norm_fwd(x, w, y, rstd, rows, cols, x_stride, y_stride, x_dtype,
                                         w_dtype, eps, device, stream);
  check_rows(status, cols, x_dtype);
  raise_on(status, "rms_norm_fwd");
}

void rms_norm_bwd(uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t rstd, uintptr_t dx,
                  uintptr_t dw, uintptr_t dw_partial, int64_t num_partials, int64_t rows,
                  int64_t cols, int64_t dy_stride, int64_t x_stride, int64_t dx_stride,
                  int x_dtype, int w_dtype, int device, uintptr_t stream) {
  KERNELS_CHECK(rows >= 0 && cols > 0, "x: expected a non-empty last dimension, got " << cols);
  KERNELS_CHECK(num_partials >= 1 && num_partials <= 65535,
                "num_partials: expected 1..65535, got " << num_partials);
  check_x_w(x_dtype, w_dtype);
  const int status = launch_rms_norm_bwd(dy, x, w, rstd, dx, dw, dw_partial, num_partials, rows,
                                         cols, dy_stride, x_stride, dx_stride, x_dtype, w_dtype,
                                         device, stream);
  check_rows(status, cols, x_dtype);
  raise_on(status, "rms_norm_bwd");
}

void int4_matmul(uintptr_t x, uintptr_t packed, uintptr_t scales, uintptr_t zeros, uintptr_t lut,
                 uintptr_t y, uintptr_t workspace, int64_t workspace_elems, int64_t m, int64_t n,
                 int64_t k, int64_t group_size, int64_t x_stride, int64_t y_stride, int x_dtype,
                 bool int4_codes, int64_t splits, int device, uintptr_t stream) {
  check_layout(n, k, group_size, packed);
  KERNELS_CHECK(m >= 0 && m <= int4_matmul_max_rows(),
                "x: the CUDA int4 kernel takes at most " << int4_matmul_max_rows() << " rows, got " << m);
  KERNELS_CHECK(x % 16 == 0 && x_stride % 8 == 0,
                "x: rows must start 16-byte aligned (aligned pointer, row stride a multiple of 8)");
  KERNELS_CHECK(y_stride >= n, "y: row stride " << y_stride << " is shorter than a row of " << n);
  const int64_t iters = int4_matmul_iterations(k);
  const int64_t most = iters < 65535 ? iters : 65535;
  KERNELS_CHECK(splits >= 1 && splits <= most, "splits: expected 1.." << most << ", got " << splits);
  const int64_t per = (iters + splits - 1) / splits;
  KERNELS_CHECK((iters + per - 1) / per == splits,
                "splits: " << splits << " leaves a split empty over " << iters << " iterations");
  KERNELS_CHECK(splits == 1 || (workspace != 0 && workspace_elems >= splits * m * n),
                "workspace: needs " << splits * m * n << " fp32 elements for " << splits << " splits");
  check_half(x_dtype, "x");
  raise_on(launch_int4_matmul(x, packed, scales, zeros, lut, y, workspace, m, n, k, group_size, x_stride,
                              y_stride, x_dtype, int4_codes, splits, device, stream),
           "int4_matmul");
}

void int4_dequantize(uintptr_t packed, uintptr_t scales, uintptr_t zeros, uintptr_t lut, uintptr_t w,
                     int64_t n, int64_t k, int64_t group_size, int w_dtype, bool int4_codes, int device,
                     uintptr_t stream) {
  check_layout(n, k, group_size, packed);
  KERNELS_CHECK(w % 16 == 0, "w: must be 16-byte aligned");
  check_half(w_dtype, "w");
  raise_on(launch_int4_dequantize(packed, scales, zeros, lut, w, n, k, group_size, w_dtype, int4_codes,
                                  device, stream),
           "int4_dequantize");
}

}  // namespace cuda
}  // namespace kernels
