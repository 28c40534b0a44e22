// Shared pieces of the prefix-attention kernels (FlashAttention-2 structure on mma.sync, all
// accumulators in registers): the parameter block, the tile geometry, the swizzled
// shared-memory layout, the asynchronous tile loads and the visibility rules.
#pragma once

#include "../device/warp_mma.cuh"

#include <cmath>

namespace lora_kernels {
namespace attn {

constexpr int THREADS = 128;  // 4 warps in every attention kernel
constexpr int BM = 64;        // query rows per block of the forward and dQ kernels: 16 per warp
constexpr int BN = 64;        // keys per tile, and keys per dK/dV block: 16 per warp
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// Query rows per step of the dK/dV kernel (smaller for D = 128 to keep two blocks per SM).
template <int D>
struct DkdvStep {
  static constexpr int BMQ = D == 128 ? 32 : 64;
};

struct Params {
  // Inputs; the last dimension is contiguous and every row 16-byte aligned (the host wrapper
  // copies a tensor that is not). Strides in elements.
  const void* q; int64_t q_sb, q_sh, q_sl;
  const void* k; int64_t k_sb, k_sh, k_sl;
  const void* v; int64_t v_sb, v_sh, v_sl;
  const void* pk; int64_t pk_sb, pk_sh, pk_sl;  // pk_sb = 0 for a prefix shared by the batch
  const void* pv; int64_t pv_sb, pv_sh, pv_sl;
  const uint8_t* kpm; int64_t kpm_sb, kpm_sl;   // key padding mask (nonzero = keep) or null
  // Forward outputs / backward inputs.
  void* out; int64_t o_sb, o_sh, o_sl;
  float* lse;                                   // (B, Hq, Lq) contiguous, natural log
  // Backward.
  const void* dout; int64_t do_sb, do_sh, do_sl;
  float* delta;                                 // (B, Hq, Lq) contiguous, written by the dQ kernel
  void* dq;                                     // (B, Hq, Lq, D) contiguous
  void* dk; void* dv;                           // (B, Hkv, Lk, D) contiguous
  void* dpk; void* dpv;                         // (Bp, Hkv, P, D) contiguous
  int B, Hq, Hkv, Lq, Lk, P, Bp;
  bool causal;
  float scale;       // softmax scale
  float scale_log2;  // scale * log2(e): scores are kept in log2 units
};

// Element offset of 16-byte chunk `chunk` of row `r` in a tile of rows of D 16-bit elements:
// chunk c of row r is stored at chunk c ^ (r % 8). The eight rows an ldmatrix phase reads, and
// the chunks a warp copies, then fall in distinct banks.
template <int D>
__device__ __forceinline__ int swz(int r, int chunk) {
  return r * D + ((chunk ^ (r & 7)) << 3);
}

// Asynchronous copy of rows [0, ROWS) of a tile whose row r starts at g + r * row_stride into
// shared memory (swizzled); rows >= nvalid are zero-filled (nothing is read for them).
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_tile(T* sm, const T* g, int64_t row_stride, int nvalid) {
  constexpr int CH = D / 8;
  static_assert((ROWS * CH) % THREADS == 0, "tile copy must divide evenly over the block");
#pragma unroll
  for (int e = threadIdx.x; e < ROWS * CH; e += THREADS) {
    const int r = e / CH, c = e % CH;
    const bool ok = r < nvalid;
    cp_async_16(sm + swz<D>(r, c), ok ? g + r * row_stride + c * 8 : g, ok ? 16 : 0);
  }
}

// The keys of tile j of a query block: tiles [0, nP) are the prefix (always visible), the rest
// the sequence keys. Loads K and V of the tile into sk, sv.
template <typename T, int D>
__device__ __forceinline__ void load_kv_tile(const Params& p, int b, int hkv, int j, int nP, T* sk,
                                             T* sv) {
  if (j < nP) {
    const int n0 = j * BN;
    const T* kg = static_cast<const T*>(p.pk) + b * p.pk_sb + hkv * p.pk_sh + n0 * p.pk_sl;
    const T* vg = static_cast<const T*>(p.pv) + b * p.pv_sb + hkv * p.pv_sh + n0 * p.pv_sl;
    load_tile<T, D, BN>(sk, kg, p.pk_sl, p.P - n0);
    load_tile<T, D, BN>(sv, vg, p.pv_sl, p.P - n0);
  } else {
    const int n0 = (j - nP) * BN;
    const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + hkv * p.k_sh + n0 * p.k_sl;
    const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + hkv * p.v_sh + n0 * p.v_sl;
    load_tile<T, D, BN>(sk, kg, p.k_sl, p.Lk - n0);
    load_tile<T, D, BN>(sv, vg, p.v_sl, p.Lk - n0);
  }
}

// Sequence key `key` exists and is not padded out (batch row b).
__device__ __forceinline__ bool seq_key_valid(const Params& p, int b, int key) {
  if (key >= p.Lk) return false;
  return p.kpm == nullptr || p.kpm[b * p.kpm_sb + key * p.kpm_sl] != 0;
}

// Number of sequence keys that any of the query rows [m0, m0 + rows) can see (bottom-right
// causal: key j is visible to query i iff j <= i + (Lk - Lq)).
__device__ __forceinline__ int seq_key_end(const Params& p, int m0, int rows) {
  if (!p.causal) return p.Lk;
  const int last = imin(m0 + rows, p.Lq) - 1;
  return imax(0, imin(p.Lk, last + (p.Lk - p.Lq) + 1));
}

// ldmatrix.x4 addresses of this lane for the 16x16 block of a swizzled tile at rows
// [row0, row0 + 16) (row0 a multiple of 8) and columns [16 c, 16 c + 16):
// * a pattern + ldmatrix_x4: the block as an A operand (registers a0..a3);
// * a pattern + ldmatrix_x4_trans: the block as two B operands with the tile rows as k and the
//   columns as n: registers {0, 1} are (b0, b1) of columns 16 c .. +7, {2, 3} of 16 c + 8 .. +15;
// * b pattern + ldmatrix_x4: the block as two B operands with the tile rows as n and the columns
//   as k: registers {0, 1} are (b0, b1) of rows row0 .. +7, {2, 3} of rows row0 + 8 .. +15.
// Lane l reads row r and 16-byte chunk 2c + h, stored at chunk (2c + h) ^ (r % 8) = 2c ^ (h ^ l % 8)
// (r % 8 = l % 8): the byte offset is r 2D + ((h ^ l % 8) << 4) XOR (c << 5), the XOR touching
// only bits below 2D. So each lane keeps one offset per pattern, and a block's address is
// tile + row0 2D + (offset ^ (c << 5)) (the tile's shared-memory offset a multiple of 2D bytes).
template <int D>
struct LdsmOffsets {
  uint32_t a, b;
  __device__ __forceinline__ explicit LdsmOffsets(int lane) {
    const uint32_t l7 = lane & 7, h_a = lane >> 4, h_b = (lane >> 3) & 1;
    a = (h_b * 8 + l7) * (D * 2) + ((h_a ^ l7) << 4);
    b = (h_a * 8 + l7) * (D * 2) + ((h_b ^ l7) << 4);
  }
};

template <int D>
__device__ __forceinline__ uint32_t ldsm_at(uint32_t tile, uint32_t offset, int row0, int c) {
  return tile + row0 * (D * 2) + (offset ^ (static_cast<uint32_t>(c) << 5));
}

}  // namespace attn
}  // namespace lora_kernels
