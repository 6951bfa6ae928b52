// y = x @ W^T for 4-bit group-quantized W (int4 or NF4) and a few rows of x (decode-sized M),
// with x in fp32 (int4_matmul; described here) or, for int4, x rounded to int8 and integer dot
// products (int4_matmul_q8; described at "int8 activations" below).
//
// W[n, k] = lut[q] * scale[n, k / group] (+ zero[n, k / group]), the codes packed two per byte
// in chunks of 32 (byte j = code j | code j + 16 << 4; see llama_kernels/int4_format.py). Per group,
// the row sums of x carry the zero term: sum_k x*(v*s + z) = s*sum x*v + z*sum x. The weights
// stream once: a tile of rows at a time serves all rows of x.
//
// The wide path: AVX-512 reads 128 codes (four chunks, 64 bytes) of a row as sixteen 32-bit
// lanes, AVX2 64 codes (two chunks) as eight. Shifting the whole vector right by 4s leaves, in
// the low nibble of each lane, one code per lane; the 16-entry table lookup reads only those low
// bits (one vpermps on AVX-512; two 8-entry vpermps and a blend on AVX2; other ISAs convert
// int4 codes to float directly and leave NF4 to the chunk path), so there is no widening. x is
// permuted once per call into the same order (lane L of step s holds the x element that code's
// position needs), and each lane carries its own group's scale at the end of the block. The
// codes past the last whole block go chunk by chunk: one 16-byte load, two runs of 16 codes
// widened to 32-bit lanes and looked up.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/kernels_cpu.h"
#include "cpu/simd.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace llama_kernels {
namespace cpu {
namespace LLAMA_KERNELS_ISA {
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
constexpr int64_t kPrefetchBytes = 8192;  // how far ahead the int8-activation kernel prefetches codes

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

// The wide path (see the top of the file): AVX-512 reads 128 codes as 16 lanes, AVX2 64 codes as
// 8 lanes. Other ISAs (SSE2, NEON through the compiler's generic vectors) read 32 codes (one
// chunk) as 4 lanes, one 128-bit register, so the accumulators stay in registers; they take the
// wide path only for the int4 table, whose entries are q - 8: a code converts to float with no
// table (see WideTable).
#if defined(__AVX512F__)
constexpr int kW = 16;  // lanes of the wide vector types
#elif defined(__AVX2__)
constexpr int kW = 8;
#else
constexpr int kW = 4;
#endif
static_assert(kW == kN, "the wide lanes are simd.h's nfloat lanes (the zero term adds nfloat sums to them)");
#if defined(__AVX512F__) || defined(__AVX2__)
constexpr bool kWideAnyTable = true;
#else
constexpr bool kWideAnyTable = false;
#endif
constexpr int kWide = 8 * kW;  // codes per wide block: 8 shifts of 4 bits
typedef float wfloat __attribute__((vector_size(kW * sizeof(float))));
typedef uint32_t wuint __attribute__((vector_size(kW * sizeof(uint32_t))));

// Whether the 16-entry table is lut[0] + q (the int4 table is q - 8), exactly.
inline bool consecutive_table(const float* lut) {
  for (int q = 1; q < 16; ++q)
    if (lut[q] != lut[0] + static_cast<float>(q)) return false;
  return true;
}

// Whether this build's wide path can decode codes of this table.
inline bool wide_usable(const float* lut) { return kWideAnyTable || consecutive_table(lut); }

// Codes of a row that the wide path takes: whole blocks, ending on a group boundary.
inline int64_t wide_codes(int64_t k, int group) {
  const int64_t unit = std::max<int64_t>(kWide, group);
  return k / unit * unit;
}

// Where x element `i` of a wide block goes in the permuted copy: the code in bits 4s..4s+3 of
// lane L is code 4(L % 4) + s / 2 (+ 16 for odd s) of chunk L / 4.
inline int wide_source(int i) {
  const int s = i / kW, lane = i % kW;
  return (lane / 4) * 32 + (s % 2) * 16 + 4 * (lane % 4) + s / 2;
}

// Wide accumulators as 16-lane ones (zero-padded on AVX2), to join the chunk path's sums.
inline vfloat widen(wfloat v) {
  vfloat out{};
  std::memcpy(&out, &v, sizeof(v));
  return out;
}

#if !defined(__AVX512F__) && !defined(__AVX2__)
struct WideTable {
  typedef int32_t wint __attribute__((vector_size(kW * sizeof(int32_t))));
  float base;
  explicit WideTable(vfloat lut) : base(lut[0]) {}
  // Only for consecutive tables (wide_usable): lut[q] = lut[0] + q, exact in fp32. Converted as
  // signed lanes: SSE2 converts int32 to float in one instruction, uint32 in several.
  wfloat lookup(wuint idx) const { return __builtin_convertvector(wint(idx & 15u), wfloat) + base; }
};
#elif defined(__AVX512F__)
struct WideTable {
  __m512 t;
  explicit WideTable(vfloat lut) : t(__m512(lut)) {}
  // vpermps reads only the low 4 bits of each index lane.
  wfloat lookup(wuint idx) const { return wfloat(_mm512_permutexvar_ps(__m512i(idx), t)); }
};
#elif defined(__AVX2__)
struct WideTable {
  __m256 lo, hi;
  explicit WideTable(vfloat lut) {
    std::memcpy(&lo, &lut, sizeof(lo));
    std::memcpy(&hi, reinterpret_cast<const char*>(&lut) + sizeof(lo), sizeof(hi));
  }
  // vpermps (8 entries) reads the low 3 bits; bit 3 of the code, shifted to the sign bit, picks
  // the table half.
  wfloat lookup(wuint idx) const {
    const __m256i i = __m256i(idx);
    const __m256 a = _mm256_permutevar8x32_ps(lo, i), b = _mm256_permutevar8x32_ps(hi, i);
    return wfloat(_mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(i, 28))));
  }
};
#endif

// Each lane's group scale for wide block b (lane L holds codes of chunk L / 4 of the block).
// `sf` is padded so the 4-float load stays inside.
template <int GROUP>
inline wfloat wide_scales(const float* sf, int64_t b) {
  constexpr int chunks = kWide / 32, per_group = GROUP / 32;
  if constexpr (GROUP >= kWide) {
    return wfloat{} + sf[b * kWide / GROUP];
  } else {
#if defined(__AVX512F__)
    const __m512i lanes = per_group == 1 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
                                         : _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    return wfloat(_mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(_mm_loadu_ps(sf + b * (chunks / per_group)))));
#elif defined(__AVX2__)
    const __m256i lanes = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);  // group 32: two chunks per block
    return wfloat(_mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(sf + b * chunks)), lanes));
#else
    static_assert(GROUP >= kWide, "generic builds read one chunk, one group, per wide block");
    return wfloat{};
#endif
  }
}

// Wide blocks [0, blocks) of RB weight rows against MB rows of permuted x, added into total.
template <int RB, int MB, int GROUP>
inline void wide_blocks(const float* const* xs, const uint8_t* packed, int64_t packed_stride,
                        const float* scale_f, int64_t groups, int64_t blocks, const WideTable& table,
                        wfloat total[MB][RB]) {
  for (int64_t b = 0; b < blocks; ++b) {
    wuint bits[RB];
    for (int r = 0; r < RB; ++r)
      std::memcpy(&bits[r], packed + r * packed_stride + b * (kWide / 2), sizeof(bits[r]));
    wfloat acc[MB][RB];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < RB; ++r) acc[m][r] = wfloat{};
#pragma GCC unroll 8
    for (int s = 0; s < 8; ++s) {
      wfloat w[RB];
      for (int r = 0; r < RB; ++r) w[r] = table.lookup(bits[r] >> (4 * s));
      for (int m = 0; m < MB; ++m) {
        wfloat xv;
        std::memcpy(&xv, xs[m] + b * kWide + s * kW, sizeof(xv));
        for (int r = 0; r < RB; ++r) acc[m][r] += w[r] * xv;
      }
    }
    for (int r = 0; r < RB; ++r) {
      const wfloat sv = wide_scales<GROUP>(scale_f + r * groups, b);
      for (int m = 0; m < MB; ++m) total[m][r] += acc[m][r] * sv;
    }
  }
}

