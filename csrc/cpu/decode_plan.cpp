// The CPU decode plan (decode_plan.h): a decode step as a fixed sequence of dispatching kernel
// calls on buffers allocated once. Host code, compiled once: the kernels it calls are the ones
// each instruction set's build provides, chosen at run time as for a call from Python.
//
// The step is the model's eager decode step (llama/model.py), op for op:
//   x = embedding[token]
//   per layer: normed, x = add_rms_norm(x, h)   (the first layer: rms_norm(x))
//              q|k|v = normed @ [Wq|Wk|Wv]^T
//              attention = rope_decode_attention(q, k, v, caches, seqlens)   (writes slot seqlens[b];
//                          the caches fp32, or fp16/bf16 when the decoder keeps them so)
//              h = attention @ Wo^T
//              normed, x = add_rms_norm(x, h)
//              gate|up = normed @ [W1|W3]^T;  h = swiglu(gate, up) @ W2^T
//   normed = add_rms_norm(x, h);  logits = normed @ Wout^T (or only their argmax);  seqlens += 1
#include "cpu/decode_plan.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "common.h"

namespace llama_kernels {
namespace cpu {

namespace {
constexpr int kF32 = static_cast<int>(DType::F32);

// torch.argmax's choice in a row of logits: the first NaN, else the first of the largest values.
int64_t argmax_row(const float* v, int64_t n) {
  int64_t at = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (v[i] != v[i]) return i;
    if (v[i] > v[at]) at = i;
  }
  return at;
}

// The ops a step times, in DecodePlan::kOpNames order.
enum Op { kEmbedding, kNorm, kQkv, kAttention, kWo, kGateUp, kSwiglu, kDown, kHead };

// Adds the time since the last lap to an op's total, when timing is on.
class Laps {
 public:
  Laps(bool on, std::vector<double>& totals) : on_(on), totals_(totals) {
    if (on_) last_ = std::chrono::steady_clock::now();
  }
  void lap(Op op) {
    if (!on_) return;
    const auto now = std::chrono::steady_clock::now();
    totals_[op] += std::chrono::duration<double, std::micro>(now - last_).count();
    last_ = now;
  }

 private:
  bool on_;
  std::vector<double>& totals_;
  std::chrono::steady_clock::time_point last_;
};
}  // namespace

const char* const DecodePlan::kOpNames[DecodePlan::kOps] = {
    "embedding", "rms_norm", "qkv", "attention", "wo", "gate_up", "swiglu", "down", "head"};

void DecodePlan::set_timing(bool on) {
  timing_ = on;
  std::fill(op_micros_.begin(), op_micros_.end(), 0.0);
  timed_steps_ = 0;
}

int64_t PlanWeights::total() const {
  int64_t t = 0;
  for (int64_t v : n()) t += v;
  return t;
}

void PlanWeights::apply(const float* x, float* y, int64_t m, int threads) {
  const int64_t stride = total();
  std::vector<void*>& outs = int4 ? quant.y : dense.y;  // sized when made: no allocation per step
  for (size_t p = 0, offset = 0; p < outs.size(); offset += n()[p], ++p) outs[p] = y + offset;
  if (!int4) linear(x, dense, m, k, k, stride, kF32, kF32, kF32, threads);
  else if (q8) int4_matmul_q8(x, quant, lut, m, k, group, k, stride, kF32, threads);
  else int4_matmul(x, quant, lut, m, k, group, k, stride, kF32, threads);
}

DecodePlan::DecodePlan(int64_t batch, int64_t dim, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t vocab,
                       int64_t capacity, float eps, float softmax_scale, const float* embedding,
                       const float* final_norm, PlanWeights head, const float* cos, const float* sin,
                       int64_t table_len, int64_t table_stride, int64_t* seqlens, int cache_dtype)
    : batch_(batch), dim_(dim), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), vocab_(vocab),
      capacity_(capacity), eps_(eps), scale_(softmax_scale), embedding_(embedding), final_norm_(final_norm),
      head_(std::move(head)), cos_(cos), sin_(sin), table_len_(table_len), table_stride_(table_stride),
      seqlens_(seqlens), cache_dtype_(cache_dtype) {
  to_dtype(cache_dtype, "k_caches");  // a float dtype: fp32, or a 16-bit cache (rope_decode_attention)
  LLAMA_KERNELS_CHECK(batch > 0 && dim > 0 && vocab > 0 && capacity > 0,
                      "batch, dim, vocab, capacity: expected positive sizes, got " << batch << ", " << dim << ", "
                                                                                  << vocab << ", " << capacity);
  LLAMA_KERNELS_CHECK(kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0 && head_dim % 2 == 0,
                      "heads, kv_heads, head_dim: expected heads a multiple of kv_heads and an even head_dim, got "
                          << heads << ", " << kv_heads << ", " << head_dim);
  LLAMA_KERNELS_CHECK(table_len > 0 && table_stride >= head_dim / 2,
                      "cos, sin: expected tables of (positions, head_dim / 2), got " << table_len
                                                                                     << " rows of stride " << table_stride);
  LLAMA_KERNELS_CHECK(head_.k == dim && head_.total() == vocab,
                      "head: expected (vocab, dim) = (" << vocab << ", " << dim << "), got (" << head_.total()
                                                        << ", " << head_.k << ")");
  for (auto& s : stream_) s.assign(batch * dim, 0.f);
  branch_.assign(batch * dim, 0.f);
  normed_.assign(batch * dim, 0.f);
  attention_.assign(batch * heads * head_dim, 0.f);
  logits_.assign(batch * vocab, 0.f);
}

