// The checks the CUDA entry points share (checks.h). Built only with CUDA: status_error() reads
// the CUDA runtime's error strings (common.cu).
#ifdef LLAMA_KERNELS_WITH_CUDA
#include "cuda/checks.h"

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"
#include "cuda/kernels_cuda.h"
#include "tensor_arg.h"

namespace llama_kernels {
namespace cuda {

std::string status_error(int status, const char* op) {
  return status == 0 ? std::string() : "RuntimeError: " + std::string(op) + ": CUDA error: " + status_string(status);
}

const char* dtype_label(int code) {
  return code >= 0 && code <= static_cast<int>(DType::I64) ? dtype_name(static_cast<DType>(code)) : "unknown";
}

std::string shape_string(const std::vector<int64_t>& v) {
  Message m;
  m << "(";
  for (size_t i = 0; i < v.size(); ++i) m << (i ? ", " : "") << v[i];
  m << (v.size() == 1 ? ",)" : ")");
  return m.str();
}

// A tensor was given, with `rank` dims, sizes and strides that are non-negative and as many as
// each other, on CUDA device `device` (a CPU tensor has device -1).
std::string check_tensor(const TensorArg& t, const char* name, int64_t rank, int device) {
  ENTRY_REQUIRE(t.given(), name << ": required, got none (address 0)");
  ENTRY_REQUIRE(t.sizes.size() == t.strides.size(),
                name << ": " << t.sizes.size() << " sizes but " << t.strides.size() << " strides");
  ENTRY_REQUIRE(t.dim() == rank, name << ": expected " << rank << " dims, got " << t.dim() << " "
                                      << shape_string(t.sizes));
  for (int64_t i = 0; i < t.dim(); ++i) {
    ENTRY_REQUIRE(t.size(i) >= 0, name << ": negative size in " << shape_string(t.sizes));
    ENTRY_REQUIRE(t.stride(i) >= 0, name << ": strides must be non-negative, got " << shape_string(t.strides));
  }
  ENTRY_REQUIRE(t.device >= 0, name << ": a CPU tensor; the CUDA kernels take tensors on a CUDA device");
  ENTRY_REQUIRE(t.device == device, name << ": on cuda:" << t.device << " but the first tensor is on cuda:" << device);
  return {};
}

std::string check_shape(const TensorArg& t, const char* name, const std::vector<int64_t>& want) {
  ENTRY_REQUIRE(t.sizes == want, name << ": expected shape " << shape_string(want) << ", got " << shape_string(t.sizes));
  return {};
}

std::string check_dtype_is(const TensorArg& t, const char* name, DType want) {
  ENTRY_REQUIRE(t.dtype == static_cast<int>(want),
                name << ": expected " << dtype_name(want) << ", got " << dtype_label(t.dtype));
  return {};
}

std::string check_same_dtype(const TensorArg& t, const char* name, const TensorArg& ref, const char* ref_name) {
  ENTRY_REQUIRE(t.dtype == ref.dtype, name << ": dtype " << dtype_label(t.dtype) << " must match " << ref_name
                                           << " (" << dtype_label(ref.dtype) << ")");
  return {};
}

// The last dim is contiguous (a dim of one element may have any stride).
std::string check_last_contiguous(const TensorArg& t, const char* name) {
  const int64_t last = t.dim() - 1;
  ENTRY_REQUIRE(t.size(last) <= 1 || t.stride(last) == 1,
                name << ": the last dim must be contiguous, got strides " << shape_string(t.strides));
  return {};
}

// Row-major without gaps (dims of one element may have any stride).
std::string check_contiguous(const TensorArg& t, const char* name) {
  int64_t expected = 1;
  for (int64_t i = t.dim() - 1; i >= 0; --i) {
    ENTRY_REQUIRE(t.size(i) <= 1 || t.stride(i) == expected,
                  name << ": must be contiguous, got strides " << shape_string(t.strides) << " for shape "
                       << shape_string(t.sizes));
    expected *= t.size(i);
  }
  return {};
}

// `t` is a tensor like `ref`: the same shape and dtype, on the same device, last dim contiguous.
std::string check_like(const TensorArg& t, const char* name, const TensorArg& ref, const char* ref_name) {
  ENTRY_RETURN_IF_ERROR(check_tensor(t, name, ref.dim(), ref.device));
  ENTRY_RETURN_IF_ERROR(check_shape(t, name, ref.sizes));
  ENTRY_RETURN_IF_ERROR(check_same_dtype(t, name, ref, ref_name));
  return check_last_contiguous(t, name);
}

std::string check_dtype(int code, const char* name) {
  ENTRY_REQUIRE(code >= 0 && code <= 2,
                name << ": unknown dtype code " << code << " (expected 0=float32, 1=float16, 2=bfloat16)");
  return {};
}

// An fp32 workspace of at least `need` elements (any shape, contiguous), or none when need is 0.
std::string check_workspace(const TensorArg& ws, int64_t need, int device, int64_t splits) {
  if (need == 0 && !ws.given()) return {};
  ENTRY_REQUIRE(ws.given() || need == 0,
                "workspace: needs " << need << " float32 elements (16-byte aligned) for " << splits
                                    << " splits, got none");
  ENTRY_RETURN_IF_ERROR(check_tensor(ws, "workspace", ws.dim(), device));
  ENTRY_RETURN_IF_ERROR(check_dtype_is(ws, "workspace", DType::F32));
  ENTRY_RETURN_IF_ERROR(check_contiguous(ws, "workspace"));
  ENTRY_REQUIRE(need == 0 || (ws.address != 0 && ws.address % 16 == 0 && ws.numel() >= need),
                "workspace: needs " << need << " float32 elements (16-byte aligned) for " << splits << " splits, got "
                                    << ws.numel());
  return {};
}

}  // namespace cuda
}  // namespace llama_kernels

#endif  // LLAMA_KERNELS_WITH_CUDA
