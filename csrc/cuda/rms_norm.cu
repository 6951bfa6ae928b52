// RMSNorm forward and backward on CUDA.
//
// One block per row (forward) or per group of rows (backward). Each thread owns up to PPT
// packs of VEC contiguous columns, so a row is read from global memory once and kept in
// registers; VEC is a 16-byte vector when the row length and pointers allow it, else 1.
#include <algorithm>
#include <initializer_list>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/rms_norm.h"

namespace llama_kernels {
namespace cuda {
namespace {

// Rows live in registers: at most 512 threads x 4 packs (16384 bf16/fp16 or 8192 fp32 columns
// with 16-byte vectors). The backward holds three floats per element, so more packs per thread
// would spill or fail to launch; longer rows go to the Triton kernel, which streams them.
constexpr int kMaxThreads = 512;
constexpr int kMaxPacksPerThread = 4;

// With h (non-null), the row normalised is s = x + h, rounded to TX and written to s: the same
// numbers as adding first, with one read of each input and no extra launch.
template <typename TX, typename TW, int VEC, int PPT>
__global__ void __launch_bounds__(kMaxThreads) rms_norm_fwd_kernel(const TX* __restrict__ x, const TX* __restrict__ h,
                                    const TW* __restrict__ w, TX* __restrict__ y,
                                    TX* __restrict__ s, float* __restrict__ rstd, int64_t cols,
                                    int64_t x_stride, int64_t h_stride, int64_t y_stride,
                                    int64_t s_stride, float eps) {
  __shared__ float shared[32];
  const int64_t row = blockIdx.x;
  const int64_t packs = cols / VEC;
  const auto* xr = reinterpret_cast<const Pack<TX, VEC>*>(x + row * x_stride);
  const auto* hr = reinterpret_cast<const Pack<TX, VEC>*>(h + row * h_stride);
  auto* sr = reinterpret_cast<Pack<TX, VEC>*>(s + row * s_stride);
  auto* yr = reinterpret_cast<Pack<TX, VEC>*>(y + row * y_stride);
  const auto* wp = reinterpret_cast<const Pack<TW, VEC>*>(w);

  float xv[PPT][VEC];
  float ss = 0.f;
#pragma unroll
  for (int p = 0; p < PPT; ++p) {
    const int64_t i = p * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (i < packs) {
      Pack<TX, VEC> pk = xr[i];
      if (h != nullptr) {
        const Pack<TX, VEC> hk = hr[i];
#pragma unroll
        for (int v = 0; v < VEC; ++v) pk.v[v] = from_f32<TX>(to_f32(pk.v[v]) + to_f32(hk.v[v]));
        sr[i] = pk;
      }
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        xv[p][v] = to_f32(pk.v[v]);
        ss += xv[p][v] * xv[p][v];
      }
    }
  }
  ss = block_sum(ss, shared);
  const float rs = rsqrtf(ss / static_cast<float>(cols) + eps);
  if (threadIdx.x == 0 && rstd != nullptr) rstd[row] = rs;  // null: inference
#pragma unroll
  for (int p = 0; p < PPT; ++p) {
    const int64_t i = p * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (i < packs) {
      Pack<TW, VEC> wk = wp[i];
      Pack<TX, VEC> out;
#pragma unroll
      for (int v = 0; v < VEC; ++v) out.v[v] = from_f32<TX>(xv[p][v] * rs * to_f32(wk.v[v]));
      yr[i] = out;
    }
  }
}

// Each block walks rows blockIdx.x, blockIdx.x + gridDim.x, ... and keeps its share of
// dw = sum_rows(dy * xhat) in registers, written once to dw_partial[blockIdx.x]. ds (or null) is
// added to dx: the gradient that reached x directly (the residual stream's, for a fused add).
template <typename TX, typename TW, int VEC, int PPT>
__global__ void __launch_bounds__(kMaxThreads) rms_norm_bwd_kernel(const TX* __restrict__ dy, const TX* __restrict__ ds,
                                    const TX* __restrict__ x, const TW* __restrict__ w,
                                    const float* __restrict__ rstd, TX* __restrict__ dx,
                                    float* __restrict__ dw_partial, int64_t rows, int64_t cols,
                                    int64_t dy_stride, int64_t ds_stride, int64_t x_stride,
                                    int64_t dx_stride) {
  __shared__ float shared[32];
  const int64_t packs = cols / VEC;
  const auto* wp = reinterpret_cast<const Pack<TW, VEC>*>(w);
  float acc[PPT][VEC];
#pragma unroll
  for (int p = 0; p < PPT; ++p)
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[p][v] = 0.f;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const auto* dyr = reinterpret_cast<const Pack<TX, VEC>*>(dy + row * dy_stride);
    const auto* xr = reinterpret_cast<const Pack<TX, VEC>*>(x + row * x_stride);
    auto* dxr = reinterpret_cast<Pack<TX, VEC>*>(dx + row * dx_stride);
    const float rs = rstd[row];
    float xh[PPT][VEC], gw[PPT][VEC];
    float dot = 0.f;
#pragma unroll
    for (int p = 0; p < PPT; ++p) {
      const int64_t i = p * static_cast<int64_t>(blockDim.x) + threadIdx.x;
      if (i < packs) {
        Pack<TX, VEC> xk = xr[i], gk = dyr[i];
        Pack<TW, VEC> wk = wp[i];
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          const float g = to_f32(gk.v[v]);
          xh[p][v] = to_f32(xk.v[v]) * rs;
          gw[p][v] = g * to_f32(wk.v[v]);
          dot += gw[p][v] * xh[p][v];
          acc[p][v] += g * xh[p][v];
        }
      }
    }
    const float mean = block_sum(dot, shared) / static_cast<float>(cols);
#pragma unroll
    for (int p = 0; p < PPT; ++p) {
      const int64_t i = p * static_cast<int64_t>(blockDim.x) + threadIdx.x;
      if (i < packs) {
        float extra[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) extra[v] = 0.f;
        if (ds != nullptr) {
          const Pack<TX, VEC> dk = reinterpret_cast<const Pack<TX, VEC>*>(ds + row * ds_stride)[i];
#pragma unroll
          for (int v = 0; v < VEC; ++v) extra[v] = to_f32(dk.v[v]);
        }
        Pack<TX, VEC> out;
#pragma unroll
        for (int v = 0; v < VEC; ++v) out.v[v] = from_f32<TX>(rs * (gw[p][v] - xh[p][v] * mean) + extra[v]);
        dxr[i] = out;
      }
    }
  }
  auto* part = reinterpret_cast<Pack<float, VEC>*>(dw_partial + blockIdx.x * cols);
#pragma unroll
  for (int p = 0; p < PPT; ++p) {
    const int64_t i = p * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (i < packs) {
      Pack<float, VEC> out;
#pragma unroll
      for (int v = 0; v < VEC; ++v) out.v[v] = acc[p][v];
      part[i] = out;
    }
  }
}

