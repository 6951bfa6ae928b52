// Module-wide CUDA helpers.
#include <string>

#include "cuda/common.cuh"
#include "cuda/kernels_cuda.h"

namespace llama_kernels {
namespace cuda {

std::string status_string(int status) {
  if (status == kStatusRowsTooLong) return "rows too long for the kernel";
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}

std::string runtime_version() {
  return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
}

}  // namespace cuda
}  // namespace llama_kernels
