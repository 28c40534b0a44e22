// lora_linear: the low-rank path of y = x W^T + b + s * dropout(x) A^T B^T.
//
// Two kernels serve every product of the LoRA forward and backward:
//
// * skinny_gemm_kernel: C (M x N, fp32) = alpha * dropout(L) (M x K) @ R^T (R: N x K), N small
//   (the rank). Serves the shrink S = dropout(x) A^T, dS = s dY B (with the fused side product
//   dB = s dY^T S computed from the same dY tile: one pass over dY), and dA^T = dropout(x)^T dS
//   (split over K with fp32 atomics). fp16/bf16 operands of one dtype use tensor cores (WMMA
//   16x16x16, fp32 accumulate); mixed dtypes (fp32 adapters over a bf16 base, as PEFT keeps
//   them) run on CUDA cores in fp32.
// * expand_add_kernel: Y (M x N) += alpha * mask * L (M x J, fp32) @ R^T (R: N x J), J = rank.
//   Adds the LoRA term in place onto the base GEMM's output (cuBLAS through ATen): the LoRA
//   term lives only in registers, never in memory. Serves y += s S B^T and
//   dx += mask * (dS A) / (1 - p).
//
// Dropout: element (t, i) of x (T, in) is kept iff philox(seed, t * in + i) >= round(p 2^32);
// kept values are scaled by 1 / (1 - p). The mask is regenerated wherever it is needed.

#include "../common.h"
#include "philox.cuh"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <mma.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

