// y = x @ W^T for 4-bit group-quantized W (int4 or NF4) and a few rows of x (decode-sized M).
//
// W[n, k] = lut[q] * scale[n, k / group] (+ zero[n, k / group]), the codes packed two per byte
// in chunks of 32 (byte j = code j | code j + 16 << 4; see kernels/int4_matmul.py). One 16-byte
// load gives two runs of 16 codes; each run is widened to 32-bit lanes and looked up in the
// 16-entry table with one permute (vpermps on AVX-512), then multiplied into every row of x.
// Per group, the row sums of x carry the zero term: sum_k x*(v*s + z) = s*sum x*v + z*sum x.
// The weights stream once: a tile of 4 rows at a time serves all rows of x.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/kernels_cpu.h"
#include "cpu/simd.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace kernels {
namespace cpu {
namespace KERNELS_ISA {
namespace {

typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef uint8_t vbyte __attribute__((vector_size(kLanes)));

// Rows of W and of x per register block: AVX-512 has 32 vector registers, narrower ISAs 16
// (and need two per 16-lane vector), so they take a smaller block to avoid spills.
#if defined(__AVX512F__)
constexpr int kRowBlock = 4;
constexpr int kMaxM = 4;
#else
constexpr int kRowBlock = 2;
constexpr int kMaxM = 2;
#endif

// The 16 codes of one half-chunk, looked up in the 16-entry table: lut[b & 0xF] or lut[b >> 4].
// AVX-512 widens to 16 lanes and permutes once; AVX2 does two 8-lane halves, looking up each
// 8-entry half of the table (vpermps) and picking by bit 3; other ISAs go through plain lanes.
inline vfloat lookup(vfloat lut, vbyte codes) {
#if defined(__AVX512F__)
  return __builtin_shuffle(lut, __builtin_convertvector(codes, vint));
#elif defined(__AVX2__)
  __m128i bytes;
  std::memcpy(&bytes, &codes, sizeof(bytes));
  __m256 lo_table, hi_table;
  std::memcpy(&lo_table, &lut, sizeof(lo_table));
  std::memcpy(&hi_table, reinterpret_cast<const char*>(&lut) + sizeof(lo_table), sizeof(hi_table));
  vfloat out;
  for (int half = 0; half < 2; ++half) {
    const __m256i idx = _mm256_cvtepu8_epi32(half ? _mm_srli_si128(bytes, 8) : bytes);
    const __m256 a = _mm256_permutevar8x32_ps(lo_table, idx), b = _mm256_permutevar8x32_ps(hi_table, idx);
    const __m256 pick_hi = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // bit 3 -> sign bit
    const __m256 r = _mm256_blendv_ps(a, b, pick_hi);
    std::memcpy(reinterpret_cast<char*>(&out) + half * sizeof(r), &r, sizeof(r));
  }
  return out;
#else
  vfloat out;
  for (int i = 0; i < kLanes; ++i) out[i] = lut[codes[i]];
  return out;
#endif
}

template <typename T>
inline float scalar(const T* p, int64_t i) {
  return to_float(p[i]);
}

// The fp16 scales (or zeros) of RB weight rows as fp32, converted once per row block so the
// group loop broadcasts them from memory.
template <int RB>
inline void to_fp32_rows(const f16_t* src, int64_t groups, std::vector<float>& dst) {
  dst.resize(static_cast<size_t>(RB * groups));
  for (int r = 0; r < RB; ++r)
    for (int64_t g = 0; g < groups; ++g) dst[r * groups + g] = to_float(src[r * groups + g]);
}

// RB weight rows against MB rows of x. xf: MB rows of fp32 x; xsum: per row of x, the sum of
// each group (only used with zeros). Writes out[m][r].
template <int RB, int MB>
inline void block(const float* const* xs, const float* const* xsums, const uint8_t* packed,
                  int64_t packed_stride, const f16_t* scales, const f16_t* zeros, int64_t groups,
                  int64_t k, int group, vfloat lut, float out[MB][RB]) {
  thread_local std::vector<float> scale_f, zero_f;
  to_fp32_rows<RB>(scales, groups, scale_f);
  vfloat total[MB][RB];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) total[m][r] = vfloat{};
  const int chunks_per_group = group / 32;
  for (int64_t g = 0; g < groups; ++g) {
    vfloat acc[MB][RB];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < RB; ++r) acc[m][r] = vfloat{};
    for (int c = 0; c < chunks_per_group; ++c) {
      const int64_t k0 = g * group + c * 32;
      vfloat w_lo[RB], w_hi[RB];
      for (int r = 0; r < RB; ++r) {
        vbyte b;
        std::memcpy(&b, packed + r * packed_stride + k0 / 2, sizeof(b));
        w_lo[r] = lookup(lut, b & 0xF);
        w_hi[r] = lookup(lut, b >> 4);
      }
      for (int m = 0; m < MB; ++m) {
        const vfloat x_lo = loadf(xs[m] + k0), x_hi = loadf(xs[m] + k0 + 16);
        for (int r = 0; r < RB; ++r) {  // two separate FMAs, not mul + fma + add
          acc[m][r] += w_lo[r] * x_lo;
          acc[m][r] += w_hi[r] * x_hi;
        }
      }
    }
    for (int r = 0; r < RB; ++r) {
      const float s = scale_f[r * groups + g];
      for (int m = 0; m < MB; ++m) total[m][r] += acc[m][r] * s;
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) out[m][r] = hsum(total[m][r]);
  if (zeros) {  // sum_g zero[r, g] * (sum of x over group g), once per row
    to_fp32_rows<RB>(zeros, groups, zero_f);
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < RB; ++r) {
        const float* z = zero_f.data() + r * groups;
        float t = 0.f;
#pragma omp simd reduction(+ : t)
        for (int64_t g = 0; g < groups; ++g) t += z[g] * xsums[m][g];
        out[m][r] += t;
      }
  }
  (void)k;
}

template <int MB, typename TX>
void rows_pass(const float* const* xs, const float* const* xsums, TX* const* ys, const uint8_t* packed,
               const f16_t* scales, const f16_t* zeros, int64_t n0, int64_t n1, int64_t k, int group,
               vfloat lut) {
  const int64_t groups = k / group, ps = k / 2;
  int64_t n = n0;
  for (; n + kRowBlock <= n1; n += kRowBlock) {
    float out[MB][kRowBlock];
    block<kRowBlock, MB>(xs, xsums, packed + n * ps, ps, scales + n * groups,
                         zeros ? zeros + n * groups : nullptr, groups, k, group, lut, out);
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < kRowBlock; ++r) ys[m][n + r] = from_float<TX>(out[m][r]);
  }
  for (; n < n1; ++n) {
    float out[MB][1];
    block<1, MB>(xs, xsums, packed + n * ps, ps, scales + n * groups, zeros ? zeros + n * groups : nullptr,
                 groups, k, group, lut, out);
    for (int m = 0; m < MB; ++m) ys[m][n] = from_float<TX>(out[m][0]);
  }
}