template <typename T>
inline float scalar(const T* p, int64_t i) {
  return to_float(p[i]);
}

// The fp16 scales (or zeros) of RB weight rows as fp32, converted once per row block so the
// group loop broadcasts them from memory.
template <int RB>
inline void to_fp32_rows(const f16_t* src, int64_t groups, std::vector<float>& dst) {
  const int64_t count = RB * groups;
  dst.resize(static_cast<size_t>(count + 4));  // + 4: wide_scales loads 4 at a time
  to_fp32(src, count, dst.data());
}

// Per-thread buffers for the fp32 scales and zeros of the current row block.
struct Scratch {
  std::vector<float> scales, zeros;
};

// RB weight rows against MB rows of x. xf: MB rows of fp32 x; xsum: per row of x, the sum of
// each group (only used with zeros). Writes out[m][r].
template <int RB, int MB>
inline void block(const float* const* xs, const float* const* xsums, const uint8_t* packed,
                  int64_t packed_stride, const f16_t* scales, const f16_t* zeros, int64_t groups,
                  int64_t k, int group, vfloat lut, bool wide_ok, Scratch& scratch, float out[MB][RB]) {
  std::vector<float>& scale_f = scratch.scales;
  std::vector<float>& zero_f = scratch.zeros;
  to_fp32_rows<RB>(scales, groups, scale_f);
  vfloat total[MB][RB];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) total[m][r] = vfloat{};
  const int chunks_per_group = group / 32;
  const int64_t wide = wide_ok ? wide_codes(k, group) / kWide : 0;  // wide blocks, then chunk by chunk
  if (wide) {
    wfloat wide_total[MB][RB];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < RB; ++r) wide_total[m][r] = wfloat{};
    const float* sf = scale_f.data();
    const WideTable table(lut);
    if (group == 32) wide_blocks<RB, MB, 32>(xs, packed, packed_stride, sf, groups, wide, table, wide_total);
    if (group == 64) wide_blocks<RB, MB, 64>(xs, packed, packed_stride, sf, groups, wide, table, wide_total);
    if (group == 128) wide_blocks<RB, MB, 128>(xs, packed, packed_stride, sf, groups, wide, table, wide_total);
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < RB; ++r) total[m][r] += widen(wide_total[m][r]);
  }
  for (int64_t g = wide * kWide / group; g < groups; ++g) {
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
  if (zeros) {  // sum_g zero[r, g] * (sum of x over group g), in vectors of 16 groups
    to_fp32_rows<RB>(zeros, groups, zero_f);
    const int64_t whole = groups / kLanes * kLanes;
    for (int r = 0; r < RB; ++r) {
      const float* z = zero_f.data() + r * groups;
      for (int m = 0; m < MB; ++m)
        for (int64_t g = 0; g < whole; g += kLanes) total[m][r] += loadf(z + g) * loadf(xsums[m] + g);
    }
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < RB; ++r) {
        float t = hsum(total[m][r]);
        for (int64_t g = whole; g < groups; ++g) t += zero_f[r * groups + g] * xsums[m][g];
        out[m][r] = t;
      }
    return;
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) out[m][r] = hsum(total[m][r]);
}

template <int MB, typename TX>
void rows_pass(const float* const* xs, const float* const* xsums, TX* const* ys, const uint8_t* packed,
               const f16_t* scales, const f16_t* zeros, int64_t n0, int64_t n1, int64_t k, int group,
               vfloat lut, bool wide_ok) {
  const int64_t groups = k / group, ps = k / 2;
  thread_local Scratch scratch;  // one TLS lookup per pass, not per row block
  int64_t n = n0;
  for (; n + kRowBlock <= n1; n += kRowBlock) {
    float out[MB][kRowBlock];
    block<kRowBlock, MB>(xs, xsums, packed + n * ps, ps, scales + n * groups,
                         zeros ? zeros + n * groups : nullptr, groups, k, group, lut, wide_ok, scratch, out);
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < kRowBlock; ++r) ys[m][n + r] = from_float<TX>(out[m][r]);
  }
  for (; n < n1; ++n) {
    float out[MB][1];
    block<1, MB>(xs, xsums, packed + n * ps, ps, scales + n * groups, zeros ? zeros + n * groups : nullptr,
                 groups, k, group, lut, wide_ok, scratch, out);
    for (int m = 0; m < MB; ++m) ys[m][n] = from_float<TX>(out[m][0]);
  }
}

// Row `x` against every row of part p, one term x[c] * (lut[q] * s + z) at a time: the slow,
// exact order of the reference, for inputs the factorized sums cannot carry.
template <typename TX>
void exact_row(const TX* x, const Int4Parts& parts, size_t p, const float* lut, int64_t k, int group, TX* y) {
  const int64_t groups = k / group, ps = k / 2;
  const auto* scales = static_cast<const f16_t*>(parts.scales[p]);
  const auto* zeros = static_cast<const f16_t*>(parts.zeros[p]);
  for (int64_t r = 0; r < parts.n[p]; ++r) {
    const uint8_t* row = parts.packed[p] + r * ps;
    float acc = 0.f;
    for (int64_t c = 0; c < k; ++c) {
      const int64_t g = r * groups + c / group, i = c % 32;
      const uint8_t byte = row[c / 32 * 16 + i % 16];
      const int code = i < 16 ? (byte & 0xF) : (byte >> 4);
      acc += to_float(x[c]) * (lut[code] * to_float(scales[g]) + to_float(zeros[g]));
    }
    y[r] = from_float<TX>(acc);
  }
}

