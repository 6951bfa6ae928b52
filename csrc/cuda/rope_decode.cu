// Fused RoPE + KV-cache append + split-K (flash-decoding) attention for one new token per
// sequence, on tensor cores (mma.sync, fp16/bf16 inputs, fp32 accumulation).
//
// Semantics (llama_kernels/ops/rope_attention.py, rope_decode_attention_reference): for sequence b with
// L = seqlens[b] cached positions, q and k_new are rotated at position L (half-split RoPE in
// fp32), the rotated key (rounded to the cache dtype) and v_new go to slot L of the caches, and
// out[b, h] = softmax(scale * q_rot . K[0..L]) V[0..L] with query head h reading kv head
// h / (H / Hkv).
//
// Grid (splits, kv_heads * head_groups, batch), 4 warps a block. A block takes one kv head of
// one sequence, up to 16 of its query heads (a GQA group; larger groups take several head
// groups, each reading the kv head again), and one contiguous chunk of the slots [0, L). The
// chunk is a whole number of key tiles computed on the device from L, so it balances for any
// length and stays valid in a CUDA graph where L changes between replays; a chunk may be empty.
// The block first rotates its query heads into shared memory (and, in the last split, k_new,
// whose first head group writes slot L of both caches). Its warps take the chunk's tiles in
// turn, each with its own online softmax (exp2, fp32), and are merged through shared memory in
// warp order. The last warp of the last split also takes the new key and value, from shared
// memory: slot L is never read. With one split the block writes the output; otherwise it writes
// fp32 partials (running max in the log2 domain, sum, unnormalized accumulator) to the workspace
// and a second kernel merges them in split order. No atomics: results are bitwise reproducible.
//
// One warp and tile of KT keys (KT = 2048 / D, so K and V take 64 registers a thread):
//   S (16 x KT) = Q (16 x D) K^T: m16n8k16 with the query heads in the M rows (rows past the
//     group are zero), the keys in N. Thread (g = lane / 4, t = lane % 4) holds as B fragments
//     key g of each 8-key n-tile, 16-byte chunks 4i + t of it: the dot product does not depend
//     on the order of the head dim, so chunk 4i + t supplies k-steps 2i and 2i + 1 and Q's A
//     fragments are read from shared memory in the same order. A warp load covers 64 contiguous
//     bytes of each of 8 keys.
//   P V: the probabilities come straight from S's accumulators (FlashAttention-2 register reuse).
//     A register of a V fragment pairs two keys, so thread (g, t) loads keys 2t, 2t + 1, 2t + 8,
//     2t + 9 of each 16 (16-byte chunks g + 8k of each; 8 bytes at 4g for D = 32; each warp load
//     covers 128 contiguous bytes of 4 keys) and byte permutes pair them up per head-dim element.
//     For groups of up to 8 heads the product is O^T (D x 8) += V^T P^T, the heads in N, so no
//     accumulator is spent on padding rows; for 9..16 heads it is O (16 x D) += P V. Either way
//     the head-dim elements land in a permuted order (vdim below), undone in shared memory.
//     D = 256 takes 8-key tiles and m16n8k8 for P V.
// The cache is read with 16-byte non-caching loads (L1::no_allocate), a whole tile (8 KB a warp)
// in flight at a time; the first tile is issued before the query is rotated.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/rope_decode.h"

namespace llama_kernels {
namespace cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
struct Shape {
  static_assert(D == 32 || D == 64 || D == 128 || D == 256, "head dim");
  static constexpr int KT = 2048 / D;  // keys a warp takes per tile
  static constexpr int NT = KT / 8;    // 8-key n-tiles of S
  static constexpr int KC = D / 32;    // 16-byte K chunks per thread and key (4i + t)
  static constexpr int VS = KT / 4;    // V keys per thread and tile
  static constexpr int VW = D / 16;    // 32-bit words of V per thread and key
  static constexpr int NJ = D / 8;     // 8-column n-tiles of O
};

// The head-dim element held in column n of O's n-tile j (and, for n = g, element j of what
// thread g loads of a V row).
template <int D>
__device__ __forceinline__ int vdim(int j, int n) {
  if constexpr (D == 32) return 4 * n + j;
  return 8 * (n + 8 * (j >> 3)) + (j & 7);
}

// Tile-relative key of thread t's V slot v: 16-key steps of keys 2t, 2t+1, 2t+8, 2t+9.
__device__ __forceinline__ int vkey(int v, int t) {
  return 16 * (v >> 2) + 2 * t + (v & 1) + 8 * ((v >> 1) & 1);
}

__device__ __forceinline__ float fast_exp2(float x) {  // ex2.approx: exp2(-inf) = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float nan_f32() { return __int_as_float(0x7fc00000); }

// Streams the cache: read once, kept out of L1.
__device__ __forceinline__ uint4 load_stream16(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

__device__ __forceinline__ uint2 load_stream8(const void* p) {
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &v, sizeof(r));
  return r;
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &v, sizeof(r));
  return r;
}

template <typename T> __device__ __forceinline__ float2 unpack2(uint32_t w);
template <> __device__ __forceinline__ float2 unpack2<__half>(uint32_t w) {
  __half2 v;
  memcpy(&v, &w, sizeof(v));
  return __half22float2(v);
}
template <> __device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t w) {
  __nv_bfloat162 v;
  memcpy(&v, &w, sizeof(v));
  return __bfloat1622float2(v);
}

