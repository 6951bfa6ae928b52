// Checks the CUDA entry points share (csrc/cuda/<op>_entry.cpp). Each returns "" when the
// descriptor passes, else "ValueError: <argument>: <what was expected>"; none throws (see
// kernels_cuda.h). An entry point returns the first error with ENTRY_RETURN_IF_ERROR.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "common.h"
#include "tensor_arg.h"

// Returns "ValueError: <message>" from the enclosing entry point when cond is false.
#define ENTRY_REQUIRE(cond, msg_expr)                         \
  do {                                                        \
    if (!(cond)) {                                            \
      ::llama_kernels::Message entry_msg_;                          \
      entry_msg_ << "ValueError: " << msg_expr;               \
      return entry_msg_.str();                                \
    }                                                         \
  } while (0)

// Returns the enclosing entry point's error string, if any.
#define ENTRY_RETURN_IF_ERROR(expr)            \
  do {                                         \
    std::string entry_err_ = (expr);           \
    if (!entry_err_.empty()) return entry_err_; \
  } while (0)

namespace llama_kernels {
namespace cuda {

// "" for status 0, else "RuntimeError: <op>: CUDA error: <what the status means>".
std::string status_error(int status, const char* op);
// The name of a dtype code, or "unknown".
const char* dtype_label(int code);
// "(2, 3)", "(4,)".
std::string shape_string(const std::vector<int64_t>& v);

// A tensor was given, with `rank` dims, sizes and strides that are non-negative and as many as
// each other, on CUDA device `device` (a CPU tensor has device -1).
std::string check_tensor(const TensorArg& t, const char* name, int64_t rank, int device);
std::string check_shape(const TensorArg& t, const char* name, const std::vector<int64_t>& want);
std::string check_dtype_is(const TensorArg& t, const char* name, DType want);
std::string check_same_dtype(const TensorArg& t, const char* name, const TensorArg& ref, const char* ref_name);
// The last dim is contiguous (a dim of one element may have any stride).
std::string check_last_contiguous(const TensorArg& t, const char* name);
// Row-major without gaps (dims of one element may have any stride).
std::string check_contiguous(const TensorArg& t, const char* name);
// `t` is a tensor like `ref`: the same shape and dtype, on the same device, last dim contiguous.
std::string check_like(const TensorArg& t, const char* name, const TensorArg& ref, const char* ref_name);
// A floating dtype code: 0=float32, 1=float16, 2=bfloat16.
std::string check_dtype(int code, const char* name);
// An fp32 workspace of at least `need` elements (any shape, contiguous), or none when need is 0.
std::string check_workspace(const TensorArg& ws, int64_t need, int device, int64_t splits);

inline int64_t stride_or_zero(const TensorArg& t, int64_t i) { return t.given() ? t.stride(i) : 0; }

}  // namespace cuda
}  // namespace llama_kernels
