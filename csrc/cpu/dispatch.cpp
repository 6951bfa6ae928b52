// Chooses, once, the best compiled ISA variant the running CPU supports. The environment
// variable LLAMA_KERNELS_CPU_ISA (baseline, avx2, avx512) or set_isa() may pick a lower one.
#include <atomic>
#include <cstdlib>

#include "common.h"
#include "cpu/kernels_cpu.h"

namespace llama_kernels {
namespace cpu {
namespace {

enum class Isa : int { Baseline = 0, Avx2 = 1, Avx512 = 2 };
const char* const kIsaNames[] = {"baseline", "avx2", "avx512"};

bool cpu_supports(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  switch (isa) {
    case Isa::Baseline: return true;
    case Isa::Avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case Isa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("f16c");
  }
  return false;
#else
  return isa == Isa::Baseline;
#endif
}

bool compiled(Isa isa) {
  switch (isa) {
    case Isa::Baseline: return true;
#ifdef LLAMA_KERNELS_HAVE_ISA_AVX2
    case Isa::Avx2: return true;
#endif
#ifdef LLAMA_KERNELS_HAVE_ISA_AVX512
    case Isa::Avx512: return true;
#endif
    default: return false;
  }
}

bool usable(Isa isa) { return compiled(isa) && cpu_supports(isa); }

Isa parse(const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == kIsaNames[i]) return static_cast<Isa>(i);
  LLAMA_KERNELS_CHECK(false, "isa: unknown instruction set '" << name
                           << "' (expected baseline, avx2 or avx512)");
  return Isa::Baseline;
}

Isa best() {
  Isa b = Isa::Baseline;
  for (Isa i : {Isa::Avx2, Isa::Avx512})
    if (usable(i)) b = i;
  if (const char* env = std::getenv("LLAMA_KERNELS_CPU_ISA")) {
    if (*env) {
      Isa want = parse(env);
      LLAMA_KERNELS_CHECK(usable(want), "LLAMA_KERNELS_CPU_ISA: '" << env
                                      << "' is not built or not supported by this CPU");
      b = want;
    }
  }
  return b;
}

std::atomic<int>& selected() {
  static std::atomic<int> isa{static_cast<int>(best())};
  return isa;
}

}  // namespace

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (int i = 0; i < 3; ++i)
    if (usable(static_cast<Isa>(i))) out.push_back(kIsaNames[i]);
  return out;
}

std::string current_isa() { return kIsaNames[selected().load()]; }

void set_isa(const std::string& name) {
  Isa want = name.empty() ? best() : parse(name);
  LLAMA_KERNELS_CHECK(usable(want), "isa: '" << name << "' is not built or not supported by this CPU");
  selected().store(static_cast<int>(want));
}

#if defined(LLAMA_KERNELS_HAVE_ISA_AVX512)
#define LLAMA_KERNELS_CASE_AVX512(call) case Isa::Avx512: return avx512::call;
#else
#define LLAMA_KERNELS_CASE_AVX512(call)
#endif
#if defined(LLAMA_KERNELS_HAVE_ISA_AVX2)
#define LLAMA_KERNELS_CASE_AVX2(call) case Isa::Avx2: return avx2::call;
#else
#define LLAMA_KERNELS_CASE_AVX2(call)
#endif

#define LLAMA_KERNELS_CPU_DISPATCH(call)                                   \
  switch (static_cast<Isa>(selected().load())) {                     \
    LLAMA_KERNELS_CASE_AVX512(call)                                        \
    LLAMA_KERNELS_CASE_AVX2(call)                                          \
    default: return baseline::call;                                  \
  }

void rms_norm_fwd(const void* x, const void* h, const void* w, void* y, void* s, float* rstd,
                  int64_t rows, int64_t cols, int64_t x_stride, int64_t h_stride, int64_t y_stride,
                  int64_t s_stride, int x_dtype, int w_dtype, float eps, int num_threads) {
  LLAMA_KERNELS_CPU_DISPATCH(rms_norm_fwd(x, h, w, y, s, rstd, rows, cols, x_stride, h_stride, y_stride,
                                    s_stride, x_dtype, w_dtype, eps, num_threads))
}

void rope_decode_attention(const void* q, const void* k_new, const void* v_new, void* k_cache, void* v_cache,
                           const void* seqlens, bool seqlens_int64, const float* cos, const float* sin, void* out,
                           int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t capacity,
                           int64_t table_len, const int64_t* strides, int dtype, float scale, int num_threads) {
  LLAMA_KERNELS_CPU_DISPATCH(rope_decode_attention(q, k_new, v_new, k_cache, v_cache, seqlens, seqlens_int64, cos, sin,
                                             out, batch, heads, kv_heads, head_dim, capacity, table_len, strides,
                                             dtype, scale, num_threads))
}

void rms_norm_bwd(const void* dy, const void* ds, const void* x, const void* w, const float* rstd,
                  void* dx, void* dw, int64_t rows, int64_t cols, int64_t dy_stride,
                  int64_t ds_stride, int64_t x_stride, int64_t dx_stride, int x_dtype, int w_dtype,
                  int num_threads) {
  LLAMA_KERNELS_CPU_DISPATCH(rms_norm_bwd(dy, ds, x, w, rstd, dx, dw, rows, cols, dy_stride, ds_stride,
                                    x_stride, dx_stride, x_dtype, w_dtype, num_threads))
}

void linear(const void* x, const LinearParts& parts, int64_t m, int64_t k, int64_t x_stride, int64_t y_stride,
            int x_dtype, int w_dtype, int bias_dtype, int num_threads) {
  LLAMA_KERNELS_CPU_DISPATCH(linear(x, parts, m, k, x_stride, y_stride, x_dtype, w_dtype, bias_dtype, num_threads))
}

void int4_matmul(const void* x, const Int4Parts& parts, const float* lut, int64_t m, int64_t k, int group,
                 int64_t x_stride, int64_t y_stride, int x_dtype, int num_threads) {
  LLAMA_KERNELS_CPU_DISPATCH(int4_matmul(x, parts, lut, m, k, group, x_stride, y_stride, x_dtype, num_threads))
}

void int4_dequantize(const uint8_t* packed, const void* scales, const void* zeros, const float* lut, void* w,
                     int64_t n, int64_t k, int group, int w_dtype, int num_threads) {
  LLAMA_KERNELS_CPU_DISPATCH(int4_dequantize(packed, scales, zeros, lut, w, n, k, group, w_dtype, num_threads))
}

}  // namespace cpu
}  // namespace llama_kernels
