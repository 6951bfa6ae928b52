// llama_kernels._C: pybind11 bindings. No libtorch. This file binds what is module-wide (build_info,
// dtype codes, TensorArg, the CPU ISA choice) and then every op's bindings, which each op
// registers from a file of its own (registry.h). The CUDA entry points take tensors as
// TensorArg descriptors (address, dtype code, device, sizes, strides; csrc/tensor_arg.h), which
// llama_kernels.dispatch.tensor_arg() builds, plus their scalars and a stream handle. The CPU entry
// points, called on every decode step of a CPU model where Python overhead counts, take raw
// addresses (tensor.data_ptr()), sizes, strides and dtype codes. The Python side
// (llama_kernels/ops/*.py) validates tensors and allocates outputs. CPU kernels release the GIL
// while they run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "common.h"
#include "cpu/kernels_cpu.h"
#include "registry.h"
#include "tensor_arg.h"
#ifdef LLAMA_KERNELS_WITH_CUDA
#include "cuda/kernels_cuda.h"
#endif

namespace py = pybind11;
using llama_kernels::cpu::available_isas;

namespace {

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

  // ------------------------------------------------------------------ ops
  // Each op's CPU and CUDA entry points (csrc/cpu/<op>_bind.cpp, csrc/cuda/<op>_entry.cpp).
  for (llama_kernels::BindFunction bind : llama_kernels::bind_functions()) bind(m);
}
