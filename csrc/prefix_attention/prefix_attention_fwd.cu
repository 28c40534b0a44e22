// prefix_attention forward, after FlashAttention-2: one block per (64 query rows, q head,
// batch row), 4 warps each owning 16 rows; online softmax over the prefix tiles (read from the
// prefix's own buffer, shared by the batch or per row), then over the sequence tiles
// (bottom-right causal, key padding). GQA: q head h reads kv head h / (Hq / Hkv), no copies.
// Writes out (B, Hq, Lq, D) and lse (B, Hq, Lq) fp32 (natural log; -inf and out = 0 for a
// row that sees no key).

#include "attention_host.h"

#include <ATen/ops/empty.h>

#include <tuple>

namespace lora_kernels {
namespace attn {
namespace {

using namespace nvcuda;

template <typename T, int D>
__global__ void __launch_bounds__(THREADS) attn_fwd_kernel(const Params p) {
  using L = Ld<D>;
  using S = FwdSmem<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + S::q);
  T* Ks = reinterpret_cast<T*>(smem + S::k);
  T* Vs = reinterpret_cast<T*>(smem + S::v);
  float* Ss = reinterpret_cast<float*>(smem + S::s);
  T* Ps = reinterpret_cast<T*>(smem + S::p);
  float* Os = reinterpret_cast<float*>(smem + S::o);
  int* kval = reinterpret_cast<int*>(smem + S::kval);

  const int m0 = blockIdx.x * BM, h = blockIdx.y, b = blockIdx.z;
  const int hkv = h / (p.Hq / p.Hkv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = warp * 16;

  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + m0 * p.q_sl;
  load_rows<T, D, BM>(Qs, L::H, qg, p.q_sl, p.Lq - m0, p.vec);
  for (int e = threadIdx.x; e < BM * L::A; e += THREADS) Os[e] = 0.f;
  __syncthreads();  // Q and the zeroed O are visible to every warp (even with no key tile)

  float m_r[16], l_r[16];  // running max (log2 units) and sum of this warp's 16 rows
#pragma unroll
  for (int r = 0; r < 16; ++r) { m_r[r] = -INFINITY; l_r[r] = 0.f; }

  auto tile = [&](const T* kg, int64_t k_sl, const T* vg, int64_t v_sl, int n0, int nvalid,
                  bool is_prefix) {
    __syncthreads();  // every warp is done with the previous K/V tile
    load_rows<T, D, BN>(Ks, L::H, kg, k_sl, nvalid, p.vec);
    load_rows<T, D, BN>(Vs, L::H, vg, v_sl, nvalid, p.vec);
    load_key_valid(kval, p, b, n0, nvalid, is_prefix);
    __syncthreads();

    // S (this warp's 16 rows x 64 keys) = Q K^T.
#pragma unroll
    for (int nt = 0; nt < BN / 16; ++nt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int kk = 0; kk < D; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
        wmma::load_matrix_sync(a, Qs + row0 * L::H + kk, L::H);
        wmma::load_matrix_sync(bf, Ks + nt * 16 * L::H + kk, L::H);
        wmma::mma_sync(acc, a, bf, acc);
      }
      wmma::store_matrix_sync(Ss + row0 * L::S + nt * 16, acc, L::S, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax, one row at a time; lane owns columns lane and lane + 32.
    const bool ok0_tile = kval[lane] != 0, ok1_tile = kval[lane + 32] != 0;
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const int row = row0 + r, i = m0 + row;
      bool ok0 = ok0_tile, ok1 = ok1_tile;
      if (!is_prefix && p.causal) {
        ok0 = ok0 && causal_visible(p, i, n0 + lane);
        ok1 = ok1 && causal_visible(p, i, n0 + lane + 32);
      }
      const float s0 = ok0 ? Ss[row * L::S + lane] * p.scale_log2 : -INFINITY;
      const float s1 = ok1 ? Ss[row * L::S + lane + 32] * p.scale_log2 : -INFINITY;
      const float m_new = fmaxf(m_r[r], warp_max(fmaxf(s0, s1)));
      float alpha = 1.f, p0 = 0.f, p1 = 0.f;
      if (m_new != -INFINITY) {  // uniform over the warp
        alpha = exp2f(m_r[r] - m_new);
        p0 = exp2f(s0 - m_new);
        p1 = exp2f(s1 - m_new);
      }
      l_r[r] = l_r[r] * alpha + warp_sum(p0 + p1);
      m_r[r] = m_new;
      Ps[row * L::P + lane] = from_float<T>(p0);
      Ps[row * L::P + lane + 32] = from_float<T>(p1);
#pragma unroll
      for (int d = lane; d < D; d += 32) Os[row * L::A + d] *= alpha;
    }
    __syncwarp();

    // O (16 x D) += P (16 x 64) V (64 x D).
#pragma unroll
    for (int nt = 0; nt < D / 16; ++nt) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, Os + row0 * L::A + nt * 16, L::A, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < BN; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
        wmma::load_matrix_sync(a, Ps + row0 * L::P + kk, L::P);
        wmma::load_matrix_sync(bf, Vs + kk * L::H + nt * 16, L::H);
        wmma::mma_sync(acc, a, bf, acc);
      }
      wmma::store_matrix_sync(Os + row0 * L::A + nt * 16, acc, L::A, wmma::mem_row_major);
    }
    __syncwarp();
  };

