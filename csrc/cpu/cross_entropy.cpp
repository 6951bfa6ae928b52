// Cross-entropy over rows of fp32 logits, and its gradient written over the logits in place: the
// per-chunk step of linear_cross_entropy (llama_kernels/ops/cross_entropy.py), which never holds
// more than one chunk of (tokens x vocab) logits.
//
// Per row, with lse = log sum_j e^{x_j}, target t, smoothing eps over V classes and z-loss weight z:
//   loss = lse - (1 - eps) x_t - (eps / V) sum_j x_j + z lse^2      (0 for an ignored row)
//   dx_j = scale * (softmax_j (1 + 2 z lse) - eps / V - (1 - eps) [j = t])   (0 when ignored)
// Three passes over a row (max, sum of exponentials and of logits, gradient); a row of a 32k
// vocabulary is 128 KB, so the later passes read it from cache. The gradient is e^{x_j - max} /
// sum, from the exponentials the second pass leaves in the row, not a second exponential. Vectors
// are the build's width (nfloat): 16-lane ones went through the stack on AVX2, at about 19 cycles
// per logit.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"
#include "cpu/kernels_cpu.h"
#include "cpu/simd.h"

namespace llama_kernels {
namespace cpu {
namespace LLAMA_KERNELS_ISA {
namespace {

inline float hmax(nfloat v) {
  float t[kN];
  std::memcpy(t, &v, sizeof(t));
  float m = t[0];
  for (int i = 1; i < kN; ++i) m = (t[i] > m || t[i] != t[i]) ? t[i] : m;  // NaN wins
  return m;
}

void row(float* x, int64_t v, int64_t target, int64_t ignore_index, float smoothing, float z_loss, float scale,
         bool write_grad, float* loss, float* lse_out) {
  if (target == ignore_index) {
    *loss = 0.f;
    if (lse_out) *lse_out = 0.f;
    if (write_grad) std::fill(x, x + v, 0.f);
    return;
  }
  nfloat vmax = nfloat{} - INFINITY;
  for (int64_t c = 0; c < v; c += kN) {
    const nfloat xv = load_n_part(x + c, std::min<int64_t>(kN, v - c), -INFINITY);
    vmax = (xv > vmax || xv != xv) ? xv : vmax;
  }
  const float m = hmax(vmax);
  // An all -inf row has no finite maximum; subtracting 0 leaves lse = -inf, as log(0) is.
  const float shift = std::isfinite(m) ? m : 0.f;
  const float xt = x[target];
  // The exponentials are summed and, when the gradient is wanted, kept in place of the logits:
  // softmax_j = e^{x_j - shift} / sum, one exponential per logit.
  nfloat vsum = nfloat{}, vx = nfloat{};
  for (int64_t c = 0; c < v; c += kN) {
    const int64_t n = std::min<int64_t>(kN, v - c);
    const nfloat xv = load_n_part(x + c, n, -INFINITY);
    const nfloat e = expv(xv - shift);
    vsum += e;
    if (smoothing != 0.f) vx += load_n_part(x + c, n, 0.f);
    if (write_grad) store_n_part(x + c, n, e);
  }
  const float sum = hsum_n(vsum), lse = shift + std::log(sum);
  float l = lse - (1.f - smoothing) * xt + z_loss * lse * lse;
  if (smoothing != 0.f) l -= smoothing / static_cast<float>(v) * hsum_n(vx);
  *loss = l;
  if (lse_out) *lse_out = lse;
  if (!write_grad) return;
  const float gain = scale * (1.f + 2.f * z_loss * lse) / sum, floor = scale * smoothing / static_cast<float>(v);
  for (int64_t c = 0; c < v; c += kN) {
    const int64_t n = std::min<int64_t>(kN, v - c);
    store_n_part(x + c, n, load_n_part(x + c, n, 0.f) * gain - floor);
  }
  x[target] -= scale * (1.f - smoothing);
}

}  // namespace

void cross_entropy_rows(float* logits, const int64_t* target, float* loss, float* lse, int64_t rows, int64_t v,
                        int64_t stride, int64_t ignore_index, float smoothing, float z_loss, float scale,
                        bool write_grad, int num_threads) {
  LLAMA_KERNELS_CHECK(rows >= 0 && v > 0, "logits: expected rows >= 0 and a positive vocabulary, got " << rows
                                                                                                   << " x " << v);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = target[r];
    LLAMA_KERNELS_CHECK(t == ignore_index || (t >= 0 && t < v),
                        "target: expected class indices in [0, " << v << ") or ignore_index " << ignore_index
                                                                 << ", got " << t << " at row " << r);
  }
  parallel_rows(rows, 1, rows * v, num_threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      row(logits + r * stride, v, target[r], ignore_index, smoothing, z_loss, scale, write_grad, loss + r,
          lse ? lse + r : nullptr);
    }
  });
}

}  // namespace LLAMA_KERNELS_ISA
}  // namespace cpu
}  // namespace llama_kernels
