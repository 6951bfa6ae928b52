// Shared by the CPU kernels: 16-lane vectors (GCC vector extensions, which each per-ISA build
// lowers to SSE, AVX2 or AVX-512) and vectors of the build's own width (nfloat, for accumulating
// loops), their loads and sums, and when to use threads. Everything is inside the ISA namespace
// so that the differently compiled copies never merge at link time.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace llama_kernels {
namespace cpu {
namespace LLAMA_KERNELS_ISA {

constexpr int kLanes = 16;
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));

inline vfloat loadf(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// 16 values as fp32 lanes: fp32 as they are, bf16 widened by a shift, fp16 converted (vcvtph2ps
// where the build has F16C or AVX-512, else the exact software conversion, which vectorises).
template <typename T>
inline vfloat load_lanes(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return loadf(p);
  } else if constexpr (std::is_same_v<T, bf16_t>) {
    typedef uint16_t vu16 __attribute__((vector_size(kLanes * sizeof(uint16_t))));
    typedef uint32_t vu32 __attribute__((vector_size(kLanes * sizeof(uint32_t))));
    vu16 h;
    std::memcpy(&h, p, sizeof(h));
    const vu32 w = __builtin_convertvector(h, vu32) << 16;
    vfloat f;
    std::memcpy(&f, &w, sizeof(f));
    return f;
  } else {
    static_assert(std::is_same_v<T, f16_t>, "load_lanes: fp32, bf16 or fp16");
    vfloat f;
#if defined(__AVX512F__)
    const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    std::memcpy(&f, &v, sizeof(f));
#elif defined(__F16C__)
    const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
    std::memcpy(&f, &lo, sizeof(lo));
    std::memcpy(reinterpret_cast<char*>(&f) + sizeof(lo), &hi, sizeof(hi));
#else
    for (int i = 0; i < kLanes; ++i) f[i] = to_float(p[i]);
#endif
    return f;
  }
}

// Vectors of the build's own width (nfloat: kN = 16 lanes with AVX-512, 8 with AVX2, 4 with
// SSE), for accumulating loops. Without AVX-512, GCC keeps 16-lane vfloat accumulators on the
// stack: with them the linear kernel's 8 rows of x cost 9x one row on a 2-core AVX2 VM, and its
// one row ran at half the memory bandwidth.
#if defined(__AVX512F__)
constexpr int kN = 16;
#elif defined(__AVX2__)
constexpr int kN = 8;
#else
constexpr int kN = 4;
#endif
typedef float nfloat __attribute__((vector_size(kN * sizeof(float))));

// kN values as fp32 lanes (fp32, bf16 widened by a shift, fp16 converted), as load_lanes.
template <typename T>
inline nfloat load_n(const T* p) {
  if constexpr (kN == kLanes) {
    return load_lanes(p);
  } else if constexpr (std::is_same_v<T, float>) {
    nfloat v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  } else if constexpr (std::is_same_v<T, bf16_t>) {
    typedef uint16_t nu16 __attribute__((vector_size(kN * sizeof(uint16_t))));
    typedef uint32_t nu32 __attribute__((vector_size(kN * sizeof(uint32_t))));
    nu16 h;
    std::memcpy(&h, p, sizeof(h));
    const nu32 w = __builtin_convertvector(h, nu32) << 16;
    nfloat f;
    std::memcpy(&f, &w, sizeof(f));
    return f;
  } else {
    static_assert(std::is_same_v<T, f16_t>, "load_n: fp32, bf16 or fp16");
    nfloat f;
#if defined(__F16C__) && !defined(__AVX512F__)
    if constexpr (kN == 8) {
      const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      std::memcpy(&f, &v, sizeof(f));
      return f;
    }
#endif
    for (int i = 0; i < kN; ++i) f[i] = to_float(p[i]);
    return f;
  }
}

// The first n (<= kN) values at p as fp32 lanes, the rest `fill`: a row's last, partial vector.
template <typename T>
inline nfloat load_n_part(const T* p, int64_t n, float fill = 0.f) {
  if (n == kN) return load_n(p);
  float t[kN];
  for (int64_t i = 0; i < kN; ++i) t[i] = i < n ? to_float(p[i]) : fill;
  nfloat v;
  std::memcpy(&v, t, sizeof(v));
  return v;
}

// The first n (<= kN) lanes of v stored at p in T.
template <typename T>
inline void store_n_part(T* p, int64_t n, nfloat v) {
  if constexpr (std::is_same_v<T, float>) {
    if (n == kN) {
      std::memcpy(p, &v, sizeof(v));
      return;
    }
  }
  float t[kN];
  std::memcpy(t, &v, sizeof(t));
  for (int64_t i = 0; i < n; ++i) p[i] = from_float<T>(t[i]);
}

