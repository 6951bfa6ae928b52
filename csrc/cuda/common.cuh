// Helpers shared by the CUDA kernels: error checks, dtype conversion, vector packs, reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"

// Launchers never throw (see kernels_cuda.h): they return 0, a cudaError_t, or a kStatus* code.
#define LLAMA_KERNELS_CUDA_RETURN_IF_ERROR(expr)                        \
  do {                                                            \
    const int kernels_status_ = static_cast<int>(expr);           \
    if (kernels_status_ != 0) return kernels_status_;             \
  } while (0)

namespace llama_kernels {
namespace cuda {

// Makes `device` current for this thread's runtime calls. Our runtime is linked statically,
// so torch's current device does not carry over and must be set on every entry.
inline int set_device(int device) { return static_cast<int>(cudaSetDevice(device)); }

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N elements moved as one aligned load or store.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block; every thread gets the result. `shared` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : 0.f;
  return warp_sum(v);
}

// Returns fn(TX{}, TW{}) for x_dtype and w_dtype, where w_dtype is x_dtype or float32 (the
// entry points have checked the codes).
template <typename Fn>
int dispatch_x_w(int x_dtype, int w_dtype, Fn&& fn) {
  const bool w32 = w_dtype == static_cast<int>(DType::F32);
  switch (static_cast<DType>(x_dtype)) {
    case DType::F16: return w32 ? fn(__half{}, float{}) : fn(__half{}, __half{});
    case DType::BF16: return w32 ? fn(__nv_bfloat16{}, float{}) : fn(__nv_bfloat16{}, __nv_bfloat16{});
    default: return fn(float{}, float{});
  }
}

}  // namespace cuda
}  // namespace llama_kernels
