// 4-bit weight-only matmul on CUDA: a tensor-core kernel for small M (decode and short
// prefills), and a dequantize kernel that feeds cuBLAS for large M.
//
// Weight layout (llama_kernels/int4_format.py): W (N, K) as packed codes, uint8 (N, K/2); each row is
// cut into chunks of 32 codes and byte j of a chunk holds code j in its low nibble and code
// j + 16 in its high nibble. fp16 scales (and zeros) per group of 32/64/128 codes of a row.
// w = lut[q] * scale (+ zero); for int4 lut[q] = q - 8.
//
// Small-M kernel. A warp computes a 16-row tile of y^T = W x^T with mma.m16n8k16 (fp16 or bf16
// inputs, fp32 accumulation): W is the A operand, x^T the B operand, M sits in the n = 8 columns
// (two n-tiles for M <= 16). Thread (g = lane / 4, t = lane % 4) loads, per iteration, one
// 16-byte chunk of row g and one of row g + 8, both at chunk index 4 * it + t: a warp streams
// 16 rows x 128 codes (1 KB) per iteration with 16-byte loads. A sum over k does not depend on
// the order of k, so the 32 codes a thread holds go into the A fragments of 8 k16-steps in the
// order the bit tricks below produce them, and the thread gathers its B fragments (the same 32
// positions of x, which it also owns in the mma layout) in that same order with byte permutes.
//
// Dequantization without per-element conversions: for a 32-bit word w of a chunk (bytes
// 4q..4q+3), (w >> s) & 0x000F000F puts two codes in the low bits of two 16-bit halves; OR-ing
// the exponent of 1024 (fp16) or 128 (bf16) makes them the numbers 1024 + q exactly, and one
// paired subtract and one paired FMA give (q - 8) * scale + zero for two codes. NF4 (any lut)
// looks pairs of values up in a 256-entry table of value pairs in shared memory. The arithmetic
// is in x's dtype: with bf16 the fp16 scale and zero are rounded to bf16 first (as tinygemm
// stores them), an error below 1/32 of a quantization step.
//
// K is split across warps (grid.y) when N alone gives too few warps to keep the memory system
// busy; each split writes fp32 partial sums that a second kernel adds up in a fixed order, so
// results are deterministic.
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/int4_matmul.h"

