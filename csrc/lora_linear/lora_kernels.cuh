// lora_linear kernels: the low-rank path of y = x W^T + b + s * dropout(x) A^T B^T around the
// cuBLAS base GEMMs (lora_linear.cu runs those through ATen).
//
// Every product runs on tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulate), including
// the rank dimension (padded to 16). Operands that are not bf16 are split into bf16 terms whose
// sum reproduces them (fp16: 2 terms, exactly; fp32: 3 terms, exactly in the normal range), and
// the products of term pairs (i, j) with i + j <= ORDER are accumulated: ORDER = 2 keeps the
// fp32 adapters' (PEFT's default) results at fp32 accuracy, ORDER = 1 (2^-16 relative) serves
// outputs rounded to fp16/bf16. Staged tiles are fp32 in shared memory; fragments are built
// from them (split per fragment).
//
// * lora_shrink_kernel: S (T, r) = alpha dropout(x) A^T, split over `in` (partials summed by
//   reduce_partials_kernel in a fixed order) when the grid would be too small.
// * lora_expand_kernel: out (M, N) = alpha mask o (L R) + bias, with L (M, r) fp32 and R (r, N):
//   the forward's LoRA term (L = S, R = B^T, bias), onto which cuBLAS then adds x W^T
//   (beta = 1), and the backward's dX term (L = dS, R = A, the dropout mask), which can also
//   write the mask bit-packed for lora_sweep_kernel.
// * lora_sweep_kernel: streams X (T, C) once, per block a column block and a range of rows:
//   column sums (C, r) += X^T L (dB = s dY^T S, dA^T = dropout(x)^T dS, partial per row range)
//   and optionally row products (T, r) = X R (dS = s dY B, partial per column block). Partials
//   are summed in a fixed order: deterministic, no atomics.
//
// Dropout: see device/philox.cuh; the mask costs one Philox call per four elements of x, in
// the forward's shrink and once more in the backward (dX term), which hands it to dA packed.
#pragma once

#include "../device/philox.cuh"
#include "../device/warp_mma.cuh"

#include <type_traits>

namespace lora_kernels {
namespace lora {

using bf16 = __nv_bfloat16;

// bf16 terms that reproduce a value of type T exactly.
template <typename T> struct Terms;
template <> struct Terms<bf16> { static constexpr int value = 1; };
template <> struct Terms<__half> { static constexpr int value = 2; };
template <> struct Terms<float> { static constexpr int value = 3; };

// Dropout mask of X: off, from Philox, or read bit-packed (bit i % 32 of word
// row * words_per_row + i / 32 set iff element (row, i) is kept).
struct Mask {
  bool on = false;
  uint64_t seed = 0;
  uint32_t threshold = 0;
  const uint32_t* bits = nullptr;
  int64_t words_per_row = 0;

  // Keep bits of elements (row, col .. col + 3), col a multiple of 4.
  __device__ __forceinline__ uint32_t nibble(int64_t row, int64_t col) const {
    if (bits != nullptr) return (bits[row * words_per_row + (col >> 5)] >> (col & 31)) & 0xFu;
    return keep_nibble(seed, row, col >> 2, threshold);
  }
};

// ------------------------------------------------------------------ fragments
// A fragment (16 x 16 at (r0, k0)) of an operand read as floats through f(row, k), split into N
// bf16 terms: a[i] is term i.
template <int N, typename F>
__device__ __forceinline__ void load_a_split(uint32_t (&a)[N][4], const F& f, int r0, int k0,
                                             int g, int t) {
  const int rr[4] = {r0 + g, r0 + g + 8, r0 + g, r0 + g + 8};
  const int kk[4] = {k0 + 2 * t, k0 + 2 * t, k0 + 2 * t + 8, k0 + 2 * t + 8};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    uint32_t x[N];
    split_bf16<N>(f(rr[q], kk[q]), f(rr[q], kk[q] + 1), x);
#pragma unroll
    for (int i = 0; i < N; ++i) a[i][q] = x[i];
  }
}

// B fragment (16 x 8 at (k0, n0)) read through f(k, n).
template <int N, typename F>
__device__ __forceinline__ void load_b_split(uint32_t (&b)[N][2], const F& f, int k0, int n0, int g,
                                             int t) {
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    uint32_t x[N];
    const int k = k0 + 2 * t + 8 * q;
    split_bf16<N>(f(k, n0 + g), f(k + 1, n0 + g), x);
#pragma unroll
    for (int i = 0; i < N; ++i) b[i][q] = x[i];
  }
}

