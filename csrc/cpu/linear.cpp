// y = x @ W^T (+ bias) for a few rows of x (decode-sized M), streaming W once.
//
// W is (N, K) row-major and is read exactly once per call: a block of 4 weight rows is
// multiplied into every row of x (up to 4 at a time) while it is in registers/L1, so the call
// runs at memory bandwidth. The vector code uses GCC vector extensions; this file is compiled
// once per instruction set (see CMakeLists.txt), giving SSE, AVX2 or AVX-512 code from one source.
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

typedef uint32_t vuint __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef uint16_t vhalfbits __attribute__((vector_size(kLanes * sizeof(uint16_t))));

constexpr int kRowBlock = 4;  // weight rows per inner block
constexpr int kMaxM = 4;      // rows of x per pass

inline vfloat load(const float* p) { return loadf(p); }

inline vfloat load(const bf16_t* p) {
  vhalfbits h;
  std::memcpy(&h, p, sizeof(h));
  vuint u = __builtin_convertvector(h, vuint) << 16;
  vfloat v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

inline vfloat load(const f16_t* p) {
#if defined(__FLT16_MAX__)
  typedef _Float16 vhalf __attribute__((vector_size(kLanes * sizeof(_Float16))));
  vhalf h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, vfloat);
#else
  vfloat v;
  for (int i = 0; i < kLanes; ++i) v[i] = to_float(p[i]);
  return v;
#endif
}

// out[m][r] = dot(x[m], w[r]) for RB weight rows and MB rows of x (fp32, contiguous, length k).
template <int RB, int MB, typename TW>
inline void dot_block(const float* const* xs, const TW* w, int64_t w_stride, int64_t k, float out[MB][RB]) {
  vfloat acc[MB][RB];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) acc[m][r] = vfloat{};
  int64_t c = 0;
  for (; c + kLanes <= k; c += kLanes) {
    vfloat wv[RB];
    for (int r = 0; r < RB; ++r) wv[r] = load(w + r * w_stride + c);
    for (int m = 0; m < MB; ++m) {
      const vfloat xv = load(xs[m] + c);
      for (int r = 0; r < RB; ++r) acc[m][r] += xv * wv[r];
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < RB; ++r) {
      float s = hsum(acc[m][r]);
      for (int64_t t = c; t < k; ++t) s += xs[m][t] * to_float(w[r * w_stride + t]);
      out[m][r] = s;
    }
}

// Rows [n0, n1) of y for MB rows of x.
template <int MB, typename TX, typename TW>
void rows_pass(const float* const* xs, TX* const* ys, const TW* w, const float* bias, int64_t n0,
               int64_t n1, int64_t k) {
  int64_t n = n0;
  for (; n + kRowBlock <= n1; n += kRowBlock) {
    float out[MB][kRowBlock];
    dot_block<kRowBlock, MB>(xs, w + n * k, k, k, out);
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

// All rows of x against weight rows [n0, n1): the weights are walked in tiles small enough to
// stay in L2 while every group of up to kMaxM rows of x passes over them, so W streams once.
template <typename TX, typename TW>
void tile_pass(const float* xf, TX* y, const TW* w, const float* bias, int64_t m, int64_t n0,
               int64_t n1, int64_t k, int64_t y_stride) {
  const int64_t tile = std::max<int64_t>(kRowBlock, (int64_t{1} << 17) / (k * sizeof(TW)) / kRowBlock * kRowBlock);
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
      switch (mb) {
        case 1: rows_pass<1>(xs, ys, w, bias, t0, t1, k); break;
        case 2: rows_pass<2>(xs, ys, w, bias, t0, t1, k); break;
        case 3: rows_pass<3>(xs, ys, w, bias, t0, t1, k); break;
        default: rows_pass<4>(xs, ys, w, bias, t0, t1, k); break;
      }
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

}  // namespace

void linear(const void* x, const LinearParts& parts, int64_t m, int64_t k, int64_t x_stride, int64_t y_stride,
            int x_dtype, int w_dtype, int bias_dtype, int num_threads) {
  LLAMA_KERNELS_CHECK(m >= 0 && k > 0, "x, weight: expected positive sizes, got m=" << m << " k=" << k);
  LLAMA_KERNELS_CHECK(!parts.n.empty() && parts.w.size() == parts.n.size() && parts.bias.size() == parts.n.size() &&
                    parts.y.size() == parts.n.size(),
                "weight: expected one or more weights, each with a bias (or none) and an output");
  for (int64_t n : parts.n) LLAMA_KERNELS_CHECK(n > 0, "weight: expected positive out_features, got " << n);
  auto with_w = [&](auto* xt) {
    using TX = std::remove_pointer_t<decltype(xt)>;
    auto run = [&](auto* wt) {
      using TW = std::remove_pointer_t<decltype(wt)>;
      linear_impl<TX, TW>(static_cast<const TX*>(x), parts, bias_dtype, m, k, x_stride, y_stride, num_threads);
    };
    switch (to_dtype(w_dtype, "weight")) {
      case DType::F32: return run(static_cast<float*>(nullptr));
      case DType::F16: return run(static_cast<f16_t*>(nullptr));
      case DType::BF16: return run(static_cast<bf16_t*>(nullptr));
    }
  };
  switch (to_dtype(x_dtype, "x")) {
    case DType::F32: return with_w(static_cast<float*>(nullptr));
    case DType::F16: return with_w(static_cast<f16_t*>(nullptr));
    case DType::BF16: return with_w(static_cast<bf16_t*>(nullptr));
  }
}

}  // namespace LLAMA_KERNELS_ISA
}  // namespace cpu
}  // namespace llama_kernels