template <typename TX>
void impl(const TX* x, const Int4Parts& parts, const float* lut_p, int64_t m, int64_t k, int group,
          int64_t x_stride, int64_t y_stride, int num_threads) {
  const int64_t groups = k / group;
  // x in fp32, wide blocks permuted (see wide_source), and its sum over each group: once for
  // every part.
  std::vector<float> xf(static_cast<size_t>(m) * k), xsum(static_cast<size_t>(m) * groups, 0.f);
  const bool wide_ok = wide_usable(lut_p);
  const int64_t wide_end = wide_ok ? wide_codes(k, group) : 0;
  for (int64_t i = 0; i < m; ++i) {
    const TX* xi = x + i * x_stride;
    float* fi = xf.data() + i * k;
    for (int64_t c = 0; c < k; ++c) xsum[i * groups + c / group] += to_float(xi[c]);
    for (int64_t c = 0; c < wide_end; ++c) fi[c] = to_float(xi[c / kWide * kWide + wide_source(c % kWide)]);
    for (int64_t c = wide_end; c < k; ++c) fi[c] = to_float(xi[c]);
  }
  const vfloat lut = loadf(lut_p);
  // 4-bit rows are small: a tile of this many weight rows stays in L2 while every row of x passes.
  const int64_t tile = std::max<int64_t>(kRowBlock, (int64_t{1} << 17) / (k / 2) / kRowBlock * kRowBlock);
  // The parts' rows are stacked, [part 0 | part 1 | ...], and split across threads as one range.
  parallel_parts(parts.n, kRowBlock, k, num_threads, [&](size_t p, int64_t n0, int64_t n1) {
    const auto* packed = parts.packed[p];
    const auto* scales = static_cast<const f16_t*>(parts.scales[p]);
    const auto* zeros = static_cast<const f16_t*>(parts.zeros[p]);
    TX* y = static_cast<TX*>(parts.y[p]);
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
          case 1: rows_pass<1>(xs, xsums, ys, packed, scales, zeros, t0, t1, k, group, lut, wide_ok); break;
          case 2: rows_pass<2>(xs, xsums, ys, packed, scales, zeros, t0, t1, k, group, lut, wide_ok); break;
          case 3: rows_pass<3>(xs, xsums, ys, packed, scales, zeros, t0, t1, k, group, lut, wide_ok); break;
          default: rows_pass<4>(xs, xsums, ys, packed, scales, zeros, t0, t1, k, group, lut, wide_ok); break;
        }
      }
    }
  });
  // With zeros, the group sums above turn an infinite element of x into inf - inf = NaN where
  // the sum of x * w is +-inf. Rows of x whose group sums are not finite are redone term by term.
  for (int64_t i = 0; i < m; ++i) {
    const float* si = xsum.data() + i * groups;
    if (std::all_of(si, si + groups, [](float v) { return std::isfinite(v); })) continue;
    for (size_t p = 0; p < parts.n.size(); ++p) {
      if (parts.zeros[p]) exact_row(x + i * x_stride, parts, p, lut_p, k, group, static_cast<TX*>(parts.y[p]) + i * y_stride);
    }
  }
}

// ----------------------------------------------------------------------------- int8 activations
// int4_matmul_q8: the same y = x @ W^T for int4 weights, with x quantized to int8 once per call,
// per block of 32 elements (symmetric: d = amax / 127, xq = round(x / d) by nearest-even of
// x * (1 / d), in [-127, 127]; d is kept in fp32; a block with d below FLT_MIN is all zero). The
// codes (unsigned nibbles 0..15) are multiplied by the int8 activations exactly in int32:
//   sum_k x_k w_k ~ sum_chunks s_g d_c (sum_j q_j xq_j - 8 sum_j xq_j) + sum_g z_g (sum of x over g)
// with the zero term from the fp32 group sums of x, as the fp32 path has it. The weights keep the
// packed layout (no repacking): a vector of 16C bytes (C chunks of 32 codes) gives, masked and
// shifted, the low codes (code j of each chunk) and the high ones (code j + 16); x is stored per
// block in the same order, [low halves of the C chunks | high halves], so one unsigned x signed
// byte dot product per half, summing 4 adjacent bytes into each 32-bit lane, leaves lane L with 8
// products of chunk L / 4: vpdpbusd in the avx512vnni build (16 lanes, 4 chunks; its 256- and
// 128-bit forms for tails), vpmaddubsw + vpmaddwd in the avx512 (16 lanes) and avx2 (8 lanes, 2
// chunks) builds, plain C++ in the baseline one (4 lanes, one chunk). AVX-VNNI (the VEX form, on
// CPUs with AVX2 and VNNI but no AVX-512) is not built: this host cannot run it to test it. The
// - 8 sum xq term is the int32 accumulator's start value, per lane. The int32 lanes become fp32
// once per block, scaled by s_g * d_c per lane. A tail of the row narrower than the widest block
// goes through the narrower widths (8 lanes, then 4). The integer sums are exact in every build;
// only the fp32 order of the block sums differs between builds.

// Vector types of W int32 lanes: bytes (4W), signed bytes, int32 and fp32.
template <int W>
struct QV {
  typedef uint8_t b __attribute__((vector_size(4 * W)));
  typedef int8_t sb __attribute__((vector_size(4 * W)));
  typedef int16_t h __attribute__((vector_size(4 * W)));
  typedef int32_t i __attribute__((vector_size(4 * W)));
  typedef float f __attribute__((vector_size(4 * W)));
};

// acc + per lane L: sum_{j<4} u[4L + j] * s[4L + j], unsigned bytes u (codes, < 16) times signed
// bytes s (int8 x, |s| <= 127). vpmaddubsw's int16 pair sums stay below 2 * 15 * 127: no saturation.
template <int W>
inline typename QV<W>::i dot(typename QV<W>::i acc, typename QV<W>::b u, typename QV<W>::sb s) {
  typedef typename QV<W>::i vi;
#if defined(__AVX512F__)
  if constexpr (W == 16) {
#if defined(__AVX512VNNI__)
    return vi(_mm512_dpbusd_epi32(__m512i(acc), __m512i(u), __m512i(s)));
#else
    return acc + vi(_mm512_madd_epi16(_mm512_maddubs_epi16(__m512i(u), __m512i(s)), _mm512_set1_epi16(1)));
#endif
  }
#endif
#if defined(__AVX2__)
  if constexpr (W == 8) {
#if defined(__AVX512VNNI__)
    return vi(_mm256_dpbusd_epi32(__m256i(acc), __m256i(u), __m256i(s)));
#else
    return acc + vi(_mm256_madd_epi16(_mm256_maddubs_epi16(__m256i(u), __m256i(s)), _mm256_set1_epi16(1)));
#endif
  }
  if constexpr (W == 4) {
#if defined(__AVX512VNNI__)
    return vi(_mm_dpbusd_epi32(__m128i(acc), __m128i(u), __m128i(s)));
#else
    return acc + vi(_mm_madd_epi16(_mm_maddubs_epi16(__m128i(u), __m128i(s)), _mm_set1_epi16(1)));
#endif
  }
#endif
  for (int l = 0; l < W; ++l)
    for (int j = 0; j < 4; ++j) acc[l] += int32_t(u[4 * l + j]) * int32_t(s[4 * l + j]);
  return acc;
}

// AVX2 without VNNI: dot() is vpmaddubsw (int16 pair sums, each |.| <= 2 * 15 * 127 = 3810),
// vpmaddwd with ones and an add, 24 instructions per chunk and row of x. kPairs16: the many-rows
// path instead adds a chunk's 8 pair sums per lane as int16 (at most 8 * 3810 = 30480 < 32767, no
// wrap) and widens them once (widen_pairs): 18 instructions. Measured 1.2x at 8 to 128 rows, together
// with keep() below.
#if defined(__AVX2__) && !defined(__AVX512F__)
constexpr bool kPairs16 = true;
#else
constexpr bool kPairs16 = false;
#endif

// Per int16 lane of 8 int32 lanes: u[2j] * s[2j] + u[2j + 1] * s[2j + 1] (vpmaddubsw).
inline QV<8>::h pairs(QV<8>::b u, QV<8>::sb s) {
#if defined(__AVX2__)
  return QV<8>::h(_mm256_maddubs_epi16(__m256i(u), __m256i(s)));
#else
  QV<8>::h out;
  for (int l = 0; l < 16; ++l) out[l] = int16_t(u[2 * l] * s[2 * l] + u[2 * l + 1] * s[2 * l + 1]);
  return out;
#endif
}

// acc + per int32 lane: the sum of its two int16 lanes of p (vpmaddwd with ones).
inline QV<8>::i widen_pairs(QV<8>::i acc, QV<8>::h p) {
#if defined(__AVX2__)
  return acc + QV<8>::i(_mm256_madd_epi16(__m256i(p), _mm256_set1_epi16(1)));
#else
  for (int l = 0; l < 8; ++l) acc[l] += int32_t(p[2 * l]) + int32_t(p[2 * l + 1]);
  return acc;
#endif
}

