// A tensor as the CUDA entry points take it: its address, dtype code, device and shape, so that
// sizes, strides and dtypes cross the binding with the tensor they describe rather than as loose
// integers in a long positional list. Plain C++ (no CUDA, no libtorch); built in Python by
// llama_kernels.dispatch.tensor_arg().
#pragma once
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace llama_kernels {

struct TensorArg {
  uintptr_t address = 0;  // 0: absent (an optional tensor not given), or an empty tensor
  int dtype = -1;         // a DType code (common.h); -1 when absent
  int device = -1;        // CUDA ordinal; -1 for the CPU
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;  // in elements

  TensorArg() = default;
  TensorArg(uintptr_t address_, int dtype_, int device_, std::vector<int64_t> sizes_, std::vector<int64_t> strides_)
      : address(address_), dtype(dtype_), device(device_), sizes(std::move(sizes_)), strides(std::move(strides_)) {}

  int64_t dim() const { return static_cast<int64_t>(sizes.size()); }
  // Size and stride of dim i (i in [0, dim()); callers check the rank first).
  int64_t size(int64_t i) const { return sizes[static_cast<size_t>(i)]; }
  int64_t stride(int64_t i) const { return strides[static_cast<size_t>(i)]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : sizes) n *= s;
    return n;
  }
  bool defined() const { return address != 0; }
  // Given: a tensor was passed (an empty tensor may have address 0 but has a shape).
  bool given() const { return address != 0 || (!sizes.empty() && numel() == 0); }
};

}  // namespace llama_kernels
