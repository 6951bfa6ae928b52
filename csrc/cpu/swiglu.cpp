// SwiGLU on the CPU: y = silu(a) * b with silu(a) = a * sigmoid(a), and its backward
//   db = dy * silu(a),  da = dy * b * (s + silu(a) * (1 - s)),  s = sigmoid(a),
// in fp32 for any storage dtype. a and b are usually the two halves of one fused gate/up
// projection, so every tensor has its own row stride (last dims contiguous). The backward
// recomputes the sigmoid from a instead of keeping the forward's activations.
//
// The exponential is expv (cpu/simd.h), on vectors of the build's own width (nfloat): 16-lane
// vectors on AVX2 went through the stack, 4-6x slower.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common.h"
#include "cpu/kernels_cpu.h"
#include "cpu/simd.h"

namespace llama_kernels {
namespace cpu {
namespace LLAMA_KERNELS_ISA {
namespace {

inline nfloat sigmoid_n(nfloat a) { return 1.f / (1.f + expv(-a)); }

template <typename T>
void fwd_impl(const T* a, const T* b, T* y, int64_t rows, int64_t cols, int64_t a_stride, int64_t b_stride,
              int64_t y_stride, int num_threads) {
  parallel_rows(rows, 1, rows * cols, num_threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* ar = a + r * a_stride;
      const T* br = b + r * b_stride;
      T* yr = y + r * y_stride;
      for (int64_t c = 0; c < cols; c += kN) {
        const int64_t n = std::min<int64_t>(kN, cols - c);
        const nfloat av = load_n_part(ar + c, n);
        store_n_part(yr + c, n, av * sigmoid_n(av) * load_n_part(br + c, n));
      }
    }
  });
}

template <typename T>
void bwd_impl(const T* dy, const T* a, const T* b, T* da, T* db, int64_t rows, int64_t cols, int64_t dy_stride,
              int64_t a_stride, int64_t b_stride, int64_t da_stride, int64_t db_stride, int num_threads) {
  parallel_rows(rows, 1, rows * cols, num_threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* gr = dy + r * dy_stride;
      const T* ar = a + r * a_stride;
      const T* br = b + r * b_stride;
      T* dar = da + r * da_stride;
      T* dbr = db + r * db_stride;
      for (int64_t c = 0; c < cols; c += kN) {
        const int64_t n = std::min<int64_t>(kN, cols - c);
        const nfloat g = load_n_part(gr + c, n), av = load_n_part(ar + c, n), bv = load_n_part(br + c, n);
        const nfloat s = sigmoid_n(av), silu = av * s;
        store_n_part(dbr + c, n, g * silu);
        store_n_part(dar + c, n, g * bv * (s + silu * (1.f - s)));
      }
    }
  });
}

}  // namespace

void swiglu_fwd(const void* a, const void* b, void* y, int64_t rows, int64_t cols, int64_t a_stride,
                int64_t b_stride, int64_t y_stride, int dtype, int num_threads) {
  LLAMA_KERNELS_CHECK(rows >= 0 && cols >= 0, "a: expected non-negative sizes, got " << rows << " x " << cols);
  switch (to_dtype(dtype, "a")) {
    case DType::F32:
      return fwd_impl(static_cast<const float*>(a), static_cast<const float*>(b), static_cast<float*>(y), rows,
                      cols, a_stride, b_stride, y_stride, num_threads);
    case DType::F16:
      return fwd_impl(static_cast<const f16_t*>(a), static_cast<const f16_t*>(b), static_cast<f16_t*>(y), rows,
                      cols, a_stride, b_stride, y_stride, num_threads);
    case DType::BF16:
      return fwd_impl(static_cast<const bf16_t*>(a), static_cast<const bf16_t*>(b), static_cast<bf16_t*>(y), rows,
                      cols, a_stride, b_stride, y_stride, num_threads);
  }
}

void swiglu_bwd(const void* dy, const void* a, const void* b, void* da, void* db, int64_t rows, int64_t cols,
                int64_t dy_stride, int64_t a_stride, int64_t b_stride, int64_t da_stride, int64_t db_stride,
                int dtype, int num_threads) {
  LLAMA_KERNELS_CHECK(rows >= 0 && cols >= 0, "a: expected non-negative sizes, got " << rows << " x " << cols);
  switch (to_dtype(dtype, "a")) {
    case DType::F32:
      return bwd_impl(static_cast<const float*>(dy), static_cast<const float*>(a), static_cast<const float*>(b),
                      static_cast<float*>(da), static_cast<float*>(db), rows, cols, dy_stride, a_stride, b_stride,
                      da_stride, db_stride, num_threads);
    case DType::F16:
      return bwd_impl(static_cast<const f16_t*>(dy), static_cast<const f16_t*>(a), static_cast<const f16_t*>(b),
                      static_cast<f16_t*>(da), static_cast<f16_t*>(db), rows, cols, dy_stride, a_stride, b_stride,
                      da_stride, db_stride, num_threads);
    case DType::BF16:
      return bwd_impl(static_cast<const bf16_t*>(dy), static_cast<const bf16_t*>(a), static_cast<const bf16_t*>(b),
                      static_cast<bf16_t*>(da), static_cast<bf16_t*>(db), rows, cols, dy_stride, a_stride, b_stride,
                      da_stride, db_stride, num_threads);
  }
}

}  // namespace LLAMA_KERNELS_ISA
}  // namespace cpu
}  // namespace llama_kernels