namespace llama_kernels {
namespace cuda {
namespace {

constexpr int kWarps = 4;          // warps per block, each on its own 16-row tile
constexpr int kChunk = 32;         // codes per 16-byte chunk
constexpr int kChunksPerIter = 4;  // one per thread of a quad

template <typename T> struct Pair;
template <> struct Pair<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // fp16 1024 in each half
  static constexpr float kBias = 1032.f;           // 1024 + 8: (1024 + q) - 1032 = q - 8
};
template <> struct Pair<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // bf16 128 in each half
  static constexpr float kBias = 136.f;            // 128 + 8
};

template <typename T2>
__device__ __forceinline__ T2 as_pair(uint32_t u) {
  T2 r;
  memcpy(&r, &u, sizeof(r));
  return r;
}

template <typename T2>
__device__ __forceinline__ uint32_t as_u32(T2 v) {
  uint32_t r;
  memcpy(&r, &v, sizeof(r));
  return r;
}

template <typename T> __device__ __forceinline__ typename Pair<T>::T2 splat(float v);
template <> __device__ __forceinline__ __half2 splat<__half>(float v) { return __float2half2_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat162 splat<__nv_bfloat16>(float v) {
  return __float2bfloat162_rn(v);
}

// The four value pairs of one 32-bit word of a chunk (bytes 4q..4q+3), as T2 bits:
// out[0] = codes {4q, 4q+2}, out[1] = {4q+1, 4q+3}, out[2] = {4q+16, 4q+18}, out[3] = {4q+17, 4q+19}.
template <typename T, bool LUT>
__device__ __forceinline__ void dequant_word(uint32_t w, typename Pair<T>::T2 scale,
                                             typename Pair<T>::T2 zero, bool has_zero,
                                             const uint32_t* pair_lut, uint32_t (&out)[4]) {
  using T2 = typename Pair<T>::T2;
  if constexpr (!LUT) {
    const T2 bias = splat<T>(Pair<T>::kBias);
    const uint32_t codes[4] = {w & 0x000F000Fu, (w >> 8) & 0x000F000Fu, (w >> 4) & 0x000F000Fu,
                               (w >> 12) & 0x000F000Fu};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const T2 q = __hsub2(as_pair<T2>(codes[i] | Pair<T>::kMagic), bias);  // q - 8, exact
      out[i] = as_u32(__hfma2(q, scale, zero));
    }
  } else {
    const uint32_t idx[4] = {(w & 0xFu) | ((w >> 12) & 0xF0u), ((w >> 8) & 0xFu) | ((w >> 20) & 0xF0u),
                             ((w >> 4) & 0xFu) | ((w >> 16) & 0xF0u), ((w >> 12) & 0xFu) | ((w >> 24) & 0xF0u)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const T2 v = as_pair<T2>(pair_lut[idx[i]]);
      out[i] = as_u32(has_zero ? __hfma2(v, scale, zero) : __hmul2(v, scale));
    }
  }
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Streams the weight: read once, keep it out of L1 (x and the scales are the reused data).
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Fills the 256-entry pair table {lut[i & 15], lut[i >> 4]} (as T2 bits) for LUT formats.
template <typename T>
__device__ __forceinline__ void fill_pair_lut(uint32_t* pair_lut, const float* lut) {
  using T2 = typename Pair<T>::T2;
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    T2 v;
    v.x = from_f32<T>(lut[i & 15]);
    v.y = from_f32<T>(lut[i >> 4]);
    pair_lut[i] = as_u32(v);
  }
  __syncthreads();
}

struct GemvArgs {
  const void* x;
  const uint8_t* packed;
  const __half* scales;
  const __half* zeros;  // null for formats without zeros
  const float* lut;     // 16 values; read by LUT kernels only
  void* y;
  float* partial;  // (splits, m, n) fp32 when splits > 1
  int64_t x_stride, y_stride;
  int m, n, k, group_size;
  int iters, iters_per_split;
};

template <typename T, bool LUT, int NT>
__global__ void __launch_bounds__(kWarps * 32) int4_mma_kernel(const GemvArgs a) {
  using T2 = typename Pair<T>::T2;
  __shared__ uint32_t pair_lut[LUT ? 256 : 1];
  if constexpr (LUT) fill_pair_lut<T>(pair_lut, a.lut);

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile = blockIdx.x * kWarps + warp;
  if (tile * 16 >= a.n) return;  // after the table is filled: no barrier follows
  const int split = blockIdx.y;
  const int it0 = split * a.iters_per_split;
  const int it1 = min(a.iters, it0 + a.iters_per_split);

  const int chunks = a.k / kChunk;
  const int groups = a.k / a.group_size;
  const int row0 = tile * 16 + g, row1 = row0 + 8;
  // Rows past N read row N - 1 (always valid memory); their results are not stored.
  const int64_t r0 = min(row0, a.n - 1), r1 = min(row1, a.n - 1);
  const uint4* w0p = reinterpret_cast<const uint4*>(a.packed + r0 * (a.k / 2));
  const uint4* w1p = reinterpret_cast<const uint4*>(a.packed + r1 * (a.k / 2));
  const T* x = static_cast<const T*>(a.x);
  const bool has_zero = a.zeros != nullptr;

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;

  // U iterations' weights and scales are loaded before any is used: more bytes in flight.
  constexpr int U = NT == 1 ? 4 : 2;
  for (int it = it0; it < it1; it += U) {
    uint4 wv0[U], wv1[U];
    T2 s0[U], s1[U], z0[U], z1[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = (it + u) * kChunksPerIter + t;
      wv0[u] = wv1[u] = make_uint4(0, 0, 0, 0);
      s0[u] = s1[u] = z0[u] = z1[u] = splat<T>(0.f);
      if (it + u < it1 && c < chunks) {
        wv0[u] = load_stream(w0p + c);
        wv1[u] = load_stream(w1p + c);
        const int grp = c * kChunk / a.group_size;
        s0[u] = splat<T>(__half2float(a.scales[r0 * groups + grp]));
        s1[u] = splat<T>(__half2float(a.scales[r1 * groups + grp]));
        if (has_zero) {
          z0[u] = splat<T>(__half2float(a.zeros[r0 * groups + grp]));
          z1[u] = splat<T>(__half2float(a.zeros[r1 * groups + grp]));
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (it + u >= it1) break;  // the same for the whole warp
      const int c = (it + u) * kChunksPerIter + t;
      const bool valid = c < chunks;
      // x: the 32 values of chunk c for columns n = 8j + g, as 16 words {x[2e], x[2e+1]}.
      uint32_t xw[NT][16];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int n = j * 8 + g;
        if (valid && n < a.m) {
          const uint4* xp = reinterpret_cast<const uint4*>(x + n * a.x_stride + c * kChunk);
#pragma unroll
          for (int v = 0; v < 4; ++v) {
            const uint4 q4 = __ldg(xp + v);
            xw[j][4 * v] = q4.x, xw[j][4 * v + 1] = q4.y, xw[j][4 * v + 2] = q4.z, xw[j][4 * v + 3] = q4.w;
          }
        } else {
#pragma unroll
          for (int e = 0; e < 16; ++e) xw[j][e] = 0u;
        }
      }
      const uint32_t w0s[4] = {wv0[u].x, wv0[u].y, wv0[u].z, wv0[u].w};
      const uint32_t w1s[4] = {wv1[u].x, wv1[u].y, wv1[u].z, wv1[u].w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        uint32_t d0[4], d1[4];
        dequant_word<T, LUT>(w0s[q], s0[u], z0[u], has_zero, pair_lut, d0);
        dequant_word<T, LUT>(w1s[q], s1[u], z1[u], has_zero, pair_lut, d1);
        // Low nibbles: codes {4q, 4q+2} at k = 2t, 2t+1 and {4q+1, 4q+3} at k = 2t+8, 2t+9.
        const uint32_t a_lo[4] = {d0[0], d1[0], d0[1], d1[1]};
        const uint32_t a_hi[4] = {d0[2], d1[2], d0[3], d1[3]};  // the same, 16 codes later
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint32_t* X = xw[j];
          mma_16816<T>(acc[j], a_lo, __byte_perm(X[2 * q], X[2 * q + 1], 0x5410),
                       __byte_perm(X[2 * q], X[2 * q + 1], 0x7632));
          mma_16816<T>(acc[j], a_hi, __byte_perm(X[8 + 2 * q], X[9 + 2 * q], 0x5410),
                       __byte_perm(X[8 + 2 * q], X[9 + 2 * q], 0x7632));
        }
      }
    }
  }

  // acc[j]: c0, c1 at (row0, n = 8j + 2t, 2t + 1); c2, c3 at (row1, same n).
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int n = j * 8 + 2 * t + (i & 1);
      const int row = i < 2 ? row0 : row1;
      if (n >= a.m || row >= a.n) continue;
      if (a.partial != nullptr)
        a.partial[(static_cast<int64_t>(split) * a.m + n) * a.n + row] = acc[j][i];
      else
        static_cast<T*>(a.y)[n * a.y_stride + row] = from_f32<T>(acc[j][i]);
    }
  }
}

