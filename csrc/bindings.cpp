// llama_kernels._C: pybind11 bindings. No libtorch. The CUDA entry points take tensors as
// TensorArg descriptors (address, dtype code, device, sizes, strides; csrc/tensor_arg.h), which
// llama_kernels.dispatch.tensor_arg() builds, plus their scalars and a stream handle. The CPU entry
// points, called on every decode step of a CPU model where Python overhead counts, take raw
// addresses (tensor.data_ptr()), sizes, strides and dtype codes. The Python side
// (llama_kernels/ops/*.py) validates tensors and allocates outputs. CPU kernels release the GIL
// while they run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "common.h"
#include "cpu/kernels_cpu.h"
#include "tensor_arg.h"
#ifdef LLAMA_KERNELS_WITH_CUDA
#include "cuda/kernels_cuda.h"
#endif

namespace py = pybind11;
using llama_kernels::cpu::available_isas;

namespace {

template <typename T>
T* ptr(uintptr_t addr) {
  return reinterpret_cast<T*>(addr);
}

#ifndef LLAMA_KERNELS_WITH_CUDA
[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "llama_kernels._C was built without CUDA (nvcc was not found at build time, or LLAMA_KERNELS_NO_CUDA=1 "
      "was set); rebuild with nvcc on PATH to use the CUDA kernels");
}
#endif

py::dict build_info() {
  py::dict d;
  d["version"] = LLAMA_KERNELS_VERSION;
  d["cxx_compiler"] = LLAMA_KERNELS_CXX_COMPILER;
#ifdef LLAMA_KERNELS_HAVE_OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  d["cpu_isas"] = available_isas();
#ifdef LLAMA_KERNELS_WITH_CUDA
  d["cuda"] = true;
  d["cuda_compiler"] = LLAMA_KERNELS_CUDA_COMPILER;
  d["cuda_archs"] = LLAMA_KERNELS_CUDA_ARCHS;
  d["cuda_runtime"] = llama_kernels::cuda::runtime_version();
#else
  d["cuda"] = false;
  d["cuda_compiler"] = py::none();
  d["cuda_archs"] = py::none();
  d["cuda_runtime"] = py::none();
#endif
  return d;
}

