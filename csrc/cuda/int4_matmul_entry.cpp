// The CUDA int4 / NF4 matmul and dequantization entry points: each checks its TensorArg descriptors, fills the
// params struct (csrc/cuda/int4_matmul.h) and calls the launcher, returning "" or "ValueError: ..." /
// "RuntimeError: ..."; none throws (see kernels_cuda.h). Built in every build: without CUDA the
// names are bound to stubs that raise "built without CUDA".
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "cuda/int4_matmul.h"
#include "registry.h"
#include "tensor_arg.h"

#ifdef LLAMA_KERNELS_WITH_CUDA
#include "common.h"
#include "cuda/checks.h"

namespace llama_kernels {
namespace cuda {

namespace {

std::string check_half(int dtype, const char* name) {
  ENTRY_RETURN_IF_ERROR(check_dtype(dtype, name));
  const DType d = static_cast<DType>(dtype);
  ENTRY_REQUIRE(d == DType::F16 || d == DType::BF16,
                name << ": the CUDA int4 kernels take float16 or bfloat16, got " << dtype_name(d));
  return {};
}

std::string check_layout(int64_t n, int64_t k, int64_t group_size, uintptr_t packed) {
  ENTRY_REQUIRE(n > 0 && n <= 0x7fffffff, "qw: expected 1..2^31-1 output features, got " << n);
  ENTRY_REQUIRE(k > 0 && k % 32 == 0 && k <= 0x7fffffff,
                "qw: in_features must be a positive multiple of 32, got " << k);
  ENTRY_REQUIRE(group_size == 32 || group_size == 64 || group_size == 128,
                "group_size: expected 32, 64 or 128, got " << group_size);
  ENTRY_REQUIRE(k % group_size == 0, "group_size: " << group_size << " does not divide K = " << k);
  ENTRY_REQUIRE(packed % 16 == 0, "qw.packed: must be 16-byte aligned for the CUDA kernel");
  return {};
}

// The 4-bit weight on `device`: packed (n, k/2) uint8, scales and zeros (or none) (n, k/group_size)
// float16, lut (16,) float32, all contiguous. Sets n and k.
std::string check_weight(const TensorArg& packed, const TensorArg& scales, const TensorArg& zeros,
                         const TensorArg& lut, int64_t group_size, int device, int64_t& n, int64_t& k) {
  ENTRY_RETURN_IF_ERROR(check_tensor(packed, "qw.packed", 2, device));
  ENTRY_RETURN_IF_ERROR(check_dtype_is(packed, "qw.packed", DType::U8));
  ENTRY_RETURN_IF_ERROR(check_contiguous(packed, "qw.packed"));
  n = packed.size(0);
  k = packed.size(1) * 2;
  ENTRY_RETURN_IF_ERROR(check_layout(n, k, group_size, packed.address));
  const std::pair<const char*, const TensorArg*> groups[] = {{"qw.scales", &scales}, {"qw.zeros", &zeros}};
  for (const auto& g : groups) {
    if (g.second == &zeros && !zeros.given()) continue;  // formats without zeros (NF4)
    ENTRY_RETURN_IF_ERROR(check_tensor(*g.second, g.first, 2, device));
    ENTRY_RETURN_IF_ERROR(check_shape(*g.second, g.first, {n, k / group_size}));
    ENTRY_RETURN_IF_ERROR(check_dtype_is(*g.second, g.first, DType::F16));
    ENTRY_RETURN_IF_ERROR(check_contiguous(*g.second, g.first));
  }
  ENTRY_RETURN_IF_ERROR(check_tensor(lut, "qw.lut", 1, device));
  ENTRY_RETURN_IF_ERROR(check_shape(lut, "qw.lut", {16}));
  ENTRY_RETURN_IF_ERROR(check_dtype_is(lut, "qw.lut", DType::F32));
  return check_contiguous(lut, "qw.lut");
}

}  // namespace

std::string int4_matmul(const TensorArg& x, const TensorArg& packed, const TensorArg& scales,
                        const TensorArg& zeros, const TensorArg& lut, const TensorArg& y,
                        const TensorArg& workspace, int64_t group_size, bool int4_codes, int64_t splits,
                        uintptr_t stream) {
  ENTRY_RETURN_IF_ERROR(check_tensor(x, "x", 2, x.device));
  ENTRY_RETURN_IF_ERROR(check_half(x.dtype, "x"));
  int64_t n = 0, k = 0;
  ENTRY_RETURN_IF_ERROR(check_weight(packed, scales, zeros, lut, group_size, x.device, n, k));
  const int64_t m = x.size(0);
  ENTRY_REQUIRE(m <= int4_matmul_max_rows(),
                "x: the CUDA int4 kernel takes at most " << int4_matmul_max_rows() << " rows, got " << m);
  ENTRY_REQUIRE(x.size(1) == k, "x: has " << x.size(1) << " columns but qw has " << k << " in_features");
  ENTRY_RETURN_IF_ERROR(check_last_contiguous(x, "x"));
  ENTRY_REQUIRE(x.address % 16 == 0 && x.stride(0) % 8 == 0,
                "x: rows must start 16-byte aligned (aligned pointer, row stride a multiple of 8)");
  ENTRY_RETURN_IF_ERROR(check_tensor(y, "y", 2, x.device));
  ENTRY_RETURN_IF_ERROR(check_shape(y, "y", {m, n}));
  ENTRY_RETURN_IF_ERROR(check_same_dtype(y, "y", x, "x"));
  ENTRY_RETURN_IF_ERROR(check_last_contiguous(y, "y"));
  ENTRY_REQUIRE(m <= 1 || y.stride(0) >= n, "y: row stride " << y.stride(0) << " is shorter than a row of " << n);
  const int64_t iters = int4_matmul_iterations(k);
  const int64_t most = iters < 65535 ? iters : 65535;
  ENTRY_REQUIRE(splits >= 1 && splits <= most, "splits: expected 1.." << most << ", got " << splits);
  const int64_t per = (iters + splits - 1) / splits;
  ENTRY_REQUIRE((iters + per - 1) / per == splits,
                "splits: " << splits << " leaves a split empty over " << iters << " iterations");
  ENTRY_RETURN_IF_ERROR(check_workspace(workspace, splits > 1 ? splits * m * n : 0, x.device, splits));
  Int4MatmulParams p{};
  p.x = x.address, p.packed = packed.address, p.scales = scales.address, p.zeros = zeros.address;
  p.lut = lut.address, p.y = y.address, p.workspace = workspace.address;
  p.m = m, p.n = n, p.k = k, p.group_size = group_size, p.x_stride = x.stride(0), p.y_stride = y.stride(0);
  p.x_dtype = x.dtype, p.int4_codes = int4_codes, p.splits = splits, p.device = x.device;
  return status_error(launch_int4_matmul(p, stream), "int4_matmul");
}

std::string int4_dequantize(const TensorArg& packed, const TensorArg& scales, const TensorArg& zeros,
                            const TensorArg& lut, const TensorArg& w, int64_t group_size, bool int4_codes,
                            uintptr_t stream) {
  int64_t n = 0, k = 0;
  ENTRY_RETURN_IF_ERROR(check_weight(packed, scales, zeros, lut, group_size, packed.device, n, k));
  ENTRY_RETURN_IF_ERROR(check_tensor(w, "w", 2, packed.device));
  ENTRY_RETURN_IF_ERROR(check_shape(w, "w", {n, k}));
  ENTRY_RETURN_IF_ERROR(check_half(w.dtype, "w"));
  ENTRY_RETURN_IF_ERROR(check_contiguous(w, "w"));
  ENTRY_REQUIRE(w.address % 16 == 0, "w: must be 16-byte aligned");
  Int4DequantizeParams p{};
  p.packed = packed.address, p.scales = scales.address, p.zeros = zeros.address, p.lut = lut.address;
  p.w = w.address, p.n = n, p.k = k, p.group_size = group_size;
  p.w_dtype = w.dtype, p.int4_codes = int4_codes, p.device = packed.device;
  return status_error(launch_int4_dequantize(p, stream), "int4_dequantize");
}

}  // namespace cuda
}  // namespace llama_kernels
#endif  // LLAMA_KERNELS_WITH_CUDA

LLAMA_KERNELS_BIND(int4_matmul_cuda) {
#ifdef LLAMA_KERNELS_WITH_CUDA
  namespace py = pybind11;
  namespace lc = llama_kernels::cuda;
  m.def("int4_matmul_cuda", &lc::int4_matmul, py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("zeros"),
        py::arg("lut"), py::arg("y"), py::arg("workspace"), py::arg("group_size"), py::arg("int4_codes"),
        py::arg("splits"), py::arg("stream"));
  m.def("int4_matmul_max_rows_cuda", &lc::int4_matmul_max_rows);
  m.def("int4_dequantize_cuda", &lc::int4_dequantize, py::arg("packed"), py::arg("scales"), py::arg("zeros"),
        py::arg("lut"), py::arg("w"), py::arg("group_size"), py::arg("int4_codes"), py::arg("stream"));
#else
  LLAMA_KERNELS_BIND_NO_CUDA("int4_matmul_cuda", std::string);
  LLAMA_KERNELS_BIND_NO_CUDA("int4_matmul_max_rows_cuda", int64_t);
  LLAMA_KERNELS_BIND_NO_CUDA("int4_dequantize_cuda", std::string);
#endif
}
