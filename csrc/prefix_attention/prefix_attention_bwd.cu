// prefix_attention backward, after FlashAttention-2, deterministic (no atomics):
//
// 1. delta = rowsum(dO * O) per query row.
// 2. dK/dV: one block per (64-key tile, kv head, batch row) of the sequence keys, and one per
//    (64-key tile, kv head, prefix row) of the prefix keys. Each loops over the q heads of its
//    group (GQA reduced in shared memory) and over query tiles of 32 rows; a prefix shared by
//    the batch (Bp = 1) loops over batch rows too: the batch-reduced prefix gradient, with no
//    atomics. To keep the GPU busy, the batch may be cut into chunks (grid z), each writing an
//    fp32 partial to a workspace that is then summed in a fixed order (deterministic).
// 3. dQ: one block per (64 query rows, q head, batch row) looping over prefix and sequence tiles.
//
// P is recomputed from the saved lse: p = exp2(s * scale * log2e - lse * log2e); dS = P (dP - delta).

#include "attention_host.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>

#include <tuple>

namespace lora_kernels {
namespace attn {
namespace {

using namespace nvcuda;

// delta[row] = sum_d dout[row, d] * out[row, d], one warp per (b, h, i) row.
template <typename T>
__global__ void __launch_bounds__(THREADS) attn_bwd_delta_kernel(const Params p, int D) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (THREADS / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Lq;
  if (row >= rows) return;  // whole warp leaves together
  const int i = static_cast<int>(row % p.Lq);
  const int h = static_cast<int>((row / p.Lq) % p.Hq);
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.Lq) * p.Hq));
  const T* o = static_cast<const T*>(p.out) + b * p.o_sb + h * p.o_sh + i * p.o_sl;
  const T* g = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + i * p.do_sl;
  float sum = 0.f;
  for (int d = lane; d < D; d += 32) sum += to_float(o[d]) * to_float(g[d]);
  sum = warp_sum(sum);
  if (lane == 0) p.delta[row] = sum;
}

