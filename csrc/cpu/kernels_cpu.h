// CPU kernels. Each kernel source is compiled once per instruction set (see CMakeLists.txt),
// into the namespace llama_kernels::cpu::<isa>. llama_kernels::cpu::<name>(), generated in
// dispatch.cpp from the list below, calls the best variant the running CPU supports.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

// The CPU kernels, one entry each: X(name, (parameters), (arguments)). From this list come the
// declarations of every ISA's variant and the dispatching functions in dispatch.cpp; the
// arguments are the parameters' names, in order, for the call the dispatcher forwards.
// rope_decode_attention: strides (in elements) are q (batch, head), k_new (batch, head), v_new
// (batch, head), the caches (batch, slot, head), out (batch, head), then the cos/sin row stride;
// the caches are in q's dtype, or in fp16/bf16 under fp32 q (cache_dtype).
// int4_matmul_q8_gemm_rows: the rows of x from which that ISA's int4_matmul_q8 takes its
// many-rows path (csrc/cpu/int4_matmul.cpp).
#define LLAMA_KERNELS_CPU_KERNELS(X)                                                              \
  X(rms_norm_fwd,                                                                                \
    (const void* x, const void* h, const void* w, void* y, void* s, float* rstd, int64_t rows,    \
     int64_t cols, int64_t x_stride, int64_t h_stride, int64_t y_stride, int64_t s_stride,        \
     int x_dtype, int w_dtype, float eps, int num_threads),                                       \
    (x, h, w, y, s, rstd, rows, cols, x_stride, h_stride, y_stride, s_stride, x_dtype, w_dtype,   \
     eps, num_threads))                                                                           \
  X(rms_norm_bwd,                                                                                \
    (const void* dy, const void* ds, const void* x, const void* w, const float* rstd, void* dx,   \
     void* dw, int64_t rows, int64_t cols, int64_t dy_stride, int64_t ds_stride,                  \
     int64_t x_stride, int64_t dx_stride, int x_dtype, int w_dtype, int num_threads),             \
    (dy, ds, x, w, rstd, dx, dw, rows, cols, dy_stride, ds_stride, x_stride, dx_stride, x_dtype,  \
     w_dtype, num_threads))                                                                       \
  X(linear,                                                                                      \
    (const void* x, const LinearParts& parts, int64_t m, int64_t k, int64_t x_stride,             \
     int64_t y_stride, int x_dtype, int w_dtype, int bias_dtype, int num_threads),                \
    (x, parts, m, k, x_stride, y_stride, x_dtype, w_dtype, bias_dtype, num_threads))              \
  X(linear_argmax,                                                                              \
    (const void* x, const void* w, int64_t m, int64_t n, int64_t k, int64_t x_stride,             \
     int x_dtype, int w_dtype, int64_t* index, float* value, int num_threads),                    \
    (x, w, m, n, k, x_stride, x_dtype, w_dtype, index, value, num_threads))                       \
  X(int4_matmul,                                                                                 \
    (const void* x, const Int4Parts& parts, const float* lut, int64_t m, int64_t k, int group,    \
     int64_t x_stride, int64_t y_stride, int x_dtype, int num_threads),                           \
    (x, parts, lut, m, k, group, x_stride, y_stride, x_dtype, num_threads))                       \
  X(int4_matmul_q8,                                                                              \
    (const void* x, const Int4Parts& parts, const float* lut, int64_t m, int64_t k, int group,    \
     int64_t x_stride, int64_t y_stride, int x_dtype, int num_threads),                           \
    (x, parts, lut, m, k, group, x_stride, y_stride, x_dtype, num_threads))                       \
  X(int4_matmul_q8_gemm_rows, (int64_t* rows), (rows))                                          \
  X(int4_dequantize,                                                                             \
    (const uint8_t* packed, const void* scales, const void* zeros, const float* lut, void* w,     \
     int64_t n, int64_t k, int group, int w_dtype, int num_threads),                              \
    (packed, scales, zeros, lut, w, n, k, group, w_dtype, num_threads))                           \
  X(rope_decode_attention,                                                                       \
    (const void* q, const void* k_new, const void* v_new, void* k_cache, void* v_cache,           \
     const void* seqlens, bool seqlens_int64, const float* cos, const float* sin, void* out,      \
     int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t capacity,          \
     int64_t table_len, const int64_t* strides, int dtype, int cache_dtype, float scale,          \
     int num_threads),                                                                            \
    (q, k_new, v_new, k_cache, v_cache, seqlens, seqlens_int64, cos, sin, out, batch, heads,      \
     kv_heads, head_dim, capacity, table_len, strides, dtype, cache_dtype, scale, num_threads))   \
  X(swiglu_fwd,                                                                                  \
    (const void* a, const void* b, void* y, int64_t rows, int64_t cols, int64_t a_stride,         \
     int64_t b_stride, int64_t y_stride, int dtype, int num_threads),                             \
    (a, b, y, rows, cols, a_stride, b_stride, y_stride, dtype, num_threads))                      \
  X(swiglu_bwd,                                                                                  \
    (const void* dy, const void* a, const void* b, void* da, void* db, int64_t rows,              \
     int64_t cols, int64_t dy_stride, int64_t a_stride, int64_t b_stride, int64_t da_stride,      \
     int64_t db_stride, int dtype, int num_threads),                                              \
    (dy, a, b, da, db, rows, cols, dy_stride, a_stride, b_stride, da_stride, db_stride, dtype,    \
     num_threads))                                                                                \
  X(masked_matmul_fwd,                                                                           \
    (const void* x, const void* w, const float* row_scale, const float* col_scale,                \
     const float* bias, const int64_t* rows, int64_t n_rows, const int64_t* cols, int64_t n_cols, \
     void* y, int64_t m, int64_t n, int64_t k, int64_t x_stride, int64_t w_stride,                \
     int64_t y_stride, int dtype, bool y_fp32, int num_threads),                                  \
    (x, w, row_scale, col_scale, bias, rows, n_rows, cols, n_cols, y, m, n, k, x_stride,          \
     w_stride, y_stride, dtype, y_fp32, num_threads))                                             \
  X(masked_matmul_active,                                                                        \
    (const float* mask, int64_t n, int64_t* idx, int64_t* count, bool* all_ones),                 \
    (mask, n, idx, count, all_ones))                                                              \
  X(masked_matmul_gather,                                                                        \
    (const void* src, int64_t src_stride, const int64_t* rows, int64_t n_rows,                    \
     const int64_t* cols, int64_t n_cols, const float* scale, float* dst, int64_t dst_stride,     \
     int dtype, int num_threads),                                                                 \
    (src, src_stride, rows, n_rows, cols, n_cols, scale, dst, dst_stride, dtype, num_threads))    \
  X(masked_matmul_scatter,                                                                       \
    (const float* u, int64_t u_stride, const int64_t* rows, int64_t n_act, const float* bias,     \
     const float* scale, void* y, int64_t m, int64_t n, int64_t y_stride, int dtype,              \
     int num_threads),                                                                            \
    (u, u_stride, rows, n_act, bias, scale, y, m, n, y_stride, dtype, num_threads))               \
  X(cross_entropy_rows,                                                                          \
    (float* logits, const int64_t* target, float* loss, float* lse, int64_t rows, int64_t v,      \
     int64_t stride, int64_t ignore_index, float smoothing, float z_loss, float scale,            \
     bool write_grad, int num_threads),                                                           \
    (logits, target, loss, lse, rows, v, stride, ignore_index, smoothing, z_loss, scale,          \
     write_grad, num_threads))                                                                    \
  X(adamw_step,                                                                                  \
    (const AdamWParts& parts, int g_dtype, float lr, float beta1, float beta2,                    \
     float one_minus_beta1, float one_minus_beta2, float eps, float weight_decay,                 \
     float bias_correction1, float bias_correction2_sqrt, int num_threads),                       \
    (parts, g_dtype, lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay,       \
     bias_correction1, bias_correction2_sqrt, num_threads))