// 8 16-bit elements as raw bits: one vector load when `vec` (16-byte aligned
// base and strides a multiple of 8 elements), else element by element.
__device__ __forceinline__ uint4 load8_bits(const void* p, bool vec) {
  if (vec) return __ldg(static_cast<const uint4*>(p));
  const unsigned short* s = static_cast<const unsigned short*>(p);
  uint32_t w[4];
#pragma unroll
  for (int e = 0; e < 4; ++e)
    w[e] = static_cast<uint32_t>(__ldg(s + 2 * e)) | (static_cast<uint32_t>(__ldg(s + 2 * e + 1)) << 16);
  return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ void load8_f32(const float* p, bool vec, float (&o)[8]) {
  if (vec) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    o[0] = a.x, o[1] = a.y, o[2] = a.z, o[3] = a.w, o[4] = b.x, o[5] = b.y, o[6] = b.z, o[7] = b.w;
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] = __ldg(p + e);
  }
}

// Elements 8c..8c+7 of the row x rotated by the table rows cs / sn (half-split RoPE, in fp32
// with the reference's operation order: x1 cos - x2 sin, x2 cos + x1 sin), rounded to T.
template <typename T, int D>
__device__ __forceinline__ uint4 rope_chunk(const T* x, int c, const float* cs, const float* sn, bool xvec,
                                            bool tvec) {
  constexpr int kHalfChunks = D / 16;
  const bool first = c < kHalfChunks;
  const int pc = first ? c + kHalfChunks : c - kHalfChunks;
  const uint4 own = load8_bits(x + 8 * c, xvec), other = load8_bits(x + 8 * pc, xvec);
  float co[8], si[8];
  const int i0 = 8 * (first ? c : pc);
  load8_f32(cs + i0, tvec, co);
  load8_f32(sn + i0, tvec, si);
  const uint32_t ow[4] = {own.x, own.y, own.z, own.w}, pw[4] = {other.x, other.y, other.z, other.w};
  uint32_t r[4];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const float2 a = unpack2<T>(ow[w]), p = unpack2<T>(pw[w]);
    float y0, y1;
    if (first) {
      y0 = __fsub_rn(__fmul_rn(a.x, co[2 * w]), __fmul_rn(p.x, si[2 * w]));
      y1 = __fsub_rn(__fmul_rn(a.y, co[2 * w + 1]), __fmul_rn(p.y, si[2 * w + 1]));
    } else {
      y0 = __fadd_rn(__fmul_rn(a.x, co[2 * w]), __fmul_rn(p.x, si[2 * w]));
      y1 = __fadd_rn(__fmul_rn(a.y, co[2 * w + 1]), __fmul_rn(p.y, si[2 * w + 1]));
    }
    r[w] = pack2<T>(y0, y1);
  }
  return make_uint4(r[0], r[1], r[2], r[3]);
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __half>::value) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

template <typename T>
__device__ __forceinline__ void mma_1688(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  if constexpr (std::is_same<T, __half>::value) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(b0));
  } else {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(b0));
  }
}

struct DecodeArgs {
  const void* q;
  const void* k_new;
  const void* v_new;
  void* k_cache;
  void* v_cache;
  const void* seqlens;
  const float* cos;
  const float* sin;
  void* out;
  float* ws;  // splits > 1: stats (planes x {max, sum}), then acc (planes x D)
  int64_t q_sb, q_sh, kn_sb, kn_sh, vn_sb, vn_sh;
  int64_t c_sb, c_ss, c_sh, o_sb, o_sh, tab_stride;
  int64_t max_pos;  // a length L is valid when 0 <= L <= max_pos
  int64_t planes;   // batch * heads * splits: records in the workspace
  int heads, group, hgroups, splits;
  float scale_log2;  // softmax_scale * log2(e)
  bool seq64, q_vec, kn_vec, vn_vec, tab_vec;
};

