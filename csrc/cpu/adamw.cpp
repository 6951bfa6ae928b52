// AdamW on the CPU: one pass over every parameter of a step, fp32 master weights and moments.
//   p <- p (1 - lr wd)
//   m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
//   p <- p - (lr / c1) m / (sqrt(v) / sqrt(c2) + eps)
// with c1 = 1 - b1^t and c2 = 1 - b2^t (both 1 without bias correction): torch.optim.AdamW's
// update, in the same order. 1 - b1 and 1 - b2 come from the caller, rounded once from double
// (1 - float(0.999) would be 1.3e-5 off in relative terms). Each element is read and written once; the tensors' elements are
// split across threads together, so many small tensors cost one parallel region.
#include <cmath>
#include <cstdint>

#include "common.h"
#include "cpu/kernels_cpu.h"
#include "cpu/simd.h"

namespace llama_kernels {
namespace cpu {
namespace LLAMA_KERNELS_ISA {
namespace {

template <typename TG>
void update(float* p, float* m, float* v, const TG* g, int64_t n, float decay, float beta1, float beta2,
            float one_minus_beta1, float one_minus_beta2, float step_size, float inv_c2_sqrt, float eps) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gi = to_float(g[i]);
    const float mi = beta1 * m[i] + one_minus_beta1 * gi;
    const float vi = beta2 * v[i] + one_minus_beta2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay - step_size * mi / (std::sqrt(vi) * inv_c2_sqrt + eps);
  }
}

}  // namespace

void adamw_step(const AdamWParts& parts, int g_dtype, float lr, float beta1, float beta2, float one_minus_beta1,
                float one_minus_beta2, float eps, float weight_decay, float bias_correction1,
                float bias_correction2_sqrt, int num_threads) {
  const size_t count = parts.n.size();
  LLAMA_KERNELS_CHECK(parts.p.size() == count && parts.m.size() == count && parts.v.size() == count &&
                          parts.g.size() == count,
                      "params, grads, exp_avgs, exp_avg_sqs: expected lists of one length");
  LLAMA_KERNELS_CHECK(bias_correction1 > 0.f && bias_correction2_sqrt > 0.f,
                      "step: bias corrections must be positive, got " << bias_correction1 << " and "
                                                                      << bias_correction2_sqrt);
  const DType gt = to_dtype(g_dtype, "grads");
  const float decay = 1.f - lr * weight_decay, step_size = lr / bias_correction1;
  const float inv_c2_sqrt = 1.f / bias_correction2_sqrt;
  // Pieces of 4096 elements (16 KB of each stream) keep the split away from cache-line sharing.
  parallel_parts(parts.n, 4096, 1, num_threads, [&](size_t i, int64_t b, int64_t e) {
    float* p = parts.p[i] + b;
    float* m = parts.m[i] + b;
    float* v = parts.v[i] + b;
    switch (gt) {
      case DType::F32:
        update(p, m, v, static_cast<const float*>(parts.g[i]) + b, e - b, decay, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size,
               inv_c2_sqrt, eps);
        break;
      case DType::F16:
        update(p, m, v, static_cast<const f16_t*>(parts.g[i]) + b, e - b, decay, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size,
               inv_c2_sqrt, eps);
        break;
      default:
        update(p, m, v, static_cast<const bf16_t*>(parts.g[i]) + b, e - b, decay, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size,
               inv_c2_sqrt, eps);
        break;
    }
  });
}

}  // namespace LLAMA_KERNELS_ISA
}  // namespace cpu
}  // namespace llama_kernels
