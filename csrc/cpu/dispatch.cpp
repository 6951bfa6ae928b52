// Chooses, once, the best compiled ISA variant the running CPU supports. The environment
// variable LLAMA_KERNELS_CPU_ISA (baseline, avx2, avx512, avx512vnni) or set_isa() may pick a lower one.
// avx512vnni is the avx512 build with AVX-512 VNNI (vpdpbusd) allowed; only the int8-activation
// int4 kernel (int4_matmul_q8) uses it, the other kernels compile the same as for avx512.
#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "common.h"
#include "cpu/kernels_cpu.h"

namespace llama_kernels {
namespace cpu {
namespace {

enum class Isa : int { Baseline = 0, Avx2 = 1, Avx512 = 2, Avx512Vnni = 3 };
const char* const kIsaNames[] = {"baseline", "avx2", "avx512", "avx512vnni"};
constexpr int kIsaCount = 4;

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
    case Isa::Avx512Vnni:
      return cpu_supports(Isa::Avx512) && __builtin_cpu_supports("avx512vnni");
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
#ifdef LLAMA_KERNELS_HAVE_ISA_AVX512VNNI
    case Isa::Avx512Vnni: return true;
#endif
    default: return false;
  }
}

bool usable(Isa isa) { return compiled(isa) && cpu_supports(isa); }

Isa parse(const std::string& name) {
  for (int i = 0; i < kIsaCount; ++i)
    if (name == kIsaNames[i]) return static_cast<Isa>(i);
  LLAMA_KERNELS_CHECK(false, "isa: unknown instruction set '" << name
                           << "' (expected baseline, avx2, avx512 or avx512vnni)");
  return Isa::Baseline;
}

Isa best() {
  Isa b = Isa::Baseline;
  for (Isa i : {Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni})
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
  for (int i = 0; i < kIsaCount; ++i)
    if (usable(static_cast<Isa>(i))) out.push_back(kIsaNames[i]);
  return out;
}

std::string current_isa() { return kIsaNames[selected().load()]; }

void set_isa(const std::string& name) {
  Isa want = name.empty() ? best() : parse(name);
  LLAMA_KERNELS_CHECK(usable(want), "isa: '" << name << "' is not built or not supported by this CPU");
  selected().store(static_cast<int>(want));
}

#if defined(LLAMA_KERNELS_HAVE_ISA_AVX512VNNI)
#define LLAMA_KERNELS_CASE_AVX512VNNI(call) case Isa::Avx512Vnni: return avx512vnni::call;
#else
#define LLAMA_KERNELS_CASE_AVX512VNNI(call)
#endif
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
    LLAMA_KERNELS_CASE_AVX512VNNI(call)                                    \
    LLAMA_KERNELS_CASE_AVX512(call)                                        \
    LLAMA_KERNELS_CASE_AVX2(call)                                          \
    default: return baseline::call;                                  \
  }

// One dispatching function per kernel in the list (kernels_cpu.h).
#define LLAMA_KERNELS_CPU_DEFINE_DISPATCH(name, params, args) \
  void name params { LLAMA_KERNELS_CPU_DISPATCH(name args) }
LLAMA_KERNELS_CPU_KERNELS(LLAMA_KERNELS_CPU_DEFINE_DISPATCH)

}  // namespace cpu
}  // namespace llama_kernels