void DecodePlan::add_layer(PlanLayer layer) {
  const int64_t q = heads_ * head_dim_, kv = kv_heads_ * head_dim_;
  const auto& qkv = layer.qkv;
  LLAMA_KERNELS_CHECK(qkv.k == dim_ && qkv.n().size() == 3 && qkv.n()[0] == q && qkv.n()[1] == kv && qkv.n()[2] == kv,
                      "layers[" << layers_.size() << "].qkv: expected Q, K, V of " << q << ", " << kv << ", " << kv
                                << " rows over " << dim_ << " columns");
  LLAMA_KERNELS_CHECK(layer.wo.k == q && layer.wo.total() == dim_,
                      "layers[" << layers_.size() << "].wo: expected (" << dim_ << ", " << q << ")");
  const auto& gu = layer.gate_up;
  LLAMA_KERNELS_CHECK(gu.k == dim_ && gu.n().size() == 2 && gu.n()[0] == gu.n()[1] && gu.n()[0] > 0,
                      "layers[" << layers_.size() << "].gate_up: expected two weights of equal rows over " << dim_
                                << " columns");
  LLAMA_KERNELS_CHECK(layer.down.k == gu.n()[0] && layer.down.total() == dim_,
                      "layers[" << layers_.size() << "].down: expected (" << dim_ << ", " << gu.n()[0] << ")");
  LLAMA_KERNELS_CHECK(layer.k_cache && layer.v_cache && layer.attention_norm && layer.ffn_norm,
                      "layers[" << layers_.size() << "]: a cache or norm address is missing");
  qkv_.resize(std::max<size_t>(qkv_.size(), batch_ * (q + 2 * kv)));
  gate_up_.resize(std::max<size_t>(gate_up_.size(), batch_ * 2 * gu.n()[0]));
  hidden_.resize(std::max<size_t>(hidden_.size(), batch_ * gu.n()[0]));
  layers_.push_back(std::move(layer));
}

