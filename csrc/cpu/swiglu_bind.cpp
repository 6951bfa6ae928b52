// Python bindings of the CPU SwiGLU (csrc/cpu/swiglu.cpp): raw addresses, sizes, row strides
// and one dtype code; the GIL is released while the kernel runs.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cpu/kernels_cpu.h"
#include "registry.h"

namespace py = pybind11;
using llama_kernels::address_ptr;

LLAMA_KERNELS_BIND(swiglu_cpu) {
  m.def(
      "swiglu_fwd_cpu",
      [](uintptr_t a, uintptr_t b, uintptr_t y, int64_t rows, int64_t cols, int64_t a_stride, int64_t b_stride,
         int64_t y_stride, int dtype, int threads) {
        llama_kernels::cpu::swiglu_fwd(address_ptr<const void>(a), address_ptr<const void>(b), address_ptr<void>(y),
                                       rows, cols, a_stride, b_stride, y_stride, dtype, threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "swiglu_bwd_cpu",
      [](uintptr_t dy, uintptr_t a, uintptr_t b, uintptr_t da, uintptr_t db, int64_t rows, int64_t cols,
         int64_t dy_stride, int64_t a_stride, int64_t b_stride, int64_t da_stride, int64_t db_stride, int dtype,
         int threads) {
        llama_kernels::cpu::swiglu_bwd(address_ptr<const void>(dy), address_ptr<const void>(a),
                                       address_ptr<const void>(b), address_ptr<void>(da), address_ptr<void>(db),
                                       rows, cols, dy_stride, a_stride, b_stride, da_stride, db_stride, dtype,
                                       threads);
      },
      py::call_guard<py::gil_scoped_release>());
}