// c += sum of a[i] b[j] over i < NA, j < nb (<= NB), i + j <= ORDER.
template <int NA, int NB, int ORDER>
__device__ __forceinline__ void mma_split(float (&c)[4], const uint32_t (&a)[NA][4],
                                          const uint32_t (&b)[NB][2], int nb) {
#pragma unroll
  for (int i = 0; i < NA; ++i) {
#pragma unroll
    for (int j = 0; j < NB; ++j) {
      if (i + j <= ORDER && j < nb) mma_16816<bf16>(c, a[i], b[j]);
    }
  }
}

// ------------------------------------------------------------------ loads and stores
// Elements [col, col + 4) of a row of X as floats, those at or past `end` as 0; a single
// vector load when `vec` (row and base aligned to 4 elements) and the group is whole.
template <typename T>
__device__ __forceinline__ void load4(const T* row, int64_t col, int64_t end, bool vec, float (&v)[4]);

template <>
__device__ __forceinline__ void load4<float>(const float* row, int64_t col, int64_t end, bool vec,
                                             float (&v)[4]) {
  if (vec && col + 4 <= end) {
    const float4 u = *reinterpret_cast<const float4*>(row + col);
    v[0] = u.x; v[1] = u.y; v[2] = u.z; v[3] = u.w;
    return;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = col + i < end ? row[col + i] : 0.f;
}

template <typename T>
__device__ __forceinline__ void load4(const T* row, int64_t col, int64_t end, bool vec, float (&v)[4]) {
  if (vec && col + 4 <= end) {
    const uint2 u = *reinterpret_cast<const uint2*>(row + col);
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = to_float(e[i]);
    return;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) v[i] = col + i < end ? to_float(row[col + i]) : 0.f;
}

// out[0], out[1] = a, b (out[1] only when `two`); one 2-element store when `pair` allows.
template <typename T>
__device__ __forceinline__ void store2(T* out, float a, float b, bool two, bool pair) {
  if (two && pair) {
    if constexpr (std::is_same<T, float>::value) {
      *reinterpret_cast<float2*>(out) = make_float2(a, b);
    } else {
      *reinterpret_cast<uint32_t*>(out) = pack2<T>(a, b);
    }
    return;
  }
  out[0] = from_float<T>(a);
  if (two) out[1] = from_float<T>(b);
}

// Stage rows [t0, t0 + ROWS) x columns [c0, c0 + COLS) of X (row stride x_sm, columns < c_end,
// rows < t_end) as fp32 with the dropout mask applied, into sX (leading dimension LD).
template <typename TX, int ROWS, int COLS, int LD, int THREADS>
__device__ __forceinline__ void stage_x(float* sX, const TX* X, int64_t x_sm, bool vec, int64_t t0,
                                        int64_t t_end, int64_t c0, int64_t c_end, const Mask& mask) {
  constexpr int G = COLS / 4;
#pragma unroll 2
  for (int e = threadIdx.x; e < ROWS * G; e += THREADS) {
    const int r = e / G, c = (e % G) * 4;
    const int64_t row = t0 + r, col = c0 + c;
    float v[4] = {0.f, 0.f, 0.f, 0.f};
    if (row < t_end && col < c_end) {
      load4<TX>(X + row * x_sm, col, c_end, vec, v);
      if (mask.on) {
        const uint32_t keep = mask.nibble(row, col);
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] = (keep >> i) & 1u ? v[i] : 0.f;
      }
    }
    *reinterpret_cast<float4*>(sX + r * LD + c) = make_float4(v[0], v[1], v[2], v[3]);
  }
}

// ------------------------------------------------------------------ shrink
constexpr int SH_THREADS = 128, SH_BM = 64, SH_BK = 64, SH_LD = SH_BK + 4;

