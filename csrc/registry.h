// The bindings registry. Each op binds its own entry points, in a file of that op
// (csrc/cpu/<op>_bind.cpp for the CPU, csrc/cuda/<op>_entry.cpp for CUDA), with
//
//   LLAMA_KERNELS_BIND(<op>_cpu) { m.def("<op>_cpu", ...); }
//
// which registers the function when the module is loaded; PYBIND11_MODULE in bindings.cpp
// calls every registered function. Those files are linked into the module directly (not from an
// archive), so their registration objects are kept.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

namespace llama_kernels {

using BindFunction = void (*)(pybind11::module_&);

// Every registered binding function, in registration order.
inline std::vector<BindFunction>& bind_functions() {
  static std::vector<BindFunction> functions;
  return functions;
}

struct BindRegistrar {
  explicit BindRegistrar(BindFunction f) { bind_functions().push_back(f); }
};

// A raw address from Python (tensor.data_ptr()) as a pointer.
template <typename T>
T* address_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// Raw addresses from Python (one per part of a multi-weight call) as pointers.
template <typename T>
std::vector<T*> address_ptrs(const std::vector<uintptr_t>& addresses) {
  std::vector<T*> out;
  out.reserve(addresses.size());
  for (uintptr_t a : addresses) out.push_back(address_ptr<T>(a));
  return out;
}

// What a CUDA entry point does in a build without CUDA.
[[noreturn]] inline void no_cuda() {
  throw std::runtime_error(
      "llama_kernels._C was built without CUDA (nvcc was not found at build time, or LLAMA_KERNELS_NO_CUDA=1 "
      "was set); rebuild with nvcc on PATH to use the CUDA kernels");
}

}  // namespace llama_kernels

// Defines and registers a binding function; its body sees the module as `m`. `tag` names it and
// must be unique in the module.
#define LLAMA_KERNELS_BIND(tag)                                                              \
  static void llama_kernels_bind_##tag(pybind11::module_& m);                                \
  static const ::llama_kernels::BindRegistrar llama_kernels_bind_registrar_##tag(          \
      &llama_kernels_bind_##tag);                                                            \
  static void llama_kernels_bind_##tag(pybind11::module_& m)

// Binds `name` to a function that takes any arguments and raises "built without CUDA"; `ret` is
// the real entry point's return type.
#define LLAMA_KERNELS_BIND_NO_CUDA(name, ret) \
  m.def(name, [](pybind11::args, pybind11::kwargs) -> ret { ::llama_kernels::no_cuda(); })