// {"float32": 0, "float16": 1, "bfloat16": 2, "uint8": 3, "int32": 4, "int64": 5}: the DType
// codes the entry points take.
py::dict dtype_codes() {
  py::dict d;
  for (llama_kernels::DType t : llama_kernels::kDTypes) d[llama_kernels::dtype_name(t)] = static_cast<int>(t);
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Compiled kernels (C++ CPU and CUDA) behind the llama_kernels package";
  m.def("build_info", &build_info, "How this module was built");
  m.def("dtype_codes", &dtype_codes, "The dtype codes the entry points take, by torch dtype name");

  using llama_kernels::TensorArg;
  py::class_<TensorArg>(m, "TensorArg", "A tensor as the CUDA entry points take it (csrc/tensor_arg.h)")
      .def(py::init<>(), "An absent tensor (address 0)")
      .def(py::init<uintptr_t, int, int, std::vector<int64_t>, std::vector<int64_t>>(), py::arg("address"),
           py::arg("dtype"), py::arg("device"), py::arg("sizes"), py::arg("strides"),
           "address, dtype code (dtype_codes()), CUDA ordinal or -1 for the CPU, sizes and strides in elements")
      .def_readonly("address", &TensorArg::address)
      .def_readonly("dtype", &TensorArg::dtype)
      .def_readonly("device", &TensorArg::device)
      .def_readonly("sizes", &TensorArg::sizes)
      .def_readonly("strides", &TensorArg::strides)
      .def("dim", &TensorArg::dim)
      .def("size", [](const TensorArg& t, int64_t i) {
        if (i < 0 || i >= t.dim()) throw py::index_error("dim out of range");
        return t.size(i);
      })
      .def("stride", [](const TensorArg& t, int64_t i) {
        if (i < 0 || i >= t.dim()) throw py::index_error("dim out of range");
        return t.stride(i);
      })
      .def("defined", &TensorArg::defined)
      .def("__repr__", [](const TensorArg& t) {
        llama_kernels::Message m;
        m << "TensorArg(address=" << t.address << ", dtype=" << t.dtype << ", device=" << t.device << ", sizes=[";
        for (size_t i = 0; i < t.sizes.size(); ++i) m << (i ? ", " : "") << t.sizes[i];
        m << "], strides=[";
        for (size_t i = 0; i < t.strides.size(); ++i) m << (i ? ", " : "") << t.strides[i];
        m << "])";
        return m.str();
      });

  // ------------------------------------------------------------------ CPU
  m.def("cpu_isas", &available_isas, "CPU instruction sets built in and supported here");
  m.def("cpu_isa", &llama_kernels::cpu::current_isa, "The CPU instruction set the kernels use now");
  m.def("set_cpu_isa", &llama_kernels::cpu::set_isa, py::arg("name"),
        "Use another CPU instruction set ('' restores the automatic choice)");

  m.def(
      "rms_norm_fwd_cpu",
      [](uintptr_t x, uintptr_t h, uintptr_t w, uintptr_t y, uintptr_t s, uintptr_t rstd,
         int64_t rows, int64_t cols, int64_t x_stride, int64_t h_stride, int64_t y_stride,
         int64_t s_stride, int x_dtype, int w_dtype, float eps, int threads) {
        if (h != 0 && s == 0) throw std::invalid_argument("s: the sum x + h needs an output");
        llama_kernels::cpu::rms_norm_fwd(ptr<const void>(x), ptr<const void>(h), ptr<const void>(w),
                                   ptr<void>(y), ptr<void>(s), ptr<float>(rstd), rows, cols,
                                   x_stride, h_stride, y_stride, s_stride, x_dtype, w_dtype, eps,
                                   threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "rms_norm_bwd_cpu",
      [](uintptr_t dy, uintptr_t ds, uintptr_t x, uintptr_t w, uintptr_t rstd, uintptr_t dx,
         uintptr_t dw, int64_t rows, int64_t cols, int64_t dy_stride, int64_t ds_stride,
         int64_t x_stride, int64_t dx_stride, int x_dtype, int w_dtype, int threads) {
        llama_kernels::cpu::rms_norm_bwd(ptr<const void>(dy), ptr<const void>(ds), ptr<const void>(x),
                                   ptr<const void>(w), ptr<const float>(rstd), ptr<void>(dx),
                                   ptr<void>(dw), rows, cols, dy_stride, ds_stride, x_stride,
                                   dx_stride, x_dtype, w_dtype, threads);
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "linear_cpu",
      [](uintptr_t x, const std::vector<uintptr_t>& w, const std::vector<uintptr_t>& bias,
         const std::vector<uintptr_t>& y, const std::vector<int64_t>& n, int64_t m, int64_t k, int64_t x_stride,
         int64_t y_stride, int x_dtype, int w_dtype, int bias_dtype, int threads) {
        llama_kernels::cpu::LinearParts parts;
        for (uintptr_t a : w) parts.w.push_back(ptr<const void>(a));
        for (uintptr_t a : bias) parts.bias.push_back(ptr<const void>(a));
        for (uintptr_t a : y) parts.y.push_back(ptr<void>(a));
        parts.n = n;
        llama_kernels::cpu::linear(ptr<const void>(x), parts, m, k, x_stride, y_stride, x_dtype, w_dtype, bias_dtype,
                             threads);
      },
      py::call_guard<py::gil_scoped_release>(),
      "y[p] = x @ w[p]^T + bias[p] for a few rows of x and one or more weights w[p] of n[p] rows; a bias "
      "entry may be 0 (none); all y[p] share y_stride");

  m.def(
      "int4_matmul_cpu",
      [](uintptr_t x, const std::vector<uintptr_t>& packed, const std::vector<uintptr_t>& scales,
         const std::vector<uintptr_t>& zeros, uintptr_t lut, const std::vector<uintptr_t>& y,
         const std::vector<int64_t>& n, int64_t m, int64_t k, int group, int64_t x_stride, int64_t y_stride,
         int x_dtype, int threads) {
        llama_kernels::cpu::Int4Parts parts;
        for (uintptr_t a : packed) parts.packed.push_back(ptr<const uint8_t>(a));
        for (uintptr_t a : scales) parts.scales.push_back(ptr<const void>(a));
        for (uintptr_t a : zeros) parts.zeros.push_back(ptr<const void>(a));
        for (uintptr_t a : y) parts.y.push_back(ptr<void>(a));
        parts.n = n;
        llama_kernels::cpu::int4_matmul(ptr<const void>(x), parts, ptr<const float>(lut), m, k, group, x_stride,
                                  y_stride, x_dtype, threads);
      },
      py::call_guard<py::gil_scoped_release>(),
      "y[p] = x @ dequant(W[p])^T for one or more 4-bit weights W[p] of n[p] rows (packed codes, fp16 "
      "scales and zeros; a zeros entry may be 0 for NF4) and one fp32 lut; all y[p] share y_stride");
  m.def(
      "int4_dequantize_cpu",
      [](uintptr_t packed, uintptr_t scales, uintptr_t zeros, uintptr_t lut, uintptr_t w, int64_t n, int64_t k,
         int group, int w_dtype, int threads) {
        llama_kernels::cpu::int4_dequantize(ptr<const uint8_t>(packed), ptr<const void>(scales), ptr<const void>(zeros),
                                      ptr<const float>(lut), ptr<void>(w), n, k, group, w_dtype, threads);
      },
      py::call_guard<py::gil_scoped_release>(),
      "w (n, k) contiguous, in float32/float16/bfloat16 = dequant of the packed codes (zeros may be 0)");
  m.def(
      "rope_decode_attention_cpu",
      [](uintptr_t q, uintptr_t k_new, uintptr_t v_new, uintptr_t k_cache, uintptr_t v_cache, uintptr_t seqlens,
         bool seqlens_int64, uintptr_t cos, uintptr_t sin, uintptr_t out, int64_t batch, int64_t heads,
         int64_t kv_heads, int64_t head_dim, int64_t capacity, int64_t table_len, std::vector<int64_t> strides,
         int dtype, float scale, int threads) {
        LLAMA_KERNELS_CHECK(strides.size() == 12, "strides: expected 12 values, got " << strides.size());
        LLAMA_KERNELS_CHECK(kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0 && head_dim % 2 == 0,
                      "heads, kv_heads, head_dim: " << heads << ", " << kv_heads << ", " << head_dim);
        py::gil_scoped_release release;
        llama_kernels::cpu::rope_decode_attention(ptr<const void>(q), ptr<const void>(k_new), ptr<const void>(v_new),
                                            ptr<void>(k_cache), ptr<void>(v_cache), ptr<const void>(seqlens),
                                            seqlens_int64, ptr<const float>(cos), ptr<const float>(sin),
                                            ptr<void>(out), batch, heads, kv_heads, head_dim, capacity, table_len,
                                            strides.data(), dtype, scale, threads);
      },
      "RoPE on q and the new key at position seqlens[b], append to the caches, attention over 0..L");

  // ------------------------------------------------------------------ CUDA
#ifdef LLAMA_KERNELS_WITH_CUDA
  namespace lc = llama_kernels::cuda;
  m.def("rms_norm_fwd_cuda", &lc::rms_norm_fwd, py::arg("x"), py::arg("h"), py::arg("w"), py::arg("y"), py::arg("s"),
        py::arg("rstd"), py::arg("eps"), py::arg("stream"));
  m.def("rms_norm_bwd_cuda", &lc::rms_norm_bwd, py::arg("dy"), py::arg("ds"), py::arg("x"), py::arg("w"),
        py::arg("rstd"), py::arg("dx"), py::arg("dw"), py::arg("dw_partial"), py::arg("stream"));
  m.def("rms_norm_max_cols_cuda", &lc::rms_norm_max_cols);
  m.def("int4_matmul_cuda", &lc::int4_matmul, py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("zeros"),
        py::arg("lut"), py::arg("y"), py::arg("workspace"), py::arg("group_size"), py::arg("int4_codes"),
        py::arg("splits"), py::arg("stream"));
  m.def("int4_matmul_max_rows_cuda", &lc::int4_matmul_max_rows);
  m.def("int4_dequantize_cuda", &lc::int4_dequantize, py::arg("packed"), py::arg("scales"), py::arg("zeros"),
        py::arg("lut"), py::arg("w"), py::arg("group_size"), py::arg("int4_codes"), py::arg("stream"));
  m.def("rope_decode_attention_cuda", &lc::rope_decode_attention, py::arg("q"), py::arg("k_new"), py::arg("v_new"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("seqlens"), py::arg("cos"), py::arg("sin"), py::arg("out"),
        py::arg("workspace"), py::arg("softmax_scale"), py::arg("splits"), py::arg("stream"));
  m.def("rope_decode_workspace_elems_cuda", &lc::rope_decode_workspace_elems);
#else
  m.def("rms_norm_fwd_cuda", [](py::args, py::kwargs) -> std::string { no_cuda(); });
  m.def("rms_norm_bwd_cuda", [](py::args, py::kwargs) -> std::string { no_cuda(); });
  m.def("rms_norm_max_cols_cuda", [](py::args, py::kwargs) -> int64_t { no_cuda(); });
  m.def("int4_matmul_cuda", [](py::args, py::kwargs) -> std::string { no_cuda(); });
  m.def("int4_matmul_max_rows_cuda", [](py::args, py::kwargs) -> int64_t { no_cuda(); });
  m.def("int4_dequantize_cuda", [](py::args, py::kwargs) -> std::string { no_cuda(); });
  m.def("rope_decode_attention_cuda", [](py::args, py::kwargs) -> std::string { no_cuda(); });
  m.def("rope_decode_workspace_elems_cuda", [](py::args, py::kwargs) -> int64_t { no_cuda(); });
#endif
}