  // Prefix keys: always visible.
  if (p.P > 0) {
    const T* pkg = static_cast<const T*>(p.pk) + b * p.pk_sb + hkv * p.pk_sh;
    const T* pvg = static_cast<const T*>(p.pv) + b * p.pv_sb + hkv * p.pv_sh;
    for (int n0 = 0; n0 < p.P; n0 += BN)
      tile(pkg + n0 * p.pk_sl, p.pk_sl, pvg + n0 * p.pv_sl, p.pv_sl, n0, p.P - n0, true);
  }
  // Sequence keys, up to the last one any row of this block can see.
  const int n_end = seq_key_end(p, m0, BM);
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + hkv * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + hkv * p.v_sh;
  for (int n0 = 0; n0 < n_end; n0 += BN)
    tile(kg + n0 * p.k_sl, p.k_sl, vg + n0 * p.v_sl, p.v_sl, n0, p.Lk - n0, false);

  // Epilogue: normalise and store this warp's rows.
  __syncwarp();
  T* og = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh;
  float* lse = p.lse + (static_cast<int64_t>(b) * p.Hq + h) * p.Lq;
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    const int row = row0 + r, i = m0 + row;
    if (i >= p.Lq) continue;
    const float l = l_r[r];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int d = lane; d < D; d += 32)
      og[i * p.o_sl + d] = from_float<T>(Os[row * L::A + d] * inv);
    if (lane == 0) lse[i] = l > 0.f ? m_r[r] * LN2 + logf(l) : -INFINITY;
  }
}

template <typename T, int D>
void launch_fwd(const Params& p) {
  const size_t bytes = FwdSmem<D>::bytes;
  set_smem_limit(attn_fwd_kernel<T, D>, bytes, "prefix_attention_fwd");
  const dim3 grid(ceil_div(p.Lq, BM), p.Hq, p.B);
  attn_fwd_kernel<T, D><<<grid, THREADS, bytes, c10::cuda::getCurrentCUDAStream()>>>(p);
  LK_CHECK_LAUNCH();
}

}  // namespace
}  // namespace attn

// out (B, Hq, Lq, D) in q's dtype, lse (B, Hq, Lq) float32.
std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& prefix_k_in, const at::Tensor& prefix_v_in,
    const c10::optional<at::Tensor>& key_padding_mask, bool causal, double scale) {
  using namespace attn;
  const auto q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in),
             v = last_dim_contiguous(v_in), pk = last_dim_contiguous(prefix_k_in),
             pv = last_dim_contiguous(prefix_v_in);
  Params p{};
  check_and_fill("prefix_attention_fwd", q, k, v, pk, pv, key_padding_mask, causal, scale, p);
  check_devices("prefix_attention_fwd", {{"q", &q}, {"k", &k}, {"v", &v}, {"prefix_k", &pk},
                                         {"prefix_v", &pv}});
  if (key_padding_mask.has_value())
    check_devices("prefix_attention_fwd", {{"q", &q}, {"key_padding_mask", &*key_padding_mask}});
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  p.out = out.data_ptr(); p.o_sb = out.stride(0); p.o_sh = out.stride(1); p.o_sl = out.stride(2);
  p.lse = lse.data_ptr<float>();
  const int64_t D = q.size(3);
  LK_DISPATCH_HALF(q.scalar_type(), T, "prefix_attention_fwd", [&] {
    if (D == 64) launch_fwd<T, 64>(p);
    else launch_fwd<T, 128>(p);
  });
  return {out, lse};
}

}  // namespace lora_kernels
