// Shared by the C++ and CUDA sources: dtype codes, error checks, and scalar conversions.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace llama_kernels {

// The dtype codes of every entry point. Python reads them from the module (dtype_codes() in
// bindings.cpp, built from kDTypes and dtype_name), so they are written down only here. The
// kernels compute in the three float types; the integer codes describe the other tensors the
// CUDA entry points take (packed 4-bit codes, sequence lengths).
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, U8 = 3, I32 = 4, I64 = 5 };
constexpr DType kDTypes[] = {DType::F32, DType::F16, DType::BF16, DType::U8, DType::I32, DType::I64};

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::U8: return "uint8";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
  }
  return "unknown";
}

// Builds error messages with `msg << "text" << number`, without iostreams: a std::ostringstream
// in this module crashed the process on one GPU image (its locale machinery is the likely
// cause), so messages are formatted with snprintf into a std::string.
class Message {
 public:
  Message& operator<<(const char* s) { text_ += s; return *this; }
  Message& operator<<(const std::string& s) { text_ += s; return *this; }
  Message& operator<<(char c) { text_ += c; return *this; }
  Message& operator<<(bool b) { text_ += b ? "true" : "false"; return *this; }
  template <typename T, typename std::enable_if<std::is_integral<T>::value, int>::type = 0>
  Message& operator<<(T v) {
    char buf[32];
    if (std::is_signed<T>::value) {
      std::snprintf(buf, sizeof(buf), "%lld", static_cast<long long>(v));
    } else {
      std::snprintf(buf, sizeof(buf), "%llu", static_cast<unsigned long long>(v));
    }
    text_ += buf;
    return *this;
  }
  template <typename T, typename std::enable_if<std::is_floating_point<T>::value, int>::type = 0>
  Message& operator<<(T v) {
    char buf[48];
    std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(v));
    text_ += buf;
    return *this;
  }
  const std::string& str() const { return text_; }

 private:
  std::string text_;
};

// The float dtype of a code (the CPU kernels' tensors); anything else throws naming `arg`.
inline DType to_dtype(int code, const char* arg) {
  if (code < 0 || code > 2) {
    Message msg;
    msg << arg << ": unknown dtype code " << code << " (expected 0=float32, 1=float16, 2=bfloat16)";
    throw std::invalid_argument(msg.str());
  }
  return static_cast<DType>(code);
}

#define LLAMA_KERNELS_CHECK(cond, msg_expr)                                    \
  do {                                                                   \
    if (!(cond)) {                                                       \
      ::llama_kernels::Message kernels_msg_;                                   \
      kernels_msg_ << msg_expr;                                          \
      throw std::invalid_argument(kernels_msg_.str());                   \
    }                                                                    \
  } while (0)

// Storage types for 16-bit floats on the CPU side. CUDA code uses __half / __nv_bfloat16.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

// fn(static_cast<T*>(nullptr)) with T the storage type of dtype code `code` (float, f16_t or
// bf16_t): how a kernel entry turns a dtype code into a template argument. `arg` names the
// argument in the error for an unknown code.
template <typename Fn>
inline void with_float_type(int code, const char* arg, Fn&& fn) {
  switch (to_dtype(code, arg)) {
    case DType::F32: return fn(static_cast<float*>(nullptr));
    case DType::F16: return fn(static_cast<f16_t*>(nullptr));
    case DType::BF16: return fn(static_cast<bf16_t*>(nullptr));
  }
}

inline float to_float(float v) { return v; }

inline float to_float(bf16_t v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Portable IEEE half <-> single conversions (round to nearest even), used where the compiler
// has no hardware conversion. Branch-free, so loops over them vectorise: a normal half rebiases
// its exponent, a subnormal one is its mantissa times 2^-24 (exact in fp32), inf and NaN keep an
// all-ones exponent.
inline float half_bits_to_float(uint16_t bits) {
  const uint32_t h = bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = h & 0x7fffu;  // exponent and mantissa
  const uint32_t normal = (em << 13) + 0x38000000u;  // exponent + (127 - 15)
  const uint32_t inf_nan = (em << 13) | 0x7f800000u;
  const float sub = static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-8f;  // em < 0x400
  uint32_t sub_bits;
  std::memcpy(&sub_bits, &sub, sizeof(sub_bits));
  const uint32_t u = sign | (em >= 0x7c00u ? inf_nan : (em >= 0x0400u ? normal : sub_bits));
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint16_t float_to_half_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (absu >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (absu < 0x38800000u) {  // subnormal or zero in half
    if (absu < 0x33000000u) return sign;
    uint32_t m = (absu & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - (absu >> 23);  // value / 2^-24 = m >> shift
    uint32_t q = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t halfway = 1u << (shift - 1u);
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
    return static_cast<uint16_t>(sign | q);
  }
  uint32_t q = absu - 0x38000000u;  // rebias exponent 127 -> 15
  uint32_t rem = q & 0x1fffu;
  q >>= 13;
  if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ++q;
  return static_cast<uint16_t>(sign | q);
}

inline float to_float(f16_t v) {
  // _Float16 only where the conversion is an instruction: elsewhere (x86 without F16C) GCC
  // calls a library routine per value, several times slower than the bit arithmetic.
#if defined(__FLT16_MAX__) && (defined(__F16C__) || defined(__aarch64__))
  _Float16 h;
  std::memcpy(&h, &v.bits, sizeof(h));
  return static_cast<float>(h);
#else
  return half_bits_to_float(v.bits);
#endif
}

template <typename T> inline T from_float(float v);

template <> inline float from_float<float>(float v) { return v; }

template <> inline bf16_t from_float<bf16_t>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

template <> inline f16_t from_float<f16_t>(float v) {
#if defined(__FLT16_MAX__)
  _Float16 h = static_cast<_Float16>(v);
  f16_t out;
  std::memcpy(&out.bits, &h, sizeof(h));
  return out;
#else
  return f16_t{float_to_half_bits(v)};
#endif
}

}  // namespace llama_kernels
