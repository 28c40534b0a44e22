// prefix_attention forward, FlashAttention-2 style on mma.sync (bf16/fp16 in, fp32 accumulate).
//
// One block per (64 query rows, q head, batch row); warp w owns rows 16w .. 16w + 15. Q stays
// in registers (A fragments), K/V tiles of 64 keys stream through shared memory in two stages
// (cp.async: tile j + 1 is in flight while tile j is multiplied); the scores S = Q K^T, the
// online softmax (running max and sum per row, in log2 units) and the output accumulator
// O (16 x D per warp) live in registers; P is fed to P V straight from the score registers.
// The tiles are the prefix's (its own buffer, shared by the batch or per row, always visible),
// then the sequence keys up to the last one the block's rows can see (bottom-right causal,
// key padding). GQA: q head h reads kv head h / (Hq / Hkv), no copies.
// Writes out (B, Hq, Lq, D) and lse (B, Hq, Lq) fp32 (natural log); a row that sees no key gets
// out = 0 and lse = -inf.
#pragma once

#include "attention_common.cuh"

namespace lora_kernels {
namespace attn {

template <int D>
struct FwdSmem {
  static constexpr size_t q = 0;                            // BM x D
  static constexpr size_t k = q + size_t(BM) * D * 2;       // 2 stages of BN x D
  static constexpr size_t v = k + size_t(2) * BN * D * 2;   // 2 stages of BN x D
  static constexpr size_t bytes = v + size_t(2) * BN * D * 2;
};

template <typename T, int D>
__global__ void __launch_bounds__(THREADS, 2) attn_fwd_kernel(const Params p) {
  constexpr int KC = D / 16;  // 16-wide chunks of the head dim (k of Q K^T)
  constexpr int NT = BN / 8;  // 8-key column tiles of S
  constexpr int DT = D / 8;   // 8-wide column tiles of O
  LK_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem + FwdSmem<D>::q);
  T* sK = reinterpret_cast<T*>(smem + FwdSmem<D>::k);
  T* sV = reinterpret_cast<T*>(smem + FwdSmem<D>::v);

  const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int hkv = h / (p.Hq / p.Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const LdsmOffsets<D> lo(lane);  // ldmatrix row offsets of this lane
  const int row_w = warp * 16;               // the warp's first row in the block
  const int rows[2] = {m0 + row_w + g, m0 + row_w + g + 8};  // this thread's query rows
  const int causal_off = p.Lk - p.Lq;
  const int nP = ceil_div(p.P, BN);
  const int ntiles = nP + ceil_div(seq_key_end(p, m0, BM), BN);

  load_tile<T, D, BM>(sQ, static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + m0 * p.q_sl,
                      p.q_sl, p.Lq - m0);
  if (ntiles > 0) load_kv_tile<T, D>(p, b, hkv, 0, nP, sK, sV);
  cp_async_commit();

  float o[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};  // running row max (log2 units), equal over the quad
  float l_run[2] = {0.f, 0.f};              // this thread's part of the running row sum
  uint32_t qf[KC][4];

  for (int j = 0; j < ntiles; ++j) {
    const int st = j & 1;
    if (j + 1 < ntiles)
      load_kv_tile<T, D>(p, b, hkv, j + 1, nP, sK + (st ^ 1) * BN * D, sV + (st ^ 1) * BN * D);
    cp_async_commit();
    cp_async_wait<1>();  // tile j (and Q) have landed for this thread ...
    __syncthreads();     // ... and for every thread
    const T* Ks = sK + st * BN * D;
    const T* Vs = sV + st * BN * D;
    if (j == 0) {
#pragma unroll
      for (int kc = 0; kc < KC; ++kc) ldmatrix_x4(qf[kc], ldsm_at<D>(smem_addr(sQ), lo.a, row_w, kc));
    }

    // S = Q K^T for the warp's 16 rows and the tile's 64 keys.
    float s[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t kb[4];
        ldmatrix_x4(kb, ldsm_at<D>(smem_addr(Ks), lo.b, np * 16, kc));
        const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
        mma_16816<T>(s[2 * np], qf[kc], b0);
        mma_16816<T>(s[2 * np + 1], qf[kc], b1);
      }
    }

    // Scale to log2 units; hide the keys a row cannot see (only in tiles that have any).
    const bool prefix_tile = j < nP;
    const int n0 = (prefix_tile ? j : j - nP) * BN;
    const bool masked = prefix_tile
        ? n0 + BN > p.P
        : (n0 + BN > p.Lk || p.kpm != nullptr || (p.causal && n0 + BN - 1 > m0 + causal_off));
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int key = n0 + nt * 8 + 2 * t + c;
        bool key_ok = true;
        if (masked) key_ok = prefix_tile ? key < p.P : seq_key_valid(p, b, key);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          bool ok = key_ok;
          if (masked && !prefix_tile && p.causal) ok = ok && key <= rows[r] + causal_off;
          const float v = s[nt][2 * r + c] * p.scale_log2;
          s[nt][2 * r + c] = ok ? v : -INFINITY;
        }
      }
    }

    // Online softmax: new row max over the quad, rescale O and the sum, P = exp2(S - max).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[r], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no key seen yet: P = 0, not NaN
      const float alpha = exp2f(m_run[r] - m_use);
      m_run[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float pr = exp2f(s[nt][2 * r + c] - m_use);
          s[nt][2 * r + c] = pr;
          sum += pr;
        }
      }
      l_run[r] = l_run[r] * alpha + sum;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        o[dt][2 * r] *= alpha;
        o[dt][2 * r + 1] *= alpha;
      }
    }

    // O += P V: the score registers of keys 16 kk .. +15 are the A fragment of that k-chunk.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]),
                              pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, ldsm_at<D>(smem_addr(Vs), lo.a, kk * 16, dp));
        const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
        mma_16816<T>(o[2 * dp], pa, b0);
        mma_16816<T>(o[2 * dp + 1], pa, b1);
      }
    }
    __syncthreads();  // stage st is refilled (tile j + 2) in the next iteration
  }

  // Epilogue: normalise, stage the warp's rows in sQ (its own rows only), store 16-byte chunks.
  cp_async_wait<0>();  // with no key tile, the Q copy may still be in flight
  __syncthreads();
  float* lse = p.lse + (static_cast<int64_t>(b) * p.Hq + h) * p.Lq;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int row = row_w + g + 8 * r;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
      *reinterpret_cast<uint32_t*>(sQ + swz<D>(row, dt) + 2 * t) =
          pack2<T>(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    if (t == 0 && rows[r] < p.Lq) lse[rows[r]] = l > 0.f ? (m_run[r] + log2f(l)) * LN2 : -INFINITY;
  }
  __syncwarp();
  T* og = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh;
  constexpr int CH = D / 8;
#pragma unroll
  for (int e = lane; e < 16 * CH; e += 32) {
    const int r = e / CH, c = e % CH, i = m0 + row_w + r;
    if (i < p.Lq)
      *reinterpret_cast<uint4*>(og + i * p.o_sl + c * 8) =
          *reinterpret_cast<const uint4*>(sQ + swz<D>(row_w + r, c));
  }
}

// Launch on raw parameters (the ATen entry point fills them).
template <typename T, int D>
void launch_fwd(const Params& p, cudaStream_t stream) {
  if (p.Lq == 0 || p.Hq == 0 || p.B == 0) return;
  const dim3 grid(ceil_div(p.Lq, BM), p.Hq, p.B);
  launch(attn_fwd_kernel<T, D>, grid, dim3(THREADS), FwdSmem<D>::bytes, stream, p);
}

}  // namespace attn
}  // namespace lora_kernels