// Sum of the lanes as a tree (as hsum), not as one chain of W dependent adds.
template <int W>
inline float hsum_w(typename QV<W>::f v) {
  if constexpr (W == kN) {
    return hsum_n(v);
  } else {
    float t[W];
    std::memcpy(t, &v, sizeof(t));
    for (int width = W / 2; width > 0; width /= 2)
      for (int i = 0; i < width; ++i) t[i] += t[i + width];
    return t[0];
  }
}

// x of one row, prepared by q8_prepare: the int8 values in block order, and per 32-bit lane (4 per
// chunk, lane 4c + j covering codes 4j..4j+3 and 16+4j..16+4j+3 of chunk c) the block scale d_c
// and the start value -8 * (sum of those 8 xq); the fp32 sums of x per weight group (padded with zeros
// to padded_groups). For the many-rows path (q8_prepare<true>, "int8 activations, many rows of x"
// below) the int8 values are in their natural order and d and the start value are per chunk.
struct Q8Row {
  const int8_t* xq;
  const float* d;
  const int32_t* corr;
  const float* xsum;
};

constexpr int kQ8Chunks = kW / 4;  // chunks per widest block: 4 (AVX-512), 2 (AVX2), 1

// Byte offset in a row of xq of code i (0..31) of chunk c: blocks of kQ8Chunks chunks from the
// start, then one block of 2 chunks (AVX-512 only) and one of 1 for what is left.
inline int64_t q8_offset(int64_t c, int i, int64_t chunks) {
  const int64_t main = chunks / kQ8Chunks * kQ8Chunks;
  int64_t start, width;
  if (c < main) {
    start = c / kQ8Chunks * kQ8Chunks, width = kQ8Chunks;
  } else if (kQ8Chunks > 2 && chunks - main >= 2 && c < main + 2) {
    start = main, width = 2;
  } else {
    start = c, width = 1;
  }
  return start * 32 + (i < 16 ? 0 : 16 * width) + (c - start) * 16 + (i % 16);
}

// One chunk of x (32 values) in int8, kN lanes at a time: q (natural order) = x / d rounded to
// the nearest integer, ties to even, as nearbyint does (round_even), within [-127, 127]. Returns
// d (0 when inv is 0), and sets the chunk's fp32 sum and sum of q. A chunk whose sum is not
// finite, or whose amax is below FLT_MIN * 127, is all zeros.
template <typename TX>
inline float q8_chunk(const TX* x, int8_t* q, float& sum, int32_t& qsum) {
  constexpr int kV = 32 / kN;  // vectors per chunk
  typedef int32_t nint __attribute__((vector_size(kN * sizeof(int32_t))));
  typedef int8_t nbyte __attribute__((vector_size(kN)));
  nfloat f[kV], s{}, a{};
  for (int v = 0; v < kV; ++v) {
    f[v] = load_n(x + v * kN);
    s += f[v];
    const nfloat m = f[v] < 0.f ? -f[v] : f[v];
    a = a < m ? m : a;  // NaN lanes are passed over, as std::max(amax, NaN) does
  }
  sum = hsum_n(s);
  float amax = 0.f;
  for (int l = 0; l < kN; ++l) amax = std::max(amax, a[l]);
  const float dc = amax / 127.f;
  const float inv = std::isfinite(sum) && dc >= 0x1p-126f ? 1.f / dc : 0.f;
  nint qs{};
  for (int v = 0; v < kV; ++v) {
    nfloat r = f[v] * inv;
    r = r == r ? r : nfloat{};  // inf or NaN times inv = 0 (a non-finite chunk): 0
    r = r > 127.f ? nfloat{} + 127.f : r;
    r = r < -127.f ? nfloat{} - 127.f : r;
    const nint qi = __builtin_convertvector(round_even(r), nint);
    qs += qi;
    const nbyte b = __builtin_convertvector(qi, nbyte);
    std::memcpy(q + v * kN, &b, sizeof(b));
  }
  qsum = 0;
  for (int l = 0; l < kN; ++l) qsum += qs[l];
  return inv == 0.f ? 0.f : dc;
}

// Quantizes row x (k values) as described above (kNatural: for the many-rows path); returns false
// if any element or group sum is not finite (the row then holds zeros, and the caller redoes it
// with fp32 activations).
template <bool kNatural, typename TX>
bool q8_prepare(const TX* x, int64_t k, int group, int8_t* xq, float* d, int32_t* corr, float* xsum) {
  const int64_t chunks = k / 32, per_group = group / 32;
  bool finite = true;
  for (int64_t c = 0; c < chunks; ++c) {
    float sum;
    int32_t qsum;
    int8_t q[32];
    const float dc = q8_chunk(x + c * 32, kNatural ? xq + c * 32 : q, sum, qsum);
    if (c % per_group == 0) xsum[c / per_group] = 0.f;
    xsum[c / per_group] += sum;
    finite = finite && std::isfinite(sum);
    if constexpr (kNatural) {
      corr[c] = -8 * qsum;
      d[c] = dc;
    } else {
      for (int j = 0; j < 4; ++j) {
        int32_t s = 0;
        for (int t = 0; t < 4; ++t) s += q[4 * j + t] + q[16 + 4 * j + t];
        corr[c * 4 + j] = -8 * s;
        d[c * 4 + j] = dc;
      }
      std::memcpy(xq + q8_offset(c, 0, chunks), q, 16);  // each half of the chunk is one run
      std::memcpy(xq + q8_offset(c, 16, chunks), q + 16, 16);
    }
  }
  for (int64_t g = 0; g < chunks / per_group; ++g) finite = finite && std::isfinite(xsum[g]);
  return finite;
}

// One block of W lanes (W / 4 chunks from chunk c0) of RB weight rows against MB rows of x; sw[r]
// holds row r's weight scale per lane.
template <int W, int RB, int MB>
inline void q8_step(const Q8Row* xs, const uint8_t* packed, int64_t packed_stride, const typename QV<W>::f* sw,
                    int64_t c0, typename QV<W>::f acc[MB][RB]) {
  typedef QV<W> V;
  typename V::b lo[RB], hi[RB];
  for (int r = 0; r < RB; ++r) {
    typename V::b bytes;
    std::memcpy(&bytes, packed + r * packed_stride + c0 * 16, sizeof(bytes));
    lo[r] = bytes & 15;
    hi[r] = bytes >> 4;
  }
  for (int m = 0; m < MB; ++m) {
    typename V::sb xl, xh;
    typename V::i corr;
    typename V::f dv;
    std::memcpy(&xl, xs[m].xq + c0 * 32, sizeof(xl));
    std::memcpy(&xh, xs[m].xq + c0 * 32 + sizeof(xl), sizeof(xh));
    std::memcpy(&corr, xs[m].corr + c0 * 4, sizeof(corr));
    std::memcpy(&dv, xs[m].d + c0 * 4, sizeof(dv));
    for (int r = 0; r < RB; ++r) {
      const typename V::i a = dot<W>(dot<W>(corr, lo[r], xl), hi[r], xh);
      acc[m][r] += __builtin_convertvector(a, typename V::f) * (sw[r] * dv);
    }
  }
}

// Per-lane weight scales of a W-lane block from chunk c0 (the tails; the main loop uses wide_scales).
template <int W>
inline typename QV<W>::f lane_scales(const float* sf, int64_t c0, int group) {
  typename QV<W>::f v;
  for (int l = 0; l < W; ++l) v[l] = sf[(c0 + l / 4) * 32 / group];
  return v;
}

