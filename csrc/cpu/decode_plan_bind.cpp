// Python bindings of the CPU decode plan (csrc/cpu/decode_plan.h): raw addresses and sizes, as
// for the other CPU entry points; the GIL is released while a step runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "common.h"
#include "cpu/decode_plan.h"
#include "registry.h"

namespace py = pybind11;
using llama_kernels::address_ptr;
using llama_kernels::address_ptrs;
using llama_kernels::cpu::DecodePlan;
using llama_kernels::cpu::PlanLayer;
using llama_kernels::cpu::PlanWeights;

namespace {

PlanWeights dense(int64_t k, const std::vector<uintptr_t>& w, const std::vector<int64_t>& n) {
  LLAMA_KERNELS_CHECK(!n.empty() && w.size() == n.size(), "weights: expected one address per weight");
  PlanWeights p;
  p.k = k;
  p.dense.w = address_ptrs<const void>(w);
  p.dense.bias.assign(n.size(), nullptr);
  p.dense.y.assign(n.size(), nullptr);
  p.dense.n = n;
  return p;
}

PlanWeights int4(int64_t k, int group, bool q8, uintptr_t lut, const std::vector<uintptr_t>& packed,
                 const std::vector<uintptr_t>& scales, const std::vector<uintptr_t>& zeros,
                 const std::vector<int64_t>& n) {
  LLAMA_KERNELS_CHECK(!n.empty() && packed.size() == n.size() && scales.size() == n.size() && zeros.size() == n.size(),
                      "weights: expected packed codes, scales and zeros for each weight");
  PlanWeights p;
  p.int4 = true;
  p.q8 = q8;
  p.k = k;
  p.group = group;
  p.lut = address_ptr<const float>(lut);
  p.quant.packed = address_ptrs<const uint8_t>(packed);
  p.quant.scales = address_ptrs<const void>(scales);
  p.quant.zeros = address_ptrs<const void>(zeros);
  p.quant.y.assign(n.size(), nullptr);
  p.quant.n = n;
  return p;
}

}  // namespace

LLAMA_KERNELS_BIND(decode_plan_cpu) {
  py::class_<PlanWeights>(m, "PlanWeights", "One projection of a CPU decode plan: one weight or several side by side")
      .def_static("dense", &dense, py::arg("k"), py::arg("w"), py::arg("n"),
                  "fp32 weights (n[p], k), contiguous, at the addresses w[p]")
      .def_static("int4", &int4, py::arg("k"), py::arg("group"), py::arg("q8"), py::arg("lut"), py::arg("packed"),
                  py::arg("scales"), py::arg("zeros"), py::arg("n"),
                  "4-bit weights: packed codes (n[p], k / 2), fp16 scales and zeros (zeros 0 for NF4), the "
                  "fp32 table; q8: int8 activations (int4 only)")
      .def_property_readonly("total", &PlanWeights::total);
  py::class_<DecodePlan>(m, "DecodePlanCpu", "A whole decode step of a LLaMA on the CPU in one call")
      .def(py::init([](int64_t batch, int64_t dim, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t vocab,
                       int64_t capacity, float eps, float scale, uintptr_t embedding, uintptr_t final_norm,
                       PlanWeights head, uintptr_t cos, uintptr_t sin, int64_t table_len, int64_t table_stride,
                       uintptr_t seqlens, int cache_dtype) {
             return new DecodePlan(batch, dim, heads, kv_heads, head_dim, vocab, capacity, eps, scale,
                                   address_ptr<const float>(embedding), address_ptr<const float>(final_norm),
                                   std::move(head), address_ptr<const float>(cos), address_ptr<const float>(sin),
                                   table_len, table_stride, address_ptr<int64_t>(seqlens), cache_dtype);
           }),
           py::arg("batch"), py::arg("dim"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"),
           py::arg("vocab"), py::arg("capacity"), py::arg("eps"), py::arg("softmax_scale"), py::arg("embedding"),
           py::arg("final_norm"), py::arg("head"), py::arg("cos"), py::arg("sin"), py::arg("table_len"),
           py::arg("table_stride"), py::arg("seqlens"), py::arg("cache_dtype"))
      .def(
          "add_layer",
          [](DecodePlan& plan, uintptr_t attention_norm, uintptr_t ffn_norm, PlanWeights qkv, PlanWeights wo,
             PlanWeights gate_up, PlanWeights down, uintptr_t k_cache, uintptr_t v_cache) {
            plan.add_layer(PlanLayer{address_ptr<const float>(attention_norm), address_ptr<const float>(ffn_norm),
                                     std::move(qkv), std::move(wo), std::move(gate_up), std::move(down),
                                     address_ptr<void>(k_cache), address_ptr<void>(v_cache)});
          },
          py::arg("attention_norm"), py::arg("ffn_norm"), py::arg("qkv"), py::arg("wo"), py::arg("gate_up"),
          py::arg("down"), py::arg("k_cache"), py::arg("v_cache"))
      .def(
          "step",
          [](DecodePlan& plan, uintptr_t tokens, uintptr_t logits, uintptr_t argmax, int threads) {
            plan.step(address_ptr<const int64_t>(tokens), address_ptr<float>(logits), address_ptr<int64_t>(argmax),
                      threads);
          },
          py::arg("tokens"), py::arg("logits"), py::arg("argmax"), py::arg("threads"),
          py::call_guard<py::gil_scoped_release>(),
          "tokens (batch,) int64 -> logits (batch, vocab) fp32 and/or argmax (batch,) int64 (address 0: not "
          "wanted); advances seqlens by one")
      .def("set_timing", &DecodePlan::set_timing, py::arg("on"),
           "Time each op of the steps that follow (totals reset)")
      .def(
          "timings",
          [](const DecodePlan& plan) {
            py::dict d;
            for (int i = 0; i < DecodePlan::kOps; ++i) d[DecodePlan::kOpNames[i]] = plan.op_micros()[i];
            return py::make_tuple(d, plan.timed_steps());
          },
          "({op: microseconds summed over the timed steps}, timed steps)");
}
