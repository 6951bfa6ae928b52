// RoPE + decode attention on CUDA: the op's host interface (plain C++, no CUDA headers).
// The params struct is the launcher's input (csrc/cuda/rope_decode.cu); the entry point
// (csrc/cuda/rope_decode_entry.cpp) checks the TensorArg descriptors, fills it and calls the launcher.
#pragma once
#include <cstdint>
#include <string>

#include "cuda/kernels_cuda.h"
#include "tensor_arg.h"

namespace llama_kernels {
namespace cuda {

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

}  // namespace cuda
}  // namespace llama_kernels