// `ahead`: the byte offset of the codes to prefetch (0: none), one 64-byte line per row and block.
template <int RB, int MB, int GROUP>
inline void q8_main(const Q8Row* xs, const uint8_t* packed, int64_t packed_stride, const float* sf, int64_t groups,
                    int64_t blocks, typename QV<kW>::f acc[MB][RB], int64_t ahead) {
  for (int64_t b = 0; b < blocks; ++b) {
    if (ahead)
      for (int r = 0; r < RB; ++r) __builtin_prefetch(packed + ahead + r * packed_stride + b * kQ8Chunks * 16, 0, 0);
    typename QV<kW>::f sw[RB];
    for (int r = 0; r < RB; ++r) sw[r] = wide_scales<GROUP>(sf + r * groups, b);
    q8_step<kW, RB, MB>(xs, packed, packed_stride, sw, b * kQ8Chunks, acc);
  }
}

// A tail block of W lanes at chunk c0, its sums added to the low lanes of the wide accumulators
// (one horizontal sum per row pair at the end, not one per tail).
template <int W, int RB, int MB>
inline void q8_tail(const Q8Row* xs, const uint8_t* packed, int64_t packed_stride, const float* sf, int64_t groups,
                    int group, int64_t c0, typename QV<kW>::f wide[MB][RB]) {
  typename QV<W>::f sw[RB], acc[MB][RB];
  for (int r = 0; r < RB; ++r) sw[r] = lane_scales<W>(sf + r * groups, c0, group);
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = typename QV<W>::f{};
  q8_step<W, RB, MB>(xs, packed, packed_stride, sw, c0, acc);
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) {
      typename QV<kW>::f v{};
      std::memcpy(&v, &acc[m][r], sizeof(acc[m][r]));
      wide[m][r] += v;
    }
}

// Lanes of the group sums of x and of the zeros a row holds: `groups` rounded up to whole
// vectors, the rest zero, so the zero term runs in whole vectors.
inline int64_t padded_groups(int64_t groups) { return (groups + kLanes - 1) / kLanes * kLanes; }

// The fp16 zeros of RB weight rows as fp32, each row padded with zeros to padded_groups.
template <int RB>
inline void to_fp32_rows_padded(const f16_t* src, int64_t groups, std::vector<float>& dst) {
  const int64_t gp = padded_groups(groups);
  dst.resize(static_cast<size_t>(RB * gp));
  for (int r = 0; r < RB; ++r) {
    float* out = dst.data() + r * gp;
    to_fp32(src + r * groups, groups, out);
    std::fill(out + groups, out + gp, 0.f);
  }
}

template <int RB, int MB>
inline void q8_block(const Q8Row* xs, const uint8_t* packed, int64_t packed_stride, const f16_t* scales,
                     const f16_t* zeros, int64_t groups, int64_t k, int group, Scratch& scratch, float out[MB][RB],
                     int64_t ahead = 0) {
  to_fp32_rows<RB>(scales, groups, scratch.scales);
  const float* sf = scratch.scales.data();
  const int64_t chunks = k / 32, blocks = chunks / kQ8Chunks;
  typename QV<kW>::f acc[MB][RB];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = typename QV<kW>::f{};
  if (group == 32) q8_main<RB, MB, 32>(xs, packed, packed_stride, sf, groups, blocks, acc, ahead);
  if (group == 64) q8_main<RB, MB, 64>(xs, packed, packed_stride, sf, groups, blocks, acc, ahead);
  if (group == 128) q8_main<RB, MB, 128>(xs, packed, packed_stride, sf, groups, blocks, acc, ahead);
  int64_t c = blocks * kQ8Chunks;
  if constexpr (kQ8Chunks > 2) {
    if (chunks - c >= 2) {
      q8_tail<8, RB, MB>(xs, packed, packed_stride, sf, groups, group, c, acc);
      c += 2;
    }
  }
  if constexpr (kQ8Chunks > 1) {
    if (chunks - c >= 1) q8_tail<4, RB, MB>(xs, packed, packed_stride, sf, groups, group, c, acc);
  }
  if (zeros) {  // sum_g zero[r, g] * (sum of x over group g), as in block(), into the same sums
    to_fp32_rows_padded<RB>(zeros, groups, scratch.zeros);
    const int64_t gp = padded_groups(groups);
    for (int r = 0; r < RB; ++r) {
      const float* z = scratch.zeros.data() + r * gp;
      for (int m = 0; m < MB; ++m) {
        nfloat t{};  // the build's width, the accumulators' type (kN == kW)
        for (int64_t g = 0; g < gp; g += kN) t += load_n(z + g) * load_n(xs[m].xsum + g);
        acc[m][r] += t;
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) out[m][r] = hsum_w<kW>(acc[m][r]);
}

// Weight rows per register block of the int8 row path when x has one row (a batch-1 decode step):
// AVX2 has the registers for 4 (kRowBlock's 2 leave it for two or more rows of x). On the
// stories42M decode stream (8 layers and the head, 2 threads), 4 rows ran 1.09-1.12x as fast as 2,
// which spend a quarter of the time on each block's setup and sums at k = 512; 8 spill and gain
// nothing. The other builds keep kRowBlock (not measured).
constexpr int kQ8RowBlock1 = kW == 8 ? 4 : kRowBlock;

template <int MB, int RB, typename TX>
void q8_rows_pass(const Q8Row* xs, TX* const* ys, const uint8_t* packed, const f16_t* scales, const f16_t* zeros,
                  int64_t n0, int64_t n1, int64_t k, int group) {
  const int64_t groups = k / group, ps = k / 2;
  thread_local Scratch scratch;
  // Row blocks side by side restart short streams at every block, which the hardware prefetchers
  // pick up late (as in linear.cpp): the codes of the rows a block or more ahead (at least
  // kPrefetchBytes) are prefetched, and the next block's scales and zeros.
  const int64_t ahead = std::max<int64_t>(1, kPrefetchBytes / (RB * ps)) * RB * ps;
  int64_t n = n0;
  for (; n + RB <= n1; n += RB) {
    for (int64_t g = 0; g < RB * groups; g += 32) {
      __builtin_prefetch(scales + (n + RB) * groups + g, 0, 0);
      if (zeros) __builtin_prefetch(zeros + (n + RB) * groups + g, 0, 0);
    }
    float out[MB][RB];
    q8_block<RB, MB>(xs, packed + n * ps, ps, scales + n * groups, zeros ? zeros + n * groups : nullptr, groups, k,
                     group, scratch, out, n + RB < n1 ? ahead : 0);
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < RB; ++r) ys[m][n + r] = from_float<TX>(out[m][r]);
  }
  for (; n < n1; ++n) {
    float out[MB][1];
    q8_block<1, MB>(xs, packed + n * ps, ps, scales + n * groups, zeros ? zeros + n * groups : nullptr, groups, k,
                    group, scratch, out);
    for (int m = 0; m < MB; ++m) ys[m][n] = from_float<TX>(out[m][0]);
  }
}

// ------------------------------------------------------------ int8 activations, many rows of x
// From kQ8GemmRows rows of x (a prefill, a batch), the layout above spends most of its time
// outside the dot products: every lane holds 8 products of one chunk, so each pair of byte dot
// products is followed by a conversion to fp32, a scale and an add, for every row of x and of W.
// There the lanes stand for weight rows instead. Each thread copies kW weight rows at a time
// into a small interleaved tile: word (c, s) of row r, bytes 4s..4s+3 of chunk c (low nibbles:
// codes 4s..4s+3; high: 16+4s..16+4s+3), goes to lane r of tile vector 4c + s. A byte dot product
// of that vector's low nibbles with x's bytes 4s..4s+3 broadcast to every lane, and one of its
// high nibbles with bytes 16+4s.., add 8 products to each weight row's own lane, and 4 such
// steps cover the chunk. A lane then holds the whole chunk's integer sum, which is converted and
// scaled (s_g of its row times d_c of x) once per chunk, row of x and kW rows of W: a quarter of
// the conversions, and y comes out as whole vectors, with no horizontal sums. The tile costs one
// copy of the thread's weight rows per call, shared by every row of x, made of 8 x 8 word
// transposes; the weights' stored layout does not change. The zero term is added per group from
// x's fp32 group sums as above.

// kW weight rows interleaved as above, with their scales and zeros in fp32, per group a vector of
// kW lanes (rows past the weight's end are zeros).
struct Q8Tile {
  std::vector<uint32_t> codes;
  std::vector<float> scales, zeros;
};

// dst[j * dst_stride + i] = word j of row i (at src + i * src_stride bytes), i, j < 8: an 8 x 8
// transpose of 32-bit words.
inline void transpose8(const uint8_t* src, int64_t src_stride, uint32_t* dst, int64_t dst_stride) {
#if defined(__AVX2__)
  __m256i r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i * src_stride));
  for (int i = 0; i < 8; i += 2) {  // t[i]: words 0, 1 | 4, 5 of rows i, i+1; t[i+1]: 2, 3 | 6, 7
    t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int h = 0; h < 8; h += 4) {  // u[h + j]: word j | j + 4 of rows h..h+3
    u[h + 0] = _mm256_unpacklo_epi64(t[h], t[h + 2]);
    u[h + 1] = _mm256_unpackhi_epi64(t[h], t[h + 2]);
    u[h + 2] = _mm256_unpacklo_epi64(t[h + 1], t[h + 3]);
    u[h + 3] = _mm256_unpackhi_epi64(t[h + 1], t[h + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j * dst_stride),
                        _mm256_permute2x128_si256(u[j], u[j + 4], 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (j + 4) * dst_stride),
                        _mm256_permute2x128_si256(u[j], u[j + 4], 0x31));
  }
