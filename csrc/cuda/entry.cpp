// The CUDA kernels' validating entry points. Each takes its tensors as TensorArg descriptors,
// checks them (rank, dtype, device, shapes that agree, strides the kernel can take), fills its
// op's params struct (kernels_cuda.h) and calls the launcher. They return "" on success, else "ValueError: ..."
// or "RuntimeError: ...", which llama_kernels/dispatch.py raises: no C++ exception crosses this
// module on the GPU path. Throwing from this module segfaulted in one GPU image (gcc 13.3,
// torch 2.11 and triton 3.6 loaded in the process), before any catch, for reasons not found.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "common.h"
#include "cuda/kernels_cuda.h"
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
namespace {

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

std::string check_x_w(int x_dtype, int w_dtype) {
  ENTRY_RETURN_IF_ERROR(check_dtype(x_dtype, "x"));
  ENTRY_RETURN_IF_ERROR(check_dtype(w_dtype, "weight"));
  const DType xt = static_cast<DType>(x_dtype), wt = static_cast<DType>(w_dtype);
  ENTRY_REQUIRE(wt == xt || wt == DType::F32,
                "weight: dtype " << dtype_name(wt) << " must be float32 or match x (" << dtype_name(xt) << ")");
  return {};
}

std::string check_rows(int status, int64_t cols, int x_dtype) {
  ENTRY_REQUIRE(status != kStatusRowsTooLong,
                "x: rows of " << cols << " elements are longer than the CUDA RMSNorm takes ("
                              << rms_norm_max_cols(x_dtype, true) << " when 16-byte aligned, "
                              << rms_norm_max_cols(x_dtype, false) << " otherwise)");
  return {};
}

// The (rows, cols) input x of RMSNorm and its weight w (cols,).
std::string check_norm_x_w(const TensorArg& x, const TensorArg& w) {
  ENTRY_RETURN_IF_ERROR(check_tensor(x, "x", 2, x.device));
  ENTRY_REQUIRE(x.size(1) > 0, "x: expected a non-empty last dimension, got " << x.size(1));
  ENTRY_REQUIRE(x.size(0) <= 0x7fffffff, "x: at most 2^31-1 rows, got " << x.size(0));
  ENTRY_RETURN_IF_ERROR(check_last_contiguous(x, "x"));
  ENTRY_RETURN_IF_ERROR(check_tensor(w, "weight", 1, x.device));
  ENTRY_RETURN_IF_ERROR(check_x_w(x.dtype, w.dtype));
  ENTRY_REQUIRE(w.size(0) == x.size(1),
                "weight: has " << w.size(0) << " elements but the last dim of x is " << x.size(1));
  return check_contiguous(w, "weight");
}

// rstd: (rows,) float32, contiguous.
std::string check_rstd(const TensorArg& rstd, const TensorArg& x) {
  ENTRY_RETURN_IF_ERROR(check_tensor(rstd, "rstd", 1, x.device));
  ENTRY_RETURN_IF_ERROR(check_shape(rstd, "rstd", {x.size(0)}));
  ENTRY_RETURN_IF_ERROR(check_dtype_is(rstd, "rstd", DType::F32));
  return check_contiguous(rstd, "rstd");
}

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

int64_t stride_or_zero(const TensorArg& t, int64_t i) { return t.given() ? t.stride(i) : 0; }

}  // namespace

std::string rms_norm_fwd(const TensorArg& x, const TensorArg& h, const TensorArg& w, const TensorArg& y,
                         const TensorArg& s, const TensorArg& rstd, float eps, uintptr_t stream) {
  ENTRY_RETURN_IF_ERROR(check_norm_x_w(x, w));
  ENTRY_RETURN_IF_ERROR(check_like(y, "y", x, "x"));
  ENTRY_REQUIRE(!h.given() || s.given(), "s: the sum x + h needs an output");
  if (h.given()) ENTRY_RETURN_IF_ERROR(check_like(h, "h", x, "x"));
  if (s.given()) ENTRY_RETURN_IF_ERROR(check_like(s, "s", x, "x"));
  if (rstd.given()) ENTRY_RETURN_IF_ERROR(check_rstd(rstd, x));
  RmsNormFwdParams p{};
  p.x = x.address, p.h = h.address, p.w = w.address, p.y = y.address;
  p.s = h.given() ? s.address : 0;  // the sum is written only with h
  p.rstd = rstd.address;
  p.rows = x.size(0), p.cols = x.size(1);
  p.x_stride = x.stride(0), p.h_stride = stride_or_zero(h, 0), p.y_stride = y.stride(0);
  p.s_stride = h.given() ? s.stride(0) : 0;
  p.x_dtype = x.dtype, p.w_dtype = w.dtype, p.eps = eps, p.device = x.device;
  const int status = launch_rms_norm_fwd(p, stream);
  ENTRY_RETURN_IF_ERROR(check_rows(status, p.cols, p.x_dtype));
  return status_error(status, "rms_norm_fwd");
}

std::string rms_norm_bwd(const TensorArg& dy, const TensorArg& ds, const TensorArg& x, const TensorArg& w,
                         const TensorArg& rstd, const TensorArg& dx, const TensorArg& dw,
                         const TensorArg& dw_partial, uintptr_t stream) {
  ENTRY_RETURN_IF_ERROR(check_norm_x_w(x, w));
  ENTRY_RETURN_IF_ERROR(check_like(dy, "dy", x, "x"));
  if (ds.given()) ENTRY_RETURN_IF_ERROR(check_like(ds, "ds", x, "x"));
  ENTRY_RETURN_IF_ERROR(check_rstd(rstd, x));
  ENTRY_RETURN_IF_ERROR(check_like(dx, "dx", x, "x"));
  ENTRY_RETURN_IF_ERROR(check_like(dw, "dw", w, "weight"));
  ENTRY_RETURN_IF_ERROR(check_contiguous(dw, "dw"));
  ENTRY_RETURN_IF_ERROR(check_tensor(dw_partial, "dw_partial", 2, x.device));
  ENTRY_REQUIRE(dw_partial.size(0) >= 1 && dw_partial.size(0) <= 65535,
                "dw_partial: expected 1..65535 rows of partial sums, got " << dw_partial.size(0));
  ENTRY_RETURN_IF_ERROR(check_shape(dw_partial, "dw_partial", {dw_partial.size(0), x.size(1)}));
  ENTRY_RETURN_IF_ERROR(check_dtype_is(dw_partial, "dw_partial", DType::F32));
  ENTRY_RETURN_IF_ERROR(check_contiguous(dw_partial, "dw_partial"));
  RmsNormBwdParams p{};
  p.dy = dy.address, p.ds = ds.address, p.x = x.address, p.w = w.address, p.rstd = rstd.address;
  p.dx = dx.address, p.dw = dw.address, p.dw_partial = dw_partial.address;
  p.num_partials = dw_partial.size(0), p.rows = x.size(0), p.cols = x.size(1);
  p.dy_stride = dy.stride(0), p.ds_stride = stride_or_zero(ds, 0), p.x_stride = x.stride(0);
  p.dx_stride = dx.stride(0);
  p.x_dtype = x.dtype, p.w_dtype = w.dtype, p.device = x.device;
  const int status = launch_rms_norm_bwd(p, stream);
  ENTRY_RETURN_IF_ERROR(check_rows(status, p.cols, p.x_dtype));
  return status_error(status, "rms_norm_bwd");
}

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