template <int NR>
struct ShrinkSmem {
  static constexpr size_t x = 0;                                         // SH_BM x SH_LD
  static constexpr size_t a = x + size_t(SH_BM) * SH_LD * 4;             // 16 NR x SH_LD
  static constexpr size_t bytes = a + size_t(16 * NR) * SH_LD * 4;
};

struct ShrinkArgs {
  const void* x = nullptr; int64_t x_sm = 0; bool x_vec = false;  // (T, in), unit column stride
  const float* A = nullptr; int a_terms = 3;      // (r, in) contiguous; bf16 terms of its values
  float* out = nullptr; int64_t out_split = 0;    // out + split * out_split: (T, r) contiguous
  int64_t T = 0, in = 0, k_per_split = SH_BK;     // k_per_split: a multiple of SH_BK
  int r = 0;
  float alpha = 1.f;
  Mask mask;
};

// grid (ceil(T / 64), splits, ceil(r / 16 NR)); warp w: rows 16w .. +15, all 16 NR ranks.
template <typename TX, int NR>
__global__ void __launch_bounds__(SH_THREADS) lora_shrink_kernel(const ShrinkArgs a) {
  constexpr int NX = Terms<TX>::value, RC = 16 * NR;
  LK_DYNAMIC_SMEM(smem);
  float* sX = reinterpret_cast<float*>(smem + ShrinkSmem<NR>::x);
  float* sA = reinterpret_cast<float*>(smem + ShrinkSmem<NR>::a);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * SH_BM;
  const int j0 = blockIdx.z * RC;
  const int64_t kb = blockIdx.y * a.k_per_split;
  const int64_t ke = kb + a.k_per_split < a.in ? kb + a.k_per_split : a.in;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const TX* X = static_cast<const TX*>(a.x);

  float acc[2 * NR][4];
#pragma unroll
  for (int nt = 0; nt < 2 * NR; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

  for (int64_t k0 = kb; k0 < ke; k0 += SH_BK) {
    stage_x<TX, SH_BM, SH_BK, SH_LD, SH_THREADS>(sX, X, a.x_sm, a.x_vec, m0, a.T, k0, ke, a.mask);
    for (int e = threadIdx.x; e < RC * SH_BK; e += SH_THREADS) {
      const int j = e / SH_BK, c = e % SH_BK;
      sA[j * SH_LD + c] = (j0 + j < a.r && k0 + c < ke) ? a.A[(j0 + j) * a.in + k0 + c] : 0.f;
    }
    __syncthreads();
    const auto fx = [&](int r, int k) { return sX[r * SH_LD + k]; };
    const auto fa = [&](int k, int n) { return sA[n * SH_LD + k]; };  // A^T (k = column, n = rank)
#pragma unroll
    for (int kk = 0; kk < SH_BK / 16; ++kk) {
      uint32_t af[NX][4];
      load_a_split<NX>(af, fx, warp * 16, kk * 16, g, t);
#pragma unroll
      for (int nt = 0; nt < 2 * NR; ++nt) {
        uint32_t bf[3][2];
        load_b_split<3>(bf, fa, kk * 16, nt * 8, g, t);
        mma_split<NX, 3, 2>(acc[nt], af, bf, a.a_terms);
      }
    }
    __syncthreads();
  }

  float* out = a.out + blockIdx.y * a.out_split;
#pragma unroll
  for (int nt = 0; nt < 2 * NR; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t row = m0 + warp * 16 + g + 8 * (e >> 1);
      const int col = j0 + nt * 8 + 2 * t + (e & 1);
      if (row < a.T && col < a.r) out[row * a.r + col] = a.alpha * acc[nt][e];
    }
  }
}

// ------------------------------------------------------------------ expand
constexpr int EX_THREADS = 128, EX_BM = 64, EX_BN = 128, EX_RK = 32, EX_LD = EX_RK + 4;
constexpr int EX_WORDS = EX_BN / 32;  // mask words per tile row

struct ExpandSmem {
  static constexpr size_t l = 0;                                    // EX_BM x EX_LD
  static constexpr size_t r = l + size_t(EX_BM) * EX_LD * 4;        // EX_BN x EX_LD ([n][j])
  static constexpr size_t bits = r + size_t(EX_BN) * EX_LD * 4;     // EX_BM x EX_WORDS
  static constexpr size_t bytes = bits + size_t(EX_BM) * EX_WORDS * 4;
};