// dw[c] = sum_g partial[g, c]; a 32x8 tile of threads per 32 columns, summed through shared memory.
template <typename TW>
__global__ void column_sum_kernel(const float* __restrict__ partial, TW* __restrict__ dw,
                                  int64_t groups, int64_t cols) {
  __shared__ float tile[8][33];
  const int64_t c = blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (c < cols)
    for (int64_t g = threadIdx.y; g < groups; g += 8) s += partial[g * cols + c];
  tile[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
#pragma unroll
    for (int k = 1; k < 8; ++k) s += tile[k][threadIdx.x];
    dw[c] = from_f32<TW>(s);
  }
}

struct LaunchShape {
  int vec;      // elements per pack
  int ppt;      // packs per thread
  int threads;  // block size
};

bool aligned(uintptr_t ptr, int64_t bytes) { return bytes > 0 && ptr % bytes == 0; }

// The fewest packs per thread that keep the block at or below kMaxThreads threads.
LaunchShape launch_shape(int64_t cols, int vec) {
  const int64_t packs = cols / vec;
  for (int ppt = 1; ppt <= kMaxPacksPerThread; ppt *= 2) {
    const int64_t need = (packs + ppt - 1) / ppt;
    if (need <= kMaxThreads) {
      int threads = static_cast<int>(std::max<int64_t>(32, (need + 31) / 32 * 32));
      return {vec, ppt, threads};
    }
  }
  return {vec, 0, 0};
}

// The 16-byte vector width for TX when every row start is aligned for it, else 1.
template <typename TX, typename TW>
int choose_vec(int64_t cols, std::initializer_list<uintptr_t> x_ptrs,
               std::initializer_list<uintptr_t> f32_ptrs, uintptr_t w,
               std::initializer_list<int64_t> strides) {
  constexpr int vec = 16 / sizeof(TX);
  bool ok = cols % vec == 0 && aligned(w, sizeof(TW) * vec);
  for (uintptr_t p : x_ptrs) ok = ok && aligned(p, 16);
  for (uintptr_t p : f32_ptrs) ok = ok && aligned(p, 4 * vec);
  for (int64_t s : strides) ok = ok && s % vec == 0;
  return ok ? vec : 1;
}

// Calls fn(std::integral_constant<int, VEC>, std::integral_constant<int, PPT>).
template <int VEC, typename Fn>
void dispatch_ppt(int ppt, Fn&& fn) {
  switch (ppt) {
    case 1: return fn(std::integral_constant<int, VEC>{}, std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, VEC>{}, std::integral_constant<int, 2>{});
    default: return fn(std::integral_constant<int, VEC>{}, std::integral_constant<int, 4>{});
  }
}