__device__ __forceinline__ int64_t read_len(const void* p, bool is64, int b) {
  return is64 ? static_cast<int64_t>(__ldg(static_cast<const long long*>(p) + b))
              : static_cast<int64_t>(__ldg(static_cast<const int*>(p) + b));
}

// One warp's online-softmax state for rows g (and g + 8 when R = 2) of the block's heads. The
// accumulator: for R = 1, O^T fragments (dims in M, the 8 heads in N: nothing wasted on padding
// rows), acc[i] = {O[head 2t][rdim(i, g)], O[2t + 1][rdim(i, g)], O[2t][rdim(i, g + 8)],
// O[2t + 1][rdim(i, g + 8)]} with rdim(i, g + 8h) = vdim(2i + h, g); for R = 2, O fragments (16
// heads in M), acc[j] = {O[g][vdim(j, 2t)], O[g][vdim(j, 2t + 1)], O[g + 8][..], O[g + 8][..]}.
template <int D, int R>
struct WarpState {
  static constexpr int kAcc = R == 1 ? D / 16 : D / 8;
  float m[R];          // running max of the scores, log2 domain
  float l[R];          // this thread's part of the running sum
  float acc[kAcc][4];
};

// Where accumulator element (i, e) of thread (g, t) belongs: head row and head-dim element.
template <int D, int R>
__device__ __forceinline__ void acc_place(int i, int e, int g, int t, int& row, int& dim) {
  if constexpr (R == 1) {
    row = 2 * t + (e & 1);
    dim = vdim<D>(2 * i + (e >> 1), g);
  } else {
    row = g + 8 * (e >> 1);
    dim = vdim<D>(i, 2 * t + (e & 1));
  }
}

template <typename T, int D>
struct Tile {
  uint32_t k[Shape<D>::NT][Shape<D>::KC * 4];  // key 8nt + g, chunks 4i + t
  uint32_t v[Shape<D>::VS][Shape<D>::VW];       // key vkey(v, t), elements vdim(j, g)
};

// Loads the cache tile of keys [k0, k0 + KT) clipped to `end`; keys past it read as zeros.
template <typename T, int D>
__device__ __forceinline__ void load_tile(Tile<T, D>& tile, const T* kc, const T* vc, int64_t stride_s, int64_t k0,
                                          int64_t end, int g, int t) {
  using S = Shape<D>;
#pragma unroll
  for (int nt = 0; nt < S::NT; ++nt) {
    const int64_t key = k0 + 8 * nt + g;
    const T* p = kc + key * stride_s;
#pragma unroll
    for (int i = 0; i < S::KC; ++i) {
      uint4 w = make_uint4(0, 0, 0, 0);
      if (key < end) w = load_stream16(p + 8 * (4 * i + t));
      tile.k[nt][4 * i] = w.x, tile.k[nt][4 * i + 1] = w.y, tile.k[nt][4 * i + 2] = w.z, tile.k[nt][4 * i + 3] = w.w;
    }
  }
#pragma unroll
  for (int v = 0; v < S::VS; ++v) {
    const int64_t key = k0 + vkey(v, t);
    const T* p = vc + key * stride_s;
    if constexpr (D == 32) {
      uint2 w = make_uint2(0, 0);
      if (key < end) w = load_stream8(p + 4 * g);
      tile.v[v][0] = w.x, tile.v[v][1] = w.y;
    } else {
#pragma unroll
      for (int k = 0; k < D / 64; ++k) {
        uint4 w = make_uint4(0, 0, 0, 0);
        if (key < end) w = load_stream16(p + 8 * (g + 8 * k));
        tile.v[v][4 * k] = w.x, tile.v[v][4 * k + 1] = w.y, tile.v[v][4 * k + 2] = w.z, tile.v[v][4 * k + 3] = w.w;
      }
    }
  }
}

// Row stride (elements) of the block's rotated-query rows in shared memory: 16 words mod 32, so
// the 16-byte fragment loads of a quarter warp (rows g, g + 1, chunks t) hit distinct banks.
template <int D>
constexpr int q_stride() {
  return D == 32 ? D : D + 32;
}