struct ExpandArgs {
  const float* L = nullptr;                            // (M, r) contiguous
  const float* R = nullptr; int64_t r_sj = 0, r_sn = 0;  // R(j, n) = R[j * r_sj + n * r_sn], (r, N)
  int r_terms = 3;
  const void* bias = nullptr;                          // (N,) in the output dtype, or null
  void* out = nullptr;                                 // (M, N) contiguous
  uint32_t* bits_out = nullptr; int64_t words_per_row = 0;  // the mask written bit-packed, or null
  int64_t M = 0, N = 0;
  int r = 0;
  float alpha = 1.f;
  Mask mask;                                           // Philox (or off)
};

// grid (ceil(M / 64), ceil(N / 128)); warp w: rows 16w .. +15, all 128 columns.
template <typename TY>
__global__ void __launch_bounds__(EX_THREADS) lora_expand_kernel(const ExpandArgs a) {
  constexpr int ORDER = std::is_same<TY, float>::value ? 2 : 1;
  LK_DYNAMIC_SMEM(smem);
  float* sL = reinterpret_cast<float*>(smem + ExpandSmem::l);
  float* sR = reinterpret_cast<float*>(smem + ExpandSmem::r);
  uint32_t* sBits = reinterpret_cast<uint32_t*>(smem + ExpandSmem::bits);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * EX_BM, n0 = static_cast<int64_t>(blockIdx.y) * EX_BN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;

  float acc[EX_BN / 8][4];
#pragma unroll
  for (int nt = 0; nt < EX_BN / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

  for (int j0 = 0; j0 < a.r; j0 += EX_RK) {
    for (int e = threadIdx.x; e < EX_BM * EX_RK; e += EX_THREADS) {
      const int m = e / EX_RK, j = e % EX_RK;
      sL[m * EX_LD + j] = (m0 + m < a.M && j0 + j < a.r) ? a.L[(m0 + m) * a.r + j0 + j] : 0.f;
    }
    for (int e = threadIdx.x; e < EX_BN * EX_RK; e += EX_THREADS) {
      const int n = e / EX_RK, j = e % EX_RK;
      sR[n * EX_LD + j] =
          (n0 + n < a.N && j0 + j < a.r) ? a.R[(j0 + j) * a.r_sj + (n0 + n) * a.r_sn] : 0.f;
    }
    __syncthreads();
    const auto fl = [&](int m, int k) { return sL[m * EX_LD + k]; };
    const auto fr = [&](int k, int n) { return sR[n * EX_LD + k]; };
#pragma unroll
    for (int kk = 0; kk < EX_RK / 16; ++kk) {
      if (j0 + kk * 16 >= a.r) break;  // uniform
      uint32_t af[3][4];
      load_a_split<3>(af, fl, warp * 16, kk * 16, g, t);
#pragma unroll
      for (int nt = 0; nt < EX_BN / 8; ++nt) {
        uint32_t bf[3][2];
        load_b_split<3>(bf, fr, kk * 16, nt * 8, g, t);
        mma_split<3, 3, ORDER>(acc[nt], af, bf, a.r_terms);
      }
    }
    __syncthreads();
  }

  // The tile's mask: one 32-column word per (row, word), eight Philox calls each.
  if (a.mask.on) {
    for (int e = threadIdx.x; e < EX_BM * EX_WORDS; e += EX_THREADS) {
      const int r = e / EX_WORDS, w = e % EX_WORDS;
      const int64_t row = m0 + r, col = n0 + w * 32;
      uint32_t word = 0;
      for (int q = 0; q < 8; ++q) word |= a.mask.nibble(row, col + 4 * q) << (4 * q);
      sBits[e] = word;
      if (a.bits_out != nullptr && row < a.M && col < a.N)
        a.bits_out[row * a.words_per_row + (col >> 5)] = word;
    }
    __syncthreads();
  }

  TY* out = static_cast<TY*>(a.out);
  const TY* bias = static_cast<const TY*>(a.bias);
  const bool pair = (a.N % 2) == 0;
#pragma unroll
  for (int nt = 0; nt < EX_BN / 8; ++nt) {
    const int cl = nt * 8 + 2 * t;  // tile column of this thread's pair
    const int64_t col = n0 + cl;
    if (col >= a.N) continue;
    const bool two = col + 1 < a.N;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int rl = warp * 16 + g + 8 * h;
      const int64_t row = m0 + rl;
      if (row >= a.M) continue;
      float v0 = a.alpha * acc[nt][2 * h], v1 = a.alpha * acc[nt][2 * h + 1];
      if (a.mask.on) {
        const uint32_t word = sBits[rl * EX_WORDS + (cl >> 5)];
        if (!((word >> (cl & 31)) & 1u)) v0 = 0.f;
        if (!((word >> ((cl + 1) & 31)) & 1u)) v1 = 0.f;
      }
      if (bias != nullptr) {
        v0 += to_float(bias[col]);
        if (two) v1 += to_float(bias[col + 1]);
      }
      store2<TY>(out + row * a.N + col, v0, v1, two, pair);
    }
  }
}

