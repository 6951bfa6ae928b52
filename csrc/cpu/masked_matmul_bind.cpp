// Python binding of the CPU masked matmul (csrc/cpu/masked_matmul.cpp): raw addresses (bias 0
// when absent), the active row and column index lists (int64), sizes, row strides and the dtype
// code; the GIL is released while the kernel runs.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <utility>

#include "cpu/kernels_cpu.h"
#include "registry.h"

namespace py = pybind11;
using llama_kernels::address_ptr;

LLAMA_KERNELS_BIND(masked_matmul_cpu) {
  m.def(
      "masked_matmul_fwd_cpu",
      [](uintptr_t x, uintptr_t w, uintptr_t row_scale, uintptr_t col_scale, uintptr_t bias, uintptr_t rows,
         int64_t n_rows, uintptr_t cols, int64_t n_cols, uintptr_t y, int64_t m, int64_t n, int64_t k,
         int64_t x_stride, int64_t w_stride, int64_t y_stride, int dtype, bool y_fp32, int threads) {
        llama_kernels::cpu::masked_matmul_fwd(
            address_ptr<const void>(x), address_ptr<const void>(w), address_ptr<const float>(row_scale),
            address_ptr<const float>(col_scale), bias ? address_ptr<const float>(bias) : nullptr,
            address_ptr<const int64_t>(rows), n_rows, address_ptr<const int64_t>(cols), n_cols, address_ptr<void>(y),
            m, n, k, x_stride, w_stride, y_stride, dtype, y_fp32, threads);
      },
      py::call_guard<py::gil_scoped_release>());
  // (count, all_ones): the mask's active indices written to idx (n int64), how many, and whether
  // their values are all exactly 1.
  m.def("masked_matmul_active_cpu", [](uintptr_t mask, int64_t n, uintptr_t idx) {
    int64_t count = 0;
    bool all_ones = true;
    llama_kernels::cpu::masked_matmul_active(address_ptr<const float>(mask), n, address_ptr<int64_t>(idx), &count,
                                             &all_ones);
    return std::make_pair(count, all_ones);
  });
  m.def(
      "masked_matmul_gather_cpu",
      [](uintptr_t src, int64_t src_stride, uintptr_t rows, int64_t n_rows, uintptr_t cols, int64_t n_cols,
         uintptr_t scale, uintptr_t dst, int64_t dst_stride, int dtype, int threads) {
        llama_kernels::cpu::masked_matmul_gather(
            address_ptr<const void>(src), src_stride, rows ? address_ptr<const int64_t>(rows) : nullptr, n_rows,
            cols ? address_ptr<const int64_t>(cols) : nullptr, n_cols,
            scale ? address_ptr<const float>(scale) : nullptr, address_ptr<float>(dst), dst_stride, dtype, threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "masked_matmul_scatter_cpu",
      [](uintptr_t u, int64_t u_stride, uintptr_t rows, int64_t n_act, uintptr_t bias, uintptr_t scale, uintptr_t y,
         int64_t m, int64_t n, int64_t y_stride, int dtype, int threads) {
        llama_kernels::cpu::masked_matmul_scatter(
            address_ptr<const float>(u), u_stride, address_ptr<const int64_t>(rows), n_act,
            bias ? address_ptr<const float>(bias) : nullptr, address_ptr<const float>(scale), address_ptr<void>(y),
            m, n, y_stride, dtype, threads);
      },
      py::call_guard<py::gil_scoped_release>());
}