#else
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) std::memcpy(dst + j * dst_stride + i, src + i * src_stride + 4 * j, 4);
#endif
}

// dst[j * kW + r] = word j of row r (src + r * src_stride bytes) for j < words, r < rows (<= kW):
// 8 x 8 blocks transposed whole, the edges word by word.
inline void interleave_rows(const uint8_t* src, int64_t src_stride, int rows, int64_t words, uint32_t* dst) {
  const auto by_word = [&](int r, int64_t j0) {  // words [j0, words) of row r
    for (int64_t j = j0; j < words; ++j) std::memcpy(dst + j * kW + r, src + r * src_stride + 4 * j, 4);
  };
  int r0 = 0;
  for (; r0 + 8 <= rows; r0 += 8) {
    int64_t j0 = 0;
    for (; j0 + 8 <= words; j0 += 8) transpose8(src + r0 * src_stride + 4 * j0, src_stride, dst + j0 * kW + r0, kW);
    for (int r = r0; r < r0 + 8; ++r) by_word(r, j0);
  }
  for (int r = r0; r < rows; ++r) by_word(r, 0);
}

// Fills `tile` from weight rows [n0, n0 + rows), rows <= kW.
inline void q8_fill_tile(const uint8_t* packed, const f16_t* scales, const f16_t* zeros, int64_t n0, int rows,
                         int64_t k, int group, Q8Tile& tile) {
  const int64_t ps = k / 2, words = k / 8, groups = k / group;
  tile.codes.resize(static_cast<size_t>(words * kW));
  tile.scales.resize(static_cast<size_t>(groups * kW));
  tile.zeros.resize(zeros ? static_cast<size_t>(groups * kW) : 0);
  if (rows < kW) {
    std::fill(tile.codes.begin(), tile.codes.end(), 0u);
    std::fill(tile.scales.begin(), tile.scales.end(), 0.f);
    std::fill(tile.zeros.begin(), tile.zeros.end(), 0.f);
  }
  interleave_rows(packed + n0 * ps, ps, rows, words, tile.codes.data());
  // The scales and zeros: each row's converted to fp32 (whole vectors), then interleaved the same way.
  thread_local std::vector<float> rowf;
  rowf.resize(static_cast<size_t>(kW * groups));
  const auto per_group = [&](const f16_t* src, std::vector<float>& dst) {
    to_fp32(src + n0 * groups, rows * groups, rowf.data());
    interleave_rows(reinterpret_cast<const uint8_t*>(rowf.data()), groups * 4, rows, groups,
                    reinterpret_cast<uint32_t*>(dst.data()));
  };
  per_group(scales, tile.scales);
  if (zeros) per_group(zeros, tile.zeros);
}

// Keeps v in a register at this point. Without it GCC reassociates a chain of integer adds into
// all of its terms first and one long sum after, which spills the terms (AVX2 has 16 registers).
template <typename T>
inline void keep(T& v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));
#elif defined(__x86_64__)
  asm("" : "+x"(v));
#endif
}

// RB tiles (RB * kW weight rows from n0, `valid` of them real) against MB rows of x (natural
// layout), written to ys[m][n0 ...]; PG chunks per weight group.
template <int RB, int MB, int PG, typename TX>
inline void q8_gemm_block(const Q8Row* xs, const Q8Tile* tiles, int64_t chunks, TX* const* ys, int64_t n0,
                          int64_t valid) {
  typedef QV<kW> V;
  const bool zeros = !tiles[0].zeros.empty();
  const uint32_t* codes[RB];
  const float *scales[RB], *zs[RB];
  for (int r = 0; r < RB; ++r) {
    codes[r] = tiles[r].codes.data();
    scales[r] = tiles[r].scales.data();
    zs[r] = tiles[r].zeros.data();
  }
  const int8_t* xq[MB];
  for (int m = 0; m < MB; ++m) xq[m] = xs[m].xq;
  typename V::f acc[MB][RB];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = typename V::f{};
  for (int64_t c = 0; c < chunks; ++c) {
    typename V::i ia[MB][RB];
    typename V::h p16[MB][RB];  // kPairs16: the chunk's pair sums
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < RB; ++r) {
        ia[m][r] = typename V::i{} + xs[m].corr[c];
        p16[m][r] = typename V::h{};
      }
    for (int s = 0; s < 4; ++s) {
      typename V::b lo[RB], hi[RB];
      for (int r = 0; r < RB; ++r) {
        typename V::b bytes;
        std::memcpy(&bytes, codes[r] + (c * 4 + s) * kW, sizeof(bytes));
        lo[r] = bytes & 15;
        hi[r] = bytes >> 4;
      }
      for (int m = 0; m < MB; ++m) {
        int32_t wl, wh;
        std::memcpy(&wl, xq[m] + c * 32 + 4 * s, 4);
        std::memcpy(&wh, xq[m] + c * 32 + 16 + 4 * s, 4);
        const auto xl = (typename V::sb)(typename V::i{} + wl), xh = (typename V::sb)(typename V::i{} + wh);
        for (int r = 0; r < RB; ++r) {
          if constexpr (kPairs16) {
            p16[m][r] += pairs(lo[r], xl);
            keep(p16[m][r]);
            p16[m][r] += pairs(hi[r], xh);
            keep(p16[m][r]);
          } else {
            ia[m][r] = dot<kW>(ia[m][r], lo[r], xl);
            keep(ia[m][r]);
            ia[m][r] = dot<kW>(ia[m][r], hi[r], xh);
            keep(ia[m][r]);
          }
        }
      }
    }
    if constexpr (kPairs16) {
      for (int m = 0; m < MB; ++m)
        for (int r = 0; r < RB; ++r) ia[m][r] = widen_pairs(ia[m][r], p16[m][r]);
    }
    const int64_t g = c / PG;
    typename V::f sv[RB];
    for (int r = 0; r < RB; ++r) std::memcpy(&sv[r], scales[r] + g * kW, sizeof(sv[r]));
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < RB; ++r) acc[m][r] += __builtin_convertvector(ia[m][r], typename V::f) * (sv[r] * xs[m].d[c]);
    if (zeros && c % PG == 0) {
      for (int r = 0; r < RB; ++r) {
        typename V::f zv;
        std::memcpy(&zv, zs[r] + g * kW, sizeof(zv));
        for (int m = 0; m < MB; ++m) acc[m][r] += zv * xs[m].xsum[g];
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) {
      TX* out = ys[m] + n0 + r * kW;
      const int64_t lanes = std::min<int64_t>(kW, valid - r * kW);
      if (std::is_same_v<TX, float> && lanes == kW) {
        std::memcpy(out, &acc[m][r], sizeof(acc[m][r]));
      } else {
        for (int64_t l = 0; l < lanes; ++l) out[l] = from_float<TX>(acc[m][r][l]);
      }
    }
}

