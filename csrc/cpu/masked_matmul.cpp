// Masked matmul on the CPU: y = ((x * c) @ W^T + bias) * r, with a column mask c (K) and a row
// mask r (N), without forming W * mask. The caller passes the indices of the nonzero entries of
// each mask (rows: N' of them, cols: K'), found once per call; the kernel multiplies only those:
//
//   * x's active columns, scaled by c, are gathered once into an fp32 (M, K') buffer;
//   * the active weight rows are split across threads; each thread gathers a tile of them,
//     restricted to the active columns, into fp32 (skipped when every column is active and W is
//     fp32: the rows are then read in place), and multiplies every row of x into it;
//   * y's other entries (rows of W with r = 0) are written as exact zeros, bias included.
//
// So the work is M * N' * K' multiply-adds, that of the compact GEMM, for any mask pattern. Soft
// masks (nonzero values other than 1) multiply in. The output may be x's dtype or fp32 (the
// backward recomputes x*c @ W^T in fp32 through this kernel). Sums are fp32.
//
// That kernel is for few rows of x (decode): its register tiles do not match a blocked GEMM's
// cache blocking beyond a few dozen rows. For more rows the glue runs torch's GEMM on compact
// operands between three helpers here, each one pass with no torch op per step:
//   * masked_matmul_active: a mask's active indices and whether its active values are all 1 (a
//     hard mask, whose multiply can be skipped);
//   * masked_matmul_gather: the compact fp32 operands x[:, cols] * c[cols] and W[rows][:, cols];
//   * masked_matmul_scatter: y from the compact product, row mask and bias applied, exact zeros
//     on the pruned rows.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/kernels_cpu.h"
#include "cpu/simd.h"