// dK/dV of one 64-key tile of the sequence keys (is_prefix = false) or of the prefix keys.
// b_per_chunk: batch rows per block (grid z) for a shared prefix; ws_k/ws_v: fp32 workspaces
// (chunks, Hkv, P, D) for the per-chunk partials, or null to write dK/dV directly.
template <typename T, int D>
__global__ void __launch_bounds__(THREADS) attn_bwd_dkdv_kernel(const Params p, bool is_prefix,
                                                                int b_per_chunk, float* ws_k,
                                                                float* ws_v) {
  using L = Ld<D>;
  using S = DkdvSmem<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Ks = reinterpret_cast<T*>(smem + S::k);
  T* Vs = reinterpret_cast<T*>(smem + S::v);
  float* dKs = reinterpret_cast<float*>(smem + S::dk);
  float* dVs = reinterpret_cast<float*>(smem + S::dv);
  T* Qs = reinterpret_cast<T*>(smem + S::q);
  T* dOs = reinterpret_cast<T*>(smem + S::dout);
  float* Ss = reinterpret_cast<float*>(smem + S::s);
  float* dPs = reinterpret_cast<float*>(smem + S::dp);
  T* Ps = reinterpret_cast<T*>(smem + S::p);
  T* dSs = reinterpret_cast<T*>(smem + S::ds);
  float* lse_s = reinterpret_cast<float*>(smem + S::lse);
  float* delta_s = reinterpret_cast<float*>(smem + S::delta);
  int* kval = reinterpret_cast<int*>(smem + S::kval);

  const int n0 = blockIdx.x * BN, hkv = blockIdx.y, bk = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int nkeys = is_prefix ? p.P : p.Lk;
  const int nvalid = nkeys - n0;

  const T* kg = is_prefix
      ? static_cast<const T*>(p.pk) + bk * p.pk_sb + hkv * p.pk_sh + n0 * p.pk_sl
      : static_cast<const T*>(p.k) + bk * p.k_sb + hkv * p.k_sh + n0 * p.k_sl;
  const T* vg = is_prefix
      ? static_cast<const T*>(p.pv) + bk * p.pv_sb + hkv * p.pv_sh + n0 * p.pv_sl
      : static_cast<const T*>(p.v) + bk * p.v_sb + hkv * p.v_sh + n0 * p.v_sl;
  load_rows<T, D, BN>(Ks, L::H, kg, is_prefix ? p.pk_sl : p.k_sl, nvalid, p.vec);
  load_rows<T, D, BN>(Vs, L::H, vg, is_prefix ? p.pv_sl : p.v_sl, nvalid, p.vec);
  load_key_valid(kval, p, bk, n0, nvalid, is_prefix);
  for (int e = threadIdx.x; e < BN * L::A; e += THREADS) { dKs[e] = 0.f; dVs[e] = 0.f; }

  // Batch rows whose queries see these keys: the prefix of a shared (Bp = 1) buffer is seen by
  // every batch row; anything else by its own row only.
  const bool shared_prefix = is_prefix && p.Bp == 1;  // then bk is the batch chunk
  const int b_begin = shared_prefix ? bk * b_per_chunk : bk;
  const int b_end = shared_prefix ? min(p.B, b_begin + b_per_chunk) : bk + 1;
  // Causal: query i sees sequence key j iff i >= j - (Lk - Lq); earlier query tiles are skipped.
  int q_begin = 0;
  if (!is_prefix && p.causal) q_begin = max(0, n0 - (p.Lk - p.Lq)) / BMQ * BMQ;
  const int group = p.Hq / p.Hkv;

  for (int b = b_begin; b < b_end; ++b) {
    for (int h = hkv * group; h < (hkv + 1) * group; ++h) {
      const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
      const T* dog = static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh;
      const float* lse_g = p.lse + (static_cast<int64_t>(b) * p.Hq + h) * p.Lq;
      const float* delta_g = p.delta + (static_cast<int64_t>(b) * p.Hq + h) * p.Lq;
      for (int mq0 = q_begin; mq0 < p.Lq; mq0 += BMQ) {
        __syncthreads();  // previous step's Q/dO/P/dS tiles are no longer read
        load_rows<T, D, BMQ>(Qs, L::H, qg + mq0 * p.q_sl, p.q_sl, p.Lq - mq0, p.vec);
        load_rows<T, D, BMQ>(dOs, L::H, dog + mq0 * p.do_sl, p.do_sl, p.Lq - mq0, p.vec);
        for (int r = threadIdx.x; r < BMQ; r += THREADS) {
          const int i = mq0 + r;
          const float l = i < p.Lq ? lse_g[i] : -INFINITY;
          // A row that saw no key (lse = -inf) has P = 0: +inf makes exp2(s - lse) = 0.
          lse_s[r] = l == -INFINITY ? INFINITY : l * LOG2E;
          delta_s[r] = i < p.Lq ? delta_g[i] : 0.f;
        }
        __syncthreads();

        // S = Q K^T and dP = dO V^T (32 x 64 each): warp w computes tiles w and w + 4.
        for (int t = warp; t < (BMQ / 16) * (BN / 16); t += THREADS / 32) {
          const int tm = t / (BN / 16), tn = t % (BN / 16);
          wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_s, acc_dp;
          wmma::fill_fragment(acc_s, 0.f);
          wmma::fill_fragment(acc_dp, 0.f);
#pragma unroll
          for (int kk = 0; kk < D; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
            wmma::load_matrix_sync(a, Qs + tm * 16 * L::H + kk, L::H);
            wmma::load_matrix_sync(bf, Ks + tn * 16 * L::H + kk, L::H);
            wmma::mma_sync(acc_s, a, bf, acc_s);
            wmma::load_matrix_sync(a, dOs + tm * 16 * L::H + kk, L::H);
            wmma::load_matrix_sync(bf, Vs + tn * 16 * L::H + kk, L::H);
            wmma::mma_sync(acc_dp, a, bf, acc_dp);
          }
          wmma::store_matrix_sync(Ss + tm * 16 * L::S + tn * 16, acc_s, L::S, wmma::mem_row_major);
          wmma::store_matrix_sync(dPs + tm * 16 * L::S + tn * 16, acc_dp, L::S, wmma::mem_row_major);
        }
        __syncthreads();

        // P and dS, elementwise.
        for (int e = threadIdx.x; e < BMQ * BN; e += THREADS) {
          const int r = e / BN, c = e % BN, i = mq0 + r;
          bool ok = kval[c] != 0;
          if (!is_prefix && p.causal) ok = ok && causal_visible(p, i, n0 + c);
          const float pr = ok ? exp2f(Ss[r * L::S + c] * p.scale_log2 - lse_s[r]) : 0.f;
          const float ds = pr * (dPs[r * L::S + c] - delta_s[r]);
          Ps[r * L::P + c] = from_float<T>(pr);
          dSs[r * L::P + c] = from_float<T>(ds);
        }
        __syncthreads();

        // dV (64 x D) += P^T dO and dK += dS^T Q: warp w owns key rows 16w .. 16w + 15.
#pragma unroll
        for (int nt = 0; nt < D / 16; ++nt) {
          wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_v, acc_k;
          wmma::load_matrix_sync(acc_v, dVs + warp * 16 * L::A + nt * 16, L::A, wmma::mem_row_major);
          wmma::load_matrix_sync(acc_k, dKs + warp * 16 * L::A + nt * 16, L::A, wmma::mem_row_major);
#pragma unroll
          for (int kk = 0; kk < BMQ; kk += 16) {
            // (key, query) element of P^T sits at Ps[query][key]: column-major with ld L::P.
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
            wmma::load_matrix_sync(a, Ps + kk * L::P + warp * 16, L::P);
            wmma::load_matrix_sync(bf, dOs + kk * L::H + nt * 16, L::H);
            wmma::mma_sync(acc_v, a, bf, acc_v);
            wmma::load_matrix_sync(a, dSs + kk * L::P + warp * 16, L::P);
            wmma::load_matrix_sync(bf, Qs + kk * L::H + nt * 16, L::H);
            wmma::mma_sync(acc_k, a, bf, acc_k);
          }
          wmma::store_matrix_sync(dVs + warp * 16 * L::A + nt * 16, acc_v, L::A, wmma::mem_row_major);
          wmma::store_matrix_sync(dKs + warp * 16 * L::A + nt * 16, acc_k, L::A, wmma::mem_row_major);
        }
      }
    }
  }
  __syncthreads();

  // Store dK = scale * dS^T Q and dV for the keys that exist.
  if (ws_k != nullptr) {
    const int64_t ws_row0 = (static_cast<int64_t>(bk) * p.Hkv + hkv) * nkeys + n0;
    for (int e = threadIdx.x; e < BN * D; e += THREADS) {
      const int r = e / D, d = e % D;
      if (r < nvalid) {
        ws_k[(ws_row0 + r) * D + d] = dKs[r * L::A + d] * p.scale;
        ws_v[(ws_row0 + r) * D + d] = dVs[r * L::A + d];
      }
    }
    return;
  }
  const int64_t out_row0 =
      ((static_cast<int64_t>(bk) * p.Hkv + hkv) * nkeys + n0);  // contiguous (Bx, Hkv, L, D)
  T* dkg = static_cast<T*>(is_prefix ? p.dpk : p.dk) + out_row0 * D;
  T* dvg = static_cast<T*>(is_prefix ? p.dpv : p.dv) + out_row0 * D;
  for (int e = threadIdx.x; e < BN * D; e += THREADS) {
    const int r = e / D, d = e % D;
    if (r < nvalid) {
      dkg[static_cast<int64_t>(r) * D + d] = from_float<T>(dKs[r * L::A + d] * p.scale);
      dvg[static_cast<int64_t>(r) * D + d] = from_float<T>(dVs[r * L::A + d]);
    }
  }
}

