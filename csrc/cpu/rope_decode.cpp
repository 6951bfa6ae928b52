// One decoding step of attention on the CPU, fused: RoPE on q and the new key at each sequence's
// own position L, the append of that key and value to slot L of the KV cache, and attention over
// slots 0..L. The same semantics as the CUDA and Triton decode kernels (llama_kernels/ops/rope_attention.py).
//
// Three phases in one parallel region. (1) Per (sequence, kv head): the append, and the group's
// rotated queries. (2) Per unit, a run of consecutive slots of one sequence (split-K, as in
// flash-decoding): every head's scores against the unit's keys, their softmax statistics and the
// weighted values. A slot's rows for all kv heads are contiguous in the (batch, slot, kv head,
// dim) cache, while one head's rows are a page apart, so reading slot by slot streams memory
// that the hardware prefetchers can follow. (3) Per (sequence, head): the units' partial results
// merged. fp32 math for every storage dtype.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu/kernels_cpu.h"
#include "cpu/simd.h"

namespace llama_kernels {
namespace cpu {
namespace LLAMA_KERNELS_ISA {
namespace {

// q . k over one head: the build's vector width at a time (nfloat), then a tree sum.
template <typename T>
inline float dot(const float* r, const T* k, int64_t n) {
  nfloat acc{};
  int64_t d = 0;
  for (; d + kN <= n; d += kN) acc += load_n(r + d) * load_n(k + d);
  float total = hsum_n(acc);
  for (; d < n; ++d) total += r[d] * to_float(k[d]);
  return total;
}

// e^x for x <= 0 (softmax arguments), to a few ulp: x = k ln2 + f with |f| <= ln2 / 2, a
// degree-6 polynomial for e^f (Cephes' coefficients), and 2^k put into the exponent bits. Below
// -87 the result is 0.
inline vfloat exp_approx(vfloat x) {
  typedef int32_t vint32 __attribute__((vector_size(kLanes * sizeof(int32_t))));
  const auto underflow = x < -87.f;  // lanes whose result is 0 (a lane mask)
  x = underflow ? vfloat{} - 87.f : x;
  const vfloat kf = __builtin_convertvector(__builtin_convertvector(x * 1.44269504f + (x < 0.f ? -0.5f : 0.5f),
                                                                    vint32), vfloat);
  const vfloat f = (x - kf * 0.693359375f) + kf * 2.12194440e-4f;
  vfloat p = vfloat{} + 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.f;
  vint32 bits = (__builtin_convertvector(kf, vint32) + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? vfloat{} : p * scale;
}

// Slots of the cache per work unit. A unit reads its slots' rows for every head at once, and a
// slot's rows (all kv heads) are contiguous, so each unit streams one run of memory.
constexpr int64_t kSlotsPerUnit = 64;

// One unit: slots [n0, n1) of sequence b, all heads.
struct Unit {
  int64_t b, n0, n1;
};

// T: q, the new key and value, and out; TC: the caches (T, or 16-bit under fp32 activations).
template <typename T, typename TC>
void decode_impl(const T* q, const T* k_new, const T* v_new, TC* k_cache, TC* v_cache, const void* seqlens,
                 bool seqlens_int64, const float* cos, const float* sin, T* out, int64_t batch, int64_t heads,
                 int64_t kv_heads, int64_t head_dim, int64_t capacity, int64_t table_len, const int64_t* st,
                 float scale, int num_threads) {
  const int64_t q_b = st[0], q_h = st[1], kn_b = st[2], kn_h = st[3], vn_b = st[4], vn_h = st[5];
  const int64_t c_b = st[6], c_s = st[7], c_h = st[8], o_b = st[9], o_h = st[10], t_s = st[11];
  const int64_t group = heads / kv_heads, half = head_dim / 2, D = head_dim;
  auto length = [&](int64_t b) -> int64_t {
    return seqlens_int64 ? static_cast<const int64_t*>(seqlens)[b]
                         : static_cast<const int32_t*>(seqlens)[b];
  };
  auto valid = [&](int64_t L) { return L >= 0 && L < capacity && L < table_len; };
  // Split each sequence's slots 0..L into units: at least kSlotsPerUnit each, and enough units
  // (about four per thread in all) to keep every thread busy at batch 1.
  int64_t total_keys = 0;
  for (int64_t b = 0; b < batch; ++b)
    if (valid(length(b))) total_keys += length(b) + 1;
  const int64_t want_units = std::max<int64_t>(1, 4 * static_cast<int64_t>(num_threads));
  std::vector<Unit> units;
  std::vector<int64_t> first_unit(static_cast<size_t>(batch + 1));  // sequence b owns [first[b], first[b + 1])
  for (int64_t b = 0; b < batch; ++b) {
    first_unit[static_cast<size_t>(b)] = static_cast<int64_t>(units.size());
    const int64_t L = length(b);
    if (!valid(L)) continue;
    const int64_t n_keys = L + 1;
    const int64_t share = std::max<int64_t>(1, want_units * n_keys / std::max<int64_t>(total_keys, 1));
    const int64_t count = std::max<int64_t>(1, std::min(share, (n_keys + kSlotsPerUnit - 1) / kSlotsPerUnit));
    for (int64_t u = 0; u < count; ++u) units.push_back({b, n_keys * u / count, n_keys * (u + 1) / count});
  }
  const int64_t n_units = static_cast<int64_t>(units.size());
  first_unit[static_cast<size_t>(batch)] = n_units;
  // Per unit and head: the running max, the sum of weights and the unnormalised output.
  const int64_t part = D + 2;
  std::vector<float> partial(static_cast<size_t>(std::max<int64_t>(n_units, 1) * heads * part));
  std::vector<float> qr_all(static_cast<size_t>(batch * heads * D));  // rotated, scaled queries
  const int nt = threads_for(total_keys * kv_heads * D * 2 + batch * heads, std::max(n_units, batch * kv_heads),
                             num_threads);
  (void)nt;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    // 1. Per (sequence, kv head): append the rotated key and the value at slot L, rotate and
    //    scale the group's queries. Every unit reads slot L, so this finishes first (barrier).
#pragma omp for schedule(static)
    for (int64_t pair = 0; pair < batch * kv_heads; ++pair) {
      const int64_t b = pair / kv_heads, kh = pair % kv_heads;
      const int64_t L = length(b);
      if (!valid(L)) continue;  // out of range: NaN below, no cache write
      const float* c = cos + L * t_s;
      const float* s = sin + L * t_s;
      // The rotated key, rounded to the cache dtype as every later step reads it, and v.
      const T* kn = k_new + b * kn_b + kh * kn_h;
      const T* vn = v_new + b * vn_b + kh * vn_h;
      TC* kslot = k_cache + b * c_b + L * c_s + kh * c_h;
      TC* vslot = v_cache + b * c_b + L * c_s + kh * c_h;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = to_float(kn[i]), x2 = to_float(kn[i + half]);
        kslot[i] = from_float<TC>(x1 * c[i] - x2 * s[i]);
        kslot[i + half] = from_float<TC>(x2 * c[i] + x1 * s[i]);
      }
      if constexpr (std::is_same_v<T, TC>) {
        for (int64_t d = 0; d < D; ++d) vslot[d] = vn[d];
      } else {
        for (int64_t d = 0; d < D; ++d) vslot[d] = from_float<TC>(to_float(vn[d]));
      }
      for (int64_t g = 0; g < group; ++g) {
        const int64_t h = kh * group + g;
        const T* qh = q + b * q_b + h * q_h;
        float* r = qr_all.data() + (b * heads + h) * D;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = to_float(qh[i]), x2 = to_float(qh[i + half]);
          r[i] = (x1 * c[i] - x2 * s[i]) * scale;
          r[i + half] = (x2 * c[i] + x1 * s[i]) * scale;
        }
      }
    }
    // 2. Per unit: scores of every head against its slots, their softmax statistics, and the
    //    weighted values. Rows are read in slot order, all kv heads of a slot together.
    std::vector<float> scores;
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < n_units; ++u) {
      const Unit unit = units[static_cast<size_t>(u)];
      const int64_t len = unit.n1 - unit.n0;
      scores.resize(static_cast<size_t>(heads * len));
      const float* qr = qr_all.data() + unit.b * heads * D;
      const TC* kbase = k_cache + unit.b * c_b + unit.n0 * c_s;
      for (int64_t n = 0; n < len; ++n) {
        const TC* row = kbase + n * c_s;
        for (int64_t kh = 0; kh < kv_heads; ++kh)
          for (int64_t g = 0; g < group; ++g) {
            const int64_t h = kh * group + g;
            scores[h * len + n] = dot(qr + h * D, row + kh * c_h, D);
          }
      }
      float* out_part = partial.data() + u * heads * part;
      for (int64_t h = 0; h < heads; ++h) {
        float* sc = scores.data() + h * len;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t n = 0; n < len; ++n) mx = std::max(mx, sc[n]);
        vfloat vsum{};
        int64_t n = 0;
        for (; n + kLanes <= len; n += kLanes) {
          const vfloat e = exp_approx(loadf(sc + n) - mx);
          std::memcpy(sc + n, &e, sizeof(e));
          vsum += e;
        }
        float sum = hsum(vsum);
        for (; n < len; ++n) {
          sc[n] = std::exp(sc[n] - mx);
          sum += sc[n];
        }
        out_part[h * part] = mx;
        out_part[h * part + 1] = sum;
        std::fill(out_part + h * part + 2, out_part + (h + 1) * part, 0.f);
      }
      const TC* vbase = v_cache + unit.b * c_b + unit.n0 * c_s;
      for (int64_t n = 0; n < len; ++n) {
        const TC* row = vbase + n * c_s;
        for (int64_t kh = 0; kh < kv_heads; ++kh) {
          const TC* vr = row + kh * c_h;
          for (int64_t g = 0; g < group; ++g) {
            const int64_t h = kh * group + g;
            const float p = scores[h * len + n];
            float* a = out_part + h * part + 2;
            int64_t d = 0;
            for (; d + kN <= D; d += kN) {
              const nfloat sum = load_n(a + d) + p * load_n(vr + d);
              std::memcpy(a + d, &sum, sizeof(sum));
            }
            for (; d < D; ++d) a[d] += p * to_float(vr[d]);
          }
        }
      }
    }
    // 3. Per (sequence, head): merge the units' partial results.
    std::vector<float> merged(static_cast<size_t>(D));
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < batch * heads; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const int64_t u0 = first_unit[static_cast<size_t>(b)], u1 = first_unit[static_cast<size_t>(b + 1)];
      T* o = out + b * o_b + h * o_h;
      if (u0 == u1) {  // out of range: no units
        for (int64_t d = 0; d < D; ++d) o[d] = from_float<T>(std::numeric_limits<float>::quiet_NaN());
        continue;
      }
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t u = u0; u < u1; ++u) mx = std::max(mx, partial[(u * heads + h) * part]);
      float sum = 0.f;
      float* a = merged.data();
      std::fill(a, a + D, 0.f);
      for (int64_t u = u0; u < u1; ++u) {
        const float* pp = partial.data() + (u * heads + h) * part;
        const float w = std::exp(pp[0] - mx);
        sum += w * pp[1];
        for (int64_t d = 0; d < D; ++d) a[d] += w * pp[2 + d];
      }
      const float inv = 1.f / sum;
      for (int64_t d = 0; d < D; ++d) o[d] = from_float<T>(a[d] * inv);
    }
  }
}

}  // namespace

