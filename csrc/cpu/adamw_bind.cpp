// Python binding of the CPU AdamW step (csrc/cpu/adamw.cpp): lists of addresses and element
// counts, one gradient dtype code; the GIL is released while the kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "cpu/kernels_cpu.h"
#include "registry.h"

namespace py = pybind11;
using llama_kernels::address_ptrs;

LLAMA_KERNELS_BIND(adamw_cpu) {
  m.def(
      "adamw_step_cpu",
      [](const std::vector<uintptr_t>& params, const std::vector<uintptr_t>& grads,
         const std::vector<uintptr_t>& exp_avgs, const std::vector<uintptr_t>& exp_avg_sqs,
         const std::vector<int64_t>& n, int g_dtype, float lr, float beta1, float beta2, float one_minus_beta1,
         float one_minus_beta2, float eps, float weight_decay, float bias_correction1, float bias_correction2_sqrt,
         int threads) {
        llama_kernels::cpu::AdamWParts parts;
        parts.p = address_ptrs<float>(params);
        parts.g = address_ptrs<const void>(grads);
        parts.m = address_ptrs<float>(exp_avgs);
        parts.v = address_ptrs<float>(exp_avg_sqs);
        parts.n = n;
        llama_kernels::cpu::adamw_step(parts, g_dtype, lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps,
                                       weight_decay, bias_correction1, bias_correction2_sqrt, threads);
      },
      py::call_guard<py::gil_scoped_release>(),
      "one AdamW step over every (param, grad, exp_avg, exp_avg_sq) of n[i] contiguous elements, in place");
}