// dQ of 64 query rows of one (batch row, q head).
template <typename T, int D>
__global__ void __launch_bounds__(THREADS) attn_bwd_dq_kernel(const Params p) {
  using L = Ld<D>;
  using S = DqSmem<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + S::q);
  T* dOs = reinterpret_cast<T*>(smem + S::dout);
  float* dQs = reinterpret_cast<float*>(smem + S::dq);
  T* Ks = reinterpret_cast<T*>(smem + S::k);
  T* Vs = reinterpret_cast<T*>(smem + S::v);
  float* Ss = reinterpret_cast<float*>(smem + S::s);
  float* dPs = reinterpret_cast<float*>(smem + S::dp);
  T* dSs = reinterpret_cast<T*>(smem + S::ds);
  float* lse_s = reinterpret_cast<float*>(smem + S::lse);
  float* delta_s = reinterpret_cast<float*>(smem + S::delta);
  int* kval = reinterpret_cast<int*>(smem + S::kval);

  const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int hkv = h / (p.Hq / p.Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = warp * 16;

  load_rows<T, D, BM>(Qs, L::H, static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + m0 * p.q_sl,
                      p.q_sl, p.Lq - m0, p.vec);
  load_rows<T, D, BM>(dOs, L::H,
                      static_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + m0 * p.do_sl,
                      p.do_sl, p.Lq - m0, p.vec);
  const float* lse_g = p.lse + (static_cast<int64_t>(b) * p.Hq + h) * p.Lq;
  const float* delta_g = p.delta + (static_cast<int64_t>(b) * p.Hq + h) * p.Lq;
  for (int r = threadIdx.x; r < BM; r += THREADS) {
    const int i = m0 + r;
    const float l = i < p.Lq ? lse_g[i] : -INFINITY;
    lse_s[r] = l == -INFINITY ? INFINITY : l * LOG2E;
    delta_s[r] = i < p.Lq ? delta_g[i] : 0.f;
  }
  for (int e = threadIdx.x; e < BM * L::A; e += THREADS) dQs[e] = 0.f;

  auto tile = [&](const T* kg, int64_t k_sl, const T* vg, int64_t v_sl, int n0, int nvalid,
                  bool is_prefix) {
    __syncthreads();  // Q/dO/lse/delta are staged; every warp is done with the previous tile
    load_rows<T, D, BN>(Ks, L::H, kg, k_sl, nvalid, p.vec);
    load_rows<T, D, BN>(Vs, L::H, vg, v_sl, nvalid, p.vec);
    load_key_valid(kval, p, b, n0, nvalid, is_prefix);
    __syncthreads();

    // S = Q K^T and dP = dO V^T for this warp's 16 rows.
#pragma unroll
    for (int nt = 0; nt < BN / 16; ++nt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc_s, acc_dp;
      wmma::fill_fragment(acc_s, 0.f);
      wmma::fill_fragment(acc_dp, 0.f);
#pragma unroll
      for (int kk = 0; kk < D; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
        wmma::load_matrix_sync(a, Qs + row0 * L::H + kk, L::H);
        wmma::load_matrix_sync(bf, Ks + nt * 16 * L::H + kk, L::H);
        wmma::mma_sync(acc_s, a, bf, acc_s);
        wmma::load_matrix_sync(a, dOs + row0 * L::H + kk, L::H);
        wmma::load_matrix_sync(bf, Vs + nt * 16 * L::H + kk, L::H);
        wmma::mma_sync(acc_dp, a, bf, acc_dp);
      }
      wmma::store_matrix_sync(Ss + row0 * L::S + nt * 16, acc_s, L::S, wmma::mem_row_major);
      wmma::store_matrix_sync(dPs + row0 * L::S + nt * 16, acc_dp, L::S, wmma::mem_row_major);
    }
    __syncwarp();

    // dS = P (dP - delta) for this warp's rows.
#pragma unroll 4
    for (int r = 0; r < 16; ++r) {
      const int row = row0 + r, i = m0 + row;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int c = lane + 32 * half;
        bool ok = kval[c] != 0;
        if (!is_prefix && p.causal) ok = ok && causal_visible(p, i, n0 + c);
        const float pr = ok ? exp2f(Ss[row * L::S + c] * p.scale_log2 - lse_s[row]) : 0.f;
        dSs[row * L::P + c] = from_float<T>(pr * (dPs[row * L::S + c] - delta_s[row]));
      }
    }
    __syncwarp();

    // dQ (16 x D) += dS (16 x 64) K (64 x D).
#pragma unroll
    for (int nt = 0; nt < D / 16; ++nt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, dQs + row0 * L::A + nt * 16, L::A, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < BN; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
        wmma::load_matrix_sync(a, dSs + row0 * L::P + kk, L::P);
        wmma::load_matrix_sync(bf, Ks + kk * L::H + nt * 16, L::H);
        wmma::mma_sync(acc, a, bf, acc);
      }
      wmma::store_matrix_sync(dQs + row0 * L::A + nt * 16, acc, L::A, wmma::mem_row_major);
    }
    __syncwarp();
  };

  if (p.P > 0) {
    const T* pkg = static_cast<const T*>(p.pk) + b * p.pk_sb + hkv * p.pk_sh;
    const T* pvg = static_cast<const T*>(p.pv) + b * p.pv_sb + hkv * p.pv_sh;
    for (int n0 = 0; n0 < p.P; n0 += BN)
      tile(pkg + n0 * p.pk_sl, p.pk_sl, pvg + n0 * p.pv_sl, p.pv_sl, n0, p.P - n0, true);
  }
  const int n_end = seq_key_end(p, m0, BM);
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + hkv * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + hkv * p.v_sh;
  for (int n0 = 0; n0 < n_end; n0 += BN)
    tile(kg + n0 * p.k_sl, p.k_sl, vg + n0 * p.v_sl, p.v_sl, n0, p.Lk - n0, false);

  __syncthreads();
  T* dqg = static_cast<T*>(p.dq) + ((static_cast<int64_t>(b) * p.Hq + h) * p.Lq + m0) * D;
  for (int e = threadIdx.x; e < BM * D; e += THREADS) {
    const int r = e / D, d = e % D;
    if (m0 + r < p.Lq) dqg[static_cast<int64_t>(r) * D + d] = from_float<T>(dQs[r * L::A + d] * p.scale);
  }
}

