// Shared pieces of the prefix-attention kernels: the parameter block, shared-memory layouts,
// and tile loaders. Tiles are staged in shared memory and multiplied with WMMA (16x16x16,
// fp16/bf16 in, fp32 accumulate); softmax and masks run on CUDA cores over the staged scores,
// so no code depends on the (unspecified) register layout of WMMA fragments.
#pragma once

#include "../common.h"

#include <mma.h>

namespace lora_kernels {
namespace attn {

constexpr int THREADS = 128;      // 4 warps per block in every attention kernel
constexpr int BM = 64;            // query rows per block (forward, dQ): 16 per warp
constexpr int BN = 64;            // keys per tile
constexpr int BMQ = 32;           // query rows per step of the dK/dV kernel
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

struct Params {
  // Inputs (last dim contiguous; the host wrapper ensures it). Strides in elements.
  const void* q; int64_t q_sb, q_sh, q_sl;
  const void* k; int64_t k_sb, k_sh, k_sl;
  const void* v; int64_t v_sb, v_sh, v_sl;
  const void* pk; int64_t pk_sb, pk_sh, pk_sl;  // pk_sb = 0 for a prefix shared by the batch
  const void* pv; int64_t pv_sb, pv_sh, pv_sl;
  const uint8_t* kpm; int64_t kpm_sb, kpm_sl;   // key padding mask (True = keep) or null
  // Forward outputs / backward inputs.
  void* out; int64_t o_sb, o_sh, o_sl;
  float* lse;                                   // (B, Hq, Lq) contiguous
  // Backward.
  const void* dout; int64_t do_sb, do_sh, do_sl;
  float* delta;                                 // (B, Hq, Lq) contiguous
  void* dq;                                     // (B, Hq, Lq, D) contiguous
  void* dk; void* dv;                           // (B, Hkv, Lk, D) contiguous
  void* dpk; void* dpv;                         // (Bp, Hkv, P, D) contiguous
  int B, Hq, Hkv, Lq, Lk, P, Bp;
  bool causal;
  bool vec;          // every tile row is 16-byte aligned: load with 128-bit accesses
  float scale;       // softmax scale
  float scale_log2;  // scale * log2(e)
};

__host__ __device__ constexpr size_t round128(size_t n) { return (n + 127) / 128 * 128; }

// Leading dimensions (elements) of the staged tiles. Paddings keep every WMMA pointer 32-byte
// aligned and spread rows over banks.
template <int D> struct Ld {
  static constexpr int H = D + 8;     // fp16/bf16 tiles with D columns
  static constexpr int A = D + 4;     // fp32 accumulators with D columns
  static constexpr int S = BN + 4;    // fp32 score tiles
  static constexpr int P = BN + 8;    // fp16/bf16 probability tiles
};

template <int D> struct FwdSmem {
  static constexpr size_t q = 0;
  static constexpr size_t k = q + round128(BM * Ld<D>::H * 2);
  static constexpr size_t v = k + round128(BN * Ld<D>::H * 2);
  static constexpr size_t s = v + round128(BN * Ld<D>::H * 2);
  static constexpr size_t p = s + round128(BM * Ld<D>::S * 4);
  static constexpr size_t o = p + round128(BM * Ld<D>::P * 2);
  static constexpr size_t kval = o + round128(BM * Ld<D>::A * 4);
  static constexpr size_t bytes = kval + round128(BN * 4);
};

template <int D> struct DkdvSmem {
  static constexpr size_t k = 0;
  static constexpr size_t v = k + round128(BN * Ld<D>::H * 2);
  static constexpr size_t dk = v + round128(BN * Ld<D>::H * 2);
  static constexpr size_t dv = dk + round128(BN * Ld<D>::A * 4);
  static constexpr size_t q = dv + round128(BN * Ld<D>::A * 4);
  static constexpr size_t dout = q + round128(BMQ * Ld<D>::H * 2);
  static constexpr size_t s = dout + round128(BMQ * Ld<D>::H * 2);
  static constexpr size_t dp = s + round128(BMQ * Ld<D>::S * 4);
  static constexpr size_t p = dp + round128(BMQ * Ld<D>::S * 4);
  static constexpr size_t ds = p + round128(BMQ * Ld<D>::P * 2);
  static constexpr size_t lse = ds + round128(BMQ * Ld<D>::P * 2);
  static constexpr size_t delta = lse + round128(BMQ * 4);
  static constexpr size_t kval = delta + round128(BMQ * 4);
  static constexpr size_t bytes = kval + round128(BN * 4);
};

template <int D> struct DqSmem {
  static constexpr size_t q = 0;
  static constexpr size_t dout = q + round128(BM * Ld<D>::H * 2);
  static constexpr size_t dq = dout + round128(BM * Ld<D>::H * 2);
  static constexpr size_t k = dq + round128(BM * Ld<D>::A * 4);
  static constexpr size_t v = k + round128(BN * Ld<D>::H * 2);
  static constexpr size_t s = v + round128(BN * Ld<D>::H * 2);
  static constexpr size_t dp = s + round128(BM * Ld<D>::S * 4);
  static constexpr size_t ds = dp + round128(BM * Ld<D>::S * 4);
  static constexpr size_t lse = ds + round128(BM * Ld<D>::P * 2);
  static constexpr size_t delta = lse + round128(BM * 4);
  static constexpr size_t kval = delta + round128(BM * 4);
  static constexpr size_t bytes = kval + round128(BN * 4);
};

// Copy rows [0, ROWS) of a (rows x D) tile whose row r starts at g + r * row_stride into shared
// memory (leading dimension ld); rows >= nvalid are zero. All THREADS threads take part.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_rows(T* sm, int ld, const T* g, int64_t row_stride,
                                          int nvalid, bool vec) {
  if (vec) {
    constexpr int CH = D / 8;  // 16-byte chunks per row
    for (int e = threadIdx.x; e < ROWS * CH; e += THREADS) {
      const int r = e / CH, c = e % CH;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (r < nvalid) val = *reinterpret_cast<const uint4*>(g + r * row_stride + c * 8);
      *reinterpret_cast<uint4*>(sm + r * ld + c * 8) = val;
    }
  } else {
    const T zero = from_float<T>(0.f);
    for (int e = threadIdx.x; e < ROWS * D; e += THREADS) {
      const int r = e / D, c = e % D;
      sm[r * ld + c] = r < nvalid ? g[r * row_stride + c] : zero;
    }
  }
}

// Key validity of a tile: kval[c] = key n0 + c exists and (sequence keys) is not padded.
__device__ __forceinline__ void load_key_valid(int* kval, const Params& p, int b, int n0,
                                               int nvalid, bool is_prefix) {
  for (int c = threadIdx.x; c < BN; c += THREADS) {
    bool ok = c < nvalid;
    if (ok && !is_prefix && p.kpm != nullptr)
      ok = p.kpm[static_cast<int64_t>(b) * p.kpm_sb + static_cast<int64_t>(n0 + c) * p.kpm_sl] != 0;
    kval[c] = ok ? 1 : 0;
  }
}

// Bottom-right causal: sequence key j is visible to query i iff j <= i + (Lk - Lq).
__device__ __forceinline__ bool causal_visible(const Params& p, int i, int j) {
  return j <= i + (p.Lk - p.Lq);
}

// Number of sequence keys that any of the query rows [m0, m0 + rows) can see.
__device__ __forceinline__ int seq_key_end(const Params& p, int m0, int rows) {
  if (!p.causal) return p.Lk;
  const int last = min(m0 + rows, p.Lq) - 1;
  return max(0, min(p.Lk, last + (p.Lk - p.Lq) + 1));
}

}  // namespace attn
}  // namespace lora_kernels