void DecodePlan::step(const int64_t* tokens, float* logits, int64_t* argmax, int threads) {
  for (int64_t b = 0; b < batch_; ++b) {
    LLAMA_KERNELS_CHECK(tokens[b] >= 0 && tokens[b] < vocab_,
                        "tokens[" << b << "]: expected an id in [0, " << vocab_ << "), got " << tokens[b]);
    LLAMA_KERNELS_CHECK(seqlens_[b] >= 0 && seqlens_[b] < capacity_ && seqlens_[b] < table_len_,
                        "cache: sequence " << b << " is at position " << seqlens_[b] << ", past the cache's "
                                           << capacity_ << " slots or the RoPE tables' " << table_len_ << " rows");
  }
  Laps laps(timing_, op_micros_);
  int cur = 0;
  float* x = stream_[0].data();
  for (int64_t b = 0; b < batch_; ++b)
    std::copy(embedding_ + tokens[b] * dim_, embedding_ + (tokens[b] + 1) * dim_, x + b * dim_);
  laps.lap(kEmbedding);
  float* normed = normed_.data();
  float* h = branch_.data();
  // normed = rms_norm(x + h), and x + h becomes the stream (the other buffer); h null adds nothing.
  auto add_norm = [&](const float* h_or_null, const float* w) {
    float* next = stream_[1 - cur].data();
    rms_norm_fwd(stream_[cur].data(), h_or_null, w, normed, h_or_null ? next : nullptr, nullptr, batch_, dim_, dim_,
                 dim_, dim_, dim_, kF32, kF32, eps_, threads);
    if (h_or_null) cur = 1 - cur;
    laps.lap(kNorm);
  };
  const int64_t q = heads_ * head_dim_, kv = kv_heads_ * head_dim_, qkv_row = q + 2 * kv;
  // rope_decode_attention's strides (elements): q, k_new, v_new (batch, head), the caches (batch,
  // slot, head), out (batch, head), the tables' row.
  const int64_t strides[12] = {qkv_row, head_dim_, qkv_row, head_dim_, qkv_row, head_dim_,
                               capacity_ * kv, kv, head_dim_, q, head_dim_, table_stride_};
  bool first = true;
  for (PlanLayer& layer : layers_) {
    add_norm(first ? nullptr : h, layer.attention_norm);
    first = false;
    float* qkv = qkv_.data();
    layer.qkv.apply(normed, qkv, batch_, threads);
    laps.lap(kQkv);
    rope_decode_attention(qkv, qkv + q, qkv + q + kv, layer.k_cache, layer.v_cache, seqlens_, true, cos_, sin_,
                          attention_.data(), batch_, heads_, kv_heads_, head_dim_, capacity_, table_len_, strides,
                          kF32, cache_dtype_, scale_, threads);
    laps.lap(kAttention);
    layer.wo.apply(attention_.data(), h, batch_, threads);
    laps.lap(kWo);
    add_norm(h, layer.ffn_norm);
    const int64_t hidden = layer.gate_up.n()[0];
    float* gu = gate_up_.data();
    layer.gate_up.apply(normed, gu, batch_, threads);
    laps.lap(kGateUp);
    swiglu_fwd(gu, gu + hidden, hidden_.data(), batch_, hidden, 2 * hidden, 2 * hidden, hidden, kF32, threads);
    laps.lap(kSwiglu);
    layer.down.apply(hidden_.data(), h, batch_, threads);
    laps.lap(kDown);
  }
  add_norm(first ? nullptr : h, final_norm_);
  if (argmax && !logits && !head_.int4) {  // the greedy head: no logits written
    linear_argmax(normed, head_.dense.w[0], batch_, vocab_, dim_, dim_, kF32, kF32, argmax, nullptr, threads);
  } else {
    float* out = logits ? logits : logits_.data();
    head_.apply(normed, out, batch_, threads);
    if (argmax)
      for (int64_t b = 0; b < batch_; ++b) argmax[b] = argmax_row(out + b * vocab_, vocab_);
  }
  laps.lap(kHead);
  for (int64_t b = 0; b < batch_; ++b) ++seqlens_[b];
  if (timing_) ++timed_steps_;
}

}  // namespace cpu
}  // namespace llama_kernels