namespace llama_kernels {
namespace cpu {
namespace LLAMA_KERNELS_ISA {
namespace {

constexpr int kRowBlock = 4;  // weight rows per inner block
constexpr int kMaxM = 4;      // rows of x per inner block

// out[m][r] = dot(xs[m], ws[r]) over k fp32 values.
template <int RB, int MB>
inline void dot_block(const float* const* xs, const float* const* ws, int64_t k, float out[MB][RB]) {
  vfloat acc[MB][RB];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = vfloat{};
  int64_t c = 0;
  for (; c + kLanes <= k; c += kLanes) {
    vfloat wv[RB];
    for (int r = 0; r < RB; ++r) wv[r] = loadf(ws[r] + c);
    for (int m = 0; m < MB; ++m) {
      const vfloat xv = loadf(xs[m] + c);
      for (int r = 0; r < RB; ++r) acc[m][r] += xv * wv[r];
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) {
      float s = hsum(acc[m][r]);
      for (int64_t t = c; t < k; ++t) s += xs[m][t] * ws[r][t];
      out[m][r] = s;
    }
}

struct Problem {
  const float* row_scale;
  const float* bias;  // may be null
  const int64_t* rows;
  int64_t m, kc, y_stride;
};

// Rows of x [i, i + MB) against the weight rows `ws` (fp32, kc each), which are the active rows
// [t0, t0 + count) of the index list.
template <int MB, typename TY>
void block_rows(const Problem& p, const float* xc, TY* y, const float* const* ws, int64_t t0, int64_t count,
                int64_t i) {
  const float* xs[MB];
  for (int j = 0; j < MB; ++j) xs[j] = xc + (i + j) * p.kc;
  auto emit = [&](int64_t t, int j, float v) {
    const int64_t row = p.rows[t];
    y[(i + j) * p.y_stride + row] = from_float<TY>((v + (p.bias ? p.bias[row] : 0.f)) * p.row_scale[row]);
  };
  int64_t q = 0;
  for (; q + kRowBlock <= count; q += kRowBlock) {
    float out[MB][kRowBlock];
    dot_block<kRowBlock, MB>(xs, ws + q, p.kc, out);
    for (int j = 0; j < MB; ++j)
      for (int r = 0; r < kRowBlock; ++r) emit(t0 + q + r, j, out[j][r]);
  }
  for (; q < count; ++q) {
    float out[MB][1];
    dot_block<1, MB>(xs, ws + q, p.kc, out);
    for (int j = 0; j < MB; ++j) emit(t0 + q, j, out[j][0]);
  }
}

template <typename T, typename TY>
void fwd_impl(const T* x, const T* w, const float* row_scale, const float* col_scale, const float* bias,
              const int64_t* rows, int64_t n_rows, const int64_t* cols, int64_t n_cols, TY* y, int64_t m, int64_t n,
              int64_t k, int64_t x_stride, int64_t w_stride, int64_t y_stride, int num_threads) {
  for (int64_t i = 0; i < m; ++i) std::memset(y + i * y_stride, 0, sizeof(TY) * n);  // +0.0 in every dtype
  if (m == 0 || n_rows == 0) return;
  const int64_t kc = n_cols;
  std::vector<float> xc(static_cast<size_t>(m) * std::max<int64_t>(kc, 1));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < kc; ++j) xc[i * kc + j] = to_float(x[i * x_stride + cols[j]]) * col_scale[cols[j]];
  const Problem p{row_scale, bias, rows, m, kc, y_stride};
  const bool in_place = std::is_same_v<T, float> && kc == k;  // W's rows need no gathering
  // Weight rows per tile: about 128 KiB of fp32, reused by every row of x while in L2.
  const int64_t tile = std::max<int64_t>(kRowBlock, (int64_t{1} << 15) / std::max<int64_t>(kc, 1) / kRowBlock * kRowBlock);
  parallel_rows(n_rows, kRowBlock, n_rows * std::max<int64_t>(kc, 1) * m, num_threads, [&](int64_t r0, int64_t r1) {
    std::vector<float> wc(in_place ? 0 : static_cast<size_t>(std::min(tile, r1 - r0)) * kc);
    std::vector<const float*> ws(static_cast<size_t>(std::min(tile, std::max<int64_t>(r1 - r0, 0))));
    for (int64_t t0 = r0; t0 < r1; t0 += tile) {
      const int64_t count = std::min(tile, r1 - t0);
      for (int64_t q = 0; q < count; ++q) {
        const T* wr = w + rows[t0 + q] * w_stride;
        if (in_place) {
          ws[q] = reinterpret_cast<const float*>(wr);
        } else {
          float* dst = wc.data() + q * kc;
          for (int64_t j = 0; j < kc; ++j) dst[j] = to_float(wr[cols[j]]);
          ws[q] = dst;
        }
      }
      for (int64_t i = 0; i < m; i += kMaxM) {
        switch (std::min<int64_t>(kMaxM, m - i)) {
          case 1: block_rows<1>(p, xc.data(), y, ws.data(), t0, count, i); break;
          case 2: block_rows<2>(p, xc.data(), y, ws.data(), t0, count, i); break;
          case 3: block_rows<3>(p, xc.data(), y, ws.data(), t0, count, i); break;
          default: block_rows<4>(p, xc.data(), y, ws.data(), t0, count, i); break;
        }
      }
    }
  });
}

}  // namespace

void masked_matmul_fwd(const void* x, const void* w, const float* row_scale, const float* col_scale,
                       const float* bias, const int64_t* rows, int64_t n_rows, const int64_t* cols, int64_t n_cols,
                       void* y, int64_t m, int64_t n, int64_t k, int64_t x_stride, int64_t w_stride,
                       int64_t y_stride, int dtype, bool y_fp32, int num_threads) {
  LLAMA_KERNELS_CHECK(m >= 0 && n >= 0 && k >= 0, "x, w: expected non-negative sizes, got m=" << m << " n=" << n
                                                                                               << " k=" << k);
  LLAMA_KERNELS_CHECK(n_rows >= 0 && n_rows <= n, "row_mask: expected at most " << n << " active rows, got " << n_rows);
  LLAMA_KERNELS_CHECK(n_cols >= 0 && n_cols <= k, "col_mask: expected at most " << k << " active columns, got "
                                                                                 << n_cols);
  auto run = [&](auto* xt) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(xt)>>;
    if (y_fp32) {
      fwd_impl(static_cast<const T*>(x), static_cast<const T*>(w), row_scale, col_scale, bias, rows, n_rows, cols,
               n_cols, static_cast<float*>(y), m, n, k, x_stride, w_stride, y_stride, num_threads);
    } else {
      fwd_impl(static_cast<const T*>(x), static_cast<const T*>(w), row_scale, col_scale, bias, rows, n_rows, cols,
               n_cols, static_cast<T*>(y), m, n, k, x_stride, w_stride, y_stride, num_threads);
    }
  };
  switch (to_dtype(dtype, "x")) {
    case DType::F32: return run(static_cast<float*>(nullptr));
    case DType::F16: return run(static_cast<f16_t*>(nullptr));
    case DType::BF16: return run(static_cast<bf16_t*>(nullptr));
  }
}

void masked_matmul_active(const float* mask, int64_t n, int64_t* idx, int64_t* count_out, bool* all_ones) {
  LLAMA_KERNELS_CHECK(n >= 0, "mask: expected a non-negative size, got " << n);
  int64_t count = 0;
  bool ones = true;
  for (int64_t j = 0; j < n; ++j) {
    const float v = mask[j];
    if (v != 0.f) {  // NaN counts as active, as torch.nonzero has it
      ones = ones && v == 1.f;
      idx[count++] = j;
    }
  }
  *count_out = count;
  *all_ones = ones;
}

namespace {

// Maximal runs of consecutive indices, as (first index, position in the list, length): whole
// heads pruned leave runs of head_dim, which copy as contiguous vectors instead of one index each.
struct Run {
  int64_t first, pos, len;
};

inline std::vector<Run> runs_of(const int64_t* idx, int64_t count) {
  std::vector<Run> runs;
  for (int64_t j = 0; j < count; ++j) {
    if (!runs.empty() && idx[j] == runs.back().first + runs.back().len) {
      ++runs.back().len;
    } else {
      runs.push_back({idx[j], j, 1});
    }
  }
  return runs;
}

constexpr int64_t kMinRunLength = 8;  // mean run length from which runs beat per-index loops

#if defined(__AVX512F__)
// Scattered indices (a random FFN mask) with AVX-512: one 16-bit mask per block of 16 columns;
// a block's active values are compressed out of (gather) or expanded into (scatter) one vector
// load or store, instead of one index each. Register forms with masked loads and stores: the
// memory forms of vcompressps/vexpandps are microcoded on some CPUs (AMD Zen 4).
inline std::vector<uint16_t> block_bits(const int64_t* idx, int64_t count, int64_t n) {
  std::vector<uint16_t> bits(static_cast<size_t>((n + 15) / 16), 0);
  for (int64_t t = 0; t < count; ++t) bits[idx[t] >> 4] |= static_cast<uint16_t>(1u << (idx[t] & 15));
  return bits;
}

inline __mmask16 lanes(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << count) - 1);
}
#endif

template <typename T>
void gather_impl(const T* src, int64_t src_stride, const int64_t* rows, int64_t n_rows, const int64_t* cols,
                 int64_t n_cols, const float* scale, float* dst, int64_t dst_stride, int num_threads) {
  std::vector<float> sc;  // the scale of each gathered column, compact
  if (scale) {
    sc.resize(static_cast<size_t>(n_cols));
    for (int64_t j = 0; j < n_cols; ++j) sc[j] = scale[cols ? cols[j] : j];
  }
  // No column list: one run of every column.
  const std::vector<Run> runs = cols ? runs_of(cols, n_cols) : std::vector<Run>{{0, 0, n_cols}};
  const bool by_run = !cols || static_cast<int64_t>(runs.size()) * kMinRunLength <= n_cols;
  const int64_t k_end = cols && n_cols ? cols[n_cols - 1] + 1 : 0;  // past the last active column
#if defined(__AVX512F__)
  const bool compress = !by_run && std::is_same_v<T, float>;
  const std::vector<uint16_t> bits = compress ? block_bits(cols, n_cols, k_end) : std::vector<uint16_t>{};
#else
  const bool compress = false;
#endif
  (void)k_end;
  const float* __restrict__ s_c = sc.data();
  parallel_rows(n_rows, 1, n_rows * n_cols, num_threads, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const T* __restrict__ s = src + (rows ? rows[i] : i) * src_stride;
      float* __restrict__ d = dst + i * dst_stride;
      if (by_run) {
        for (const Run& run : runs) {
          const T* __restrict__ a = s + run.first;
          float* __restrict__ o = d + run.pos;
          if (scale) {
            const float* __restrict__ f = s_c + run.pos;
            for (int64_t q = 0; q < run.len; ++q) o[q] = to_float(a[q]) * f[q];
          } else {
            for (int64_t q = 0; q < run.len; ++q) o[q] = to_float(a[q]);
          }
        }
      } else if (compress) {
#if defined(__AVX512F__)
        const float* sf = reinterpret_cast<const float*>(s);
        int64_t pos = 0;
        for (size_t b = 0; b < bits.size(); ++b) {
          const __mmask16 active = bits[b];
          if (!active) continue;
          const int64_t c0 = static_cast<int64_t>(b) * 16;
          const __mmask16 valid = lanes(k_end - c0);  // no load past the last active column
          __m512 v = _mm512_maskz_loadu_ps(valid, sf + c0);
          if (scale) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(valid, scale + c0));
          const int count = __builtin_popcount(active);
          _mm512_mask_storeu_ps(d + pos, lanes(count), _mm512_maskz_compress_ps(active, v));
          pos += count;
        }
#endif
      } else if (scale) {
        for (int64_t j = 0; j < n_cols; ++j) d[j] = to_float(s[cols[j]]) * s_c[j];
      } else {
        for (int64_t j = 0; j < n_cols; ++j) d[j] = to_float(s[cols[j]]);
      }
    }
  });
}