void rope_decode_attention(const void* q, const void* k_new, const void* v_new, void* k_cache, void* v_cache,
                           const void* seqlens, bool seqlens_int64, const float* cos, const float* sin, void* out,
                           int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t capacity,
                           int64_t table_len, const int64_t* strides, int dtype, int cache_dtype, float scale,
                           int num_threads) {
  const DType t = to_dtype(dtype, "q"), tc = to_dtype(cache_dtype, "k_cache");
  LLAMA_KERNELS_CHECK(tc == t || t == DType::F32,
                      "k_cache, v_cache: expected q's dtype, or a 16-bit cache under float32 q, got "
                          << dtype_name(tc) << " under " << dtype_name(t));
  auto run = [&](auto* qt, auto* ct) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(qt)>>;
    using TC = std::remove_pointer_t<decltype(ct)>;
    decode_impl(static_cast<const T*>(q), static_cast<const T*>(k_new), static_cast<const T*>(v_new),
                static_cast<TC*>(k_cache), static_cast<TC*>(v_cache), seqlens, seqlens_int64, cos, sin,
                static_cast<T*>(out), batch, heads, kv_heads, head_dim, capacity, table_len, strides, scale,
                num_threads);
  };
  with_float_type(dtype, "q", [&](auto* qt) {
    using T = std::remove_pointer_t<decltype(qt)>;
    if (tc == t) return run(qt, static_cast<T*>(nullptr));
    if constexpr (std::is_same_v<T, float>) {  // a 16-bit cache under fp32 activations
      if (tc == DType::F16) return run(qt, static_cast<f16_t*>(nullptr));
      return run(qt, static_cast<bf16_t*>(nullptr));
    }
  });
}

}  // namespace LLAMA_KERNELS_ISA
}  // namespace cpu
}  // namespace llama_kernels
