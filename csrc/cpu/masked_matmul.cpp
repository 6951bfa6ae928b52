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

}  // namespace LLAMA_KERNELS_ISA
}  // namespace cpu
}  // namespace llama_kernels