// y[n, row] = sum over splits of partial[s, n, row], in split order.
template <typename T>
__global__ void sum_splits_kernel(const float* __restrict__ partial, T* __restrict__ y, int splits,
                                  int m, int n, int64_t y_stride) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<int64_t>(m) * n) return;
  const int64_t plane = static_cast<int64_t>(m) * n;
  float s = 0.f;
  for (int p = 0; p < splits; ++p) s += partial[p * plane + i];
  y[(i / n) * y_stride + i % n] = from_f32<T>(s);
}

// w (N, K) in T. One thread per 32-bit word of codes (word q of a chunk: codes 4q..4q+3 and
// 4q+16..4q+19), so loads are coalesced 4-byte words and the two 8-byte stores of a quad of
// threads fill whole 32-byte sectors.
template <typename T, bool LUT>
__global__ void int4_dequantize_kernel(const uint8_t* __restrict__ packed,
                                       const __half* __restrict__ scales,
                                       const __half* __restrict__ zeros, const float* lut,
                                       T* __restrict__ w, int n, int k, int group_size) {
  using T2 = typename Pair<T>::T2;
  __shared__ uint32_t pair_lut[LUT ? 256 : 1];
  if constexpr (LUT) fill_pair_lut<T>(pair_lut, lut);
  const int64_t words_per_row = k / 8;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= static_cast<int64_t>(n) * words_per_row) return;
  const int64_t row = i / words_per_row;
  const int word = static_cast<int>(i % words_per_row);
  const int c = word / 4, q = word % 4;
  const int64_t gi = row * (k / group_size) + c * kChunk / group_size;
  const T2 s = splat<T>(__half2float(scales[gi]));
  const T2 z = splat<T>(zeros != nullptr ? __half2float(zeros[gi]) : 0.f);
  const uint32_t v = __ldcs(reinterpret_cast<const unsigned int*>(packed) + i);
  uint32_t d[4];
  dequant_word<T, LUT>(v, s, z, zeros != nullptr, pair_lut, d);
  T* out = w + row * k + c * kChunk + 4 * q;
  *reinterpret_cast<uint2*>(out) = make_uint2(__byte_perm(d[0], d[1], 0x5410), __byte_perm(d[0], d[1], 0x7632));
  *reinterpret_cast<uint2*>(out + 16) = make_uint2(__byte_perm(d[2], d[3], 0x5410), __byte_perm(d[2], d[3], 0x7632));
}

