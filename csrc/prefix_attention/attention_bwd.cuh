// prefix_attention backward, FlashAttention-2 style on mma.sync, deterministic (no atomics):
//
// 1. dQ kernel: one block per (64 query rows, q head, batch row), warp w owning rows
//    16w .. +15 as in the forward. It first computes delta = rowsum(dO * O) for its rows (and
//    writes it for step 2), keeps Q and dO as A fragments in registers, and streams the K/V
//    tiles (prefix, then sequence keys) through two cp.async stages. Per 16 keys:
//    S = Q K^T, dP = dO V^T, P = exp2(S log2e scale - lse log2e), dS = P (dP - delta),
//    dQ += dS K, with dQ (16 x D per warp) in registers. dQ = scale * that.
// 2. dK/dV kernel: one block per (64 keys, kv head, z), warp w owning keys 16w .. +15, with
//    dK and dV (16 x D per warp) in registers, computed transposed: per 16 queries
//    S^T = K Q^T, dP^T = V dO^T, P^T and dS^T elementwise, dV += P^T dO, dK += dS^T Q.
//    It loops over the q heads of its kv group (GQA) and the query tiles (causal: from the
//    first query that sees the block's keys), with Q/dO/lse/delta tiles in two cp.async stages.
//    Sequence-key blocks: z = batch row. Prefix-key blocks (the same launch, x past the
//    sequence tiles): z = batch row for a per-row prefix; for a prefix shared by the batch,
//    z = a chunk of batch rows looped over inside the block (the batch reduction in a fixed
//    order), each chunk writing an fp32 partial that the host sums in a fixed order.
// P is recomputed from the saved lse; a row that saw no key (lse = -inf) has P = 0.
#pragma once

#include "attention_common.cuh"