template <typename TX>
void impl(const TX* x, const uint8_t* packed, const f16_t* scales, const f16_t* zeros, const float* lut_p,
          TX* y, int64_t m, int64_t n, int64_t k, int group, int64_t x_stride, int64_t y_stride,
          int num_threads) {
  const int64_t groups = k / group;
  std::vector<float> xf(static_cast<size_t>(m) * k), xsum(static_cast<size_t>(m) * groups, 0.f);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < k; ++c) {
      xf[i * k + c] = to_float(x[i * x_stride + c]);
      xsum[i * groups + c / group] += xf[i * k + c];
    }
  const vfloat lut = loadf(lut_p);
  // 4-bit rows are small: a tile of this many weight rows stays in L2 while every row of x passes.
  const int64_t tile = std::max<int64_t>(kRowBlock, (int64_t{1} << 17) / (k / 2) / kRowBlock * kRowBlock);
  parallel_rows(n, kRowBlock, n * k, num_threads, [&](int64_t n0, int64_t n1) {
    for (int64_t t0 = n0; t0 < n1; t0 += tile) {
      const int64_t t1 = std::min(n1, t0 + tile);
      for (int64_t i = 0; i < m; i += kMaxM) {
        const float* xs[kMaxM];
        const float* xsums[kMaxM];
        TX* ys[kMaxM];
        const int mb = static_cast<int>(std::min<int64_t>(kMaxM, m - i));
        for (int j = 0; j < mb; ++j) {
          xs[j] = xf.data() + (i + j) * k;
          xsums[j] = xsum.data() + (i + j) * groups;
          ys[j] = y + (i + j) * y_stride;
        }
        switch (mb) {
          case 1: rows_pass<1>(xs, xsums, ys, packed, scales, zeros, t0, t1, k, group, lut); break;
          case 2: rows_pass<2>(xs, xsums, ys, packed, scales, zeros, t0, t1, k, group, lut); break;
          case 3: rows_pass<3>(xs, xsums, ys, packed, scales, zeros, t0, t1, k, group, lut); break;
          default: rows_pass<4>(xs, xsums, ys, packed, scales, zeros, t0, t1, k, group, lut); break;
        }
      }
    }
  });
}

}  // namespace

void int4_matmul(const void* x, const uint8_t* packed, const void* scales, const void* zeros,
                 const float* lut, void* y, int64_t m, int64_t n, int64_t k, int group,
                 int64_t x_stride, int64_t y_stride, int x_dtype, int num_threads) {
  KERNELS_CHECK(m >= 0 && n > 0 && k > 0, "x, qw: expected positive sizes, got m=" << m << " n=" << n << " k=" << k);
  KERNELS_CHECK(group == 32 || group == 64 || group == 128, "group_size: expected 32, 64 or 128, got " << group);
  KERNELS_CHECK(k % group == 0, "qw: in_features " << k << " is not a multiple of group_size " << group);
  const auto* s = static_cast<const f16_t*>(scales);
  const auto* z = static_cast<const f16_t*>(zeros);
  switch (to_dtype(x_dtype, "x")) {
    case DType::F32:
      return impl(static_cast<const float*>(x), packed, s, z, lut, static_cast<float*>(y), m, n, k, group,
                  x_stride, y_stride, num_threads);
    case DType::F16:
      return impl(static_cast<const f16_t*>(x), packed, s, z, lut, static_cast<f16_t*>(y), m, n, k, group,
                  x_stride, y_stride, num_threads);
    case DType::BF16:
      return impl(static_cast<const bf16_t*>(x), packed, s, z, lut, static_cast<bf16_t*>(y), m, n, k, group,
                  x_stride, y_stride, num_threads);
  }
}

}  // namespace KERNELS_ISA
}  // namespace cpu
}  // namespace kernels