// y's rows: zeros, then each active entry (u * r + bias * r at its row of W): the row mask and
// bias gathered once into compact vectors, a row of y written while in L1; by runs of
// consecutive rows where they are long (whole heads).
template <typename TY>
void scatter_impl(const float* u, int64_t u_stride, const int64_t* rows, int64_t n_act, const float* bias,
                  const float* scale, TY* y, int64_t m, int64_t n, int64_t y_stride, int num_threads) {
  std::vector<float> s(static_cast<size_t>(n_act)), b(static_cast<size_t>(n_act));
  bool plain = true;
  for (int64_t t = 0; t < n_act; ++t) {
    s[t] = scale[rows[t]];
    b[t] = bias ? bias[rows[t]] * s[t] : 0.f;
    plain = plain && s[t] == 1.f && b[t] == 0.f;
  }
  const std::vector<Run> runs = runs_of(rows, n_act);
  const bool by_run = static_cast<int64_t>(runs.size()) * kMinRunLength <= n_act;
  const float* __restrict__ sp = s.data();
  const float* __restrict__ bp = b.data();
#if defined(__AVX512F__)
  const bool expand = !by_run && std::is_same_v<TY, float>;
  const std::vector<uint16_t> bits = expand ? block_bits(rows, n_act, n) : std::vector<uint16_t>{};
  std::vector<float> bias_full;  // bias * r over every row of W (the expanded lanes' addend)
  if (expand && !plain) {
    bias_full.assign(static_cast<size_t>(n), 0.f);
    for (int64_t t = 0; t < n_act; ++t) bias_full[rows[t]] = bp[t];
  }
#endif
  parallel_rows(m, 1, m * n, num_threads, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* __restrict__ ui = u + i * u_stride;
      TY* __restrict__ yi = y + i * y_stride;
#if defined(__AVX512F__)
      if (expand) {  // y's row written once, in order: each block expanded from the next u values
        float* yf = reinterpret_cast<float*>(yi);
        int64_t pos = 0;
        for (size_t blk = 0; blk < bits.size(); ++blk) {
          const int64_t c0 = static_cast<int64_t>(blk) * 16;
          const __mmask16 valid = lanes(n - c0), active = bits[blk];
          const int count = __builtin_popcount(active);
          __m512 v = _mm512_maskz_expand_ps(active, _mm512_maskz_loadu_ps(lanes(count), ui + pos));
          if (!plain)  // u * r + bias * r on the active lanes; exact zeros elsewhere (a NaN bias too)
            v = _mm512_maskz_fmadd_ps(active, v, _mm512_maskz_loadu_ps(valid, scale + c0),
                                      _mm512_maskz_loadu_ps(valid, bias_full.data() + c0));
          _mm512_mask_storeu_ps(yf + c0, valid, v);
          pos += count;
        }
        continue;
      }
#endif
      std::memset(static_cast<void*>(yi), 0, sizeof(TY) * n);  // +0.0 in every dtype
      if (by_run) {
        for (const Run& run : runs) {
          const float* __restrict__ a = ui + run.pos;
          const float* __restrict__ f = sp + run.pos;
          const float* __restrict__ g = bp + run.pos;
          TY* __restrict__ o = yi + run.first;
          for (int64_t q = 0; q < run.len; ++q) o[q] = from_float<TY>(a[q] * f[q] + g[q]);
        }
      } else if (plain) {
        for (int64_t t = 0; t < n_act; ++t) yi[rows[t]] = from_float<TY>(ui[t]);
      } else {
        for (int64_t t = 0; t < n_act; ++t) yi[rows[t]] = from_float<TY>(ui[t] * sp[t] + bp[t]);
      }
    }
  });
}

}  // namespace

