// RMSNorm on the CPU: y = x * rsqrt(mean(x^2) + eps) * w, fp32 math for any storage dtype.
// Rows are split across OpenMP threads; the inner loops are written to vectorise for the
// instruction set this file is compiled for (LLAMA_KERNELS_ISA).
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/kernels_cpu.h"
#include "cpu/simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace llama_kernels {
namespace cpu {
namespace LLAMA_KERNELS_ISA {
namespace {

// With h, s = x + h is rounded to TX, written, and normalised: the same numbers as adding first.
template <typename TX, typename TW>
void fwd_impl(const TX* x, const TX* h, const TW* w, TX* y, TX* s, float* rstd, int64_t rows,
              int64_t cols, int64_t x_stride, int64_t h_stride, int64_t y_stride,
              int64_t s_stride, float eps, int num_threads) {
  const int nt = threads_for(rows * cols, rows, num_threads);
  (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const TX* xr = x + r * x_stride;
    TX* yr = y + r * y_stride;
    float ss = 0.f;
    bool summed = false;
    if (h) {  // the sum, written once, replaces x as the row to normalise
      const TX* hr = h + r * h_stride;
      TX* sr = s + r * s_stride;
      if constexpr (std::is_same_v<TX, float>) {  // fp32: sum and square in the same pass
#pragma omp simd reduction(+ : ss)
        for (int64_t c = 0; c < cols; ++c) {
          const float v = xr[c] + hr[c];
          sr[c] = v;
          ss += v * v;
        }
        summed = true;
      } else {  // 16-bit: the rounding loop vectorises on its own, not inside the reduction
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) sr[c] = from_float<TX>(to_float(xr[c]) + to_float(hr[c]));
      }
      xr = sr;
    }
    if (!summed) {
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < cols; ++c) {
        float v = to_float(xr[c]);
        ss += v * v;
      }
    }
    float rs = 1.f / std::sqrt(ss / static_cast<float>(cols) + eps);
    if (rstd) rstd[r] = rs;  // null: inference, no backward to feed
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) yr[c] = from_float<TX>(to_float(xr[c]) * rs * to_float(w[c]));
  }
}

// dx = rstd * (dy*w - xhat * mean(dy*w*xhat)) [+ ds],  dw = sum_rows(dy * xhat),  xhat = x * rstd.
// ds (or null) is a gradient that reached x directly: the residual stream's, when x is the sum
// of a fused residual add.
template <typename TX, typename TW>
void bwd_impl(const TX* dy, const TX* ds, const TX* x, const TW* w, const float* rstd, TX* dx,
              TW* dw, int64_t rows, int64_t cols, int64_t dy_stride, int64_t ds_stride,
              int64_t x_stride, int64_t dx_stride, int num_threads) {
#ifdef _OPENMP
  const int nt = threads_for(rows * cols, rows, num_threads);
#else
  const int nt = 1;
#endif
  std::vector<float> partial(static_cast<size_t>(nt) * cols, 0.f);
  std::vector<float> wf(cols);
  for (int64_t c = 0; c < cols; ++c) wf[c] = to_float(w[c]);

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#ifdef _OPENMP
    const int t = omp_get_thread_num();
#else
    const int t = 0;
#endif
    float* acc = partial.data() + static_cast<size_t>(t) * cols;
    const float* wp = wf.data();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const TX* dyr = dy + r * dy_stride;
      const TX* xr = x + r * x_stride;
      TX* dxr = dx + r * dx_stride;
      const float rs = rstd[r];
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t c = 0; c < cols; ++c) {
        float g = to_float(dyr[c]);
        float xh = to_float(xr[c]) * rs;
        dot += g * wp[c] * xh;
        acc[c] += g * xh;
      }
      const float mean = dot / static_cast<float>(cols);
      if (ds) {
        const TX* dsr = ds + r * ds_stride;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
          float xh = to_float(xr[c]) * rs;
          dxr[c] = from_float<TX>(rs * (to_float(dyr[c]) * wp[c] - xh * mean) + to_float(dsr[c]));
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
          float xh = to_float(xr[c]) * rs;
          dxr[c] = from_float<TX>(rs * (to_float(dyr[c]) * wp[c] - xh * mean));
        }
      }
    }
  }
  for (int64_t c = 0; c < cols; ++c) {
    float s = 0.f;
    for (int t = 0; t < nt; ++t) s += partial[static_cast<size_t>(t) * cols + c];
    dw[c] = from_float<TW>(s);
  }
}

// Calls fn with typed null pointers selecting the (x dtype, w dtype) instantiation.
template <typename Fn>
void dispatch_dtypes(int x_dtype, int w_dtype, Fn&& fn) {
  auto with_w = [&](auto xtag) {
    switch (to_dtype(w_dtype, "weight")) {
      case DType::F32: return fn(xtag, static_cast<float*>(nullptr));
      case DType::F16: return fn(xtag, static_cast<f16_t*>(nullptr));
      case DType::BF16: return fn(xtag, static_cast<bf16_t*>(nullptr));
    }
  };
  switch (to_dtype(x_dtype, "x")) {
    case DType::F32: return with_w(static_cast<float*>(nullptr));
    case DType::F16: return with_w(static_cast<f16_t*>(nullptr));
    case DType::BF16: return with_w(static_cast<bf16_t*>(nullptr));
  }
}

}  // namespace

void rms_norm_fwd(const void* x, const void* h, const void* w, void* y, void* s, float* rstd,
                  int64_t rows, int64_t cols, int64_t x_stride, int64_t h_stride, int64_t y_stride,
                  int64_t s_stride, int x_dtype, int w_dtype, float eps, int num_threads) {
  dispatch_dtypes(x_dtype, w_dtype, [&](auto* xt, auto* wt) {
    using TX = std::remove_pointer_t<decltype(xt)>;
    using TW = std::remove_pointer_t<decltype(wt)>;
    fwd_impl<TX, TW>(static_cast<const TX*>(x), static_cast<const TX*>(h), static_cast<const TW*>(w),
                     static_cast<TX*>(y), static_cast<TX*>(s), rstd, rows, cols, x_stride,
                     h_stride, y_stride, s_stride, eps, num_threads);
  });
}

void rms_norm_bwd(const void* dy, const void* ds, const void* x, const void* w, const float* rstd,
                  void* dx, void* dw, int64_t rows, int64_t cols, int64_t dy_stride,
                  int64_t ds_stride, int64_t x_stride, int64_t dx_stride, int x_dtype, int w_dtype,
                  int num_threads) {
  dispatch_dtypes(x_dtype, w_dtype, [&](auto* xt, auto* wt) {
    using TX = std::remove_pointer_t<decltype(xt)>;
    using TW = std::remove_pointer_t<decltype(wt)>;
    bwd_impl<TX, TW>(static_cast<const TX*>(dy), static_cast<const TX*>(ds),
                     static_cast<const TX*>(x), static_cast<const TW*>(w), rstd,
                     static_cast<TX*>(dx), static_cast<TW*>(dw), rows, cols, dy_stride, ds_stride,
                     x_stride, dx_stride, num_threads);
  });
}

}  // namespace LLAMA_KERNELS_ISA
}  // namespace cpu
}  // namespace llama_kernels