// Batch chunks for the gradient of a shared prefix: about two blocks per SM in all.
inline int prefix_batch_chunks(const Params& p) {
  if (p.Bp != 1 || p.B <= 1) return 1;
  int device = 0, sms = 1;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int blocks = ceil_div(p.P, BN) * p.Hkv;
  return std::max(1, std::min(p.B, ceil_div(2 * sms, blocks)));
}

template <typename T, int D>
void launch_bwd(const Params& p, float* ws_k, float* ws_v, int chunks) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Lq;
  if (rows > 0) {
    const int64_t blocks = (rows + THREADS / 32 - 1) / (THREADS / 32);
    attn_bwd_delta_kernel<T><<<static_cast<unsigned>(blocks), THREADS, 0, stream>>>(p, D);
    LK_CHECK_LAUNCH();
  }
  const size_t kv_bytes = DkdvSmem<D>::bytes;
  set_smem_limit(attn_bwd_dkdv_kernel<T, D>, kv_bytes, "prefix_attention_bwd");
  if (p.Lk > 0) {
    const dim3 grid(ceil_div(p.Lk, BN), p.Hkv, p.B);
    attn_bwd_dkdv_kernel<T, D><<<grid, THREADS, kv_bytes, stream>>>(p, false, 1, nullptr, nullptr);
    LK_CHECK_LAUNCH();
  }
  if (p.P > 0) {
    // Bp = B: one block per prefix row. Bp = 1: `chunks` blocks, each over B / chunks rows.
    const int b_per_chunk = p.Bp == 1 ? ceil_div(p.B, chunks) : 1;
    const dim3 grid(ceil_div(p.P, BN), p.Hkv, p.Bp == 1 ? chunks : p.Bp);
    attn_bwd_dkdv_kernel<T, D><<<grid, THREADS, kv_bytes, stream>>>(p, true, b_per_chunk, ws_k,
                                                                     ws_v);
    LK_CHECK_LAUNCH();
  }
  if (p.Lq > 0) {
    const size_t q_bytes = DqSmem<D>::bytes;
    set_smem_limit(attn_bwd_dq_kernel<T, D>, q_bytes, "prefix_attention_bwd");
    const dim3 grid(ceil_div(p.Lq, BM), p.Hq, p.B);
    attn_bwd_dq_kernel<T, D><<<grid, THREADS, q_bytes, stream>>>(p);
    LK_CHECK_LAUNCH();
  }
}

}  // namespace
}  // namespace attn