void masked_matmul_gather(const void* src, int64_t src_stride, const int64_t* rows, int64_t n_rows,
                          const int64_t* cols, int64_t n_cols, const float* scale, float* dst, int64_t dst_stride,
                          int dtype, int num_threads) {
  LLAMA_KERNELS_CHECK(n_rows >= 0 && n_cols >= 0, "gather: expected non-negative sizes, got " << n_rows << " x "
                                                                                             << n_cols);
  switch (to_dtype(dtype, "x")) {
    case DType::F32:
      return gather_impl(static_cast<const float*>(src), src_stride, rows, n_rows, cols, n_cols, scale, dst,
                         dst_stride, num_threads);
    case DType::F16:
      return gather_impl(static_cast<const f16_t*>(src), src_stride, rows, n_rows, cols, n_cols, scale, dst,
                         dst_stride, num_threads);
    case DType::BF16:
      return gather_impl(static_cast<const bf16_t*>(src), src_stride, rows, n_rows, cols, n_cols, scale, dst,
                         dst_stride, num_threads);
  }
}

void masked_matmul_scatter(const float* u, int64_t u_stride, const int64_t* rows, int64_t n_act, const float* bias,
                           const float* scale, void* y, int64_t m, int64_t n, int64_t y_stride, int dtype,
                           int num_threads) {
  LLAMA_KERNELS_CHECK(m >= 0 && n >= 0 && n_act >= 0 && n_act <= n,
                      "scatter: expected 0 <= N' <= N, got m=" << m << " n=" << n << " N'=" << n_act);
  switch (to_dtype(dtype, "y")) {
    case DType::F32:
      return scatter_impl(u, u_stride, rows, n_act, bias, scale, static_cast<float*>(y), m, n, y_stride,
                          num_threads);
    case DType::F16:
      return scatter_impl(u, u_stride, rows, n_act, bias, scale, static_cast<f16_t*>(y), m, n, y_stride,
                          num_threads);
    case DType::BF16:
      return scatter_impl(u, u_stride, rows, n_act, bias, scale, static_cast<bf16_t*>(y), m, n, y_stride,
                          num_threads);
  }
}

}  // namespace LLAMA_KERNELS_ISA
}  // namespace cpu
}  // namespace llama_kernels
