// y = x @ W^T (+ bias) for a few rows of x (decode-sized M), streaming W once.
//
// W is (N, K) row-major and is read exactly once per call: each weight row (or block of rows)
// is multiplied into every row of x (up to kMaxM at a time) while it is in registers/L1, so the
// call runs at memory bandwidth (the two walks: see stream_rows). linear_argmax runs the same walk
// for greedy decoding's head and keeps only each row of x's largest logit and its index. The
// vector code uses GCC vector extensions; this file is compiled once per instruction set (see
// CMakeLists.txt), giving SSE, AVX2 or AVX-512 code from one source.
#include <algorithm>
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

// Register blocking follows the register file (the dot products run in nfloat, simd.h):
// AVX-512 has 32 vector registers, for 16 accumulators (4 rows of x by 4 weight rows) beside the
// weight vectors; AVX2 and SSE have 16, for 8 (4 rows of x by 2 weight rows).
#if defined(__AVX512F__)
constexpr int kRowBlock = 4;  // weight rows per inner block
constexpr int kAccumulators = 16;
#else
constexpr int kRowBlock = 2;
constexpr int kAccumulators = 8;
#endif
constexpr int kMaxM = 4;  // rows of x per pass

// Two ways through the weights (measured on a 2-core AVX-512 VM, bench/suites/linear.py):
// * one row at a time, front to back (dot_row): W's rows are contiguous, so a thread's rows form
//   one linear stream that the hardware prefetchers follow. Taken when the rows of x are few and
//   short enough to stay in L1 beside the stream (stream_rows): 1.7-1.9x the blocked walk at one
//   row of x, 1.3-1.7x at four rows of K = 512.
// * blocks of kRowBlock rows side by side (dot_block), each vector of x reused for the block's
//   rows: better for more or longer rows of x, where the row-at-a-time walk re-reads x from L2.
//   Interleaving the rows restarts several short streams at every block (2 KB each at K = 512),
//   which the hardware prefetchers pick up late: a software prefetch (non-temporal: W is read
//   once) of the rows kPrefetchBytes ahead gains 10-20% there.
// The two round differently, so the choice depends only on (m, k): linear_argmax makes the same
// logits as linear for the same call.
constexpr int64_t kStreamRowsXBytes = 16384;
constexpr int64_t kPrefetchBytes = 8192;

inline bool stream_rows(int64_t m, int64_t k) {
  return m == 1 || (m <= kMaxM && m * k * int64_t(sizeof(float)) <= kStreamRowsXBytes);
}