// Folds one tile whose first `valid` keys are real (valid >= 1) into the warp's state. sq: the
// block's rotated query rows (T bits) in shared memory.
template <typename T, int D, int R>
__device__ __forceinline__ void attend_tile(WarpState<D, R>& st, const uint16_t* sq, const Tile<T, D>& tile,
                                            int valid, float scale_log2, int g, int t) {
  using S = Shape<D>;
  constexpr int KT = S::KT, QS = q_stride<D>();
  float s[S::NT][4];
#pragma unroll
  for (int nt = 0; nt < S::NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
  for (int i = 0; i < S::KC; ++i) {  // chunk 4i + t: k-steps 2i (words 0, 1) and 2i + 1 (words 2, 3)
    const uint4 q0 = *reinterpret_cast<const uint4*>(sq + g * QS + 8 * (4 * i + t));
    uint4 q1 = make_uint4(0, 0, 0, 0);
    if constexpr (R == 2) q1 = *reinterpret_cast<const uint4*>(sq + (g + 8) * QS + 8 * (4 * i + t));
#pragma unroll
    for (int nt = 0; nt < S::NT; ++nt) {
      mma_16816<T>(s[nt], q0.x, q1.x, q0.y, q1.y, tile.k[nt][4 * i], tile.k[nt][4 * i + 1]);
      mma_16816<T>(s[nt], q0.z, q1.z, q0.w, q1.w, tile.k[nt][4 * i + 2], tile.k[nt][4 * i + 3]);
    }
  }
#pragma unroll
  for (int nt = 0; nt < S::NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int key = 8 * nt + 2 * t + (i & 1);
      s[nt][i] = key < valid ? s[nt][i] * scale_log2 : -INFINITY;
    }
  float alpha[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float mx = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < S::NT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(st.m[r], mx);  // finite: key 0 is valid
    alpha[r] = fast_exp2(st.m[r] - m_new);   // 0 while the state is empty (m = -inf)
    st.m[r] = m_new;
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < S::NT; ++nt) {
      s[nt][2 * r] = fast_exp2(s[nt][2 * r] - m_new);
      s[nt][2 * r + 1] = fast_exp2(s[nt][2 * r + 1] - m_new);
      sum += s[nt][2 * r] + s[nt][2 * r + 1];
    }
    st.l[r] = st.l[r] * alpha[r] + sum;
  }
  // P as fragments: p[nt][r] = {P[row g + 8r][key 8nt + 2t], [.. + 1]}.
  uint32_t p[S::NT][2];
#pragma unroll
  for (int nt = 0; nt < S::NT; ++nt) {
    p[nt][0] = pack2<T>(s[nt][0], s[nt][1]);
    p[nt][1] = R == 2 ? pack2<T>(s[nt][2], s[nt][3]) : 0u;
  }

  if constexpr (R == 1) {
    // O^T (D x 8 heads) += V^T P^T: V^T is the A operand (M = head dims, K = keys), P^T the B
    // operand, taken as is from S's accumulators. The factors of heads 2t, 2t + 1 live in quads
    // 2t and 2t + 1.
    const float a_lo = __shfl_sync(0xffffffffu, alpha[0], 8 * t);
    const float a_hi = __shfl_sync(0xffffffffu, alpha[0], 8 * t + 4);
#pragma unroll
    for (int i = 0; i < S::NJ / 2; ++i) {  // rows g: element 2i (low halves), g + 8: 2i + 1 (high)
      float c[4] = {st.acc[i][0] * a_lo, st.acc[i][1] * a_hi, st.acc[i][2] * a_lo, st.acc[i][3] * a_hi};
      if constexpr (KT == 8) {
        mma_1688<T>(c, __byte_perm(tile.v[0][i], tile.v[1][i], 0x5410u),
                    __byte_perm(tile.v[0][i], tile.v[1][i], 0x7632u), p[0][0]);
      } else {
#pragma unroll
        for (int u = 0; u < KT / 16; ++u)
          mma_16816<T>(c, __byte_perm(tile.v[4 * u][i], tile.v[4 * u + 1][i], 0x5410u),
                       __byte_perm(tile.v[4 * u][i], tile.v[4 * u + 1][i], 0x7632u),
                       __byte_perm(tile.v[4 * u + 2][i], tile.v[4 * u + 3][i], 0x5410u),
                       __byte_perm(tile.v[4 * u + 2][i], tile.v[4 * u + 3][i], 0x7632u), p[2 * u][0],
                       p[2 * u + 1][0]);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) st.acc[i][e] = c[e];
    }
  } else {
    // O (16 heads x D) += P V: P is the A operand, V the B operand (K = keys, N = head dims).
#pragma unroll
    for (int j = 0; j < S::NJ; ++j) {
      const int w = j >> 1;
      const uint32_t sel = (j & 1) ? 0x7632u : 0x5410u;  // the high or the low halves of two words
      float c[4] = {st.acc[j][0] * alpha[0], st.acc[j][1] * alpha[0], st.acc[j][2] * alpha[1],
                    st.acc[j][3] * alpha[1]};
      if constexpr (KT == 8) {
        mma_1688<T>(c, p[0][0], p[0][1], __byte_perm(tile.v[0][w], tile.v[1][w], sel));
      } else {
#pragma unroll
        for (int u = 0; u < KT / 16; ++u)
          mma_16816<T>(c, p[2 * u][0], p[2 * u][1], p[2 * u + 1][0], p[2 * u + 1][1],
                       __byte_perm(tile.v[4 * u][w], tile.v[4 * u + 1][w], sel),
                       __byte_perm(tile.v[4 * u + 2][w], tile.v[4 * u + 3][w], sel));
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) st.acc[j][e] = c[e];
    }
  }
}

