// The CUDA kernels' host interface. Plain C++: bindings.cpp and entry.cpp include it without
// CUDA headers. Entry points take tensors as TensorArg descriptors (tensor_arg.h) plus the true
// scalars; `stream` is a cudaStream_t handle, `device` the CUDA ordinal.
//
// Two layers. The launchers (launch_*, in the .cu files) take validated arguments, never throw,
// and return a status: 0, a cudaError_t, or a kStatus* code below. A C++ exception thrown from
// this module segfaulted in one GPU image, so nothing on the GPU path throws. The entry points
// (entry.cpp) check the descriptors (rank, dtype, device, shapes, strides), fill the op's params
// struct, call a launcher and return "" or "ValueError: ..." /
// "RuntimeError: ...", which llama_kernels/dispatch.py turns into the Python exception.
#pragma once
#include <cstdint>
#include <string>

#include "tensor_arg.h"

namespace llama_kernels {
namespace cuda {

constexpr int kStatusRowsTooLong = -1;  // RMSNorm: a row does not fit the register-resident kernel

std::string status_string(int status);

// Each op's launch parameters are declared once, in its *Params struct: the entry point fills it
// from the TensorArg descriptors it has checked, and the launcher takes it. Addresses are device
// addresses, strides are in elements, dtypes are DType codes (common.h).

// ------------------------------------------------------------------ RMSNorm
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

// ------------------------------------------------------------------ int4 / NF4
// y (m, n) = x (m, k) @ dequant(W)^T for m <= int4_matmul_max_rows(); x, y fp16 or bf16 with row
// strides. packed (n, k/2) uint8, scales/zeros (n, k/group_size) fp16 (zeros may be 0), lut 16
// fp32 values, all contiguous. int4_codes: lut is q - 8 (the bit-trick path); else the table is
// used. splits > 1 splits K; workspace then holds splits * m * n fp32 partial sums.
struct Int4MatmulParams {
  uintptr_t x, packed, scales, zeros, lut, y, workspace;
  int64_t m, n, k, group_size, x_stride, y_stride;
  int x_dtype;
  bool int4_codes;
  int64_t splits;
  int device;
};

// w (n, k) contiguous in w_dtype (fp16 or bf16) = the dequantized weight.
struct Int4DequantizeParams {
  uintptr_t packed, scales, zeros, lut, w;
  int64_t n, k, group_size;
  int w_dtype;
  bool int4_codes;
  int device;
};

// Entry points: k is twice packed's columns; zeros may be absent (NF4); workspace may be absent
// when splits is 1.
std::string int4_matmul(const TensorArg& x, const TensorArg& packed, const TensorArg& scales,
                        const TensorArg& zeros, const TensorArg& lut, const TensorArg& y,
                        const TensorArg& workspace, int64_t group_size, bool int4_codes, int64_t splits,
                        uintptr_t stream);
std::string int4_dequantize(const TensorArg& packed, const TensorArg& scales, const TensorArg& zeros,
                            const TensorArg& lut, const TensorArg& w, int64_t group_size, bool int4_codes,
                            uintptr_t stream);
inline int64_t int4_matmul_max_rows() { return 16; }
// Iterations of the small-M kernel over K (4 chunks of 32 codes each); splits divide them.
inline int64_t int4_matmul_iterations(int64_t k) { return (k / 32 + 3) / 4; }

int launch_int4_matmul(const Int4MatmulParams& p, uintptr_t stream);
int launch_int4_dequantize(const Int4DequantizeParams& p, uintptr_t stream);

// ------------------------------------------------------------------ RoPE + decode attention
// One decoding step (csrc/cuda/rope_decode.cu): q (B, 1, H, D), k_new / v_new (B, 1, Hkv, D),
// k_cache / v_cache (B, capacity, Hkv, D) sharing one layout, all of `dtype` (fp16 or bf16) with
// a contiguous last dim (q_stride_b / _h are the strides of dims 0 and 2). seqlens (B,) int32 or
// int64: L_b, the cached positions; cos / sin (table_len, D/2) fp32 with row stride
// table_stride. Rotates q and k_new at position L_b, writes the rotated key and v_new into slot
// L_b of the caches, and writes out (B, 1, H, D) = attention over slots 0..L_b. A length outside
// [0, min(capacity, table_len) - 1] gives NaN and no cache write. head_dim is 32, 64, 128 or 256;
// the caches must be 16-byte aligned with strides a multiple of 8 elements. splits > 1 splits
// the cache per (sequence, kv head) and needs a workspace of rope_decode_workspace_elems() fp32:
// stats (B, H, splits, {max, sum}) then acc (B, H, splits, D).
struct RopeDecodeParams {
  uintptr_t q, k_new, v_new, k_cache, v_cache, seqlens, cos, sin, out, workspace;
  int64_t batch, heads, kv_heads, head_dim, capacity, table_len;
  int64_t q_stride_b, q_stride_h, knew_stride_b, knew_stride_h, vnew_stride_b, vnew_stride_h;
  int64_t cache_stride_b, cache_stride_s, cache_stride_h, out_stride_b, out_stride_h, table_stride;
  int dtype;
  bool seqlens_int64;
  float softmax_scale;
  int64_t splits;
  int device;
};

// Entry point: the shapes above; workspace may be absent when splits is 1.
std::string rope_decode_attention(const TensorArg& q, const TensorArg& k_new, const TensorArg& v_new,
                                  const TensorArg& k_cache, const TensorArg& v_cache, const TensorArg& seqlens,
                                  const TensorArg& cos, const TensorArg& sin, const TensorArg& out,
                                  const TensorArg& workspace, float softmax_scale, int64_t splits,
                                  uintptr_t stream);
// fp32 elements of the workspace for `splits` (0 for one split, which needs none).
inline int64_t rope_decode_workspace_elems(int64_t batch, int64_t heads, int64_t head_dim, int64_t splits) {
  return splits > 1 ? batch * heads * splits * (head_dim + 2) : 0;
}

int launch_rope_decode_attention(const RopeDecodeParams& p, uintptr_t stream);

// Version of the CUDA runtime this module was built with, e.g. "13.0".
std::string runtime_version();

}  // namespace cuda
}  // namespace llama_kernels