// out[m][r] = dot(x[m], w[r]) for RB weight rows and MB rows of x (fp32, contiguous, length k).
// `ahead` is the element offset of the weights to prefetch (0: none). Each row's sum is the same
// whatever RB is (lanes in column order, then hsum, then the tail), so a row's result does not
// depend on how rows are blocked or split among threads.
template <int RB, int MB, bool PREFETCH = false, typename TW>
inline void dot_block(const float* const* xs, const TW* w, int64_t w_stride, int64_t k, float out[MB][RB],
                      int64_t ahead = 0) {
  nfloat acc[MB][RB];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = nfloat{};
  int64_t c = 0;
  for (; c + kN <= k; c += kN) {
    nfloat wv[RB];
    for (int r = 0; r < RB; ++r) wv[r] = load_n(w + r * w_stride + c);
    if (PREFETCH) {
      // One prefetch per 64-byte line of each row.
      if (((c * int64_t(sizeof(TW))) & 63) == 0)
        for (int r = 0; r < RB; ++r) __builtin_prefetch(w + ahead + r * w_stride + c, 0, 0);
    }
    for (int m = 0; m < MB; ++m) {
      const nfloat xv = load_n(xs[m] + c);
      for (int r = 0; r < RB; ++r) acc[m][r] += xv * wv[r];
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) {
      float s = hsum_n(acc[m][r]);
      for (int64_t t = c; t < k; ++t) s += xs[m][t] * to_float(w[r * w_stride + t]);
      out[m][r] = s;
    }
}

// out[m] = dot(x[m], w) for one weight row, read front to back with 4 accumulators per row of x (2
// past kAccumulators): consecutive rows then form one linear stream, which the hardware
// prefetchers follow (rows interleaved in blocks restart several short streams at every block:
// slower at K = 512).
template <int MB, typename TW>
inline void dot_row(const float* const* xs, const TW* w, int64_t k, float out[MB]) {
  constexpr int U = MB * 4 <= kAccumulators ? 4 : 2;
  nfloat acc[MB][U];
  for (int m = 0; m < MB; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = nfloat{};
  int64_t c = 0;
  for (; c + U * kN <= k; c += U * kN) {
    nfloat wv[U];
    for (int u = 0; u < U; ++u) wv[u] = load_n(w + c + u * kN);
    for (int m = 0; m < MB; ++m)
      for (int u = 0; u < U; ++u) acc[m][u] += load_n(xs[m] + c + u * kN) * wv[u];
  }
  for (; c + kN <= k; c += kN) {
    const nfloat wv = load_n(w + c);
    for (int m = 0; m < MB; ++m) acc[m][0] += load_n(xs[m] + c) * wv;
  }
  for (int m = 0; m < MB; ++m) {
    for (int stride = 1; stride < U; stride *= 2)  // (a0 + a1) + (a2 + a3)
      for (int u = 0; u + stride < U; u += 2 * stride) acc[m][u] += acc[m][u + stride];
    float s = hsum_n(acc[m][0]);
    for (int64_t t = c; t < k; ++t) s += xs[m][t] * to_float(w[t]);
    out[m] = s;
  }
}

// Rows [n0, n1) of y for MB rows of x, row at a time (`stream`) or in blocks (see stream_rows).
template <int MB, typename TX, typename TW>
void rows_pass(const float* const* xs, TX* const* ys, const TW* w, const float* bias, int64_t n0,
               int64_t n1, int64_t k, bool stream) {
  int64_t n = n0;
  if (stream) {
    for (; n < n1; ++n) {
      float out[MB];
      dot_row<MB>(xs, w + n * k, k, out);
      for (int m = 0; m < MB; ++m) ys[m][n] = from_float<TX>(out[m] + (bias ? bias[n] : 0.f));
    }
    return;
  }
  // The rows a block or more ahead (at least kPrefetchBytes) are prefetched.
  const int64_t ahead = std::max<int64_t>(1, kPrefetchBytes / (kRowBlock * k * int64_t(sizeof(TW)))) * kRowBlock * k;
  for (; n + kRowBlock <= n1; n += kRowBlock) {
    float out[MB][kRowBlock];
    dot_block<kRowBlock, MB, true>(xs, w + n * k, k, k, out, ahead);
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < kRowBlock; ++r)
        ys[m][n + r] = from_float<TX>(out[m][r] + (bias ? bias[n + r] : 0.f));
  }
  for (; n < n1; ++n) {
    float out[MB][1];
    dot_block<1, MB>(xs, w + n * k, k, k, out);
    for (int m = 0; m < MB; ++m) ys[m][n] = from_float<TX>(out[m][0] + (bias ? bias[n] : 0.f));
  }
}

// rows_pass for mb (1 <= mb <= MB) rows of x.
template <int MB, typename TX, typename TW>
void rows_pass_some(int mb, const float* const* xs, TX* const* ys, const TW* w, const float* bias, int64_t n0,
                    int64_t n1, int64_t k, bool stream) {
  if constexpr (MB > 1) {
    if (mb < MB) return rows_pass_some<MB - 1>(mb, xs, ys, w, bias, n0, n1, k, stream);
  }
  rows_pass<MB>(xs, ys, w, bias, n0, n1, k, stream);
}

// All rows of x against weight rows [n0, n1): the weights are walked in tiles small enough to
// stay in L2 while every group of up to kMaxM rows of x passes over them, so W streams once.
template <typename TX, typename TW>
void tile_pass(const float* xf, TX* y, const TW* w, const float* bias, int64_t m, int64_t n0,
               int64_t n1, int64_t k, int64_t y_stride) {
  const int64_t tile = std::max<int64_t>(kRowBlock, (int64_t{1} << 17) / (k * sizeof(TW)) / kRowBlock * kRowBlock);
  const bool stream = stream_rows(m, k);
  for (int64_t t0 = n0; t0 < n1; t0 += tile) {
    const int64_t t1 = std::min(n1, t0 + tile);
    for (int64_t i = 0; i < m; i += kMaxM) {
      const float* xs[kMaxM];
      TX* ys[kMaxM];
      const int mb = static_cast<int>(std::min<int64_t>(kMaxM, m - i));
      for (int j = 0; j < mb; ++j) {
        xs[j] = xf + (i + j) * k;
        ys[j] = y + (i + j) * y_stride;
      }
      rows_pass_some<kMaxM>(mb, xs, ys, w, bias, t0, t1, k, stream);
    }
  }
}

template <typename TX, typename TW>
void linear_impl(const TX* x, const LinearParts& parts, int bias_dtype, int64_t m, int64_t k, int64_t x_stride,
                 int64_t y_stride, int num_threads) {
  // x rows and the biases in fp32, converted once.
  std::vector<float> xf(static_cast<size_t>(m) * k);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < k; ++c) xf[i * k + c] = to_float(x[i * x_stride + c]);
  std::vector<std::vector<float>> bf(parts.n.size());
  for (size_t p = 0; p < parts.n.size(); ++p) {
    const void* bias = parts.bias[p];
    if (!bias) continue;
    bf[p].resize(parts.n[p]);
    for (int64_t j = 0; j < parts.n[p]; ++j) {
      switch (to_dtype(bias_dtype, "bias")) {
        case DType::F32: bf[p][j] = static_cast<const float*>(bias)[j]; break;
        case DType::F16: bf[p][j] = to_float(static_cast<const f16_t*>(bias)[j]); break;
        case DType::BF16: bf[p][j] = to_float(static_cast<const bf16_t*>(bias)[j]); break;
      }
    }
  }
  // The parts' weight rows, stacked, are split into contiguous 4-row-aligned ranges, one per thread.
  parallel_parts(parts.n, kRowBlock, k, num_threads, [&](size_t p, int64_t n0, int64_t n1) {
    tile_pass(xf.data(), static_cast<TX*>(parts.y[p]), static_cast<const TW*>(parts.w[p]),
              parts.bias[p] ? bf[p].data() : nullptr, m, n0, n1, k, y_stride);
  });
}