template <typename T, int D, int R>
__global__ void __launch_bounds__(kThreads) rope_decode_kernel(const DecodeArgs a) {
  using S = Shape<D>;
  constexpr int KT = S::KT, ROWS = 8 * R, QS = q_stride<D>(), CH = D / 8;
  // Rows 0..ROWS-1: the rotated query heads; ROWS, ROWS + 1: the rotated k_new and v_new.
  __shared__ __align__(16) uint16_t sm_q[(ROWS + 2) * QS];
  __shared__ float sm_m[kWarps][ROWS];
  __shared__ float sm_l[ROWS];
  __shared__ float sm_acc[ROWS][D];

  const int split = blockIdx.x;
  const int kvh = blockIdx.y / a.hgroups, hg = blockIdx.y % a.hgroups;
  const int b = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int head0 = kvh * a.group + hg * 16;  // the block's first query head
  const int nrows = min(ROWS, a.group - hg * 16);
  const bool last = split == a.splits - 1;  // takes the new key
  T* out = static_cast<T*>(a.out) + b * a.o_sb + head0 * a.o_sh;

  const int64_t L = read_len(a.seqlens, a.seq64, b);
  if (L < 0 || L > a.max_pos) {  // no reads, no cache write; the output is NaN
    if (a.splits == 1)
      for (int i = threadIdx.x; i < nrows * D; i += kThreads) out[(i / D) * a.o_sh + i % D] = from_f32<T>(nan_f32());
    return;  // with splits > 1 the merge kernel writes the NaN
  }

  // This split's keys: whole tiles, [start, end) of [0, L).
  const int64_t tiles = (L + KT - 1) / KT;
  const int64_t per = (tiles + a.splits - 1) / a.splits;
  const int64_t start = split * per * KT;
  const int64_t end = min(L, start + per * KT);
  const T* kc = static_cast<const T*>(a.k_cache) + b * a.c_sb + kvh * a.c_sh;
  const T* vc = static_cast<const T*>(a.v_cache) + b * a.c_sb + kvh * a.c_sh;

  Tile<T, D> tile;
  int64_t k0 = start + warp * KT;
  if (k0 < end) load_tile<T, D>(tile, kc, vc, a.c_ss, k0, end, g, t);  // in flight during the rotation

  // The block rotates its query heads (zero rows past the group) and, in the last split, k_new,
  // one 8-element chunk a thread; the first head group of the last split writes slot L.
  {
    const float* cs = a.cos + L * a.tab_stride;
    const float* sn = a.sin + L * a.tab_stride;
    const int items = (ROWS + (last ? 2 : 0)) * CH;
#pragma unroll 1
    for (int idx = threadIdx.x; idx < items; idx += kThreads) {
      const int row = idx / CH, c = idx % CH;
      uint4 w = make_uint4(0, 0, 0, 0);
      if (row < ROWS) {
        if (hg * 16 + row < a.group)
          w = rope_chunk<T, D>(static_cast<const T*>(a.q) + b * a.q_sb + (head0 + row) * a.q_sh, c,
                               cs, sn, a.q_vec, a.tab_vec);
      } else {
        const int64_t slot = b * a.c_sb + L * a.c_ss + kvh * a.c_sh + 8 * c;
        if (row == ROWS) {
          w = rope_chunk<T, D>(static_cast<const T*>(a.k_new) + b * a.kn_sb + kvh * a.kn_sh, c, cs, sn,
                               a.kn_vec, a.tab_vec);
          if (hg == 0) *reinterpret_cast<uint4*>(static_cast<T*>(a.k_cache) + slot) = w;
        } else {
          w = load8_bits(static_cast<const T*>(a.v_new) + b * a.vn_sb + kvh * a.vn_sh + 8 * c, a.vn_vec);
          if (hg == 0) *reinterpret_cast<uint4*>(static_cast<T*>(a.v_cache) + slot) = w;
        }
      }
      *reinterpret_cast<uint4*>(sm_q + row * QS + 8 * c) = w;
    }
  }
  __syncthreads();

  WarpState<D, R> st;
#pragma unroll
  for (int r = 0; r < R; ++r) st.m[r] = -INFINITY, st.l[r] = 0.f;
#pragma unroll
  for (int i = 0; i < WarpState<D, R>::kAcc; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) st.acc[i][e] = 0.f;

  while (k0 < end) {
    const int valid = static_cast<int>(min(static_cast<int64_t>(KT), end - k0));
    attend_tile<T, D, R>(st, sm_q, tile, valid, a.scale_log2, g, t);
    k0 += kWarps * KT;
    if (k0 < end) load_tile<T, D>(tile, kc, vc, a.c_ss, k0, end, g, t);
  }

  // The new key (rounded to T, as the cache holds it) and value, as key 0 of a tile of zeros,
  // in the last warp of the last split: never read back from slot L.
  if (last && warp == kWarps - 1) {
#pragma unroll
    for (int x = 0; x < S::NT; ++x)
#pragma unroll
      for (int w = 0; w < S::KC * 4; ++w) tile.k[x][w] = 0u;
#pragma unroll
    for (int x = 0; x < S::VS; ++x)
#pragma unroll
      for (int w = 0; w < S::VW; ++w) tile.v[x][w] = 0u;
    const uint16_t* kn = sm_q + ROWS * QS;
    const uint16_t* vn = sm_q + (ROWS + 1) * QS;
    if (g == 0) {  // key 0 of n-tile 0: chunks 4i + t
#pragma unroll
      for (int i = 0; i < S::KC; ++i) {
        const uint4 w = *reinterpret_cast<const uint4*>(kn + 8 * (4 * i + t));
        tile.k[0][4 * i] = w.x, tile.k[0][4 * i + 1] = w.y, tile.k[0][4 * i + 2] = w.z, tile.k[0][4 * i + 3] = w.w;
      }
    }
    if (t == 0) {  // V slot 0 is key 2t = 0
      if constexpr (D == 32) {
        const uint2 w = *reinterpret_cast<const uint2*>(vn + 4 * g);
        tile.v[0][0] = w.x, tile.v[0][1] = w.y;
      } else {
#pragma unroll
        for (int k = 0; k < D / 64; ++k) {
          const uint4 w = *reinterpret_cast<const uint4*>(vn + 8 * (g + 8 * k));
          tile.v[0][4 * k] = w.x, tile.v[0][4 * k + 1] = w.y, tile.v[0][4 * k + 2] = w.z, tile.v[0][4 * k + 3] = w.w;
        }
      }
    }
    attend_tile<T, D, R>(st, sm_q, tile, 1, a.scale_log2, g, t);
  }

  // Merge the warps in warp order: rescale each to the block's max, add into shared memory.
#pragma unroll
  for (int r = 0; r < R; ++r) {
    st.l[r] += __shfl_xor_sync(0xffffffffu, st.l[r], 1);
    st.l[r] += __shfl_xor_sync(0xffffffffu, st.l[r], 2);
    if (t == 0) sm_m[warp][g + 8 * r] = st.m[r];
  }
  __syncthreads();
  // Each warp's share is scaled by 2^(m_warp - m_block) per head row (0 for a warp that saw no key).
  auto factor = [&](int row) {
    const float mine = sm_m[warp][row];
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sm_m[w][row]);
    return mine == -INFINITY ? 0.f : fast_exp2(mine - mx);
  };
  float f_row[R], f_col[2];  // rows g (+ 8); for R = 1 also the accumulator's heads 2t, 2t + 1