// Sum of an nfloat's lanes as a tree (i + kN/2, then + kN/4, ...), in registers.
inline float hsum_n(nfloat v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(__m512(v));
#elif defined(__AVX2__)
  __m256 s8;
  std::memcpy(&s8, &v, sizeof(s8));
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s4, _mm_movehdup_ps(s4)));
#else
  return (v[0] + v[2]) + (v[1] + v[3]);
#endif
}

// Sum of the lanes as a tree (log2 16 dependent adds, not 15).
inline float hsum(vfloat v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(__m512(v));
#elif defined(__AVX2__)
  // The same tree in registers: lanes i + 8, then hsum_n (the loop below spills to memory and adds
  // 15 scalars, which cost as much as a 512-long dot product's FMAs).
  nfloat lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  return hsum_n(lo + hi);
#else
  float t[kLanes];
  std::memcpy(t, &v, sizeof(t));
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int i = 0; i < width; ++i) t[i] += t[i + width];
  return t[0];
#endif
}

// out[0, n) = in[0, n) as fp32, kN values at a time.
template <typename T>
inline void to_fp32(const T* in, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + kN <= n; i += kN) {
    const nfloat v = load_n(in + i);
    std::memcpy(out + i, &v, sizeof(v));
  }
  for (; i < n; ++i) out[i] = to_float(in[i]);
}

typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));

// Each lane rounded to the nearest integer, ties to even (as nearbyint in the default rounding
// mode), for |v| < 2^22: adding and subtracting 1.5 * 2^23 leaves no fraction bits. Any fp32
// vector type.
template <typename VF>
inline VF round_even(VF v) {
  const float shifter = 12582912.f;
  return (v + shifter) - shifter;
}

// e^x lane by lane with plain arithmetic, so that it vectorises (expf would not, without
// -ffast-math), on any fp32 vector type (vfloat, nfloat): relative error about 2e-7 on [-87, 88],
// inf above, 0 below, NaN kept. x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial
// to degree 6, 2^n as exponent bits (n by round_even); ln2 is split in two so that n * ln2 is
// exact in the first part.
template <typename VF>
inline VF expv(VF x_in) {
  using VI = decltype(x_in < x_in);  // the int32 vector of as many lanes
  VF x = x_in < -87.f ? VF{} - 87.f : x_in;
  x = x > 88.f ? VF{} + 88.f : x;
  x = x == x ? x : VF{};  // NaN lanes: computed as 0, restored below
  const VF n = round_even(x * 1.44269504088896341f);
  const VF r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  VF p = VF{} + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  VF two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  VF e = p * two_n;
  e = x_in > 88.f ? VF{} + __builtin_inff() : e;
  e = x_in < -87.f ? VF{} : e;
  return x_in == x_in ? e : x_in;
}

// Below this many elements a call runs on the calling thread: waking a thread pool costs more
// than the work, and idle OpenMP workers spinning beside torch's own pool slow both down.
constexpr int64_t kMinParallelElements = int64_t{1} << 16;

// Threads for a call touching `elements` values split into `units` independent pieces.
inline int threads_for(int64_t elements, int64_t units, int requested) {
  if (elements < kMinParallelElements) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(requested, units)));
}

// Splits rows [0, n) into contiguous ranges aligned to `align` rows, one per thread (threads as
// threads_for decides for `elements` values), and calls fn(row_begin, row_end) on each.
template <typename Fn>
inline void parallel_rows(int64_t n, int64_t align, int64_t elements, int requested, Fn&& fn) {
  const int64_t blocks = (n + align - 1) / align;
  const int nt = threads_for(elements, blocks, requested);
  (void)nt;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#ifdef _OPENMP
    const int t = omp_get_thread_num(), count = omp_get_num_threads();
#else
    const int t = 0, count = 1;
#endif
    fn(std::min(n, blocks * t / count * align), std::min(n, blocks * (t + 1) / count * align));
  }
}

// Rows of several matrices stacked ([part 0 | part 1 | ...], part p with ns[p] rows of
// `row_elements` values), split as one range like parallel_rows; calls fn(p, begin, end) with
// part-local rows for each piece of a part that a thread owns.
template <typename Fn>
inline void parallel_parts(const std::vector<int64_t>& ns, int64_t align, int64_t row_elements, int requested,
                           Fn&& fn) {
  int64_t total = 0;
  for (int64_t n : ns) total += n;
  parallel_rows(total, align, total * row_elements, requested, [&](int64_t n0, int64_t n1) {
    int64_t offset = 0;
    for (size_t p = 0; p < ns.size(); offset += ns[p], ++p) {
      const int64_t lo = std::max(n0, offset), hi = std::min(n1, offset + ns[p]);
      if (lo < hi) fn(p, lo - offset, hi - offset);
    }
  });
}

}  // namespace LLAMA_KERNELS_ISA
}  // namespace cpu
}  // namespace llama_kernels
