// The CUDA RoPE + decode attention entry points: each checks its TensorArg descriptors, fills the
// params struct (csrc/cuda/rope_decode.h) and calls the launcher, returning "" or "ValueError: ..." /
// "RuntimeError: ..."; none throws (see kernels_cuda.h). Built in every build: without CUDA the
// names are bound to stubs that raise "built without CUDA".
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda/rope_decode.h"
#include "registry.h"
#include "tensor_arg.h"

#ifdef LLAMA_KERNELS_WITH_CUDA
#include "common.h"
#include "cuda/checks.h"

namespace llama_kernels {
namespace cuda {

std::string rope_decode_attention(const TensorArg& q, const TensorArg& k_new, const TensorArg& v_new,
                                  const TensorArg& k_cache, const TensorArg& v_cache, const TensorArg& seqlens,
                                  const TensorArg& cos, const TensorArg& sin, const TensorArg& out,
                                  const TensorArg& workspace, float softmax_scale, int64_t splits,
                                  uintptr_t stream) {
  const int device = q.device;
  ENTRY_RETURN_IF_ERROR(check_tensor(q, "q", 4, device));
  ENTRY_RETURN_IF_ERROR(check_dtype(q.dtype, "q"));
  ENTRY_REQUIRE(q.dtype == static_cast<int>(DType::F16) || q.dtype == static_cast<int>(DType::BF16),
                "q: the CUDA decode attention takes float16 or bfloat16, got " << dtype_label(q.dtype));
  const int64_t batch = q.size(0), heads = q.size(2), head_dim = q.size(3);
  ENTRY_REQUIRE(q.size(1) == 1, "q: expected one new token per sequence, (B, 1, H, D), got " << shape_string(q.sizes));
  ENTRY_REQUIRE(head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256,
                "head_dim: the CUDA decode attention takes 32, 64, 128 or 256, got " << head_dim);
  ENTRY_REQUIRE(batch <= 65535, "batch: expected 0..65535 sequences, got " << batch);
  ENTRY_REQUIRE(heads >= 1 && heads <= 65535, "heads: expected 1..65535 query heads, got " << heads);
  ENTRY_RETURN_IF_ERROR(check_tensor(k_cache, "k_cache", 4, device));
  const int64_t capacity = k_cache.size(1), kv_heads = k_cache.size(2);
  ENTRY_REQUIRE(kv_heads >= 1 && heads % kv_heads == 0,
                "kv_heads: " << kv_heads << " must be positive and divide heads = " << heads);
  const int64_t head_groups = (heads / kv_heads + 15) / 16;  // blocks of up to 16 query heads
  ENTRY_REQUIRE(kv_heads * head_groups <= 65535,
                "kv_heads: " << kv_heads << " kv heads of " << heads / kv_heads << " query heads each are too many");
  ENTRY_REQUIRE(capacity >= 1 && capacity <= 0x7fffffff, "capacity: expected 1..2^31-1 slots, got " << capacity);
  const std::vector<int64_t> cache_shape{batch, capacity, kv_heads, head_dim};
  ENTRY_RETURN_IF_ERROR(check_shape(k_cache, "k_cache", cache_shape));
  ENTRY_RETURN_IF_ERROR(check_same_dtype(k_cache, "k_cache", q, "q"));
  ENTRY_RETURN_IF_ERROR(check_last_contiguous(k_cache, "k_cache"));
  ENTRY_RETURN_IF_ERROR(check_like(v_cache, "v_cache", k_cache, "k_cache"));
  ENTRY_REQUIRE(v_cache.strides == k_cache.strides, "v_cache: strides " << shape_string(v_cache.strides)
                                                        << " must be k_cache's " << shape_string(k_cache.strides));
  const TensorArg* news[] = {&k_new, &v_new};
  const char* new_names[] = {"k_new", "v_new"};
  for (int i = 0; i < 2; ++i) {
    ENTRY_RETURN_IF_ERROR(check_tensor(*news[i], new_names[i], 4, device));
    ENTRY_RETURN_IF_ERROR(check_shape(*news[i], new_names[i], {batch, 1, kv_heads, head_dim}));
    ENTRY_RETURN_IF_ERROR(check_same_dtype(*news[i], new_names[i], q, "q"));
    ENTRY_RETURN_IF_ERROR(check_last_contiguous(*news[i], new_names[i]));
  }
  ENTRY_RETURN_IF_ERROR(check_last_contiguous(q, "q"));
  ENTRY_RETURN_IF_ERROR(check_like(out, "out", q, "q"));
  ENTRY_RETURN_IF_ERROR(check_tensor(seqlens, "seqlens", 1, device));
  ENTRY_RETURN_IF_ERROR(check_shape(seqlens, "seqlens", {batch}));
  ENTRY_REQUIRE(seqlens.dtype == static_cast<int>(DType::I32) || seqlens.dtype == static_cast<int>(DType::I64),
                "seqlens: expected int32 or int64, got " << dtype_label(seqlens.dtype));
  ENTRY_RETURN_IF_ERROR(check_contiguous(seqlens, "seqlens"));
  ENTRY_RETURN_IF_ERROR(check_tensor(cos, "cos", 2, device));
  ENTRY_RETURN_IF_ERROR(check_dtype_is(cos, "cos", DType::F32));
  const int64_t table_len = cos.size(0);
  ENTRY_REQUIRE(table_len >= 1, "cos: the tables need at least one position, got " << table_len);
  ENTRY_RETURN_IF_ERROR(check_shape(cos, "cos", {table_len, head_dim / 2}));
  ENTRY_RETURN_IF_ERROR(check_last_contiguous(cos, "cos"));
  ENTRY_REQUIRE(cos.stride(0) >= head_dim / 2,
                "cos: row stride " << cos.stride(0) << " is shorter than head_dim / 2 = " << head_dim / 2);
  ENTRY_RETURN_IF_ERROR(check_like(sin, "sin", cos, "cos"));
  ENTRY_REQUIRE(sin.strides == cos.strides,
                "sin: strides " << shape_string(sin.strides) << " must be cos's " << shape_string(cos.strides));
  ENTRY_REQUIRE(k_cache.address % 16 == 0, "k_cache: must be 16-byte aligned for the CUDA kernel");
  ENTRY_REQUIRE(v_cache.address % 16 == 0, "v_cache: must be 16-byte aligned for the CUDA kernel");
  ENTRY_REQUIRE(k_cache.stride(0) % 8 == 0 && k_cache.stride(1) % 8 == 0 && k_cache.stride(2) % 8 == 0,
                "k_cache: strides must be multiples of 8 elements, got " << shape_string(k_cache.strides));
  ENTRY_REQUIRE(std::isfinite(softmax_scale), "softmax_scale: must be finite, got " << softmax_scale);
  ENTRY_REQUIRE(splits >= 1 && splits <= 65535, "splits: expected 1..65535, got " << splits);
  ENTRY_RETURN_IF_ERROR(check_workspace(workspace, rope_decode_workspace_elems(batch, heads, head_dim, splits),
                                        device, splits));
  RopeDecodeParams p{};
  p.q = q.address, p.k_new = k_new.address, p.v_new = v_new.address, p.k_cache = k_cache.address;
  p.v_cache = v_cache.address, p.seqlens = seqlens.address, p.cos = cos.address, p.sin = sin.address;
  p.out = out.address, p.workspace = workspace.address;
  p.batch = batch, p.heads = heads, p.kv_heads = kv_heads, p.head_dim = head_dim, p.capacity = capacity;
  p.table_len = table_len;
  p.q_stride_b = q.stride(0), p.q_stride_h = q.stride(2);
  p.knew_stride_b = k_new.stride(0), p.knew_stride_h = k_new.stride(2);
  p.vnew_stride_b = v_new.stride(0), p.vnew_stride_h = v_new.stride(2);
  p.cache_stride_b = k_cache.stride(0), p.cache_stride_s = k_cache.stride(1), p.cache_stride_h = k_cache.stride(2);
  p.out_stride_b = out.stride(0), p.out_stride_h = out.stride(2);
  p.table_stride = cos.stride(0);
  p.dtype = q.dtype, p.seqlens_int64 = seqlens.dtype == static_cast<int>(DType::I64);
  p.softmax_scale = softmax_scale, p.splits = splits, p.device = device;
  return status_error(launch_rope_decode_attention(p, stream), "rope_decode_attention");
}

}  // namespace cuda
}  // namespace llama_kernels
#endif  // LLAMA_KERNELS_WITH_CUDA

LLAMA_KERNELS_BIND(rope_decode_cuda) {
#ifdef LLAMA_KERNELS_WITH_CUDA
  namespace py = pybind11;
  namespace lc = llama_kernels::cuda;
  m.def("rope_decode_attention_cuda", &lc::rope_decode_attention, py::arg("q"), py::arg("k_new"), py::arg("v_new"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("seqlens"), py::arg("cos"), py::arg("sin"), py::arg("out"),
        py::arg("workspace"), py::arg("softmax_scale"), py::arg("splits"), py::arg("stream"));
  m.def("rope_decode_workspace_elems_cuda", &lc::rope_decode_workspace_elems);
#else
  LLAMA_KERNELS_BIND_NO_CUDA("rope_decode_attention_cuda", std::string);
  LLAMA_KERNELS_BIND_NO_CUDA("rope_decode_workspace_elems_cuda", int64_t);
#endif
}
