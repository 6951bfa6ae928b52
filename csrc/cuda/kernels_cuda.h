// The CUDA kernels' host interface. Plain C++: bindings.cpp and entry.cpp include it without
// CUDA headers. Pointers are device addresses, `stream` is a cudaStream_t handle, `device` the
// CUDA ordinal.
//
// Two layers. The launchers (launch_*, in the .cu files) take validated arguments, never throw,
// and return a status: 0, a cudaError_t, or a kStatus* code below. A C++ exception thrown from
// this module segfaulted in one GPU image, so nothing on the GPU path throws. The entry points
// (entry.cpp) check the arguments, call a launcher and return "" or "ValueError: ..." /
// "RuntimeError: ...", which llama_kernels/dispatch.py turns into the Python exception.
#pragma once
#include <cstdint>
#include <string>

namespace llama_kernels {
namespace cuda {

constexpr int kStatusRowsTooLong = -1;  // RMSNorm: a row does not fit the register-resident kernel

std::string status_string(int status);

// ------------------------------------------------------------------ RMSNorm
// x, y: (rows, cols) with row strides in elements; w: (cols,); rstd: (rows,) fp32, or 0 to skip.
// w_dtype must equal x_dtype or be float32. h (or 0), s: (rows, cols) like x; with h, the row
// normalised is s = x + h, rounded to x's dtype and written to s.
std::string rms_norm_fwd(uintptr_t x, uintptr_t h, uintptr_t w, uintptr_t y, uintptr_t s,
                  uintptr_t rstd, int64_t rows, int64_t cols, int64_t x_stride, int64_t h_stride,
                  int64_t y_stride, int64_t s_stride, int x_dtype, int w_dtype, float eps,
                  int device, uintptr_t stream);

// dw_partial: (num_partials, cols) fp32 workspace; dw = its column sums, in w_dtype. ds (or 0),
// like dy, is added to dx: a gradient that reached x directly (a fused residual add's).
std::string rms_norm_bwd(uintptr_t dy, uintptr_t ds, uintptr_t x, uintptr_t w, uintptr_t rstd,
                  uintptr_t dx, uintptr_t dw, uintptr_t dw_partial, int64_t num_partials,
                  int64_t rows, int64_t cols, int64_t dy_stride, int64_t ds_stride,
                  int64_t x_stride, int64_t dx_stride, int x_dtype, int w_dtype, int device,
                  uintptr_t stream);

// The largest row length the CUDA RMSNorm takes for a dtype and vector width (1 if unaligned).
int64_t rms_norm_max_cols(int x_dtype, bool aligned);

int launch_rms_norm_fwd(uintptr_t x, uintptr_t h, uintptr_t w, uintptr_t y, uintptr_t s,
                        uintptr_t rstd, int64_t rows, int64_t cols, int64_t x_stride,
                        int64_t h_stride, int64_t y_stride, int64_t s_stride, int x_dtype,
                        int w_dtype, float eps, int device, uintptr_t stream);
int launch_rms_norm_bwd(uintptr_t dy, uintptr_t ds, uintptr_t x, uintptr_t w, uintptr_t rstd,
                        uintptr_t dx, uintptr_t dw, uintptr_t dw_partial, int64_t num_partials,
                        int64_t rows, int64_t cols, int64_t dy_stride, int64_t ds_stride,
                        int64_t x_stride, int64_t dx_stride, int x_dtype, int w_dtype, int device,
                        uintptr_t stream);

// ------------------------------------------------------------------ int4 / NF4
// y (m, n) = x (m, k) @ dequant(W)^T for m <= int4_matmul_max_rows(); x, y fp16 or bf16 with row
// strides in elements. packed (n, k/2) uint8, scales/zeros (n, k/group_size) fp16 (zeros may be
// 0), lut 16 fp32 values. int4_codes: lut is q - 8 (the bit-trick path); else the table is used.
// splits > 1 splits K; workspace then holds splits * m * n fp32 partial sums.
std::string int4_matmul(uintptr_t x, uintptr_t packed, uintptr_t scales, uintptr_t zeros, uintptr_t lut,
                 uintptr_t y, uintptr_t workspace, int64_t workspace_elems, int64_t m, int64_t n,
                 int64_t k, int64_t group_size, int64_t x_stride, int64_t y_stride, int x_dtype,
                 bool int4_codes, int64_t splits, int device, uintptr_t stream);
inline int64_t int4_matmul_max_rows() { return 16; }
// Iterations of the small-M kernel over K (4 chunks of 32 codes each); splits divide them.
inline int64_t int4_matmul_iterations(int64_t k) { return (k / 32 + 3) / 4; }

// w (n, k) contiguous in w_dtype (fp16 or bf16) = the dequantized weight.
std::string int4_dequantize(uintptr_t packed, uintptr_t scales, uintptr_t zeros, uintptr_t lut, uintptr_t w,
                     int64_t n, int64_t k, int64_t group_size, int w_dtype, bool int4_codes, int device,
                     uintptr_t stream);

int launch_int4_matmul(uintptr_t x, uintptr_t packed, uintptr_t scales, uintptr_t zeros, uintptr_t lut,
                       uintptr_t y, uintptr_t workspace, int64_t m, int64_t n, int64_t k,
                       int64_t group_size, int64_t x_stride, int64_t y_stride, int x_dtype,
                       bool int4_codes, int64_t splits, int device, uintptr_t stream);
int launch_int4_dequantize(uintptr_t packed, uintptr_t scales, uintptr_t zeros, uintptr_t lut,
                           uintptr_t w, int64_t n, int64_t k, int64_t group_size, int w_dtype,
                           bool int4_codes, int device, uintptr_t stream);

// ------------------------------------------------------------------ RoPE + decode attention
// One decoding step (csrc/cuda/rope_decode.cu): q (B, 1, H, D), k_new / v_new (B, 1, Hkv, D),
// k_cache / v_cache (B, capacity, Hkv, D) sharing one layout, all of `dtype` (fp16 or bf16) with
// a contiguous last dim; strides in elements (q_stride_b / _h are the strides of dims 0 and 2).
// seqlens (B,) int32 or int64: L_b, the cached positions; cos / sin (table_len, D/2) fp32 with
// row stride table_stride. Rotates q and k_new at position L_b, writes the rotated key and v_new
// into slot L_b of the caches, and writes out (B, 1, H, D) = attention over slots 0..L_b. A
// length outside [0, min(capacity, table_len) - 1] gives NaN and no cache write. head_dim is 32,
// 64, 128 or 256; the caches must be 16-byte aligned with strides a multiple of 8 elements.
// splits > 1 splits the cache per (sequence, kv head) and needs a workspace of
// rope_decode_workspace_elems() fp32: stats (B, H, splits, {max, sum}) then acc (B, H, splits, D).
std::string rope_decode_attention(uintptr_t q, uintptr_t k_new, uintptr_t v_new, uintptr_t k_cache,
                                  uintptr_t v_cache, uintptr_t seqlens, uintptr_t cos, uintptr_t sin,
                                  uintptr_t out, uintptr_t workspace, int64_t workspace_elems, int64_t batch,
                                  int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t capacity,
                                  int64_t table_len, int64_t q_stride_b, int64_t q_stride_h,
                                  int64_t knew_stride_b, int64_t knew_stride_h, int64_t vnew_stride_b,
                                  int64_t vnew_stride_h, int64_t cache_stride_b, int64_t cache_stride_s,
                                  int64_t cache_stride_h, int64_t out_stride_b, int64_t out_stride_h,
                                  int64_t table_stride, int dtype, bool seqlens_int64, float softmax_scale,
                                  int64_t splits, int device, uintptr_t stream);
// fp32 elements of the workspace for `splits` (0 for one split, which needs none).
inline int64_t rope_decode_workspace_elems(int64_t batch, int64_t heads, int64_t head_dim, int64_t splits) {
  return splits > 1 ? batch * heads * splits * (head_dim + 2) : 0;
}

int launch_rope_decode_attention(uintptr_t q, uintptr_t k_new, uintptr_t v_new, uintptr_t k_cache,
                                 uintptr_t v_cache, uintptr_t seqlens, uintptr_t cos, uintptr_t sin, uintptr_t out,
                                 uintptr_t workspace, int64_t batch, int64_t heads, int64_t kv_heads,
                                 int64_t head_dim, int64_t capacity, int64_t table_len, int64_t q_stride_b,
                                 int64_t q_stride_h, int64_t knew_stride_b, int64_t knew_stride_h,
                                 int64_t vnew_stride_b, int64_t vnew_stride_h, int64_t cache_stride_b,
                                 int64_t cache_stride_s, int64_t cache_stride_h, int64_t out_stride_b,
                                 int64_t out_stride_h, int64_t table_stride, int dtype, bool seqlens_int64,
                                 float softmax_scale, int64_t splits, int device, uintptr_t stream);

// Version of the CUDA runtime this module was built with, e.g. "13.0".
std::string runtime_version();

}  // namespace cuda
}  // namespace llama_kernels
