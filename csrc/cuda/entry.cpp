// The CUDA kernels' validating entry points. They return "" on success, else "ValueError: ..."
// or "RuntimeError: ...", which llama_kernels/dispatch.py raises: no C++ exception crosses this
// module on the GPU path. Throwing from this module segfaulted in one GPU image (gcc 13.3,
// torch 2.11 and triton 3.6 loaded in the process), before any catch, for reasons not found.
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>

#include "common.h"
#include "cuda/kernels_cuda.h"

// Returns "ValueError: <message>" from the enclosing entry point when cond is false.
#define ENTRY_REQUIRE(cond, msg_expr)                         \
  do {                                                        \
    if (!(cond)) {                                            \
      ::llama_kernels::Message entry_msg_;                          \
      entry_msg_ << "ValueError: " << msg_expr;               \
      return entry_msg_.str();                                \
    }                                                         \
  } while (0)

// Returns the enclosing entry point's error string, if any.
#define ENTRY_RETURN_IF_ERROR(expr)            \
  do {                                         \
    std::string entry_err_ = (expr);           \
    if (!entry_err_.empty()) return entry_err_; \
  } while (0)

namespace llama_kernels {
namespace cuda {
namespace {

std::string status_error(int status, const char* op) {
  return status == 0 ? std::string() : "RuntimeError: " + std::string(op) + ": CUDA error: " + status_string(status);
}

std::string check_dtype(int code, const char* name) {
  ENTRY_REQUIRE(code >= 0 && code <= 2,
                name << ": unknown dtype code " << code << " (expected 0=float32, 1=float16, 2=bfloat16)");
  return {};
}

std::string check_x_w(int x_dtype, int w_dtype) {
  ENTRY_RETURN_IF_ERROR(check_dtype(x_dtype, "x"));
  ENTRY_RETURN_IF_ERROR(check_dtype(w_dtype, "weight"));
  const DType xt = static_cast<DType>(x_dtype), wt = static_cast<DType>(w_dtype);
  ENTRY_REQUIRE(wt == xt || wt == DType::F32,
                "weight: dtype " << dtype_name(wt) << " must be float32 or match x (" << dtype_name(xt) << ")");
  return {};
}

std::string check_rows(int status, int64_t cols, int x_dtype) {
  ENTRY_REQUIRE(status != kStatusRowsTooLong,
                "x: rows of " << cols << " elements are longer than the CUDA RMSNorm takes ("
                              << rms_norm_max_cols(x_dtype, true) << " when 16-byte aligned, "
                              << rms_norm_max_cols(x_dtype, false) << " otherwise)");
  return {};
}

std::string check_half(int dtype, const char* name) {
  ENTRY_RETURN_IF_ERROR(check_dtype(dtype, name));
  const DType d = static_cast<DType>(dtype);
  ENTRY_REQUIRE(d == DType::F16 || d == DType::BF16,
                name << ": the CUDA int4 kernels take float16 or bfloat16, got " << dtype_name(d));
  return {};
}

std::string check_layout(int64_t n, int64_t k, int64_t group_size, uintptr_t packed) {
  ENTRY_REQUIRE(n > 0 && n <= 0x7fffffff, "qw: expected 1..2^31-1 output features, got " << n);
  ENTRY_REQUIRE(k > 0 && k % 32 == 0 && k <= 0x7fffffff,
                "qw: in_features must be a positive multiple of 32, got " << k);
  ENTRY_REQUIRE(group_size == 32 || group_size == 64 || group_size == 128,
                "group_size: expected 32, 64 or 128, got " << group_size);
  ENTRY_REQUIRE(k % group_size == 0, "group_size: " << group_size << " does not divide K = " << k);
  ENTRY_REQUIRE(packed % 16 == 0, "qw.packed: must be 16-byte aligned for the CUDA kernel");
  return {};
}

}  // namespace

std::string rms_norm_fwd(uintptr_t x, uintptr_t h, uintptr_t w, uintptr_t y, uintptr_t s,
                  uintptr_t rstd, int64_t rows, int64_t cols, int64_t x_stride, int64_t h_stride,
                  int64_t y_stride, int64_t s_stride, int x_dtype, int w_dtype, float eps,
                  int device, uintptr_t stream) {
  ENTRY_REQUIRE(rows >= 0 && cols > 0, "x: expected a non-empty last dimension, got " << cols);
  ENTRY_REQUIRE(rows <= 0x7fffffff, "x: at most 2^31-1 rows, got " << rows);
  ENTRY_REQUIRE(h == 0 || s != 0, "s: the sum x + h needs an output");
  ENTRY_RETURN_IF_ERROR(check_x_w(x_dtype, w_dtype));
  const int status = launch_rms_norm_fwd(x, h, w, y, s, rstd, rows, cols, x_stride, h_stride,
                                         y_stride, s_stride, x_dtype, w_dtype, eps, device, stream);
  ENTRY_RETURN_IF_ERROR(check_rows(status, cols, x_dtype));
  return status_error(status, "rms_norm_fwd");
}

std::string rms_norm_bwd(uintptr_t dy, uintptr_t ds, uintptr_t x, uintptr_t w, uintptr_t rstd,
                  uintptr_t dx, uintptr_t dw, uintptr_t dw_partial, int64_t num_partials,
                  int64_t rows, int64_t cols, int64_t dy_stride, int64_t ds_stride,
                  int64_t x_stride, int64_t dx_stride, int x_dtype, int w_dtype, int device,
                  uintptr_t stream) {
  ENTRY_REQUIRE(rows >= 0 && cols > 0, "x: expected a non-empty last dimension, got " << cols);
  ENTRY_REQUIRE(num_partials >= 1 && num_partials <= 65535,
                "num_partials: expected 1..65535, got " << num_partials);
  ENTRY_RETURN_IF_ERROR(check_x_w(x_dtype, w_dtype));
  const int status = launch_rms_norm_bwd(dy, ds, x, w, rstd, dx, dw, dw_partial, num_partials,
                                         rows, cols, dy_stride, ds_stride, x_stride, dx_stride,
                                         x_dtype, w_dtype, device, stream);
  ENTRY_RETURN_IF_ERROR(check_rows(status, cols, x_dtype));
  return status_error(status, "rms_norm_bwd");
}

std::string int4_matmul(uintptr_t x, uintptr_t packed, uintptr_t scales, uintptr_t zeros, uintptr_t lut,
                 uintptr_t y, uintptr_t workspace, int64_t workspace_elems, int64_t m, int64_t n,
                 int64_t k, int64_t group_size, int64_t x_stride, int64_t y_stride, int x_dtype,
                 bool int4_codes, int64_t splits, int device, uintptr_t stream) {
  ENTRY_RETURN_IF_ERROR(check_layout(n, k, group_size, packed));
  ENTRY_REQUIRE(m >= 0 && m <= int4_matmul_max_rows(),
                "x: the CUDA int4 kernel takes at most " << int4_matmul_max_rows() << " rows, got " << m);
  ENTRY_REQUIRE(x % 16 == 0 && x_stride % 8 == 0,
                "x: rows must start 16-byte aligned (aligned pointer, row stride a multiple of 8)");
  ENTRY_REQUIRE(y_stride >= n, "y: row stride " << y_stride << " is shorter than a row of " << n);
  const int64_t iters = int4_matmul_iterations(k);
  const int64_t most = iters < 65535 ? iters : 65535;
  ENTRY_REQUIRE(splits >= 1 && splits <= most, "splits: expected 1.." << most << ", got " << splits);
  const int64_t per = (iters + splits - 1) / splits;
  ENTRY_REQUIRE((iters + per - 1) / per == splits,
                "splits: " << splits << " leaves a split empty over " << iters << " iterations");
  ENTRY_REQUIRE(splits == 1 || (workspace != 0 && workspace_elems >= splits * m * n),
                "workspace: needs " << splits * m * n << " fp32 elements for " << splits << " splits");
  ENTRY_RETURN_IF_ERROR(check_half(x_dtype, "x"));
  return status_error(launch_int4_matmul(x, packed, scales, zeros, lut, y, workspace, m, n, k, group_size,
                                         x_stride, y_stride, x_dtype, int4_codes, splits, device, stream),
                      "int4_matmul");
}

std::string int4_dequantize(uintptr_t packed, uintptr_t scales, uintptr_t zeros, uintptr_t lut, uintptr_t w,
                     int64_t n, int64_t k, int64_t group_size, int w_dtype, bool int4_codes, int device,
                     uintptr_t stream) {
  ENTRY_RETURN_IF_ERROR(check_layout(n, k, group_size, packed));
  ENTRY_REQUIRE(w % 16 == 0, "w: must be 16-byte aligned");
  ENTRY_RETURN_IF_ERROR(check_half(w_dtype, "w"));
  return status_error(launch_int4_dequantize(packed, scales, zeros, lut, w, n, k, group_size, w_dtype,
                                             int4_codes, device, stream),
                      "int4_dequantize");
}

std::string rope_decode_attention(uintptr_t q, uintptr_t k_new, uintptr_t v_new, uintptr_t k_cache,
                                  uintptr_t v_cache, uintptr_t seqlens, uintptr_t cos, uintptr_t sin,
                                  uintptr_t out, uintptr_t workspace, int64_t workspace_elems, int64_t batch,
                                  int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t capacity,
                                  int64_t table_len, int64_t q_stride_b, int64_t q_stride_h,
                                  int64_t knew_stride_b, int64_t knew_stride_h, int64_t vnew_stride_b,
                                  int64_t vnew_stride_h, int64_t cache_stride_b, int64_t cache_stride_s,
                                  int64_t cache_stride_h, int64_t out_stride_b, int64_t out_stride_h,
                                  int64_t table_stride, int dtype, bool seqlens_int64, float softmax_scale,
                                  int64_t splits, int device, uintptr_t stream) {
  ENTRY_RETURN_IF_ERROR(check_dtype(dtype, "q"));
  ENTRY_REQUIRE(dtype == static_cast<int>(DType::F16) || dtype == static_cast<int>(DType::BF16),
                "q: the CUDA decode attention takes float16 or bfloat16, got "
                    << dtype_name(static_cast<DType>(dtype)));
  ENTRY_REQUIRE(head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256,
                "head_dim: the CUDA decode attention takes 32, 64, 128 or 256, got " << head_dim);
  ENTRY_REQUIRE(batch >= 0 && batch <= 65535, "batch: expected 0..65535 sequences, got " << batch);
  ENTRY_REQUIRE(heads >= 1 && heads <= 65535, "heads: expected 1..65535 query heads, got " << heads);
  ENTRY_REQUIRE(kv_heads >= 1 && heads % kv_heads == 0,
                "kv_heads: " << kv_heads << " must be positive and divide heads = " << heads);
  const int64_t head_groups = (heads / kv_heads + 15) / 16;  // blocks of up to 16 query heads
  ENTRY_REQUIRE(kv_heads * head_groups <= 65535,
                "kv_heads: " << kv_heads << " kv heads of " << heads / kv_heads << " query heads each are too many");
  ENTRY_REQUIRE(capacity >= 1 && capacity <= 0x7fffffff, "capacity: expected 1..2^31-1 slots, got " << capacity);
  ENTRY_REQUIRE(table_len >= 1, "cos: the tables need at least one position, got " << table_len);
  ENTRY_REQUIRE(table_stride >= head_dim / 2,
                "cos: row stride " << table_stride << " is shorter than head_dim / 2 = " << head_dim / 2);
  ENTRY_REQUIRE(k_cache % 16 == 0, "k_cache: must be 16-byte aligned for the CUDA kernel");
  ENTRY_REQUIRE(v_cache % 16 == 0, "v_cache: must be 16-byte aligned for the CUDA kernel");
  ENTRY_REQUIRE(cache_stride_b >= 0 && cache_stride_s >= 0 && cache_stride_h >= 0 && cache_stride_b % 8 == 0 &&
                    cache_stride_s % 8 == 0 && cache_stride_h % 8 == 0,
                "k_cache: strides must be non-negative multiples of 8 elements, got (" << cache_stride_b << ", "
                    << cache_stride_s << ", " << cache_stride_h << ")");
  ENTRY_REQUIRE(q_stride_b >= 0 && q_stride_h >= 0, "q: strides must be non-negative");
  ENTRY_REQUIRE(knew_stride_b >= 0 && knew_stride_h >= 0, "k_new: strides must be non-negative");
  ENTRY_REQUIRE(vnew_stride_b >= 0 && vnew_stride_h >= 0, "v_new: strides must be non-negative");
  ENTRY_REQUIRE(out_stride_b >= 0 && out_stride_h >= 0, "out: strides must be non-negative");
  ENTRY_REQUIRE(std::isfinite(softmax_scale), "softmax_scale: must be finite, got " << softmax_scale);
  ENTRY_REQUIRE(splits >= 1 && splits <= 65535, "splits: expected 1..65535, got " << splits);
  const int64_t need = rope_decode_workspace_elems(batch, heads, head_dim, splits);
  ENTRY_REQUIRE(need == 0 || (workspace != 0 && workspace % 16 == 0 && workspace_elems >= need),
                "workspace: needs " << need << " float32 elements (16-byte aligned) for " << splits << " splits, got "
                                    << workspace_elems);
  if (batch > 0) {
    const std::pair<const char*, uintptr_t> pointers[] = {{"q", q}, {"k_new", k_new}, {"v_new", v_new},
                                                          {"k_cache", k_cache}, {"v_cache", v_cache},
                                                          {"seqlens", seqlens}, {"cos", cos}, {"sin", sin},
                                                          {"out", out}};
    for (const auto& p : pointers) ENTRY_REQUIRE(p.second != 0, p.first << ": null pointer");
  }
  ENTRY_REQUIRE(device >= 0, "device: expected a CUDA device ordinal, got " << device);
  return status_error(
      launch_rope_decode_attention(q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, out, workspace, batch,
                                   heads, kv_heads, head_dim, capacity, table_len, q_stride_b, q_stride_h,
                                   knew_stride_b, knew_stride_h, vnew_stride_b, vnew_stride_h, cache_stride_b,
                                   cache_stride_s, cache_stride_h, out_stride_b, out_stride_h, table_stride, dtype,
                                   seqlens_int64, softmax_scale, splits, device, stream),
      "rope_decode_attention");
}

}  // namespace cuda
}  // namespace llama_kernels