// Whether logit v replaces the best so far: larger, or the first NaN (torch.argmax's order: NaN
// is the maximum, and the first of equal maxima wins).
inline bool beats(float v, float best) { return v > best || (v != v && best == best); }

// A logit as linear writes it in x's dtype, back in fp32 (the identity for fp32).
template <typename TX>
inline float round_to(float v) {
  if constexpr (std::is_same_v<TX, float>) return v;
  else return to_float(from_float<TX>(v));
}

// index[i] = argmax_n (x[i] @ w[n]) for the m rows of x, with the logits of linear_impl (the same
// dot_row / dot_block per row, rounded to x's dtype) made one tile at a time in a buffer that stays in L1/L2.
template <typename TX, typename TW>
void linear_argmax_impl(const TX* x, const TW* w, int64_t m, int64_t n, int64_t k, int64_t x_stride,
                        int64_t* index, float* value, int num_threads) {
  std::vector<float> xf(static_cast<size_t>(m) * k);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < k; ++c) xf[i * k + c] = to_float(x[i * x_stride + c]);
  const int nt = threads_for(n * k, (n + kRowBlock - 1) / kRowBlock, num_threads);
  // Per thread and row of x: the best logit and its index (-1: that thread had no rows).
  std::vector<float> best(static_cast<size_t>(nt) * m, 0.f);
  std::vector<int64_t> where(static_cast<size_t>(nt) * m, -1);
  parallel_rows(n, kRowBlock, n * k, num_threads, [&](int64_t n0, int64_t n1) {
#ifdef _OPENMP
    const int t = omp_get_thread_num();
#else
    const int t = 0;
#endif
    constexpr int64_t kTile = 256;
    const bool stream = stream_rows(m, k);
    float buf[kMaxM][kTile];
    for (int64_t t0 = n0; t0 < n1; t0 += kTile) {
      const int64_t t1 = std::min(n1, t0 + kTile);
      for (int64_t i = 0; i < m; i += kMaxM) {
        const float* xs[kMaxM];
        float* ys[kMaxM];
        const int mb = static_cast<int>(std::min<int64_t>(kMaxM, m - i));
        for (int j = 0; j < mb; ++j) {
          xs[j] = xf.data() + (i + j) * k;
          ys[j] = buf[j];
        }
        const TW* wt = w + t0 * k;
        rows_pass_some<kMaxM>(mb, xs, ys, wt, static_cast<const float*>(nullptr), 0, t1 - t0, k, stream);
        for (int j = 0; j < mb; ++j) {
          float& b = best[t * m + i + j];
          int64_t& at = where[t * m + i + j];
          for (int64_t r = 0; r < t1 - t0; ++r) {
            const float v = round_to<TX>(buf[j][r]);
            if (at < 0 || beats(v, b)) {
              b = v;
              at = t0 + r;
            }
          }
        }
      }
    }
  });
  // Threads own increasing row ranges: taking a later thread's best only when it beats keeps the
  // first index among equal maxima.
  for (int64_t i = 0; i < m; ++i) {
    float b = 0.f;
    int64_t at = -1;
    for (int t = 0; t < nt; ++t) {
      const int64_t a = where[t * m + i];
      if (a >= 0 && (at < 0 || beats(best[t * m + i], b))) {
        b = best[t * m + i];
        at = a;
      }
    }
    index[i] = at;
    if (value) value[i] = b;
  }
}

}  // namespace

