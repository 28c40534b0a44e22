// ATen entry point of the prefix_attention backward (kernels: attention_bwd.cuh).

#include "attention_bwd.cuh"
#include "attention_host.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <tuple>

namespace lora_kernels {

// (dq, dk, dv, dprefix_k, dprefix_v), each with its input's shape and dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_bwd(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& prefix_k_in, const at::Tensor& prefix_v_in,
    const c10::optional<at::Tensor>& key_padding_mask, const at::Tensor& out_in,
    const at::Tensor& lse_in, bool causal, double scale) {
  using namespace attn;
  constexpr const char* op = "prefix_attention_bwd";
  Params p{};
  check_and_fill(op, q_in, k_in, v_in, prefix_k_in, prefix_v_in, key_padding_mask, causal, scale,
                 p);
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && dout_in.scalar_type() == q_in.scalar_type(), op,
              ": dout must have q's shape ", shape_str(q_in), " and dtype ",
              dtype_str(q_in.scalar_type()), ", got ", shape_str(dout_in), " ",
              dtype_str(dout_in.scalar_type()));
  TORCH_CHECK(out_in.sizes() == q_in.sizes() && out_in.scalar_type() == q_in.scalar_type(), op,
              ": out must have q's shape ", shape_str(q_in), " and dtype ",
              dtype_str(q_in.scalar_type()), ", got ", shape_str(out_in), " ",
              dtype_str(out_in.scalar_type()));
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == q_in.size(0) &&
                  lse_in.size(1) == q_in.size(1) && lse_in.size(2) == q_in.size(2) &&
                  lse_in.scalar_type() == at::kFloat,
              op, ": lse must be float32 of shape (", q_in.size(0), ", ", q_in.size(1), ", ",
              q_in.size(2), "), got ", shape_str(lse_in), " ", dtype_str(lse_in.scalar_type()));
  check_devices(op, {{"q", &q_in}, {"k", &k_in}, {"v", &v_in}, {"prefix_k", &prefix_k_in},
                     {"prefix_v", &prefix_v_in}, {"dout", &dout_in}, {"out", &out_in},
                     {"lse", &lse_in}});
  if (key_padding_mask.has_value())
    check_devices(op, {{"q", &q_in}, {"key_padding_mask", &*key_padding_mask}});
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto q = with_aligned_rows(q_in), k = with_aligned_rows(k_in),
             v = with_aligned_rows(v_in), pk = with_aligned_rows(prefix_k_in),
             pv = with_aligned_rows(prefix_v_in), dout = with_aligned_rows(dout_in),
             out = with_aligned_rows(out_in), lse = lse_in.contiguous();
  fill_pointers(q, k, v, pk, pv, p);
  if (p.B == 0 || p.Hq == 0 || p.Lq == 0)  // no query: every gradient is zero
    return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()),
            at::zeros(v.sizes(), v.options()), at::zeros(pk.sizes(), pk.options()),
            at::zeros(pv.sizes(), pv.options())};
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  auto dpk = at::empty(pk.sizes(), pk.options());
  auto dpv = at::empty(pv.sizes(), pv.options());
  auto delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  p.out = const_cast<void*>(out.data_ptr());
  p.o_sb = out.stride(0); p.o_sh = out.stride(1); p.o_sl = out.stride(2);
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.dout = dout.data_ptr(); p.do_sb = dout.stride(0); p.do_sh = dout.stride(1);
  p.do_sl = dout.stride(2);
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr(); p.dk = dk.data_ptr(); p.dv = dv.data_ptr();
  p.dpk = dpk.data_ptr(); p.dpv = dpv.data_ptr();
  // A prefix shared by the batch: chunks of batch rows write fp32 partials, summed below in a
  // fixed order (deterministic).
  const int chunks = prefix_batch_chunks(p, sm_count());
  at::Tensor ws_k, ws_v;
  if (chunks > 1) {
    ws_k = at::empty({chunks, pk.size(1), pk.size(2), pk.size(3)}, q.options().dtype(at::kFloat));
    ws_v = at::empty({chunks, pk.size(1), pk.size(2), pk.size(3)}, q.options().dtype(at::kFloat));
  }
  const int64_t D = q.size(3);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH_HALF(q.scalar_type(), T, op, [&] {
    float* wk = chunks > 1 ? ws_k.data_ptr<float>() : nullptr;
    float* wv = chunks > 1 ? ws_v.data_ptr<float>() : nullptr;
    if (D == 64) launch_bwd<T, 64>(p, stream, chunks, wk, wv);
    else launch_bwd<T, 128>(p, stream, chunks, wk, wv);
  });
  if (chunks > 1) {
    dpk = at::sum(ws_k, {0}, /*keepdim=*/true).to(pk.scalar_type());
    dpv = at::sum(ws_v, {0}, /*keepdim=*/true).to(pv.scalar_type());
  }
  return {dq, dk, dv, dpk, dpv};
}

}  // namespace lora_kernels