#pragma unroll
  for (int r = 0; r < R; ++r) f_row[r] = factor(g + 8 * r);
  f_col[0] = R == 1 ? factor(2 * t) : 0.f;
  f_col[1] = R == 1 ? factor(2 * t + 1) : 0.f;
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w) {
      if (t == 0)
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int row = g + 8 * r;
          sm_l[row] = (w == 0 ? 0.f : sm_l[row]) + st.l[r] * f_row[r];
        }
#pragma unroll
      for (int i = 0; i < WarpState<D, R>::kAcc; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          int row, dim;
          acc_place<D, R>(i, e, g, t, row, dim);
          float& dst = sm_acc[row][dim];
          dst = (w == 0 ? 0.f : dst) + st.acc[i][e] * (R == 1 ? f_col[e & 1] : f_row[(e >> 1) & (R - 1)]);
        }
    }
    __syncthreads();
  }

  if (a.splits == 1) {
    for (int i = threadIdx.x; i < nrows * D; i += kThreads) {
      const int row = i / D, d = i % D;
      out[row * a.o_sh + d] = from_f32<T>(sm_acc[row][d] / sm_l[row]);
    }
    return;
  }
  // Record of row r: (b * heads + head0 + r) * splits + split.
  const int64_t rec0 = (static_cast<int64_t>(b) * a.heads + head0) * a.splits + split;
  float* acc_ws = a.ws + 2 * a.planes;
  for (int i = threadIdx.x; i < nrows * D; i += kThreads) {
    const int row = i / D, d = i % D;
    acc_ws[(rec0 + static_cast<int64_t>(row) * a.splits) * D + d] = sm_acc[row][d];
  }
  if (threadIdx.x < nrows) {
    const int row = threadIdx.x;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sm_m[w][row]);
    float2* stats = reinterpret_cast<float2*>(a.ws) + rec0 + static_cast<int64_t>(row) * a.splits;
    *stats = make_float2(mx, sm_l[row]);  // an empty split: (-inf, 0) and a zero accumulator
  }
}