void linear(const void* x, const LinearParts& parts, int64_t m, int64_t k, int64_t x_stride, int64_t y_stride,
            int x_dtype, int w_dtype, int bias_dtype, int num_threads) {
  LLAMA_KERNELS_CHECK(m >= 0 && k > 0, "x, weight: expected positive sizes, got m=" << m << " k=" << k);
  LLAMA_KERNELS_CHECK(!parts.n.empty() && parts.w.size() == parts.n.size() && parts.bias.size() == parts.n.size() &&
                    parts.y.size() == parts.n.size(),
                "weight: expected one or more weights, each with a bias (or none) and an output");
  for (int64_t n : parts.n) LLAMA_KERNELS_CHECK(n > 0, "weight: expected positive out_features, got " << n);
  with_float_type(x_dtype, "x", [&](auto* xt) {
    with_float_type(w_dtype, "weight", [&](auto* wt) {
      using TX = std::remove_pointer_t<decltype(xt)>;
      using TW = std::remove_pointer_t<decltype(wt)>;
      linear_impl<TX, TW>(static_cast<const TX*>(x), parts, bias_dtype, m, k, x_stride, y_stride, num_threads);
    });
  });
}

void linear_argmax(const void* x, const void* w, int64_t m, int64_t n, int64_t k, int64_t x_stride, int x_dtype,
                   int w_dtype, int64_t* index, float* value, int num_threads) {
  LLAMA_KERNELS_CHECK(m >= 0 && n > 0 && k > 0,
                      "x, weight: expected positive sizes, got m=" << m << " n=" << n << " k=" << k);
  with_float_type(x_dtype, "x", [&](auto* xt) {
    with_float_type(w_dtype, "weight", [&](auto* wt) {
      using TX = std::remove_pointer_t<decltype(xt)>;
      using TW = std::remove_pointer_t<decltype(wt)>;
      linear_argmax_impl<TX, TW>(static_cast<const TX*>(x), static_cast<const TW*>(w), m, n, k, x_stride, index,
                                 value, num_threads);
    });
  });
}

}  // namespace LLAMA_KERNELS_ISA
}  // namespace cpu
}  // namespace llama_kernels
