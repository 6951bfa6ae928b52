// Python bindings of the CPU dense linear (csrc/cpu/linear.cpp): raw addresses, sizes, strides
// and dtype codes; the GIL is released while the kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "cpu/kernels_cpu.h"
#include "registry.h"

namespace py = pybind11;
using llama_kernels::address_ptr;
using llama_kernels::address_ptrs;

LLAMA_KERNELS_BIND(linear_cpu) {
  m.def(
      "linear_cpu",
      [](uintptr_t x, const std::vector<uintptr_t>& w, const std::vector<uintptr_t>& bias,
         const std::vector<uintptr_t>& y, const std::vector<int64_t>& n, int64_t m, int64_t k, int64_t x_stride,
         int64_t y_stride, int x_dtype, int w_dtype, int bias_dtype, int threads) {
        llama_kernels::cpu::LinearParts parts;
        parts.w = address_ptrs<const void>(w);
        parts.bias = address_ptrs<const void>(bias);
        parts.y = address_ptrs<void>(y);
        parts.n = n;
        llama_kernels::cpu::linear(address_ptr<const void>(x), parts, m, k, x_stride, y_stride, x_dtype, w_dtype,
                                   bias_dtype, threads);
      },
      py::call_guard<py::gil_scoped_release>(),
      "y[p] = x @ w[p]^T + bias[p] for a few rows of x and one or more weights w[p] of n[p] rows; a bias "
      "entry may be 0 (none); all y[p] share y_stride");
  m.def(
      "linear_argmax_cpu",
      [](uintptr_t x, uintptr_t w, int64_t m, int64_t n, int64_t k, int64_t x_stride, int x_dtype, int w_dtype,
         uintptr_t index, uintptr_t value, int threads) {
        llama_kernels::cpu::linear_argmax(address_ptr<const void>(x), address_ptr<const void>(w), m, n, k, x_stride,
                                          x_dtype, w_dtype, address_ptr<int64_t>(index), address_ptr<float>(value),
                                          threads);
      },
      py::call_guard<py::gil_scoped_release>(),
      "index[i] (int64) = argmax over the n rows of w of x[i] @ w^T, value[i] (fp32, address 0: not written) its "
      "logit, for m rows of x; the logits are those linear_cpu computes, never written out");
}
