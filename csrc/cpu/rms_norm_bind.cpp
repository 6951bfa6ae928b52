// Python bindings of the CPU RMSNorm (csrc/cpu/rms_norm.cpp): raw addresses, sizes, strides and
// dtype codes; the GIL is released while the kernel runs.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "cpu/kernels_cpu.h"
#include "registry.h"

namespace py = pybind11;
using llama_kernels::address_ptr;

LLAMA_KERNELS_BIND(rms_norm_cpu) {
  m.def(
      "rms_norm_fwd_cpu",
      [](uintptr_t x, uintptr_t h, uintptr_t w, uintptr_t y, uintptr_t s, uintptr_t rstd,
         int64_t rows, int64_t cols, int64_t x_stride, int64_t h_stride, int64_t y_stride,
         int64_t s_stride, int x_dtype, int w_dtype, float eps, int threads) {
        if (h != 0 && s == 0) throw std::invalid_argument("s: the sum x + h needs an output");
        llama_kernels::cpu::rms_norm_fwd(address_ptr<const void>(x), address_ptr<const void>(h),
                                         address_ptr<const void>(w), address_ptr<void>(y), address_ptr<void>(s),
                                         address_ptr<float>(rstd), rows, cols, x_stride, h_stride, y_stride,
                                         s_stride, x_dtype, w_dtype, eps, threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "rms_norm_bwd_cpu",
      [](uintptr_t dy, uintptr_t ds, uintptr_t x, uintptr_t w, uintptr_t rstd, uintptr_t dx,
         uintptr_t dw, int64_t rows, int64_t cols, int64_t dy_stride, int64_t ds_stride,
         int64_t x_stride, int64_t dx_stride, int x_dtype, int w_dtype, int threads) {
        llama_kernels::cpu::rms_norm_bwd(address_ptr<const void>(dy), address_ptr<const void>(ds),
                                         address_ptr<const void>(x), address_ptr<const void>(w),
                                         address_ptr<const float>(rstd), address_ptr<void>(dx),
                                         address_ptr<void>(dw), rows, cols, dy_stride, ds_stride, x_stride,
                                         dx_stride, x_dtype, w_dtype, threads);
      },
      py::call_guard<py::gil_scoped_release>());
}