namespace lora_kernels {
namespace attn {

template <int D>
struct DqSmem {
  static constexpr size_t q = 0;                              // BM x D
  static constexpr size_t dout = q + size_t(BM) * D * 2;      // BM x D
  static constexpr size_t k = dout + size_t(BM) * D * 2;      // 2 stages of BN x D (stage 1
  static constexpr size_t v = k + size_t(2) * BN * D * 2;     //   of K first holds O for delta)
  static constexpr size_t bytes = v + size_t(2) * BN * D * 2;
};

template <int D>
struct DkdvSmem {
  static constexpr int BMQ = DkdvStep<D>::BMQ;
  static constexpr size_t k = 0;                                  // BN x D
  static constexpr size_t v = k + size_t(BN) * D * 2;             // BN x D
  static constexpr size_t stage0 = v + size_t(BN) * D * 2;
  // A stage: Q and dO (BMQ x D each), lse and delta (BMQ floats each).
  static constexpr size_t q = 0, dout = size_t(BMQ) * D * 2, lse = 2 * dout, delta = lse + BMQ * 4;
  static constexpr size_t stage_bytes = (delta + BMQ * 4 + 127) / 128 * 128;
  static constexpr size_t bytes = stage0 + 2 * stage_bytes;
};

// lse of query row i in log2 units; +inf for a row that does not exist or saw no key, so that
// exp2(s - lse) = 0 there.
__device__ __forceinline__ float lse_log2(float lse, bool exists) {
  return exists && lse != -INFINITY ? lse * LOG2E : INFINITY;
}

template <typename T, int D>
__global__ void __launch_bounds__(THREADS, 2) attn_bwd_dq_kernel(const Params p) {
  constexpr int KC = D / 16, DT = D / 8, CH = D / 8;
  LK_DYNAMIC_SMEM(smem);
  T* sQ = reinterpret_cast<T*>(smem + DqSmem<D>::q);
  T* sdO = reinterpret_cast<T*>(smem + DqSmem<D>::dout);
  T* sK = reinterpret_cast<T*>(smem + DqSmem<D>::k);
  T* sV = reinterpret_cast<T*>(smem + DqSmem<D>::v);
  T* sO = sK + BN * D;  // stage 1 of K, free until tile 1 is loaded

  const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int hkv = h / (p.Hq / p.Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const LdsmOffsets<D> lo(lane);  // ldmatrix row offsets of this lane
  const int row_w = warp * 16;
  const int rows[2] = {m0 + row_w + g, m0 + row_w + g + 8};
  const int causal_off = p.Lk - p.Lq;
  const int nP = ceil_div(p.P, BN);
  const int ntiles = nP + ceil_div(seq_key_end(p, m0, BM), BN);
  const int64_t bh = static_cast<int64_t>(b) * p.Hq + h;

  load_tile<T, D, BM>(sQ, static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + m0 * p.q_sl,
                      p.q_sl, p.Lq - m0);
  load_tile<T, D, BM>(sdO,
                      static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + m0 * p.do_sl,
                      p.do_sl, p.Lq - m0);
  load_tile<T, D, BM>(sO, static_cast<const T*>(p.out) + b * p.o_sb + h * p.o_sh + m0 * p.o_sl,
                      p.o_sl, p.Lq - m0);
  cp_async_commit();
  if (ntiles > 0) load_kv_tile<T, D>(p, b, hkv, 0, nP, sK, sV);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();

  // delta = rowsum(dO * O): lanes 2r and 2r + 1 share row r of the warp, half a row each.
  float delta_rows[2];
  {
    const int r = lane >> 1, half = lane & 1;
    float sum = 0.f;
#pragma unroll
    for (int c = half * CH / 2; c < (half + 1) * CH / 2; ++c) {
      const T* a = sdO + swz<D>(row_w + r, c);
      const T* o = sO + swz<D>(row_w + r, c);
#pragma unroll
      for (int e = 0; e < 8; ++e) sum += to_float(a[e]) * to_float(o[e]);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    const int i = m0 + row_w + r;
    if (half == 0 && i < p.Lq) p.delta[bh * p.Lq + i] = sum;
    delta_rows[0] = __shfl_sync(0xffffffffu, sum, 2 * g);
    delta_rows[1] = __shfl_sync(0xffffffffu, sum, 2 * (g + 8));
  }
  const float* lse_g = p.lse + bh * p.Lq;
  float lse2[2];
#pragma unroll
  for (int r = 0; r < 2; ++r)
    lse2[r] = lse_log2(rows[r] < p.Lq ? lse_g[rows[r]] : 0.f, rows[r] < p.Lq);
  uint32_t qf[KC][4], df[KC][4];
#pragma unroll
  for (int kc = 0; kc < KC; ++kc) {
    ldmatrix_x4(qf[kc], ldsm_at<D>(smem_addr(sQ), lo.a, row_w, kc));
    ldmatrix_x4(df[kc], ldsm_at<D>(smem_addr(sdO), lo.a, row_w, kc));
  }
  __syncthreads();  // O (in K's stage 1) is read by every warp before tile 1 overwrites it

  float dq[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.f;

  for (int j = 0; j < ntiles; ++j) {
    const int st = j & 1;
    if (j + 1 < ntiles)
      load_kv_tile<T, D>(p, b, hkv, j + 1, nP, sK + (st ^ 1) * BN * D, sV + (st ^ 1) * BN * D);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* Ks = sK + st * BN * D;
    const T* Vs = sV + st * BN * D;
    const bool prefix_tile = j < nP;
    const int n0 = (prefix_tile ? j : j - nP) * BN;
    const bool masked = prefix_tile
        ? n0 + BN > p.P
        : (n0 + BN > p.Lk || p.kpm != nullptr || (p.causal && n0 + BN - 1 > m0 + causal_off));

#pragma unroll 1  // (unrolling it costs registers for no gain)
    for (int kk = 0; kk < BN / 16; ++kk) {  // 16 keys at a time
      float s2[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
      float dp2[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int kc = 0; kc < KC; ++kc) {
        uint32_t kb[4], vb[4];
        ldmatrix_x4(kb, ldsm_at<D>(smem_addr(Ks), lo.b, kk * 16, kc));
        ldmatrix_x4(vb, ldsm_at<D>(smem_addr(Vs), lo.b, kk * 16, kc));
        const uint32_t k0[2] = {kb[0], kb[1]}, k1[2] = {kb[2], kb[3]};
        const uint32_t v0[2] = {vb[0], vb[1]}, v1[2] = {vb[2], vb[3]};
        mma_16816<T>(s2[0], qf[kc], k0);
        mma_16816<T>(s2[1], qf[kc], k1);
        mma_16816<T>(dp2[0], df[kc], v0);
        mma_16816<T>(dp2[1], df[kc], v1);
      }
      // dS = P (dP - delta), element (row r, key 16 kk + 8 n + 2 t + c).
#pragma unroll
      for (int n = 0; n < 2; ++n) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int key = n0 + kk * 16 + n * 8 + 2 * t + c;
          bool key_ok = true;
          if (masked) key_ok = prefix_tile ? key < p.P : seq_key_valid(p, b, key);
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            bool ok = key_ok;
            if (masked && !prefix_tile && p.causal) ok = ok && key <= rows[r] + causal_off;
            const float pr = ok ? exp2f(s2[n][2 * r + c] * p.scale_log2 - lse2[r]) : 0.f;
            dp2[n][2 * r + c] = pr * (dp2[n][2 * r + c] - delta_rows[r]);
          }
        }
      }
      const uint32_t dsa[4] = {pack2<T>(dp2[0][0], dp2[0][1]), pack2<T>(dp2[0][2], dp2[0][3]),
                               pack2<T>(dp2[1][0], dp2[1][1]), pack2<T>(dp2[1][2], dp2[1][3])};
      // dQ += dS K (K rows = keys as k).
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t kb[4];
        ldmatrix_x4_trans(kb, ldsm_at<D>(smem_addr(Ks), lo.a, kk * 16, dp));
        const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
        mma_16816<T>(dq[2 * dp], dsa, b0);
        mma_16816<T>(dq[2 * dp + 1], dsa, b1);
      }
    }
    __syncthreads();
  }

  // Epilogue: dQ = scale * acc, staged in the warp's own rows of sQ, 16-byte stores.
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row_w + g + 8 * r;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
      *reinterpret_cast<uint32_t*>(sQ + swz<D>(row, dt) + 2 * t) =
          pack2<T>(dq[dt][2 * r] * p.scale, dq[dt][2 * r + 1] * p.scale);
  }
  __syncwarp();
  T* dqg = static_cast<T*>(p.dq) + bh * p.Lq * D;
#pragma unroll
  for (int e = lane; e < 16 * CH; e += 32) {
    const int r = e / CH, c = e % CH, i = m0 + row_w + r;
    if (i < p.Lq)
      *reinterpret_cast<uint4*>(dqg + static_cast<int64_t>(i) * D + c * 8) =
          *reinterpret_cast<const uint4*>(sQ + swz<D>(row_w + r, c));
  }
}

// Where a dK/dV block's work comes from: its keys, batch rows and query tiles.
struct DkdvWork {
  bool is_prefix, shared_prefix;
  int n0, nkeys, b_begin, nb, q_begin, nq, group;
};

__device__ __forceinline__ DkdvWork dkdv_work(const Params& p, int n_seq_tiles, int b_per_chunk,
                                              int bmq) {
  DkdvWork w;
  const int x = blockIdx.x, z = blockIdx.z;
  w.is_prefix = x >= n_seq_tiles;
  w.shared_prefix = w.is_prefix && p.Bp == 1;
  w.n0 = (w.is_prefix ? x - n_seq_tiles : x) * BN;
  w.nkeys = w.is_prefix ? p.P : p.Lk;
  w.b_begin = w.shared_prefix ? z * b_per_chunk : z;
  w.nb = w.shared_prefix ? imax(0, imin(p.B, w.b_begin + b_per_chunk) - w.b_begin) : 1;
  // Causal: sequence key n is seen by queries i >= n - (Lk - Lq); earlier query tiles skipped.
  w.q_begin = (!w.is_prefix && p.causal) ? imax(0, w.n0 - (p.Lk - p.Lq)) / bmq * bmq : 0;
  w.nq = w.q_begin < p.Lq ? ceil_div(p.Lq - w.q_begin, bmq) : 0;
  w.group = p.Hq / p.Hkv;
  return w;
}

// Copy the Q/dO/lse/delta tiles of step `it` (batch row, q head, query tile) into a stage.
template <typename T, int D>
__device__ __forceinline__ void load_dkdv_stage(const Params& p, const DkdvWork& w, int hkv,
                                                int it, unsigned char* stage) {
  using L = DkdvSmem<D>;
  constexpr int BMQ = L::BMQ;
  const int qi = it % w.nq, hh = (it / w.nq) % w.group, bb = it / (w.nq * w.group);
  const int b = w.b_begin + bb, h = hkv * w.group + hh, mq0 = w.q_begin + qi * BMQ;
  load_tile<T, D, BMQ>(reinterpret_cast<T*>(stage + L::q),
                       static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + mq0 * p.q_sl, p.q_sl,
                       p.Lq - mq0);
  load_tile<T, D, BMQ>(reinterpret_cast<T*>(stage + L::dout),
                       static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + mq0 * p.do_sl,
                       p.do_sl, p.Lq - mq0);
  const int64_t row0 = (static_cast<int64_t>(b) * p.Hq + h) * p.Lq;
  const int tid = threadIdx.x;
  if (tid < 2 * BMQ) {
    const bool is_lse = tid < BMQ;
    const int r = is_lse ? tid : tid - BMQ;
    const float* src = (is_lse ? p.lse : p.delta) + row0;
    float* dst = reinterpret_cast<float*>(stage + (is_lse ? L::lse : L::delta)) + r;
    const bool ok = mq0 + r < p.Lq;
    cp_async_4(dst, ok ? src + mq0 + r : src, ok ? 4 : 0);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(THREADS, 2) attn_bwd_dkdv_kernel(const Params p, int n_seq_tiles,
                                                                   int b_per_chunk, float* ws_k,
                                                                   float* ws_v) {
  using L = DkdvSmem<D>;
  constexpr int BMQ = L::BMQ, KC = D / 16, DT = D / 8, CH = D / 8;
  LK_DYNAMIC_SMEM(smem);
  T* sK = reinterpret_cast<T*>(smem + L::k);
  T* sV = reinterpret_cast<T*>(smem + L::v);
  const int hkv = blockIdx.y, z = blockIdx.z;
  const DkdvWork w = dkdv_work(p, n_seq_tiles, b_per_chunk, BMQ);
  if (w.shared_prefix && w.nb == 0) return;  // a batch chunk past the end (uniform per block)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const LdsmOffsets<D> lo(lane);  // ldmatrix row offsets of this lane
  const int causal_off = p.Lk - p.Lq;
  const int n_iter = w.nb * w.group * w.nq;

  // K/V of the block's keys (z is the batch row of sequence keys and of a per-row prefix; a
  // shared prefix has batch stride 0).
  if (w.is_prefix) {
    load_tile<T, D, BN>(sK, static_cast<const T*>(p.pk) + z * p.pk_sb + hkv * p.pk_sh + w.n0 * p.pk_sl,
                        p.pk_sl, w.nkeys - w.n0);
    load_tile<T, D, BN>(sV, static_cast<const T*>(p.pv) + z * p.pv_sb + hkv * p.pv_sh + w.n0 * p.pv_sl,
                        p.pv_sl, w.nkeys - w.n0);
  } else {
    load_tile<T, D, BN>(sK, static_cast<const T*>(p.k) + z * p.k_sb + hkv * p.k_sh + w.n0 * p.k_sl,
                        p.k_sl, w.nkeys - w.n0);
    load_tile<T, D, BN>(sV, static_cast<const T*>(p.v) + z * p.v_sb + hkv * p.v_sh + w.n0 * p.v_sl,
                        p.v_sl, w.nkeys - w.n0);
  }
  if (n_iter > 0) load_dkdv_stage<T, D>(p, w, hkv, 0, smem + L::stage0);
  cp_async_commit();

  // This thread's two keys (rows g and g + 8 of the warp's 16) and whether they exist.
  int keys[2];
  bool key_ok[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    keys[r] = w.n0 + warp * 16 + g + 8 * r;
    key_ok[r] = w.is_prefix ? keys[r] < p.P : seq_key_valid(p, z, keys[r]);
  }

  float dk[DT][4], dv[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt) {
    dk[dt][0] = dk[dt][1] = dk[dt][2] = dk[dt][3] = 0.f;
    dv[dt][0] = dv[dt][1] = dv[dt][2] = dv[dt][3] = 0.f;
  }

  for (int it = 0; it < n_iter; ++it) {
    const int st = it & 1;
    if (it + 1 < n_iter)
      load_dkdv_stage<T, D>(p, w, hkv, it + 1, smem + L::stage0 + (st ^ 1) * L::stage_bytes);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const unsigned char* stage = smem + L::stage0 + st * L::stage_bytes;
    const T* Qs = reinterpret_cast<const T*>(stage + L::q);
    const T* dOs = reinterpret_cast<const T*>(stage + L::dout);
    const float* lse_s = reinterpret_cast<const float*>(stage + L::lse);
    const float* delta_s = reinterpret_cast<const float*>(stage + L::delta);
    const int mq0 = w.q_begin + (it % w.nq) * BMQ;

#pragma unroll 1  // (unrolled, the loop's address arithmetic costs registers: spills)
    for (int kk = 0; kk < BMQ / 16; ++kk) {  // 16 queries at a time
      float s2[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};   // S^T (keys x queries)
      float dp2[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};  // dP^T
#pragma unroll
      for (int kc = 0; kc < KC; ++kc) {
        uint32_t ka[4], va[4], qb[4], ob[4];
        ldmatrix_x4(ka, ldsm_at<D>(smem_addr(sK), lo.a, warp * 16, kc));
        ldmatrix_x4(va, ldsm_at<D>(smem_addr(sV), lo.a, warp * 16, kc));
        ldmatrix_x4(qb, ldsm_at<D>(smem_addr(Qs), lo.b, kk * 16, kc));
        ldmatrix_x4(ob, ldsm_at<D>(smem_addr(dOs), lo.b, kk * 16, kc));
        const uint32_t q0[2] = {qb[0], qb[1]}, q1[2] = {qb[2], qb[3]};
        const uint32_t o0[2] = {ob[0], ob[1]}, o1[2] = {ob[2], ob[3]};
        mma_16816<T>(s2[0], ka, q0);
        mma_16816<T>(s2[1], ka, q1);
        mma_16816<T>(dp2[0], va, o0);
        mma_16816<T>(dp2[1], va, o1);
      }
      // P^T and dS^T, element (key row r, query 16 kk + 8 n + 2 t + c).
#pragma unroll
      for (int n = 0; n < 2; ++n) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int qc = kk * 16 + n * 8 + 2 * t + c, i = mq0 + qc;
          const float l2 = lse_log2(lse_s[qc], i < p.Lq);
          const float dlt = delta_s[qc];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            bool ok = key_ok[r];
            if (!w.is_prefix && p.causal) ok = ok && keys[r] <= i + causal_off;
            const float pr = ok ? exp2f(s2[n][2 * r + c] * p.scale_log2 - l2) : 0.f;
            s2[n][2 * r + c] = pr;
            dp2[n][2 * r + c] = pr * (dp2[n][2 * r + c] - dlt);
          }
        }
      }
      const uint32_t pa[4] = {pack2<T>(s2[0][0], s2[0][1]), pack2<T>(s2[0][2], s2[0][3]),
                              pack2<T>(s2[1][0], s2[1][1]), pack2<T>(s2[1][2], s2[1][3])};
      const uint32_t dsa[4] = {pack2<T>(dp2[0][0], dp2[0][1]), pack2<T>(dp2[0][2], dp2[0][3]),
                               pack2<T>(dp2[1][0], dp2[1][1]), pack2<T>(dp2[1][2], dp2[1][3])};
      // dV += P^T dO and dK += dS^T Q (query rows as k).
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t ob[4], qb[4];
        ldmatrix_x4_trans(ob, ldsm_at<D>(smem_addr(dOs), lo.a, kk * 16, dp));
        ldmatrix_x4_trans(qb, ldsm_at<D>(smem_addr(Qs), lo.a, kk * 16, dp));
        const uint32_t o0[2] = {ob[0], ob[1]}, o1[2] = {ob[2], ob[3]};
        const uint32_t q0[2] = {qb[0], qb[1]}, q1[2] = {qb[2], qb[3]};
        mma_16816<T>(dv[2 * dp], pa, o0);
        mma_16816<T>(dv[2 * dp + 1], pa, o1);
        mma_16816<T>(dk[2 * dp], dsa, q0);
        mma_16816<T>(dk[2 * dp + 1], dsa, q1);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();

  // Epilogue. dK = scale * acc. Output rows: ((z, hkv, key)) of a contiguous (Z, Hkv, nkeys, D).
  const int64_t out_row0 = (static_cast<int64_t>(z) * p.Hkv + hkv) * w.nkeys;
  if (w.shared_prefix && ws_k != nullptr) {  // fp32 partial of this batch chunk
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (keys[r] >= w.nkeys) continue;
      float* kp = ws_k + (out_row0 + keys[r]) * D;
      float* vp = ws_v + (out_row0 + keys[r]) * D;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        *reinterpret_cast<float2*>(kp + dt * 8 + 2 * t) =
            make_float2(dk[dt][2 * r] * p.scale, dk[dt][2 * r + 1] * p.scale);
        *reinterpret_cast<float2*>(vp + dt * 8 + 2 * t) = make_float2(dv[dt][2 * r], dv[dt][2 * r + 1]);
      }
    }
    return;
  }
  // Stage the warp's own 16 rows in sK / sV, then 16-byte stores.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp * 16 + g + 8 * r;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      *reinterpret_cast<uint32_t*>(sK + swz<D>(row, dt) + 2 * t) =
          pack2<T>(dk[dt][2 * r] * p.scale, dk[dt][2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(sV + swz<D>(row, dt) + 2 * t) =
          pack2<T>(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
  }
  __syncwarp();
  T* dkg = static_cast<T*>(w.is_prefix ? p.dpk : p.dk) + out_row0 * D;
  T* dvg = static_cast<T*>(w.is_prefix ? p.dpv : p.dv) + out_row0 * D;
#pragma unroll
  for (int e = lane; e < 16 * CH; e += 32) {
    const int r = e / CH, c = e % CH, key = w.n0 + warp * 16 + r;
    if (key < w.nkeys) {
      *reinterpret_cast<uint4*>(dkg + static_cast<int64_t>(key) * D + c * 8) =
          *reinterpret_cast<const uint4*>(sK + swz<D>(warp * 16 + r, c));
      *reinterpret_cast<uint4*>(dvg + static_cast<int64_t>(key) * D + c * 8) =
          *reinterpret_cast<const uint4*>(sV + swz<D>(warp * 16 + r, c));
    }
  }
}

// Batch chunks for the gradient of a prefix shared by the batch: enough blocks for about two
// per SM in all (each chunk writes an fp32 partial). 1 = no partials.
inline int prefix_batch_chunks(const Params& p, int sms) {
  if (p.Bp != 1 || p.B <= 1 || p.P == 0) return 1;
  const int blocks = ceil_div(p.P, BN) * p.Hkv;
  int chunks = imax(1, imin(p.B, ceil_div(2 * sms, blocks)));
  return ceil_div(p.B, ceil_div(p.B, chunks));  // no empty chunk
}

// Launch on raw parameters. p.delta must hold B * Hq * Lq floats; ws_k / ws_v hold
// chunks * Hkv * P * D floats each when chunks > 1 (else null).
template <typename T, int D>
void launch_bwd(const Params& p, cudaStream_t stream, int chunks, float* ws_k, float* ws_v) {
  if (p.B == 0 || p.Hq == 0) return;
  if (p.Lq > 0) {
    const dim3 grid(ceil_div(p.Lq, BM), p.Hq, p.B);
    launch(attn_bwd_dq_kernel<T, D>, grid, dim3(THREADS), DqSmem<D>::bytes, stream, p);
  }
  const int n_seq = ceil_div(p.Lk, BN), n_prefix = ceil_div(p.P, BN);
  if (n_seq + n_prefix > 0) {
    const int b_per_chunk = ceil_div(p.B, chunks);
    const dim3 grid(n_seq + n_prefix, p.Hkv, p.B);
    launch(attn_bwd_dkdv_kernel<T, D>, grid, dim3(THREADS), DkdvSmem<D>::bytes, stream, p, n_seq,
           b_per_chunk, chunks > 1 ? ws_k : nullptr, chunks > 1 ? ws_v : nullptr);
  }
}

}  // namespace attn
}  // namespace lora_kernels
