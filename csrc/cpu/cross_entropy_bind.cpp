// Python binding of the CPU cross-entropy rows (csrc/cpu/cross_entropy.cpp): raw addresses,
// sizes and the row stride; the GIL is released while the kernel runs.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cpu/kernels_cpu.h"
#include "registry.h"

namespace py = pybind11;
using llama_kernels::address_ptr;

LLAMA_KERNELS_BIND(cross_entropy_cpu) {
  m.def(
      "cross_entropy_rows_cpu",
      [](uintptr_t logits, uintptr_t target, uintptr_t loss, uintptr_t lse, int64_t rows, int64_t v, int64_t stride,
         int64_t ignore_index, float smoothing, float z_loss, float scale, bool write_grad, int threads) {
        llama_kernels::cpu::cross_entropy_rows(address_ptr<float>(logits), address_ptr<const int64_t>(target),
                                               address_ptr<float>(loss), address_ptr<float>(lse), rows, v, stride,
                                               ignore_index, smoothing, z_loss, scale, write_grad, threads);
      },
      py::call_guard<py::gil_scoped_release>());
}