// ------------------------------------------------------------------ sweep
constexpr int SW_THREADS = 256, SW_BM = 32, SW_BC = 256, SW_LDX = SW_BC + 4;

template <int NR>
struct SweepSmem {
  static constexpr int LDL = 16 * NR + 4;
  static constexpr size_t x = 0;                                        // SW_BM x SW_LDX
  static constexpr size_t l = x + size_t(SW_BM) * SW_LDX * 4;           // SW_BM x LDL
  static constexpr size_t r = l + size_t(SW_BM) * LDL * 4;              // 16 NR x SW_LDX ([j][c])
  static constexpr size_t bytes_cols_only = r;
  static constexpr size_t bytes = r + size_t(16 * NR) * SW_LDX * 4;
};

struct SweepArgs {
  const void* X = nullptr; int64_t x_sm = 0; bool x_vec = false;  // (T, C), unit column stride
  const float* L = nullptr;        // (T, r) contiguous: right factor of the column sums
  float* ws_cols = nullptr;        // column sums at [ts, c, j] with the strides below, or null
  int64_t wc_split = 0, wc_sc = 0, wc_sj = 0;
  float alpha_cols = 1.f;
  const float* R = nullptr;        // R(c, j) = R[c * r_sc + j * r_sj], (C, r): row products, or null
  int64_t r_sc = 0, r_sj = 0;
  int r_terms = 3;
  float* ws_rows = nullptr;        // row products: ws_rows + column block * wr_split, (T, r)
  int64_t wr_split = 0;
  float alpha_rows = 1.f;
  int64_t T = 0, C = 0, t_per_split = SW_BM;  // t_per_split: a multiple of SW_BM
  int r = 0;
  Mask mask;
};

