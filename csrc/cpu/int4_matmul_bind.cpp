// Python bindings of the CPU 4-bit matmul and dequantization (csrc/cpu/int4_matmul.cpp): raw
// addresses, sizes, strides and dtype codes; the GIL is released while the kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "cpu/kernels_cpu.h"
#include "registry.h"

namespace py = pybind11;
using llama_kernels::address_ptr;
using llama_kernels::address_ptrs;

namespace {
// The weights of one call, from the addresses Python passes (both kernels take the same).
llama_kernels::cpu::Int4Parts parts_of(const std::vector<uintptr_t>& packed, const std::vector<uintptr_t>& scales,
                                       const std::vector<uintptr_t>& zeros, const std::vector<uintptr_t>& y,
                                       const std::vector<int64_t>& n) {
  llama_kernels::cpu::Int4Parts parts;
  parts.packed = address_ptrs<const uint8_t>(packed);
  parts.scales = address_ptrs<const void>(scales);
  parts.zeros = address_ptrs<const void>(zeros);
  parts.y = address_ptrs<void>(y);
  parts.n = n;
  return parts;
}
}  // namespace

LLAMA_KERNELS_BIND(int4_matmul_cpu) {
  m.def(
      "int4_matmul_cpu",
      [](uintptr_t x, const std::vector<uintptr_t>& packed, const std::vector<uintptr_t>& scales,
         const std::vector<uintptr_t>& zeros, uintptr_t lut, const std::vector<uintptr_t>& y,
         const std::vector<int64_t>& n, int64_t m, int64_t k, int group, int64_t x_stride, int64_t y_stride,
         int x_dtype, int threads) {
        llama_kernels::cpu::int4_matmul(address_ptr<const void>(x), parts_of(packed, scales, zeros, y, n),
                                        address_ptr<const float>(lut), m, k, group, x_stride, y_stride, x_dtype,
                                        threads);
      },
      py::call_guard<py::gil_scoped_release>(),
      "y[p] = x @ dequant(W[p])^T for one or more 4-bit weights W[p] of n[p] rows (packed codes, fp16 "
      "scales and zeros; a zeros entry may be 0 for NF4) and one fp32 lut; all y[p] share y_stride");
  m.def(
      "int4_matmul_q8_cpu",
      [](uintptr_t x, const std::vector<uintptr_t>& packed, const std::vector<uintptr_t>& scales,
         const std::vector<uintptr_t>& zeros, uintptr_t lut, const std::vector<uintptr_t>& y,
         const std::vector<int64_t>& n, int64_t m, int64_t k, int group, int64_t x_stride, int64_t y_stride,
         int x_dtype, int threads) {
        llama_kernels::cpu::int4_matmul_q8(address_ptr<const void>(x), parts_of(packed, scales, zeros, y, n),
                                           address_ptr<const float>(lut), m, k, group, x_stride, y_stride, x_dtype,
                                           threads);
      },
      py::call_guard<py::gil_scoped_release>(),
      "int4_matmul_cpu with x quantized to int8 per block of 32 (an fp32 scale each) and integer dot "
      "products (AVX-512 VNNI, AVX2/AVX-512BW vpmaddubsw); int4 weights only (lut = code - 8)");
  m.def(
      "int4_matmul_q8_gemm_rows",
      [] {
        int64_t rows = 0;
        llama_kernels::cpu::int4_matmul_q8_gemm_rows(&rows);
        return rows;
      },
      "rows of x from which int4_matmul_q8_cpu takes its many-rows path, in the selected ISA build");
  m.def(
      "int4_dequantize_cpu",
      [](uintptr_t packed, uintptr_t scales, uintptr_t zeros, uintptr_t lut, uintptr_t w, int64_t n, int64_t k,
         int group, int w_dtype, int threads) {
        llama_kernels::cpu::int4_dequantize(address_ptr<const uint8_t>(packed), address_ptr<const void>(scales),
                                            address_ptr<const void>(zeros), address_ptr<const float>(lut),
                                            address_ptr<void>(w), n, k, group, w_dtype, threads);
      },
      py::call_guard<py::gil_scoped_release>(),
      "w (n, k) contiguous, in float32/float16/bfloat16 = dequant of the packed codes (zeros may be 0)");
}