// Declares one kernel of the list (an X for LLAMA_KERNELS_CPU_KERNELS).
#define LLAMA_KERNELS_CPU_DECLARE(name, params, args) void name params;

namespace llama_kernels {
namespace cpu {

// The tensors of one AdamW step: parameter p, its gradient g (fp32, fp16 or bf16, one dtype for
// all), and the fp32 moments m and v, each n[i] contiguous elements. One call updates them all,
// the elements of every tensor split across threads as one range.
struct AdamWParts {
  std::vector<float*> p, m, v;
  std::vector<const void*> g;
  std::vector<int64_t> n;
};

// Several 4-bit weights that multiply the same x, each with its own output (y[p], same row
// stride): part p has n[p] output features. One call converts x once and splits all the parts'
// rows across threads together (a fused Q/K/V or gate/up projection without concatenating).
struct Int4Parts {
  std::vector<const uint8_t*> packed;
  std::vector<const void*> scales, zeros;  // fp16; zeros[p] may be null (NF4)
  std::vector<void*> y;
  std::vector<int64_t> n;
};

// Several dense weights that multiply the same x (one weight and one bias dtype for all).
struct LinearParts {
  std::vector<const void*> w, bias;  // bias[p] may be null
  std::vector<void*> y;
  std::vector<int64_t> n;
};

namespace baseline { LLAMA_KERNELS_CPU_KERNELS(LLAMA_KERNELS_CPU_DECLARE) }
namespace avx2 { LLAMA_KERNELS_CPU_KERNELS(LLAMA_KERNELS_CPU_DECLARE) }
namespace avx512 { LLAMA_KERNELS_CPU_KERNELS(LLAMA_KERNELS_CPU_DECLARE) }
namespace avx512vnni { LLAMA_KERNELS_CPU_KERNELS(LLAMA_KERNELS_CPU_DECLARE) }

// Dispatching entry points (dispatch.cpp): the same signatures, routed to the selected ISA.
LLAMA_KERNELS_CPU_KERNELS(LLAMA_KERNELS_CPU_DECLARE)

// Instruction sets compiled into this build and supported by this CPU, best last.
std::vector<std::string> available_isas();
// The ISA used now; set_isa() overrides the automatic choice (for tests and benchmarks).
std::string current_isa();
void set_isa(const std::string& name);

}  // namespace cpu
}  // namespace llama_kernels
