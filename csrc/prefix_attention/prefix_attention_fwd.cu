// ATen entry point of the prefix_attention forward (kernel: attention_fwd.cuh).

#include "attention_fwd.cuh"
#include "attention_host.h"

#include <ATen/ops/empty.h>

#include <tuple>

namespace lora_kernels {

// out (B, Hq, Lq, D) in q's dtype, lse (B, Hq, Lq) float32.
std::tuple<at::Tensor, at::Tensor> prefix_attention_fwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& prefix_k_in, const at::Tensor& prefix_v_in,
    const c10::optional<at::Tensor>& key_padding_mask, bool causal, double scale) {
  using namespace attn;
  constexpr const char* op = "prefix_attention_fwd";
  Params p{};
  check_and_fill(op, q_in, k_in, v_in, prefix_k_in, prefix_v_in, key_padding_mask, causal, scale,
                 p);
  check_devices(op, {{"q", &q_in}, {"k", &k_in}, {"v", &v_in}, {"prefix_k", &prefix_k_in},
                     {"prefix_v", &prefix_v_in}});
  if (key_padding_mask.has_value())
    check_devices(op, {{"q", &q_in}, {"key_padding_mask", &*key_padding_mask}});
  const c10::cuda::CUDAGuard guard(q_in.device());
  const auto q = with_aligned_rows(q_in), k = with_aligned_rows(k_in),
             v = with_aligned_rows(v_in), pk = with_aligned_rows(prefix_k_in),
             pv = with_aligned_rows(prefix_v_in);
  fill_pointers(q, k, v, pk, pv, p);
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  p.out = out.data_ptr(); p.o_sb = out.stride(0); p.o_sh = out.stride(1); p.o_sl = out.stride(2);
  p.lse = lse.data_ptr<float>();
  const int64_t D = q.size(3);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  LK_DISPATCH_HALF(q.scalar_type(), T, op, [&] {
    if (D == 64) launch_fwd<T, 64>(p, stream);
    else launch_fwd<T, 128>(p, stream);
  });
  return {out, lse};
}

}  // namespace lora_kernels
