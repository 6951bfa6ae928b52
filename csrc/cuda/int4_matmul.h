// int4 / NF4 matmul and dequantization on CUDA: the op's host interface (plain C++, no CUDA headers).
// The params struct is the launcher's input (csrc/cuda/int4_matmul.cu); the entry point
// (csrc/cuda/int4_matmul_entry.cpp) checks the TensorArg descriptors, fills it and calls the launcher.
#pragma once
#include <cstdint>
#include <string>

#include "cuda/kernels_cuda.h"
#include "tensor_arg.h"

namespace llama_kernels {
namespace cuda {

// y (m, n) = x (m, k) @ dequant(W)^T for m <= int4_matmul_max_rows(); x, y fp16 or bf16 with row
// strides. packed (n, k/2) uint8, scales/zeros (n, k/group_size) fp16 (zeros may be 0), lut 16
// fp32 values, all contiguous. int4_codes: lut is q - 8 (the bit-trick path); else the table is
// used. splits > 1 splits K; workspace then holds splits * m * n fp32 partial sums.
struct Int4MatmulParams {
  uintptr_t x, packed, scales, zeros, lut, y, workspace;
  int64_t m, n, k, group_size, x_stride, y_stride;
  int x_dtype;
  bool int4_codes;
  int64_t splits;
  int device;
};

// w (n, k) contiguous in w_dtype (fp16 or bf16) = the dequantized weight.
struct Int4DequantizeParams {
  uintptr_t packed, scales, zeros, lut, w;
  int64_t n, k, group_size;
  int w_dtype;
  bool int4_codes;
  int device;
};

// Entry points: k is twice packed's columns; zeros may be absent (NF4); workspace may be absent
// when splits is 1.
std::string int4_matmul(const TensorArg& x, const TensorArg& packed, const TensorArg& scales,
                        const TensorArg& zeros, const TensorArg& lut, const TensorArg& y,
                        const TensorArg& workspace, int64_t group_size, bool int4_codes, int64_t splits,
                        uintptr_t stream);
std::string int4_dequantize(const TensorArg& packed, const TensorArg& scales, const TensorArg& zeros,
                            const TensorArg& lut, const TensorArg& w, int64_t group_size, bool int4_codes,
                            uintptr_t stream);
inline int64_t int4_matmul_max_rows() { return 16; }
// Iterations of the small-M kernel over K (4 chunks of 32 codes each); splits divide them.
inline int64_t int4_matmul_iterations(int64_t k) { return (k / 32 + 3) / 4; }

int launch_int4_matmul(const Int4MatmulParams& p, uintptr_t stream);
int launch_int4_dequantize(const Int4DequantizeParams& p, uintptr_t stream);

}  // namespace cuda
}  // namespace llama_kernels
