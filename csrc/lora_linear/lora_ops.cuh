// The LoRA ops on raw pointers, shared by the ATen entry points (lora_linear.cu) and the CPU
// emulator's driver: split plans, partial sums and the dropout-mask hand-over live here once.
// Adapters are fp32 and contiguous (a_terms / b_terms: bf16 terms of their original dtype);
// X, dY have a unit column stride. Sizes are positive (callers handle empty tensors).
// `Scratch` hands out temporary buffers, `float* floats(n)` and `uint32_t* words(n)`, that stay
// valid until the launched work is done.
#pragma once

#include "lora_kernels.cuh"

namespace lora_kernels {
namespace lora {

inline Mask philox_mask(double p, int64_t seed) {
  Mask m;
  m.on = p > 0.0;
  m.seed = static_cast<uint64_t>(seed);
  m.threshold = dropout_threshold(p);
  return m;
}

// s (T, r) = dropout(x) A^T / (1 - p).
template <typename TX, typename Scratch>
void shrink(const TX* x, int64_t x_sm, bool x_vec, const float* A, int a_terms, float* s,
            int64_t T, int64_t in, int r, double p, int64_t seed, int sms, Scratch& scratch,
            cudaStream_t stream) {
  const SplitPlan plan = shrink_plan(T, in, r, sms);
  const float alpha = static_cast<float>(1.0 / (1.0 - p));
  ShrinkArgs a;
  a.x = x; a.x_sm = x_sm; a.x_vec = x_vec;
  a.A = A; a.a_terms = a_terms;
  a.out = plan.splits > 1 ? scratch.floats(plan.splits * T * r) : s;
  a.out_split = T * r;
  a.T = T; a.in = in; a.k_per_split = plan.per_split; a.r = r;
  a.alpha = plan.splits > 1 ? 1.f : alpha;
  a.mask = philox_mask(p, seed);
  launch_shrink<TX>(a, plan.splits, stream);
  if (plan.splits > 1) launch_reduce(a.out, plan.splits, T * r, alpha, s, stream);
}

// y (T, out) = scaling s B^T + bias (bias may be null).
template <typename TY>
void expand(const float* s, const float* B, int b_terms, const TY* bias, TY* y, int64_t T,
            int64_t out, int r, float scaling, cudaStream_t stream) {
  ExpandArgs a;
  a.L = s;
  a.R = B; a.r_sj = 1; a.r_sn = r;  // R(j, n) = B[n, j]
  a.r_terms = b_terms;
  a.bias = bias;
  a.out = y;
  a.M = T; a.N = out; a.r = r;
  a.alpha = scaling;
  launch_expand<TY>(a, stream);
}

// ds (T, r) = scaling dY B and, when db is not null, db (out, r) = scaling dY^T s: one pass.
template <typename TY, typename Scratch>
void grad_s_b(const TY* dy, int64_t dy_sm, bool dy_vec, const float* s, const float* B,
              int b_terms, float* ds, float* db, int64_t T, int64_t out, int r, float scaling,
              int sms, Scratch& scratch, cudaStream_t stream) {
  const SplitPlan plan = sweep_plan(T, out, r, sms);
  const int col_blocks = sweep_col_blocks(out);
  SweepArgs a;
  a.X = dy; a.x_sm = dy_sm; a.x_vec = dy_vec;
  a.L = s;
  if (db != nullptr) {
    a.ws_cols = plan.splits > 1 ? scratch.floats(plan.splits * out * r) : db;
    a.wc_split = out * r; a.wc_sc = r; a.wc_sj = 1;
    a.alpha_cols = plan.splits > 1 ? 1.f : scaling;
  }
  a.R = B; a.r_sc = r; a.r_sj = 1;  // R(c, j) = B[c, j]
  a.r_terms = b_terms;
  a.ws_rows = col_blocks > 1 ? scratch.floats(col_blocks * T * r) : ds;
  a.wr_split = T * r;
  a.alpha_rows = col_blocks > 1 ? 1.f : scaling;
  a.T = T; a.C = out; a.t_per_split = plan.per_split; a.r = r;
  launch_sweep<TY>(a, plan.splits, stream);
  if (col_blocks > 1) launch_reduce(a.ws_rows, col_blocks, T * r, scaling, ds, stream);
  if (db != nullptr && plan.splits > 1)
    launch_reduce(a.ws_cols, plan.splits, out * r, scaling, db, stream);
}

// dx (T, in) = mask o (ds A) / (1 - p) when dx is not null; da (r, in) = ds^T dropout(x) /
// (1 - p) when da is not null. The mask is generated once: by the dx kernel, which writes it
// bit-packed for the dA kernel when both are wanted.
template <typename TX, typename Scratch>
void grad_x_a(const float* ds, const TX* x, int64_t x_sm, bool x_vec, const float* A,
              int a_terms, TX* dx, float* da, int64_t T, int64_t in, int r, double p,
              int64_t seed, int sms, Scratch& scratch, cudaStream_t stream) {
  const float inv_keep = static_cast<float>(1.0 / (1.0 - p));
  const Mask philox = philox_mask(p, seed);
  const int64_t words = ceil_div64(in, 32);
  uint32_t* bits = dx != nullptr && da != nullptr && philox.on ? scratch.words(T * words) : nullptr;
  if (dx != nullptr) {
    ExpandArgs e;
    e.L = ds;
    e.R = A; e.r_sj = in; e.r_sn = 1;  // R(j, n) = A[j, n]
    e.r_terms = a_terms;
    e.out = dx;
    e.bits_out = bits; e.words_per_row = words;
    e.M = T; e.N = in; e.r = r;
    e.alpha = inv_keep;
    e.mask = philox;
    launch_expand<TX>(e, stream);
  }
  if (da != nullptr) {
    const SplitPlan plan = sweep_plan(T, in, r, sms);
    SweepArgs a;
    a.X = x; a.x_sm = x_sm; a.x_vec = x_vec;
    a.L = ds;
    a.ws_cols = plan.splits > 1 ? scratch.floats(plan.splits * r * in) : da;
    a.wc_split = r * in; a.wc_sc = 1; a.wc_sj = in;  // column sums (in, r) stored as dA (r, in)
    a.alpha_cols = plan.splits > 1 ? 1.f : inv_keep;
    a.T = T; a.C = in; a.t_per_split = plan.per_split; a.r = r;
    a.mask = philox;
    if (bits != nullptr) {
      a.mask.bits = bits;
      a.mask.words_per_row = words;
    }
    launch_sweep<TX>(a, plan.splits, stream);
    if (plan.splits > 1) launch_reduce(a.ws_cols, plan.splits, r * in, inv_keep, da, stream);
  }
}

}  // namespace lora
}  // namespace lora_kernels