namespace lora_kernels {
namespace {

constexpr int SK_BM = 64, SK_BN = 32, SK_BK = 32, SK_THREADS = 256;

template <typename TL, typename TR, bool USE_WMMA>
__global__ void __launch_bounds__(SK_THREADS) skinny_gemm_kernel(
    const TL* __restrict__ L, int64_t l_sm, int64_t l_sk,
    const TR* __restrict__ R, int64_t r_sn, int64_t r_sk,
    float* __restrict__ C, int64_t c_sm, int64_t c_sn,
    const float* __restrict__ S2, int64_t s2_sm, int64_t s2_sn,
    float* __restrict__ DB, int64_t db_sk, int64_t db_sn,
    int64_t M, int64_t N, int64_t K, int64_t k_per_split,
    float alpha, float beta,
    uint64_t seed, uint32_t drop_threshold, int64_t mask_sm, int64_t mask_sk, bool use_mask,
    bool atomic_c) {
  using TS = std::conditional_t<USE_WMMA, TL, float>;  // shared-memory staging type
  constexpr int LDS = USE_WMMA ? SK_BK + 8 : SK_BK + 1;
  __shared__ __align__(128) TS Ls[SK_BM][LDS];
  __shared__ __align__(128) TS Rs[SK_BN][LDS];
  __shared__ __align__(128) float S2s[SK_BM][SK_BN + 1];   // fused dB only
  __shared__ __align__(128) float Cs[SK_BM][SK_BN + 4];    // WMMA epilogue only

  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * SK_BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * SK_BN;
  const int64_t kb = static_cast<int64_t>(blockIdx.z) * k_per_split;
  const int64_t ke = min(K, kb + k_per_split);
  const bool fused = DB != nullptr;

  if (fused) {
    for (int e = tid; e < SK_BM * SK_BN; e += SK_THREADS) {
      const int mm = e / SK_BN, nn = e % SK_BN;
      const int64_t gm = m0 + mm, gn = n0 + nn;
      S2s[mm][nn] = (gm < M && gn < N) ? S2[gm * s2_sm + gn * s2_sn] : 0.f;
    }
  }

  // SIMT layout: thread (ty, tx) owns rows ty + 16 i (i < 4) and columns tx + 16 j (j < 2).
  const int ty = tid / 16, tx = tid % 16;
  float acc[4][2] = {};
  // WMMA layout: warp w owns the 16 x 16 output tile (w / 2, w % 2).
  const int warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2;
  using namespace nvcuda;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> cfrag;
  if constexpr (USE_WMMA) wmma::fill_fragment(cfrag, 0.f);

  const bool l_k_fast = l_sk == 1;
  const bool r_k_fast = r_sk == 1;
  for (int64_t k0 = kb; k0 < ke; k0 += SK_BK) {
    for (int e = tid; e < SK_BM * SK_BK; e += SK_THREADS) {
      const int mm = l_k_fast ? e / SK_BK : e % SK_BM;
      const int kk = l_k_fast ? e % SK_BK : e / SK_BM;
      const int64_t gm = m0 + mm, gk = k0 + kk;
      float v = 0.f;
      if (gm < M && gk < ke) {
        v = to_float(L[gm * l_sm + gk * l_sk]);
        if (use_mask && !dropout_keep(seed, static_cast<uint64_t>(gm * mask_sm + gk * mask_sk),
                                      drop_threshold)) {
          v = 0.f;
        }
      }
      Ls[mm][kk] = from_float<TS>(v);
    }
    for (int e = tid; e < SK_BN * SK_BK; e += SK_THREADS) {
      const int nn = r_k_fast ? e / SK_BK : e % SK_BN;
      const int kk = r_k_fast ? e % SK_BK : e / SK_BN;
      const int64_t gn = n0 + nn, gk = k0 + kk;
      const float v = (gn < N && gk < ke) ? to_float(R[gn * r_sn + gk * r_sk]) : 0.f;
      Rs[nn][kk] = from_float<TS>(v);
    }
    __syncthreads();

    if constexpr (USE_WMMA) {
#pragma unroll
      for (int kk = 0; kk < SK_BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, TS, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, TS, wmma::col_major> b;
        wmma::load_matrix_sync(a, &Ls[wm * 16][kk], LDS);
        wmma::load_matrix_sync(b, &Rs[wn * 16][kk], LDS);  // (k, n) at Rs[n][k]: column-major
        wmma::mma_sync(cfrag, a, b, cfrag);
      }
    } else {
#pragma unroll 8
      for (int kk = 0; kk < SK_BK; ++kk) {
        float a[4], b[2];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = to_float(Ls[ty + 16 * i][kk]);
#pragma unroll
        for (int j = 0; j < 2; ++j) b[j] = to_float(Rs[tx + 16 * j][kk]);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }

    if (fused) {
      // DB[k, n] += beta * sum_m L[m, k] * S2[m, n] over this tile's rows (dB = s dY^T S).
#pragma unroll
      for (int q = 0; q < (SK_BK * SK_BN) / SK_THREADS; ++q) {
        const int e = tid + q * SK_THREADS;
        const int kk = e % SK_BK, nn = e / SK_BK;
        float sum = 0.f;
#pragma unroll 8
        for (int mm = 0; mm < SK_BM; ++mm) sum = fmaf(to_float(Ls[mm][kk]), S2s[mm][nn], sum);
        const int64_t gk = k0 + kk, gn = n0 + nn;
        if (gk < ke && gn < N && sum != 0.f) atomicAdd(&DB[gk * db_sk + gn * db_sn], beta * sum);
      }
    }
    __syncthreads();  // the tiles are overwritten by the next step
  }

  if constexpr (USE_WMMA) {
    wmma::store_matrix_sync(&Cs[wm * 16][wn * 16], cfrag, SK_BN + 4, wmma::mem_row_major);
    __syncthreads();
    for (int e = tid; e < SK_BM * SK_BN; e += SK_THREADS) {
      const int mm = e / SK_BN, nn = e % SK_BN;
      const int64_t gm = m0 + mm, gn = n0 + nn;
      if (gm < M && gn < N) {
        const float v = alpha * Cs[mm][nn];
        if (atomic_c) atomicAdd(&C[gm * c_sm + gn * c_sn], v);
        else C[gm * c_sm + gn * c_sn] = v;
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int64_t gm = m0 + ty + 16 * i, gn = n0 + tx + 16 * j;
        if (gm < M && gn < N) {
          const float v = alpha * acc[i][j];
          if (atomic_c) atomicAdd(&C[gm * c_sm + gn * c_sn], v);
          else C[gm * c_sm + gn * c_sn] = v;
        }
      }
  }
}

constexpr int EX_BM = 64, EX_BN = 64, EX_BJ = 32, EX_THREADS = 256;

template <typename TY, typename TR>
__global__ void __launch_bounds__(EX_THREADS) expand_add_kernel(
    TY* __restrict__ Y, int64_t y_sm, int64_t y_sn,
    const float* __restrict__ L, int64_t l_sm, int64_t l_sj,
    const TR* __restrict__ R, int64_t r_sn, int64_t r_sj,
    int64_t M, int64_t N, int64_t J, float alpha,
    uint64_t seed, uint32_t drop_threshold, int64_t mask_sm, bool use_mask) {
  __shared__ float Ls[EX_BM][EX_BJ + 1];
  __shared__ float Rs[EX_BN][EX_BJ + 1];
  const int tid = threadIdx.x;
  const int ty = tid / 16, tx = tid % 16;  // rows ty + 16 i, columns tx + 16 j
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * EX_BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * EX_BN;
  float acc[4][4] = {};
  const bool l_j_fast = l_sj == 1, r_j_fast = r_sj == 1;

  for (int64_t j0 = 0; j0 < J; j0 += EX_BJ) {
    for (int e = tid; e < EX_BM * EX_BJ; e += EX_THREADS) {
      const int mm = l_j_fast ? e / EX_BJ : e % EX_BM;
      const int jj = l_j_fast ? e % EX_BJ : e / EX_BM;
      const int64_t gm = m0 + mm, gj = j0 + jj;
      Ls[mm][jj] = (gm < M && gj < J) ? L[gm * l_sm + gj * l_sj] : 0.f;
    }
    for (int e = tid; e < EX_BN * EX_BJ; e += EX_THREADS) {
      const int nn = r_j_fast ? e / EX_BJ : e % EX_BN;
      const int jj = r_j_fast ? e % EX_BJ : e / EX_BN;
      const int64_t gn = n0 + nn, gj = j0 + jj;
      Rs[nn][jj] = (gn < N && gj < J) ? to_float(R[gn * r_sn + gj * r_sj]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int jj = 0; jj < EX_BJ; ++jj) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = Ls[ty + 16 * i][jj];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Rs[tx + 16 * j][jj];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t gm = m0 + ty + 16 * i;
    if (gm >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gn = n0 + tx + 16 * j;
      if (gn >= N) continue;
      float v = alpha * acc[i][j];
      if (use_mask && !dropout_keep(seed, static_cast<uint64_t>(gm * mask_sm + gn), drop_threshold))
        v = 0.f;
      TY* p = &Y[gm * y_sm + gn * y_sn];
      *p = from_float<TY>(to_float(*p) + v);
    }
  }
}

// Host side ------------------------------------------------------------------------------------

struct SkinnyArgs {
  const void* L; int64_t l_sm, l_sk; at::ScalarType l_type;
  const void* R; int64_t r_sn, r_sk; at::ScalarType r_type;
  float* C; int64_t c_sm, c_sn;
  const float* S2 = nullptr; int64_t s2_sm = 0, s2_sn = 0;
  float* DB = nullptr; int64_t db_sk = 0, db_sn = 0;
  int64_t M, N, K;
  int splits = 1;
  float alpha = 1.f, beta = 1.f;
  uint64_t seed = 0; uint32_t threshold = 0; int64_t mask_sm = 0, mask_sk = 0; bool use_mask = false;
};

void launch_skinny(const SkinnyArgs& a, const char* op) {
  if (a.M == 0 || a.N == 0) return;
  const int64_t k_per_split =
      a.splits > 1 ? static_cast<int64_t>(ceil_div(ceil_div(a.K, a.splits), SK_BK)) * SK_BK : a.K;
  const int splits = a.splits > 1 ? ceil_div(a.K, k_per_split) : 1;
  const dim3 grid(ceil_div(a.M, SK_BM), ceil_div(a.N, SK_BN), std::max(splits, 1));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool atomic_c = splits > 1;
  const bool wmma = a.l_type == a.r_type && (a.l_type == at::kHalf || a.l_type == at::kBFloat16);
  if (wmma) {
    LK_DISPATCH_HALF(a.l_type, T, op, [&] {
      skinny_gemm_kernel<T, T, true><<<grid, SK_THREADS, 0, stream>>>(
          static_cast<const T*>(a.L), a.l_sm, a.l_sk, static_cast<const T*>(a.R), a.r_sn, a.r_sk,
          a.C, a.c_sm, a.c_sn, a.S2, a.s2_sm, a.s2_sn, a.DB, a.db_sk, a.db_sn, a.M, a.N, a.K,
          k_per_split, a.alpha, a.beta, a.seed, a.threshold, a.mask_sm, a.mask_sk, a.use_mask,
          atomic_c);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  LK_DISPATCH_FLOAT(a.l_type, TL, op, [&] {
    LK_DISPATCH_FLOAT(a.r_type, TR, op, [&] {
      skinny_gemm_kernel<TL, TR, false><<<grid, SK_THREADS, 0, stream>>>(
          static_cast<const TL*>(a.L), a.l_sm, a.l_sk, static_cast<const TR*>(a.R), a.r_sn,
          a.r_sk, a.C, a.c_sm, a.c_sn, a.S2, a.s2_sm, a.s2_sn, a.DB, a.db_sk, a.db_sn, a.M, a.N,
          a.K, k_per_split, a.alpha, a.beta, a.seed, a.threshold, a.mask_sm, a.mask_sk,
          a.use_mask, atomic_c);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void launch_expand(const at::Tensor& y, const at::Tensor& l, const void* r, at::ScalarType r_type,
                   int64_t r_sn, int64_t r_sj, float alpha, uint64_t seed, uint32_t threshold,
                   bool use_mask, const char* op) {
  const int64_t M = y.size(0), N = y.size(1), J = l.size(1);
  if (M == 0 || N == 0) return;
  const dim3 grid(ceil_div(M, EX_BM), ceil_div(N, EX_BN));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH_FLOAT(y.scalar_type(), TY, op, [&] {
    LK_DISPATCH_FLOAT(r_type, TR, op, [&] {
      expand_add_kernel<TY, TR><<<grid, EX_THREADS, 0, stream>>>(
          static_cast<TY*>(y.data_ptr()), y.stride(0), y.stride(1), l.data_ptr<float>(),
          l.stride(0), l.stride(1), static_cast<const TR*>(r), r_sn, r_sj, M, N, J, alpha, seed,
          threshold, /*mask_sm=*/N, use_mask);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// How many slices to cut the reduction (K) into so that about `per_sm` blocks per SM run, with at
// least 256 reduction steps per slice; more than one slice means fp32 atomics into a zeroed C.
int choose_splits(int64_t M, int64_t N, int64_t K, int per_sm) {
  const int mn_blocks = std::max(1, ceil_div(M, SK_BM) * ceil_div(N, SK_BN));
  return std::max(1, std::min(ceil_div(static_cast<int64_t>(per_sm) * sm_count(), mn_blocks),
                              ceil_div(std::max<int64_t>(K, 1), 256)));
}

void check_dropout(const char* op, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
}

}  // namespace

// S (T, r) float32 = dropout(x) A^T.
at::Tensor lora_shrink(const at::Tensor& x, const at::Tensor& lora_A, double dropout_p, int64_t seed) {
  constexpr const char* op = "lora_shrink";
  LK_CHECK_DIM("lora_shrink", "x", x, 2);
  LK_CHECK_DIM("lora_shrink", "lora_A", lora_A, 2);
  LK_CHECK_FLOAT("lora_shrink", "x", x);
  LK_CHECK_FLOAT("lora_shrink", "lora_A", lora_A);
  LK_CHECK_SIZE("lora_shrink", "lora_A", lora_A, 1, x.size(1), "in_features (x.size(1))");
  check_dropout(op, dropout_p);
  LK_CHECK_CUDA("lora_shrink", "x", x);
  LK_CHECK_SAME_DEVICE("lora_shrink", "lora_A", lora_A, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), in = x.size(1), r = lora_A.size(0);
  const int splits = choose_splits(T, r, in, 2);
  auto s = splits > 1 ? at::zeros({T, r}, x.options().dtype(at::kFloat))
                      : at::empty({T, r}, x.options().dtype(at::kFloat));
  SkinnyArgs a;
  a.L = x.data_ptr(); a.l_sm = x.stride(0); a.l_sk = x.stride(1); a.l_type = x.scalar_type();
  a.R = lora_A.data_ptr(); a.r_sn = lora_A.stride(0); a.r_sk = lora_A.stride(1);
  a.r_type = lora_A.scalar_type();
  a.C = s.data_ptr<float>(); a.c_sm = r; a.c_sn = 1;
  a.M = T; a.N = r; a.K = in; a.splits = splits;
  a.alpha = static_cast<float>(1.0 / (1.0 - dropout_p));
  a.use_mask = dropout_p > 0.0;
  a.seed = static_cast<uint64_t>(seed); a.threshold = dropout_threshold(dropout_p);
  a.mask_sm = in; a.mask_sk = 1;
  launch_skinny(a, op);
  return s;
}

// y (T, out) += scaling * S B^T, in place.
void lora_expand_(const at::Tensor& y, const at::Tensor& s, const at::Tensor& lora_B, double scaling) {
  constexpr const char* op = "lora_expand_";
  LK_CHECK_DIM("lora_expand_", "y", y, 2);
  LK_CHECK_DIM("lora_expand_", "s", s, 2);
  LK_CHECK_DIM("lora_expand_", "lora_B", lora_B, 2);
  LK_CHECK_FLOAT("lora_expand_", "y", y);
  LK_CHECK_DTYPE("lora_expand_", "s", s, at::kFloat);
  LK_CHECK_FLOAT("lora_expand_", "lora_B", lora_B);
  LK_CHECK_SIZE("lora_expand_", "s", s, 0, y.size(0), "tokens (y.size(0))");
  LK_CHECK_SIZE("lora_expand_", "lora_B", lora_B, 0, y.size(1), "out_features (y.size(1))");
  LK_CHECK_SIZE("lora_expand_", "lora_B", lora_B, 1, s.size(1), "rank (s.size(1))");
  LK_CHECK_CUDA("lora_expand_", "y", y);
  LK_CHECK_SAME_DEVICE("lora_expand_", "s", s, y);
  LK_CHECK_SAME_DEVICE("lora_expand_", "lora_B", lora_B, y);
  const c10::cuda::CUDAGuard guard(y.device());
  launch_expand(y, s, lora_B.data_ptr(), lora_B.scalar_type(), lora_B.stride(0), lora_B.stride(1),
                static_cast<float>(scaling), 0, 0, false, op);
}

// dS (T, r) = scaling * dY B and, when need_dB, dB (out, r) = scaling * dY^T S: one pass over dY.
std::tuple<at::Tensor, at::Tensor> lora_grad_s_b(const at::Tensor& dy, const at::Tensor& s,
                                                 const at::Tensor& lora_B, double scaling,
                                                 bool need_dB) {
  constexpr const char* op = "lora_grad_s_b";
  LK_CHECK_DIM("lora_grad_s_b", "dy", dy, 2);
  LK_CHECK_DIM("lora_grad_s_b", "s", s, 2);
  LK_CHECK_DIM("lora_grad_s_b", "lora_B", lora_B, 2);
  LK_CHECK_FLOAT("lora_grad_s_b", "dy", dy);
  LK_CHECK_DTYPE("lora_grad_s_b", "s", s, at::kFloat);
  LK_CHECK_FLOAT("lora_grad_s_b", "lora_B", lora_B);
  LK_CHECK_SIZE("lora_grad_s_b", "s", s, 0, dy.size(0), "tokens (dy.size(0))");
  LK_CHECK_SIZE("lora_grad_s_b", "lora_B", lora_B, 0, dy.size(1), "out_features (dy.size(1))");
  LK_CHECK_SIZE("lora_grad_s_b", "lora_B", lora_B, 1, s.size(1), "rank (s.size(1))");
  LK_CHECK_CUDA("lora_grad_s_b", "dy", dy);
  LK_CHECK_SAME_DEVICE("lora_grad_s_b", "s", s, dy);
  LK_CHECK_SAME_DEVICE("lora_grad_s_b", "lora_B", lora_B, dy);
  const c10::cuda::CUDAGuard guard(dy.device());
  const int64_t T = dy.size(0), out = dy.size(1), r = s.size(1);
  const int splits = choose_splits(T, r, out, 2);
  auto ds = splits > 1 ? at::zeros({T, r}, dy.options().dtype(at::kFloat))
                       : at::empty({T, r}, dy.options().dtype(at::kFloat));
  auto db = need_dB ? at::zeros({out, r}, dy.options().dtype(at::kFloat))
                    : at::empty({0}, dy.options().dtype(at::kFloat));
  SkinnyArgs a;
  a.L = dy.data_ptr(); a.l_sm = dy.stride(0); a.l_sk = dy.stride(1); a.l_type = dy.scalar_type();
  // R = B^T: R[n = j][k = o] = B[o, j].
  a.R = lora_B.data_ptr(); a.r_sn = lora_B.stride(1); a.r_sk = lora_B.stride(0);
  a.r_type = lora_B.scalar_type();
  a.C = ds.data_ptr<float>(); a.c_sm = r; a.c_sn = 1;
  if (need_dB) {
    a.S2 = s.data_ptr<float>(); a.s2_sm = s.stride(0); a.s2_sn = s.stride(1);
    a.DB = db.data_ptr<float>(); a.db_sk = r; a.db_sn = 1;
  }
  a.M = T; a.N = r; a.K = out; a.splits = splits;
  a.alpha = static_cast<float>(scaling); a.beta = static_cast<float>(scaling);
  launch_skinny(a, op);
  return {ds, db};
}

// dx (T, in) += mask * (dS A) / (1 - p), in place (dx holds dY W from cuBLAS).
void lora_dropout_expand_(const at::Tensor& dx, const at::Tensor& ds, const at::Tensor& lora_A,
                          double dropout_p, int64_t seed) {
  constexpr const char* op = "lora_dropout_expand_";
  LK_CHECK_DIM("lora_dropout_expand_", "dx", dx, 2);
  LK_CHECK_DIM("lora_dropout_expand_", "ds", ds, 2);
  LK_CHECK_DIM("lora_dropout_expand_", "lora_A", lora_A, 2);
  LK_CHECK_FLOAT("lora_dropout_expand_", "dx", dx);
  LK_CHECK_DTYPE("lora_dropout_expand_", "ds", ds, at::kFloat);
  LK_CHECK_FLOAT("lora_dropout_expand_", "lora_A", lora_A);
  LK_CHECK_SIZE("lora_dropout_expand_", "ds", ds, 0, dx.size(0), "tokens (dx.size(0))");
  LK_CHECK_SIZE("lora_dropout_expand_", "lora_A", lora_A, 0, ds.size(1), "rank (ds.size(1))");
  LK_CHECK_SIZE("lora_dropout_expand_", "lora_A", lora_A, 1, dx.size(1), "in_features (dx.size(1))");
  check_dropout(op, dropout_p);
  LK_CHECK_CUDA("lora_dropout_expand_", "dx", dx);
  LK_CHECK_SAME_DEVICE("lora_dropout_expand_", "ds", ds, dx);
  LK_CHECK_SAME_DEVICE("lora_dropout_expand_", "lora_A", lora_A, dx);
  const c10::cuda::CUDAGuard guard(dx.device());
  // R = A^T: R[n = i][j] = A[j, i].
  launch_expand(dx, ds, lora_A.data_ptr(), lora_A.scalar_type(), lora_A.stride(1),
                lora_A.stride(0), static_cast<float>(1.0 / (1.0 - dropout_p)),
                static_cast<uint64_t>(seed), dropout_threshold(dropout_p), dropout_p > 0.0, op);
}

// dA (r, in) float32 = dS^T dropout(x).
at::Tensor lora_grad_a(const at::Tensor& ds, const at::Tensor& x, double dropout_p, int64_t seed) {
  constexpr const char* op = "lora_grad_a";
  LK_CHECK_DIM("lora_grad_a", "ds", ds, 2);
  LK_CHECK_DIM("lora_grad_a", "x", x, 2);
  LK_CHECK_DTYPE("lora_grad_a", "ds", ds, at::kFloat);
  LK_CHECK_FLOAT("lora_grad_a", "x", x);
  LK_CHECK_SIZE("lora_grad_a", "ds", ds, 0, x.size(0), "tokens (x.size(0))");
  check_dropout(op, dropout_p);
  LK_CHECK_CUDA("lora_grad_a", "ds", ds);
  LK_CHECK_SAME_DEVICE("lora_grad_a", "x", x, ds);
  const c10::cuda::CUDAGuard guard(ds.device());
  const int64_t T = x.size(0), in = x.size(1), r = ds.size(1);
  // Split the token reduction so that about four blocks per SM run; fp32 atomics join them.
  const int splits = choose_splits(in, r, T, 4);
  auto da = splits > 1 ? at::zeros({r, in}, x.options().dtype(at::kFloat))
                       : at::empty({r, in}, x.options().dtype(at::kFloat));
  SkinnyArgs a;
  // dA^T (in, r) = dropout(x)^T (in, T) @ dS (T, r): L = x^T, R = dS^T, C = dA^T.
  a.L = x.data_ptr(); a.l_sm = x.stride(1); a.l_sk = x.stride(0); a.l_type = x.scalar_type();
  a.R = ds.data_ptr(); a.r_sn = ds.stride(1); a.r_sk = ds.stride(0); a.r_type = at::kFloat;
  a.C = da.data_ptr<float>(); a.c_sm = 1; a.c_sn = in;
  a.M = in; a.N = r; a.K = T; a.splits = splits;
  a.alpha = static_cast<float>(1.0 / (1.0 - dropout_p));
  a.use_mask = dropout_p > 0.0;
  a.seed = static_cast<uint64_t>(seed); a.threshold = dropout_threshold(dropout_p);
  a.mask_sm = 1; a.mask_sk = in;
  launch_skinny(a, op);
  return da;
}

}  // namespace lora_kernels
