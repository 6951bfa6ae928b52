// The CPU decode plan: one call runs a whole decode step of a LLaMA (one new token per sequence,
// every layer, the final norm and the head), by calling the dispatching CPU kernels
// (kernels_cpu.h) on buffers allocated once. A decode step of a small model is a few dozen
// kernels of a few microseconds each; run from Python, the interpreter, the op checks and the
// output allocations between them cost about as much as the kernels themselves.
//
// The plan holds raw addresses: of the weights, the norms, the embedding table, the RoPE tables
// and the KV cache. Whoever builds it (llama_kernels/cpu/decode_plan.py) keeps those tensors
// alive and unmoved, and builds a new plan when any of them changes.
#pragma once
#include <cstdint>
#include <vector>

#include "cpu/kernels_cpu.h"

namespace llama_kernels {
namespace cpu {

// One projection of the step: one weight, or several that read the same x (Q, K and V; gate and
// up), whose outputs lie side by side in one row of total() values. Dense fp32 weights, or 4-bit
// weights (int4 or NF4: packed codes, fp16 scales and zeros, a 16-entry table) multiplied with
// int8 activations (q8) or fp32 ones.
struct PlanWeights {
  bool int4 = false, q8 = false;
  int64_t k = 0;  // in_features
  int group = 0;
  const float* lut = nullptr;  // 4-bit: the code table
  // The kernels' own descriptions, made once: dense fp32 (n[p], k) weights without bias, or
  // 4-bit ones (packed codes, fp16 scales and zeros; zeros null for NF4). Their outputs (y) are
  // pointed at the step's buffer by apply().
  LinearParts dense;
  Int4Parts quant;

  const std::vector<int64_t>& n() const { return int4 ? quant.n : dense.n; }  // out_features of each
  int64_t total() const;
  // y (m, total()) = x (m, k) @ W^T, row strides k and total().
  void apply(const float* x, float* y, int64_t m, int threads);
};

struct PlanLayer {
  const float* attention_norm;
  const float* ffn_norm;
  PlanWeights qkv, wo, gate_up, down;
  void* k_cache;  // (batch, capacity, kv_heads, head_dim), contiguous; the plan's cache dtype
  void* v_cache;
};

class DecodePlan {
 public:
  DecodePlan(int64_t batch, int64_t dim, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t vocab,
             int64_t capacity, float eps, float softmax_scale, const float* embedding, const float* final_norm,
             PlanWeights head, const float* cos, const float* sin, int64_t table_len, int64_t table_stride,
             int64_t* seqlens, int cache_dtype);
  void add_layer(PlanLayer layer);
  // One step: tokens (batch,) enter at position seqlens[b]; writes the keys and values there, adds
  // 1 to each seqlens[b], and writes logits (batch, vocab) and/or the greedy tokens argmax
  // (batch,) (either may be null).
  void step(const int64_t* tokens, float* logits, int64_t* argmax, int threads);

  // Time spent per op over the steps since timing was switched on (microseconds, summed over
  // layers), in kOpNames order; steps() counts those steps. Off by default.
  static constexpr int kOps = 9;
  static const char* const kOpNames[kOps];
  void set_timing(bool on);
  const std::vector<double>& op_micros() const { return op_micros_; }
  int64_t timed_steps() const { return timed_steps_; }

 private:
  int64_t batch_, dim_, heads_, kv_heads_, head_dim_, vocab_, capacity_;
  float eps_, scale_;
  const float* embedding_;
  const float* final_norm_;
  PlanWeights head_;
  const float* cos_;
  const float* sin_;
  int64_t table_len_, table_stride_;
  int64_t* seqlens_;
  int cache_dtype_;  // a DType code: float32, or float16/bfloat16 (keys and values rounded to it)
  std::vector<PlanLayer> layers_;
  // Step buffers: the residual stream (two, alternating, so a norm never writes the row it
  // reads), a branch output, the normed input, q|k|v, the attention output, gate|up, the FFN's
  // hidden activations, and the logits when the caller wants only the argmax.
  std::vector<float> stream_[2], branch_, normed_, qkv_, attention_, gate_up_, hidden_, logits_;
  bool timing_ = false;
  std::vector<double> op_micros_ = std::vector<double>(kOps, 0.0);
  int64_t timed_steps_ = 0;
};

}  // namespace cpu
}  // namespace llama_kernels