// grid (ceil(C / 256), row splits, ceil(r / 16 NR)). Warp w: column sums of columns
// 32w .. +31 (2 m-tiles) x all 16 NR ranks; row products: tiles w and w + 8 of the
// (2 m-tiles x 2 NR n-tiles) of a 32-row step.
template <typename TX, int NR>
__global__ void __launch_bounds__(SW_THREADS) lora_sweep_kernel(const SweepArgs a) {
  constexpr int NX = Terms<TX>::value, RC = 16 * NR, LDL = SweepSmem<NR>::LDL;
  constexpr int ROW_TILES = 4 * NR;  // 2 m-tiles x 2 NR n-tiles of the row products
  LK_DYNAMIC_SMEM(smem);
  float* sX = reinterpret_cast<float*>(smem + SweepSmem<NR>::x);
  float* sL = reinterpret_cast<float*>(smem + SweepSmem<NR>::l);
  float* sR = reinterpret_cast<float*>(smem + SweepSmem<NR>::r);
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * SW_BC;
  const int j0 = blockIdx.z * RC;
  const int64_t tb = blockIdx.y * a.t_per_split;
  const int64_t te = tb + a.t_per_split < a.T ? tb + a.t_per_split : a.T;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const bool cols = a.ws_cols != nullptr, rows = a.ws_rows != nullptr;
  const TX* X = static_cast<const TX*>(a.X);

  if (rows) {
    for (int e = threadIdx.x; e < RC * SW_BC; e += SW_THREADS) {
      const int j = e / SW_BC, c = e % SW_BC;
      sR[j * SW_LDX + c] =
          (j0 + j < a.r && c0 + c < a.C) ? a.R[(c0 + c) * a.r_sc + (j0 + j) * a.r_sj] : 0.f;
    }
  }
  float acc[2][2 * NR][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 2 * NR; ++nt) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.f;

  const auto fx = [&](int m, int c) { return sX[m * SW_LDX + c]; };
  const auto fxt = [&](int c, int m) { return sX[m * SW_LDX + c]; };  // X^T
  const auto fl = [&](int m, int j) { return sL[m * LDL + j]; };
  const auto fr = [&](int c, int j) { return sR[j * SW_LDX + c]; };
  for (int64_t t0 = tb; t0 < te; t0 += SW_BM) {
    stage_x<TX, SW_BM, SW_BC, SW_LDX, SW_THREADS>(sX, X, a.x_sm, a.x_vec, t0, te, c0, a.C, a.mask);
    if (cols) {
      for (int e = threadIdx.x; e < SW_BM * RC; e += SW_THREADS) {
        const int m = e / RC, j = e % RC;
        sL[m * LDL + j] = (t0 + m < te && j0 + j < a.r) ? a.L[(t0 + m) * a.r + j0 + j] : 0.f;
      }
    }
    __syncthreads();
    if (cols) {  // (C, r) += X^T L over this step's 32 rows
#pragma unroll
      for (int ks = 0; ks < SW_BM / 16; ++ks) {
        uint32_t af[2][NX][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) load_a_split<NX>(af[mt], fxt, warp * 32 + mt * 16, ks * 16, g, t);
#pragma unroll
        for (int nt = 0; nt < 2 * NR; ++nt) {
          uint32_t bf[3][2];
          load_b_split<3>(bf, fl, ks * 16, nt * 8, g, t);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) mma_split<NX, 3, 2>(acc[mt][nt], af[mt], bf, 3);
        }
      }
    }
    if (rows) {  // (32, r) = X R over this block's 256 columns
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int tile = warp + 8 * q;
        if (tile >= ROW_TILES) break;  // uniform per warp
        const int mt = tile % 2, nt = tile / 2;
        float c4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
        for (int ks = 0; ks < SW_BC / 16; ++ks) {
          uint32_t af[NX][4], bf[3][2];
          load_a_split<NX>(af, fx, mt * 16, ks * 16, g, t);
          load_b_split<3>(bf, fr, ks * 16, nt * 8, g, t);
          mma_split<NX, 3, 2>(c4, af, bf, a.r_terms);
        }
        float* out = a.ws_rows + blockIdx.x * a.wr_split;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t row = t0 + mt * 16 + g + 8 * (e >> 1);
          const int col = j0 + nt * 8 + 2 * t + (e & 1);
          if (row < te && col < a.r) out[row * a.r + col] = a.alpha_rows * c4[e];
        }
      }
    }
    __syncthreads();
  }

  if (!cols) return;
  float* out = a.ws_cols + blockIdx.y * a.wc_split;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < 2 * NR; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t c = c0 + warp * 32 + mt * 16 + g + 8 * (e >> 1);
        const int j = j0 + nt * 8 + 2 * t + (e & 1);
        if (c < a.C && j < a.r) out[c * a.wc_sc + j * a.wc_sj] = a.alpha_cols * acc[mt][nt][e];
      }
}

// ------------------------------------------------------------------ partial sums
// out[e] = alpha * sum over k < n of ws[k * numel + e], k in increasing order.
__global__ void __launch_bounds__(256) reduce_partials_kernel(const float* ws, int n, int64_t numel,
                                                              float alpha, float* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < numel; e += stride) {
    float s = 0.f;
    for (int k = 0; k < n; ++k) s += ws[k * numel + e];
    out[e] = alpha * s;
  }
}

// ------------------------------------------------------------------ launchers
inline int rank_groups(int r) { return r <= 16 ? 1 : r <= 32 ? 2 : 4; }  // NR: 16 NR ranks per block

template <typename F>
inline void with_nr(int nr, F&& f) {
  if (nr == 1) f(std::integral_constant<int, 1>());
  else if (nr == 2) f(std::integral_constant<int, 2>());
  else f(std::integral_constant<int, 4>());
}

