// What the CUDA ops share on the host side: status codes and strings, the runtime version. Each op
// declares its own interface in csrc/cuda/<op>.h, which includes this. Plain C++: the host files
// include it without CUDA headers. Entry points take tensors as TensorArg descriptors (tensor_arg.h) plus the true
// scalars; `stream` is a cudaStream_t handle, `device` the CUDA ordinal.
//
// Two layers. The launchers (launch_*, in the .cu files) take validated arguments, never throw,
// and return a status: 0, a cudaError_t, or a kStatus* code below. A C++ exception thrown from
// this module segfaulted in one GPU image, so nothing on the GPU path throws. The entry points
// (csrc/cuda/<op>_entry.cpp) check the descriptors (rank, dtype, device, shapes, strides), fill the op's params
// struct, call a launcher and return "" or "ValueError: ..." /
// "RuntimeError: ...", which llama_kernels/dispatch.py turns into the Python exception.
#pragma once
#include <cstdint>
#include <string>

#include "tensor_arg.h"

namespace llama_kernels {
namespace cuda {

constexpr int kStatusRowsTooLong = -1;  // RMSNorm: a row does not fit the register-resident kernel

std::string status_string(int status);

// Each op's launch parameters are declared once, in its *Params struct (csrc/cuda/<op>.h): the
// entry point fills it from the TensorArg descriptors it has checked, and the launcher takes
// it. Addresses are device addresses, strides are in elements, dtypes are DType codes (common.h).

// Version of the CUDA runtime this module was built with, e.g. "13.0".
std::string runtime_version();

}  // namespace cuda
}  // namespace llama_kernels