// Rows of x from which impl_q8 takes this path (measured on the stories42M projections and head,
// 2 threads). 16 lanes (AVX-512 VNNI): 1.3x the row path at 8 rows and 1.65x at 16, when the tile
// was still filled word by word (not re-measured since). 8 lanes (AVX2 vpmaddubsw): with the
// transposed fill, about even at 3 rows, 1.06-1.09x at 4, 1.2-1.3x at 8, 1.5x at 16 and 1.6-1.8x
// at 32-64; the word-by-word fill cost about as much as the dot products at 8 rows. 4 lanes (the
// baseline build, no AVX2): 1.2x at 4 rows, 1.3x at 32.
constexpr int64_t kQ8GemmRows = kW >= 16 ? 8 : 4;

// Tiles of kQ8GemmTiles * kW weight rows against kQ8GemmM rows of x per register block: AVX-512's
// 32 registers hold 2 x 5 int32 and fp32 accumulators with the codes; narrower ISAs take one tile.
#if defined(__AVX512F__)
constexpr int kQ8GemmTiles = 2;
constexpr int kQ8GemmM = 5;
#else
constexpr int kQ8GemmTiles = 1;
constexpr int kQ8GemmM = 4;
#endif

// q8_gemm_block for the first mb (1 <= mb <= MB) rows of x.
template <int RB, int MB, typename TX>
inline void q8_gemm_some(int mb, const Q8Row* xs, const Q8Tile* tiles, int64_t chunks, int per_group, TX* const* ys,
                         int64_t n0, int64_t valid) {
  if constexpr (MB > 1) {
    if (mb < MB) return q8_gemm_some<RB, MB - 1>(mb, xs, tiles, chunks, per_group, ys, n0, valid);
  }
  if (per_group == 1) q8_gemm_block<RB, MB, 1>(xs, tiles, chunks, ys, n0, valid);
  if (per_group == 2) q8_gemm_block<RB, MB, 2>(xs, tiles, chunks, ys, n0, valid);
  if (per_group == 4) q8_gemm_block<RB, MB, 4>(xs, tiles, chunks, ys, n0, valid);
}

// Every row of x against weight rows [n0, n1) of one part, a block of tiles at a time.
template <typename TX>
void q8_gemm_rows(const Q8Row* xs, int64_t m, TX* y, int64_t y_stride, const uint8_t* packed, const f16_t* scales,
                  const f16_t* zeros, int64_t n0, int64_t n1, int64_t k, int group) {
  constexpr int RB = kQ8GemmTiles, MB = kQ8GemmM;
  thread_local Q8Tile tiles[RB];
  const int64_t chunks = k / 32;
  const int per_group = group / 32;
  for (int64_t t0 = n0; t0 < n1; t0 += RB * kW) {
    const int64_t valid = std::min<int64_t>(RB * kW, n1 - t0);
    for (int r = 0; r < RB; ++r) {
      const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(kW, valid - r * kW));
      q8_fill_tile(packed, scales, zeros, t0 + r * kW, static_cast<int>(rows), k, group, tiles[r]);
    }
    const int64_t blocks = (m + MB - 1) / MB;  // as even as they come: 16 rows as 4 x 4, not 5 + 5 + 5 + 1
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t i = m * b / blocks;
      const int mb = static_cast<int>(m * (b + 1) / blocks - i);
      TX* ys[MB];
      for (int j = 0; j < mb; ++j) ys[j] = y + (i + j) * y_stride;
      q8_gemm_some<RB, MB>(mb, xs + i, tiles, chunks, per_group, ys, t0, valid);
    }
  }
}

template <typename TX>
void impl_q8(const TX* x, const Int4Parts& parts, const float* lut_p, int64_t m, int64_t k, int group,
             int64_t x_stride, int64_t y_stride, int num_threads) {
  const int64_t groups = k / group, chunks = k / 32;
  const bool gemm = m >= kQ8GemmRows;
  std::vector<int8_t> xq(static_cast<size_t>(m * k));
  const int64_t gp = padded_groups(groups);  // each row's group sums, padded with zeros (q8_block)
  std::vector<float> d(static_cast<size_t>(m * chunks * 4)), xsum(static_cast<size_t>(m * gp), 0.f);
  std::vector<int32_t> corr(static_cast<size_t>(m * chunks * 4));
  std::vector<Q8Row> rows(static_cast<size_t>(m));
  std::vector<char> nonfinite(static_cast<size_t>(m), 0);  // a non-finite element or group sum
  const int pt = threads_for(m * k, m, num_threads);  // many rows (a prefill): quantized in parallel
  (void)pt;
#pragma omp parallel for schedule(static) num_threads(pt) if (pt > 1)
  for (int64_t i = 0; i < m; ++i) {
    int8_t* qi = xq.data() + i * k;
    float* di = d.data() + i * chunks * 4;
    int32_t* ci = corr.data() + i * chunks * 4;
    float* si = xsum.data() + i * gp;
    const bool finite = gemm ? q8_prepare<true>(x + i * x_stride, k, group, qi, di, ci, si)
                             : q8_prepare<false>(x + i * x_stride, k, group, qi, di, ci, si);
    if (!finite) {
      nonfinite[i] = 1;
      std::fill(si, si + groups, 0.f);  // the row runs as zeros, then is redone in fp32 below
    }
    rows[i] = Q8Row{qi, di, ci, si};
  }
  std::vector<int64_t> redo;
  for (int64_t i = 0; i < m; ++i)
    if (nonfinite[i]) redo.push_back(i);
  if (gemm) {
    parallel_parts(parts.n, kQ8GemmTiles * kW, k, num_threads, [&](size_t p, int64_t n0, int64_t n1) {
      q8_gemm_rows(rows.data(), m, static_cast<TX*>(parts.y[p]), y_stride, parts.packed[p],
                   static_cast<const f16_t*>(parts.scales[p]), static_cast<const f16_t*>(parts.zeros[p]), n0, n1, k,
                   group);
    });
  } else {
    const int64_t rb = m == 1 ? kQ8RowBlock1 : kRowBlock;
    const int64_t tile = std::max<int64_t>(rb, (int64_t{1} << 17) / (k / 2) / rb * rb);
    parallel_parts(parts.n, rb, k, num_threads, [&](size_t p, int64_t n0, int64_t n1) {
      const auto* packed = parts.packed[p];
      const auto* scales = static_cast<const f16_t*>(parts.scales[p]);
      const auto* zeros = static_cast<const f16_t*>(parts.zeros[p]);
      TX* y = static_cast<TX*>(parts.y[p]);
      for (int64_t t0 = n0; t0 < n1; t0 += tile) {
        const int64_t t1 = std::min(n1, t0 + tile);
        for (int64_t i = 0; i < m; i += kMaxM) {
          TX* ys[kMaxM];
          const int mb = static_cast<int>(std::min<int64_t>(kMaxM, m - i));
          for (int j = 0; j < mb; ++j) ys[j] = y + (i + j) * y_stride;
          const Q8Row* xs = rows.data() + i;
          switch (mb) {
            case 1: q8_rows_pass<1, kQ8RowBlock1>(xs, ys, packed, scales, zeros, t0, t1, k, group); break;
            case 2: q8_rows_pass<2, kRowBlock>(xs, ys, packed, scales, zeros, t0, t1, k, group); break;
            case 3: q8_rows_pass<3, kRowBlock>(xs, ys, packed, scales, zeros, t0, t1, k, group); break;
            default: q8_rows_pass<4, kRowBlock>(xs, ys, packed, scales, zeros, t0, t1, k, group); break;
          }
        }
      }
    });
  }
  // A row of x with inf or NaN (or group sums that overflow) has no int8 form: it is computed with
  // fp32 activations, which give what the reference gives.
  for (int64_t i : redo) {
    Int4Parts one = parts;
    for (void*& y : one.y) y = static_cast<TX*>(y) + i * y_stride;
    impl(x + i * x_stride, one, lut_p, 1, k, group, x_stride, y_stride, num_threads);
  }
}