template <typename TX, typename Fn>
void dispatch_shape(const LaunchShape& s, Fn&& fn) {
  constexpr int kVec = 16 / sizeof(TX);
  if (s.vec == kVec)
    dispatch_ppt<kVec>(s.ppt, fn);
  else
    dispatch_ppt<1>(s.ppt, fn);
}

}  // namespace

int64_t rms_norm_max_cols(int x_dtype, bool is_aligned) {
  const int64_t bytes = x_dtype == static_cast<int>(DType::F32) ? 4 : 2;
  return int64_t{kMaxThreads} * kMaxPacksPerThread * (is_aligned ? 16 / bytes : 1);
}

int launch_rms_norm_fwd(const RmsNormFwdParams& p, uintptr_t stream) {
  const uintptr_t x = p.x, h = p.h, w = p.w, y = p.y, s = p.s, rstd = p.rstd;
  const int64_t rows = p.rows, cols = p.cols;
  const int64_t x_stride = p.x_stride, h_stride = p.h_stride, y_stride = p.y_stride, s_stride = p.s_stride;
  const int x_dtype = p.x_dtype, w_dtype = p.w_dtype, device = p.device;
  const float eps = p.eps;
  if (rows == 0) return 0;
  LLAMA_KERNELS_CUDA_RETURN_IF_ERROR(set_device(device));
  return dispatch_x_w(x_dtype, w_dtype, [&](auto tx, auto tw) -> int {
    using TX = decltype(tx);
    using TW = decltype(tw);
    // Without h, x stands in for h and s in the alignment checks (never dereferenced then).
    const int vec = choose_vec<TX, TW>(cols, {x, y, h ? h : x, h ? s : y}, {}, w,
                                       {x_stride, y_stride, h ? h_stride : x_stride, h ? s_stride : y_stride});
    const LaunchShape shape = launch_shape(cols, vec);
    if (shape.ppt == 0) return kStatusRowsTooLong;
    dispatch_shape<TX>(shape, [&](auto vc, auto pc) {
      rms_norm_fwd_kernel<TX, TW, decltype(vc)::value, decltype(pc)::value>
          <<<static_cast<unsigned>(rows), shape.threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
              reinterpret_cast<const TX*>(x), reinterpret_cast<const TX*>(h),
              reinterpret_cast<const TW*>(w), reinterpret_cast<TX*>(y), reinterpret_cast<TX*>(s),
              reinterpret_cast<float*>(rstd), cols, x_stride, h_stride, y_stride, s_stride, eps);
    });
    return static_cast<int>(cudaGetLastError());
  });
}

int launch_rms_norm_bwd(const RmsNormBwdParams& p, uintptr_t stream) {
  const uintptr_t dy = p.dy, ds = p.ds, x = p.x, w = p.w, rstd = p.rstd, dx = p.dx, dw = p.dw;
  const uintptr_t dw_partial = p.dw_partial;
  const int64_t num_partials = p.num_partials, rows = p.rows, cols = p.cols;
  const int64_t dy_stride = p.dy_stride, ds_stride = p.ds_stride, x_stride = p.x_stride, dx_stride = p.dx_stride;
  const int x_dtype = p.x_dtype, w_dtype = p.w_dtype, device = p.device;
  LLAMA_KERNELS_CUDA_RETURN_IF_ERROR(set_device(device));
  auto cu_stream = reinterpret_cast<cudaStream_t>(stream);
  return dispatch_x_w(x_dtype, w_dtype, [&](auto tx, auto tw) -> int {
    using TX = decltype(tx);
    using TW = decltype(tw);
    // Without ds, dy stands in for it in the alignment checks (never dereferenced then).
    const int vec = choose_vec<TX, TW>(cols, {dy, x, dx, ds ? ds : dy}, {dw_partial}, w,
                                       {dy_stride, x_stride, dx_stride, ds ? ds_stride : dy_stride});
    const LaunchShape s = launch_shape(cols, vec);
    if (s.ppt == 0) return kStatusRowsTooLong;
    dispatch_shape<TX>(s, [&](auto vc, auto pc) {
      rms_norm_bwd_kernel<TX, TW, decltype(vc)::value, decltype(pc)::value>
          <<<static_cast<unsigned>(num_partials), s.threads, 0, cu_stream>>>(
              reinterpret_cast<const TX*>(dy), reinterpret_cast<const TX*>(ds),
              reinterpret_cast<const TX*>(x), reinterpret_cast<const TW*>(w),
              reinterpret_cast<const float*>(rstd), reinterpret_cast<TX*>(dx),
              reinterpret_cast<float*>(dw_partial), rows, cols, dy_stride, ds_stride, x_stride,
              dx_stride);
    });
    LLAMA_KERNELS_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    const unsigned col_blocks = static_cast<unsigned>((cols + 31) / 32);
    column_sum_kernel<TW><<<col_blocks, dim3(32, 8), 0, cu_stream>>>(
        reinterpret_cast<const float*>(dw_partial), reinterpret_cast<TW*>(dw), num_partials, cols);
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace cuda
}  // namespace llama_kernels
