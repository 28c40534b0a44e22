// ATen entry points of lora_linear's low-rank path (kernels: lora_kernels.cuh). The base GEMMs
// are cuBLAS, called from Python (lora_kernels/cuda/lora_linear.py) with beta = 1 onto the
// buffers these ops return:
//
//   forward:  S = lora_shrink(x, A);  y = lora_expand(S, B, bias);  y += x W^T
//   backward: dS, dB = lora_grad_s_b(dY, S, B);  dx, dA = lora_grad_x_a(dS, x, A);  dx += dY W
//
// Adapters (small) are converted to fp32 once per call; the kernels split them into as many
// bf16 terms as their dtype needs. Reductions over a split dimension write fp32 partials that
// reduce_partials_kernel sums in a fixed order (deterministic, no atomics).

#include "../common.h"
#include "lora_ops.cuh"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <tuple>
#include <vector>

namespace lora_kernels {
namespace {

using namespace lora;

// bf16 terms that reproduce a value of this dtype exactly.
int terms_of(at::ScalarType t) {
  return t == at::kBFloat16 ? 1 : t == at::kHalf ? 2 : 3;
}

// t (2-D) with a unit column stride (a copy only when it has another).
at::Tensor unit_col_stride(const at::Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

// Rows can be read four elements at a time.
bool rows_vec4(const at::Tensor& t) {
  const int64_t bytes = 4 * static_cast<int64_t>(t.element_size());
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0 &&
         (t.size(0) <= 1 || t.stride(0) % 4 == 0);
}

at::Tensor as_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

void check_dropout(const char* op, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
}

float* f32(const at::Tensor& t) { return t.data_ptr<float>(); }

// Temporary buffers for lora_ops.cuh, freed when the op returns (the caching allocator keeps
// them for the stream's pending work).
struct Scratch {
  at::TensorOptions options;
  std::vector<at::Tensor> held;
  float* floats(int64_t n) {
    held.push_back(at::empty({n}, options.dtype(at::kFloat)));
    return held.back().data_ptr<float>();
  }
  uint32_t* words(int64_t n) {
    held.push_back(at::empty({n}, options.dtype(at::kInt)));
    return reinterpret_cast<uint32_t*>(held.back().data_ptr<int32_t>());
  }
};

}  // namespace

// S (T, r) float32 = dropout(x) A^T / (1 - p).
at::Tensor lora_shrink(const at::Tensor& x_in, const at::Tensor& lora_A, double dropout_p,
                       int64_t seed) {
  constexpr const char* op = "lora_shrink";
  LK_CHECK_DIM("lora_shrink", "x", x_in, 2);
  LK_CHECK_DIM("lora_shrink", "lora_A", lora_A, 2);
  LK_CHECK_FLOAT("lora_shrink", "x", x_in);
  LK_CHECK_FLOAT("lora_shrink", "lora_A", lora_A);
  LK_CHECK_SIZE("lora_shrink", "lora_A", lora_A, 1, x_in.size(1), "in_features (x.size(1))");
  check_dropout(op, dropout_p);
  LK_CHECK_CUDA("lora_shrink", "x", x_in);
  LK_CHECK_SAME_DEVICE("lora_shrink", "lora_A", lora_A, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = unit_col_stride(x_in);
  const auto a32 = as_f32(lora_A);
  const int64_t T = x.size(0), in = x.size(1), r = lora_A.size(0);
  auto s = at::empty({T, r}, x.options().dtype(at::kFloat));
  if (T == 0 || r == 0) return s;
  if (in == 0) return s.zero_();
  Scratch scratch{x.options()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH_FLOAT(x.scalar_type(), TX, op, [&] {
    shrink<TX>(static_cast<const TX*>(x.data_ptr()), x.stride(0), rows_vec4(x), f32(a32),
               terms_of(lora_A.scalar_type()), f32(s), T, in, static_cast<int>(r), dropout_p, seed,
               sm_count(), scratch, stream);
  });
  return s;
}

// (T, out) in out_dtype = scaling * S B^T + bias: the forward's LoRA term, onto which the caller
// adds x W^T (cuBLAS, beta = 1).
at::Tensor lora_expand(const at::Tensor& s_in, const at::Tensor& lora_B,
                       const c10::optional<at::Tensor>& bias, double scaling,
                       at::ScalarType out_dtype) {
  constexpr const char* op = "lora_expand";
  LK_CHECK_DIM("lora_expand", "s", s_in, 2);
  LK_CHECK_DIM("lora_expand", "lora_B", lora_B, 2);
  LK_CHECK_DTYPE("lora_expand", "s", s_in, at::kFloat);
  LK_CHECK_FLOAT("lora_expand", "lora_B", lora_B);
  LK_CHECK_SIZE("lora_expand", "lora_B", lora_B, 1, s_in.size(1), "rank (s.size(1))");
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16, op,
              ": out_dtype must be float32, float16 or bfloat16, got ", dtype_str(out_dtype));
  if (bias.has_value()) {
    LK_CHECK_DIM("lora_expand", "bias", *bias, 1);
    LK_CHECK_SIZE("lora_expand", "bias", *bias, 0, lora_B.size(0), "out_features (lora_B.size(0))");
    LK_CHECK_DTYPE("lora_expand", "bias", *bias, out_dtype);
  }
  LK_CHECK_CUDA("lora_expand", "s", s_in);
  LK_CHECK_SAME_DEVICE("lora_expand", "lora_B", lora_B, s_in);
  if (bias.has_value()) LK_CHECK_SAME_DEVICE("lora_expand", "bias", *bias, s_in);
  const c10::cuda::CUDAGuard guard(s_in.device());
  const auto s = s_in.contiguous();
  const auto b32 = as_f32(lora_B);
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t T = s.size(0), out = lora_B.size(0), r = s.size(1);
  auto y = at::empty({T, out}, s.options().dtype(out_dtype));
  if (T == 0 || out == 0) return y;
  if (r == 0) {  // no LoRA term: the bias alone
    if (bias_c.defined()) y.copy_(bias_c.unsqueeze(0).expand({T, out}));
    else y.zero_();
    return y;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH_FLOAT(out_dtype, TY, op, [&] {
    expand<TY>(f32(s), f32(b32), terms_of(lora_B.scalar_type()),
               bias_c.defined() ? static_cast<const TY*>(bias_c.data_ptr()) : nullptr,
               static_cast<TY*>(y.data_ptr()), T, out, static_cast<int>(r),
               static_cast<float>(scaling), stream);
  });
  return y;
}

// dS (T, r) = scaling * dY B and, when need_dB, dB (out, r) = scaling * dY^T S: one pass over dY.
std::tuple<at::Tensor, at::Tensor> lora_grad_s_b(const at::Tensor& dy_in, const at::Tensor& s_in,
                                                 const at::Tensor& lora_B, double scaling,
                                                 bool need_dB) {
  constexpr const char* op = "lora_grad_s_b";
  LK_CHECK_DIM("lora_grad_s_b", "dy", dy_in, 2);
  LK_CHECK_DIM("lora_grad_s_b", "s", s_in, 2);
  LK_CHECK_DIM("lora_grad_s_b", "lora_B", lora_B, 2);
  LK_CHECK_FLOAT("lora_grad_s_b", "dy", dy_in);
  LK_CHECK_DTYPE("lora_grad_s_b", "s", s_in, at::kFloat);
  LK_CHECK_FLOAT("lora_grad_s_b", "lora_B", lora_B);
  LK_CHECK_SIZE("lora_grad_s_b", "s", s_in, 0, dy_in.size(0), "tokens (dy.size(0))");
  LK_CHECK_SIZE("lora_grad_s_b", "lora_B", lora_B, 0, dy_in.size(1), "out_features (dy.size(1))");
  LK_CHECK_SIZE("lora_grad_s_b", "lora_B", lora_B, 1, s_in.size(1), "rank (s.size(1))");
  LK_CHECK_CUDA("lora_grad_s_b", "dy", dy_in);
  LK_CHECK_SAME_DEVICE("lora_grad_s_b", "s", s_in, dy_in);
  LK_CHECK_SAME_DEVICE("lora_grad_s_b", "lora_B", lora_B, dy_in);
  const c10::cuda::CUDAGuard guard(dy_in.device());
  const auto dy = unit_col_stride(dy_in);
  const auto s = s_in.contiguous();
  const auto b32 = as_f32(lora_B);
  const int64_t T = dy.size(0), out = dy.size(1), r = s.size(1);
  const auto f32opts = dy.options().dtype(at::kFloat);
  if (T == 0 || out == 0 || r == 0)
    return {at::zeros({T, r}, f32opts), need_dB ? at::zeros({out, r}, f32opts) : at::empty({0}, f32opts)};
  auto ds = at::empty({T, r}, f32opts);
  auto db = need_dB ? at::empty({out, r}, f32opts) : at::empty({0}, f32opts);
  Scratch scratch{dy.options()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH_FLOAT(dy.scalar_type(), TX, op, [&] {
    grad_s_b<TX>(static_cast<const TX*>(dy.data_ptr()), dy.stride(0), rows_vec4(dy), f32(s),
                 f32(b32), terms_of(lora_B.scalar_type()), f32(ds), need_dB ? f32(db) : nullptr,
                 T, out, static_cast<int>(r), static_cast<float>(scaling), sm_count(), scratch,
                 stream);
  });
  return {ds, db};
}

// dx (T, in) in x's dtype = mask o (dS A) / (1 - p) when need_dx (the caller adds dY W, cuBLAS
// beta = 1), and dA (r, in) float32 = dS^T dropout(x) / (1 - p) when need_dA; an empty tensor
// for what is not needed. The mask is generated once here (by the dx kernel, which hands it to
// the dA kernel bit-packed when both are needed).
std::tuple<at::Tensor, at::Tensor> lora_grad_x_a(const at::Tensor& ds_in, const at::Tensor& x_in,
                                                 const at::Tensor& lora_A, double dropout_p,
                                                 int64_t seed, bool need_dx, bool need_dA) {
  constexpr const char* op = "lora_grad_x_a";
  LK_CHECK_DIM("lora_grad_x_a", "ds", ds_in, 2);
  LK_CHECK_DIM("lora_grad_x_a", "x", x_in, 2);
  LK_CHECK_DIM("lora_grad_x_a", "lora_A", lora_A, 2);
  LK_CHECK_DTYPE("lora_grad_x_a", "ds", ds_in, at::kFloat);
  LK_CHECK_FLOAT("lora_grad_x_a", "x", x_in);
  LK_CHECK_FLOAT("lora_grad_x_a", "lora_A", lora_A);
  LK_CHECK_SIZE("lora_grad_x_a", "ds", ds_in, 0, x_in.size(0), "tokens (x.size(0))");
  LK_CHECK_SIZE("lora_grad_x_a", "lora_A", lora_A, 0, ds_in.size(1), "rank (ds.size(1))");
  LK_CHECK_SIZE("lora_grad_x_a", "lora_A", lora_A, 1, x_in.size(1), "in_features (x.size(1))");
  check_dropout(op, dropout_p);
  LK_CHECK_CUDA("lora_grad_x_a", "ds", ds_in);
  LK_CHECK_SAME_DEVICE("lora_grad_x_a", "x", x_in, ds_in);
  LK_CHECK_SAME_DEVICE("lora_grad_x_a", "lora_A", lora_A, ds_in);
  const c10::cuda::CUDAGuard guard(ds_in.device());
  const auto x = unit_col_stride(x_in);
  const auto ds = ds_in.contiguous();
  const auto a32 = as_f32(lora_A);
  const int64_t T = x.size(0), in = x.size(1), r = ds.size(1);
  const auto f32opts = ds.options().dtype(at::kFloat);
  at::Tensor dx = need_dx ? at::empty({T, in}, x.options()) : at::empty({0}, x.options());
  at::Tensor da = need_dA ? at::empty({r, in}, f32opts) : at::empty({0}, f32opts);
  if (T == 0 || in == 0 || r == 0) {
    if (need_dx) dx.zero_();
    if (need_dA) da.zero_();
    return {dx, da};
  }
  Scratch scratch{x.options()};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH_FLOAT(x.scalar_type(), TX, op, [&] {
    grad_x_a<TX>(f32(ds), static_cast<const TX*>(x.data_ptr()), x.stride(0), rows_vec4(x),
                 f32(a32), terms_of(lora_A.scalar_type()),
                 need_dx ? static_cast<TX*>(dx.data_ptr()) : nullptr, need_dA ? f32(da) : nullptr,
                 T, in, static_cast<int>(r), dropout_p, seed, sm_count(), scratch, stream);
  });
  return {dx, da};
}

}  // namespace lora_kernels