// out[b, h] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, in split order.
template <typename T, int D>
__global__ void __launch_bounds__(128) rope_decode_merge_kernel(const float* __restrict__ ws, int64_t planes,
                                                                const void* seqlens, bool seq64, int64_t max_pos,
                                                                void* out_, int64_t o_sb, int64_t o_sh, int heads,
                                                                int splits) {
  const int h = blockIdx.x, b = blockIdx.y;
  T* out = static_cast<T*>(out_) + b * o_sb + h * o_sh;
  const int64_t L = read_len(seqlens, seq64, b);
  if (L < 0 || L > max_pos) {
    for (int d = threadIdx.x; d < D; d += blockDim.x) out[d] = from_f32<T>(nan_f32());
    return;
  }
  const int64_t rec0 = (static_cast<int64_t>(b) * heads + h) * splits;
  const float2* stats = reinterpret_cast<const float2*>(ws) + rec0;
  const float* acc = ws + 2 * planes + rec0 * D;
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, stats[s].x);
  float den = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float2 ml = stats[s];
    den += (ml.x == -INFINITY ? 0.f : fast_exp2(ml.x - mx)) * ml.y;
  }
  const float inv = 1.f / den;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float num = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float ms = stats[s].x;
      if (ms != -INFINITY) num += fast_exp2(ms - mx) * acc[static_cast<int64_t>(s) * D + d];
    }
    out[d] = from_f32<T>(num * inv);
  }
}

template <typename T, int D>
int launch_typed(const DecodeArgs& a, int64_t batch, int64_t kv_heads, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.splits), static_cast<unsigned>(kv_heads * a.hgroups),
                  static_cast<unsigned>(batch));
  if (a.group > 8)
    rope_decode_kernel<T, D, 2><<<grid, kThreads, 0, stream>>>(a);
  else
    rope_decode_kernel<T, D, 1><<<grid, kThreads, 0, stream>>>(a);
  LLAMA_KERNELS_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (a.splits > 1) {
    rope_decode_merge_kernel<T, D><<<dim3(static_cast<unsigned>(a.heads), static_cast<unsigned>(batch)),
                                     std::min(D, 128), 0, stream>>>(a.ws, a.planes, a.seqlens, a.seq64, a.max_pos,
                                                                    a.out, a.o_sb, a.o_sh, a.heads, a.splits);
    LLAMA_KERNELS_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return 0;
}