// W (n, k) = lut[q] * scale (+ zero), one 32-code chunk (16 bytes) at a time: the two runs of 16
// codes are looked up as in the matmul's chunk path, scaled and stored in TW.
template <typename TW>
void dequantize_impl(const uint8_t* packed, const f16_t* scales, const f16_t* zeros, const float* lut_p,
                     TW* w, int64_t n, int64_t k, int group, int num_threads) {
  const int64_t groups = k / group, ps = k / 2;
  const vfloat lut = loadf(lut_p);
  parallel_rows(n, 1, n * k, num_threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = packed + r * ps;
      TW* out = w + r * k;
      for (int64_t k0 = 0; k0 < k; k0 += 32) {
        const int64_t g = r * groups + k0 / group;
        const float s = to_float(scales[g]), z = zeros ? to_float(zeros[g]) : 0.f;
        vbyte b;
        std::memcpy(&b, row + k0 / 2, sizeof(b));
        const vfloat lo = lookup(lut, b & 0xF) * s + z, hi = lookup(lut, b >> 4) * s + z;
        if constexpr (std::is_same_v<TW, float>) {
          std::memcpy(out + k0, &lo, sizeof(lo));
          std::memcpy(out + k0 + 16, &hi, sizeof(hi));
        } else {
          for (int i = 0; i < 16; ++i) {
            out[k0 + i] = from_float<TW>(lo[i]);
            out[k0 + 16 + i] = from_float<TW>(hi[i]);
          }
        }
      }
    }
  });
}

}  // namespace

void int4_dequantize(const uint8_t* packed, const void* scales, const void* zeros, const float* lut, void* w,
                     int64_t n, int64_t k, int group, int w_dtype, int num_threads) {
  LLAMA_KERNELS_CHECK(n >= 0 && k > 0 && k % 32 == 0, "qw: expected in_features a positive multiple of 32, got " << k);
  LLAMA_KERNELS_CHECK(group == 32 || group == 64 || group == 128, "group_size: expected 32, 64 or 128, got " << group);
  LLAMA_KERNELS_CHECK(k % group == 0, "qw: in_features " << k << " is not a multiple of group_size " << group);
  const auto* s = static_cast<const f16_t*>(scales);
  const auto* z = static_cast<const f16_t*>(zeros);
  switch (to_dtype(w_dtype, "dtype")) {
    case DType::F32: return dequantize_impl(packed, s, z, lut, static_cast<float*>(w), n, k, group, num_threads);
    case DType::F16: return dequantize_impl(packed, s, z, lut, static_cast<f16_t*>(w), n, k, group, num_threads);
    case DType::BF16: return dequantize_impl(packed, s, z, lut, static_cast<bf16_t*>(w), n, k, group, num_threads);
  }
}

namespace {

// The checks both entries make of the weights they are given.
void check_parts(const Int4Parts& parts, int64_t k, int group) {
  LLAMA_KERNELS_CHECK(!parts.n.empty() && parts.packed.size() == parts.n.size() && parts.scales.size() == parts.n.size() &&
                    parts.zeros.size() == parts.n.size() && parts.y.size() == parts.n.size(),
                "qw: expected one or more weights, each with packed codes, scales, zeros and an output");
  for (int64_t n : parts.n) LLAMA_KERNELS_CHECK(n > 0, "qw: expected positive out_features, got " << n);
  LLAMA_KERNELS_CHECK(group == 32 || group == 64 || group == 128, "group_size: expected 32, 64 or 128, got " << group);
  LLAMA_KERNELS_CHECK(k % group == 0, "qw: in_features " << k << " is not a multiple of group_size " << group);
}

}  // namespace

void int4_matmul(const void* x, const Int4Parts& parts, const float* lut, int64_t m, int64_t k, int group,
                 int64_t x_stride, int64_t y_stride, int x_dtype, int num_threads) {
  LLAMA_KERNELS_CHECK(m >= 0 && k > 0, "x, qw: expected positive sizes, got m=" << m << " k=" << k);
  check_parts(parts, k, group);
  with_float_type(x_dtype, "x", [&](auto* xt) {
    using TX = std::remove_pointer_t<decltype(xt)>;
    impl(static_cast<const TX*>(x), parts, lut, m, k, group, x_stride, y_stride, num_threads);
  });
}

void int4_matmul_q8_gemm_rows(int64_t* rows) { *rows = kQ8GemmRows; }

void int4_matmul_q8(const void* x, const Int4Parts& parts, const float* lut, int64_t m, int64_t k, int group,
                    int64_t x_stride, int64_t y_stride, int x_dtype, int num_threads) {
  LLAMA_KERNELS_CHECK(m >= 0 && k > 0 && k % 32 == 0, "x, qw: expected positive sizes and in_features a multiple of 32, got m="
                                                          << m << " k=" << k);
  check_parts(parts, k, group);
  for (int q = 0; q < 16; ++q)
    LLAMA_KERNELS_CHECK(lut[q] == static_cast<float>(q - 8),
                        "lut: int8 activations take the int4 table (code - 8) only, not NF4's code book");
  with_float_type(x_dtype, "x", [&](auto* xt) {
    using TX = std::remove_pointer_t<decltype(xt)>;
    impl_q8(static_cast<const TX*>(x), parts, lut, m, k, group, x_stride, y_stride, num_threads);
  });
}

}  // namespace LLAMA_KERNELS_ISA
}  // namespace cpu
}  // namespace llama_kernels