// (dq, dk, dv, dprefix_k, dprefix_v), each with its input's shape and dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_bwd(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& prefix_k_in, const at::Tensor& prefix_v_in,
    const c10::optional<at::Tensor>& key_padding_mask, const at::Tensor& out_in,
    const at::Tensor& lse_in, bool causal, double scale) {
  using namespace attn;
  constexpr const char* op = "prefix_attention_bwd";
  const auto q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
             v = last_dim_contiguous(v_in), pk = last_dim_contiguous(prefix_k_in),
             pv = last_dim_contiguous(prefix_v_in), dout = last_dim_contiguous(dout_in),
             out = last_dim_contiguous(out_in);
  Params p{};
  check_and_fill(op, q, k, v, pk, pv, key_padding_mask, causal, scale, p);
  TORCH_CHECK(dout.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type(), op,
              ": dout must have q's shape ", shape_str(q), " and dtype ", dtype_str(q.scalar_type()),
              ", got ", shape_str(dout), " ", dtype_str(dout.scalar_type()));
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type(), op,
              ": out must have q's shape ", shape_str(q), " and dtype ", dtype_str(q.scalar_type()),
              ", got ", shape_str(out), " ", dtype_str(out.scalar_type()));
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == q.size(0) && lse_in.size(1) == q.size(1) &&
                  lse_in.size(2) == q.size(2) && lse_in.scalar_type() == at::kFloat,
              op, ": lse must be float32 of shape (", q.size(0), ", ", q.size(1), ", ", q.size(2),
              "), got ", shape_str(lse_in), " ", dtype_str(lse_in.scalar_type()));
  check_devices(op, {{"q", &q}, {"k", &k}, {"v", &v}, {"prefix_k", &pk}, {"prefix_v", &pv},
                     {"dout", &dout}, {"out", &out}, {"lse", &lse_in}});
  if (key_padding_mask.has_value())
    check_devices(op, {{"q", &q}, {"key_padding_mask", &*key_padding_mask}});
  const c10::cuda::CUDAGuard guard(q.device());
  const auto lse = lse_in.contiguous();
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  auto dpk = at::empty(pk.sizes(), pk.options());
  auto dpv = at::empty(pv.sizes(), pv.options());
  if (p.B == 0 || p.Hq == 0)  // no query: every gradient is zero
    return {dq, at::zeros(k.sizes(), k.options()), at::zeros(v.sizes(), v.options()),
            at::zeros(pk.sizes(), pk.options()), at::zeros(pv.sizes(), pv.options())};
  auto delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  p.out = const_cast<void*>(out.data_ptr());
  p.o_sb = out.stride(0); p.o_sh = out.stride(1); p.o_sl = out.stride(2);
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.dout = dout.data_ptr(); p.do_sb = dout.stride(0); p.do_sh = dout.stride(1);
  p.do_sl = dout.stride(2);
  p.vec = p.vec && rows_16b_aligned(dout);
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr(); p.dk = dk.data_ptr(); p.dv = dv.data_ptr();
  p.dpk = dpk.data_ptr(); p.dpv = dpv.data_ptr();
  const int64_t D = q.size(3);
  // A shared prefix over a batch: chunks of batch rows write fp32 partials, summed below.
  int chunks = p.P > 0 ? prefix_batch_chunks(p) : 1;
  if (chunks > 1) chunks = ceil_div(p.B, ceil_div(p.B, chunks));  // no empty chunk
  at::Tensor ws_k, ws_v;
  if (chunks > 1) {
    ws_k = at::empty({chunks, pk.size(1), pk.size(2), D}, q.options().dtype(at::kFloat));
    ws_v = at::empty({chunks, pk.size(1), pk.size(2), D}, q.options().dtype(at::kFloat));
  }
  LK_DISPATCH_HALF(q.scalar_type(), T, op, [&] {
    float* wk = chunks > 1 ? ws_k.data_ptr<float>() : nullptr;
    float* wv = chunks > 1 ? ws_v.data_ptr<float>() : nullptr;
    if (D == 64) launch_bwd<T, 64>(p, wk, wv, chunks);
    else launch_bwd<T, 128>(p, wk, wv, chunks);
  });
  if (chunks > 1) {
    dpk = at::sum(ws_k, {0}, /*keepdim=*/true).to(pk.scalar_type());
    dpv = at::sum(ws_v, {0}, /*keepdim=*/true).to(pv.scalar_type());
  }
  return {dq, dk, dv, dpk, dpv};
}

}  // namespace lora_kernels