// Calls fn(T{}) for fp16 or bf16 (the entry points have checked the dtype).
template <typename Fn>
int dispatch_half(int dtype, Fn&& fn) {
  return dtype == static_cast<int>(DType::F16) ? fn(__half{}) : fn(__nv_bfloat16{});
}

template <typename Fn>
void dispatch_bool(bool v, Fn&& fn) {
  if (v)
    fn(std::true_type{});
  else
    fn(std::false_type{});
}

}  // namespace

int launch_int4_matmul(const Int4MatmulParams& p, uintptr_t stream) {
  const uintptr_t x = p.x, packed = p.packed, scales = p.scales, zeros = p.zeros, lut = p.lut, y = p.y;
  const uintptr_t workspace = p.workspace;
  const int64_t m = p.m, n = p.n, k = p.k, group_size = p.group_size, x_stride = p.x_stride, y_stride = p.y_stride;
  const int x_dtype = p.x_dtype, device = p.device;
  const bool int4_codes = p.int4_codes;
  const int64_t splits = p.splits;
  if (m == 0) return 0;
  LLAMA_KERNELS_CUDA_RETURN_IF_ERROR(set_device(device));
  auto cu_stream = reinterpret_cast<cudaStream_t>(stream);
  GemvArgs a{};
  a.x = reinterpret_cast<const void*>(x);
  a.packed = reinterpret_cast<const uint8_t*>(packed);
  a.scales = reinterpret_cast<const __half*>(scales);
  a.zeros = reinterpret_cast<const __half*>(zeros);
  a.lut = reinterpret_cast<const float*>(lut);
  a.y = reinterpret_cast<void*>(y);
  a.partial = splits > 1 ? reinterpret_cast<float*>(workspace) : nullptr;
  a.x_stride = x_stride;
  a.y_stride = y_stride;
  a.m = static_cast<int>(m);
  a.n = static_cast<int>(n);
  a.k = static_cast<int>(k);
  a.group_size = static_cast<int>(group_size);
  a.iters = static_cast<int>(int4_matmul_iterations(k));
  a.iters_per_split = static_cast<int>((a.iters + splits - 1) / splits);
  const int tiles = static_cast<int>((n + 15) / 16);
  const dim3 grid((tiles + kWarps - 1) / kWarps, static_cast<unsigned>(splits));
  return dispatch_half(x_dtype, [&](auto tx) -> int {
    using T = decltype(tx);
    dispatch_bool(!int4_codes, [&](auto lut_c) {
      constexpr bool kLut = decltype(lut_c)::value;
      if (m <= 8)
        int4_mma_kernel<T, kLut, 1><<<grid, kWarps * 32, 0, cu_stream>>>(a);
      else
        int4_mma_kernel<T, kLut, 2><<<grid, kWarps * 32, 0, cu_stream>>>(a);
    });
    LLAMA_KERNELS_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    if (splits > 1) {
      const int64_t total = m * n;
      sum_splits_kernel<T><<<static_cast<unsigned>((total + 255) / 256), 256, 0, cu_stream>>>(
          a.partial, reinterpret_cast<T*>(y), static_cast<int>(splits), a.m, a.n, y_stride);
    }
    return static_cast<int>(cudaGetLastError());
  });
}

int launch_int4_dequantize(const Int4DequantizeParams& p, uintptr_t stream) {
  const uintptr_t packed = p.packed, scales = p.scales, zeros = p.zeros, lut = p.lut, w = p.w;
  const int64_t n = p.n, k = p.k, group_size = p.group_size;
  const int w_dtype = p.w_dtype, device = p.device;
  const bool int4_codes = p.int4_codes;
  LLAMA_KERNELS_CUDA_RETURN_IF_ERROR(set_device(device));
  const int64_t total = n * (k / kChunk) * 4;  // one thread per 32-bit word of codes
  const unsigned blocks = static_cast<unsigned>((total + 255) / 256);
  return dispatch_half(w_dtype, [&](auto tw) -> int {
    using T = decltype(tw);
    dispatch_bool(!int4_codes, [&](auto lut_c) {
      int4_dequantize_kernel<T, decltype(lut_c)::value><<<blocks, 256, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
          reinterpret_cast<const uint8_t*>(packed), reinterpret_cast<const __half*>(scales),
          reinterpret_cast<const __half*>(zeros), reinterpret_cast<const float*>(lut),
          reinterpret_cast<T*>(w), static_cast<int>(n), static_cast<int>(k), static_cast<int>(group_size));
    });
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace cuda
}  // namespace llama_kernels