inline void launch_reduce(const float* ws, int n, int64_t numel, float alpha, float* out,
                          cudaStream_t stream) {
  if (numel == 0) return;
  const int blocks = static_cast<int>(ceil_div64(numel, 256) < 4096 ? ceil_div64(numel, 256) : 4096);
  launch(reduce_partials_kernel, dim3(blocks), dim3(256), 0, stream, ws, n, numel, alpha, out);
}

// How a reduction dimension is cut: `splits` pieces of `per_split` (a multiple of the tile).
struct SplitPlan {
  int splits;
  int64_t per_split;
};

inline SplitPlan plan_splits(int64_t extent, int64_t tile, int64_t blocks, int64_t min_tiles,
                             int blocks_per_sm, int sms) {
  const int64_t tiles = ceil_div64(extent > 0 ? extent : 1, tile);
  int64_t s = ceil_div64(static_cast<int64_t>(blocks_per_sm) * sms, blocks > 0 ? blocks : 1);
  const int64_t most = ceil_div64(tiles, min_tiles);
  s = s < most ? s : most;
  s = s < 1 ? 1 : s;
  const int64_t per = ceil_div64(tiles, s) * tile;
  return SplitPlan{static_cast<int>(ceil_div64(tiles * tile, per)), per};
}

// Shrink (4 warps, loads in flight per block: 8 KiB): `in` cut so that about 4 blocks per SM
// run, at least 4 column tiles per split.
inline SplitPlan shrink_plan(int64_t T, int64_t in, int r, int sms) {
  const int64_t blocks = ceil_div64(T, SH_BM) * ceil_div64(r, 16 * rank_groups(r));
  return plan_splits(in, SH_BK, blocks, 4, 4, sms);
}

// Sweep (8 warps, 16 KiB in flight per block): T cut so that about 2 blocks per SM run.
inline SplitPlan sweep_plan(int64_t T, int64_t C, int r, int sms) {
  const int64_t blocks = ceil_div64(C, SW_BC) * ceil_div64(r, 16 * rank_groups(r));
  return plan_splits(T, SW_BM, blocks, 1, 2, sms);
}

inline int sweep_col_blocks(int64_t C) { return ceil_div(C, SW_BC); }

// a.k_per_split from shrink_plan; a.out: the result (splits == 1) or splits partials.
template <typename TX>
void launch_shrink(const ShrinkArgs& a, int splits, cudaStream_t stream) {
  if (a.T == 0 || a.r == 0) return;
  with_nr(rank_groups(a.r), [&](auto NR) {
    const dim3 grid(ceil_div(a.T, SH_BM), splits, ceil_div(a.r, 16 * NR.value));
    launch(lora_shrink_kernel<TX, NR.value>, grid, dim3(SH_THREADS), ShrinkSmem<NR.value>::bytes,
           stream, a);
  });
}

template <typename TY>
void launch_expand(const ExpandArgs& a, cudaStream_t stream) {
  if (a.M == 0 || a.N == 0) return;
  const dim3 grid(ceil_div(a.M, EX_BM), ceil_div(a.N, EX_BN));
  launch(lora_expand_kernel<TY>, grid, dim3(EX_THREADS), ExpandSmem::bytes, stream, a);
}

// a.t_per_split from sweep_plan; a.ws_cols: the result (splits == 1) or splits partials;
// a.ws_rows: the result (one column block) or sweep_col_blocks(C) partials.
template <typename TX>
void launch_sweep(const SweepArgs& a, int splits, cudaStream_t stream) {
  if (a.T == 0 || a.C == 0 || a.r == 0) return;
  with_nr(rank_groups(a.r), [&](auto NR) {
    const dim3 grid(sweep_col_blocks(a.C), splits, ceil_div(a.r, 16 * NR.value));
    const size_t smem = a.ws_rows != nullptr ? SweepSmem<NR.value>::bytes
                                             : SweepSmem<NR.value>::bytes_cols_only;
    launch(lora_sweep_kernel<TX, NR.value>, grid, dim3(SW_THREADS), smem, stream, a);
  });
}

}  // namespace lora
}  // namespace lora_kernels