template <typename T>
int launch_dim(const DecodeArgs& a, int64_t head_dim, int64_t batch, int64_t kv_heads, cudaStream_t stream) {
  switch (head_dim) {
    case 32: return launch_typed<T, 32>(a, batch, kv_heads, stream);
    case 64: return launch_typed<T, 64>(a, batch, kv_heads, stream);
    case 128: return launch_typed<T, 128>(a, batch, kv_heads, stream);
    default: return launch_typed<T, 256>(a, batch, kv_heads, stream);
  }
}

bool vec_ok(uintptr_t p, int64_t s0, int64_t s1) { return p % 16 == 0 && s0 % 8 == 0 && s1 % 8 == 0; }

}  // namespace

int launch_rope_decode_attention(const RopeDecodeParams& p, uintptr_t stream) {
  const uintptr_t q = p.q, k_new = p.k_new, v_new = p.v_new, k_cache = p.k_cache, v_cache = p.v_cache;
  const uintptr_t seqlens = p.seqlens, cos = p.cos, sin = p.sin, out = p.out, workspace = p.workspace;
  const int64_t batch = p.batch, heads = p.heads, kv_heads = p.kv_heads, head_dim = p.head_dim;
  const int64_t capacity = p.capacity, table_len = p.table_len;
  const int64_t q_stride_b = p.q_stride_b, q_stride_h = p.q_stride_h;
  const int64_t knew_stride_b = p.knew_stride_b, knew_stride_h = p.knew_stride_h;
  const int64_t vnew_stride_b = p.vnew_stride_b, vnew_stride_h = p.vnew_stride_h;
  const int64_t cache_stride_b = p.cache_stride_b, cache_stride_s = p.cache_stride_s;
  const int64_t cache_stride_h = p.cache_stride_h, out_stride_b = p.out_stride_b, out_stride_h = p.out_stride_h;
  const int64_t table_stride = p.table_stride;
  const int dtype = p.dtype, device = p.device;
  const bool seqlens_int64 = p.seqlens_int64;
  const float softmax_scale = p.softmax_scale;
  const int64_t splits = p.splits;
  if (batch == 0) return 0;
  LLAMA_KERNELS_CUDA_RETURN_IF_ERROR(set_device(device));
  DecodeArgs a{};
  a.q = reinterpret_cast<const void*>(q);
  a.k_new = reinterpret_cast<const void*>(k_new);
  a.v_new = reinterpret_cast<const void*>(v_new);
  a.k_cache = reinterpret_cast<void*>(k_cache);
  a.v_cache = reinterpret_cast<void*>(v_cache);
  a.seqlens = reinterpret_cast<const void*>(seqlens);
  a.cos = reinterpret_cast<const float*>(cos);
  a.sin = reinterpret_cast<const float*>(sin);
  a.out = reinterpret_cast<void*>(out);
  a.ws = splits > 1 ? reinterpret_cast<float*>(workspace) : nullptr;
  a.q_sb = q_stride_b, a.q_sh = q_stride_h;
  a.kn_sb = knew_stride_b, a.kn_sh = knew_stride_h;
  a.vn_sb = vnew_stride_b, a.vn_sh = vnew_stride_h;
  a.c_sb = cache_stride_b, a.c_ss = cache_stride_s, a.c_sh = cache_stride_h;
  a.o_sb = out_stride_b, a.o_sh = out_stride_h;
  a.tab_stride = table_stride;
  a.max_pos = std::min(capacity, table_len) - 1;
  a.planes = batch * heads * splits;
  a.heads = static_cast<int>(heads);
  a.group = static_cast<int>(heads / kv_heads);
  a.hgroups = (a.group + 15) / 16;
  a.splits = static_cast<int>(splits);
  a.scale_log2 = softmax_scale * kLog2e;
  a.seq64 = seqlens_int64;
  a.q_vec = vec_ok(q, q_stride_b, q_stride_h);
  a.kn_vec = vec_ok(k_new, knew_stride_b, knew_stride_h);
  a.vn_vec = vec_ok(v_new, vnew_stride_b, vnew_stride_h);
  a.tab_vec = cos % 16 == 0 && sin % 16 == 0 && table_stride % 4 == 0;
  auto cu_stream = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == static_cast<int>(DType::F16)) return launch_dim<__half>(a, head_dim, batch, kv_heads, cu_stream);
  return launch_dim<__nv_bfloat16>(a, head_dim, batch, kv_heads, cu_stream);
}

}  // namespace cuda
}  // namespace llama_kernels
