// The CUDA RMSNorm entry points: each checks its TensorArg descriptors, fills the
// params struct (csrc/cuda/rms_norm.h) and calls the launcher, returning "" or "ValueError: ..." /
// "RuntimeError: ..."; none throws (see kernels_cuda.h). Built in every build: without CUDA the
// names are bound to stubs that raise "built without CUDA".
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cuda/rms_norm.h"
#include "registry.h"
#include "tensor_arg.h"

#ifdef LLAMA_KERNELS_WITH_CUDA
#include "common.h"
#include "cuda/checks.h"

namespace llama_kernels {
namespace cuda {

namespace {

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

}  // namespace cuda
}  // namespace llama_kernels
#endif  // LLAMA_KERNELS_WITH_CUDA

LLAMA_KERNELS_BIND(rms_norm_cuda) {
#ifdef LLAMA_KERNELS_WITH_CUDA
  namespace py = pybind11;
  namespace lc = llama_kernels::cuda;
  m.def("rms_norm_fwd_cuda", &lc::rms_norm_fwd, py::arg("x"), py::arg("h"), py::arg("w"), py::arg("y"), py::arg("s"),
        py::arg("rstd"), py::arg("eps"), py::arg("stream"));
  m.def("rms_norm_bwd_cuda", &lc::rms_norm_bwd, py::arg("dy"), py::arg("ds"), py::arg("x"), py::arg("w"),
        py::arg("rstd"), py::arg("dx"), py::arg("dw"), py::arg("dw_partial"), py::arg("stream"));
  m.def("rms_norm_max_cols_cuda", &lc::rms_norm_max_cols);
#else
  LLAMA_KERNELS_BIND_NO_CUDA("rms_norm_fwd_cuda", std::string);
  LLAMA_KERNELS_BIND_NO_CUDA("rms_norm_bwd_cuda", std::string);
  LLAMA_KERNELS_BIND_NO_CUDA("rms_norm_max_cols_cuda", int64_t);
#endif
}
