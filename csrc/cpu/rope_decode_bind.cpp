// Python bindings of the CPU RoPE + decode attention (csrc/cpu/rope_decode.cpp): raw addresses,
// sizes, strides and dtype codes; the GIL is released while the kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "common.h"
#include "cpu/kernels_cpu.h"
#include "registry.h"

namespace py = pybind11;
using llama_kernels::address_ptr;

LLAMA_KERNELS_BIND(rope_decode_cpu) {
  m.def(
      "rope_decode_attention_cpu",
      [](uintptr_t q, uintptr_t k_new, uintptr_t v_new, uintptr_t k_cache, uintptr_t v_cache, uintptr_t seqlens,
         bool seqlens_int64, uintptr_t cos, uintptr_t sin, uintptr_t out, int64_t batch, int64_t heads,
         int64_t kv_heads, int64_t head_dim, int64_t capacity, int64_t table_len, std::vector<int64_t> strides,
         int dtype, int cache_dtype, float scale, int threads) {
        LLAMA_KERNELS_CHECK(strides.size() == 12, "strides: expected 12 values, got " << strides.size());
        LLAMA_KERNELS_CHECK(kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0 && head_dim % 2 == 0,
                            "heads, kv_heads, head_dim: " << heads << ", " << kv_heads << ", " << head_dim);
        py::gil_scoped_release release;
        llama_kernels::cpu::rope_decode_attention(
            address_ptr<const void>(q), address_ptr<const void>(k_new), address_ptr<const void>(v_new),
            address_ptr<void>(k_cache), address_ptr<void>(v_cache), address_ptr<const void>(seqlens), seqlens_int64,
            address_ptr<const float>(cos), address_ptr<const float>(sin), address_ptr<void>(out), batch, heads,
            kv_heads, head_dim, capacity, table_len, strides.data(), dtype, cache_dtype, scale, threads);
      },
      "RoPE on q and the new key at position seqlens[b], append to the caches, attention over 0..L; the "
      "caches in q's dtype (or fp16/bf16 under fp32 q: cache_dtype)");
}
