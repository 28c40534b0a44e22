// Host-side argument checks and parameter set-up shared by the prefix-attention entry points.
#pragma once

#include "../common.h"
#include "attention_common.cuh"

#include <c10/util/Optional.h>

#include <initializer_list>
#include <utility>

namespace lora_kernels {
namespace attn {

inline bool rows_16b_aligned(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  if (t.size(-1) > 1 && t.stride(-1) != 1) return false;
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  return true;
}

// t itself when its last dimension is contiguous and every row starts 16-byte aligned (the
// kernels copy rows with 16-byte cp.async), else a contiguous copy. Views out of a packed QKV
// projection pass as they are.
inline at::Tensor with_aligned_rows(const at::Tensor& t) {
  return rows_16b_aligned(t) ? t : t.contiguous();
}

// Device checks, after every shape and dtype check: all on one CUDA device.
inline void check_devices(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> tensors) {
  const at::Tensor& first = *tensors.begin()->second;
  TORCH_CHECK(first.is_cuda(), op, ": ", tensors.begin()->first,
              " must be a CUDA tensor, got a tensor on ", first.device().str());
  for (const auto& [name, t] : tensors)
    TORCH_CHECK(t->device() == first.device(), op, ": ", name, " must be on ", first.device().str(),
                ", got ", t->device().str());
}

// Shape and dtype checks shared by forward and backward (devices: check_devices). Fills the
// sizes, the scalars and the key padding mask of `p`; fill_pointers does the tensors.
inline void check_and_fill(const char* op, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& prefix_k,
                           const at::Tensor& prefix_v,
                           const c10::optional<at::Tensor>& key_padding_mask, bool causal,
                           double scale, Params& p) {
  TORCH_CHECK(q.dim() == 4, op, ": q must be a 4-D tensor (B, Hq, Lq, D), got shape ", shape_str(q));
  TORCH_CHECK(k.dim() == 4, op, ": k must be a 4-D tensor (B, Hkv, Lk, D), got shape ", shape_str(k));
  TORCH_CHECK(v.dim() == 4, op, ": v must be a 4-D tensor (B, Hkv, Lk, D), got shape ", shape_str(v));
  TORCH_CHECK(prefix_k.dim() == 4, op, ": prefix_k must be a 4-D tensor (Bp, Hkv, P, D), got shape ",
              shape_str(prefix_k));
  TORCH_CHECK(prefix_v.dim() == 4, op, ": prefix_v must be a 4-D tensor (Bp, Hkv, P, D), got shape ",
              shape_str(prefix_v));
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": q must be float16 or bfloat16, got ", dtype_str(q.scalar_type()));
  const auto dt = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dt, op, ": k must have q's dtype ", dtype_str(dt), ", got ",
              dtype_str(k.scalar_type()));
  TORCH_CHECK(v.scalar_type() == dt, op, ": v must have q's dtype ", dtype_str(dt), ", got ",
              dtype_str(v.scalar_type()));
  TORCH_CHECK(prefix_k.scalar_type() == dt, op, ": prefix_k must have q's dtype ", dtype_str(dt),
              ", got ", dtype_str(prefix_k.scalar_type()));
  TORCH_CHECK(prefix_v.scalar_type() == dt, op, ": prefix_v must have q's dtype ", dtype_str(dt),
              ", got ", dtype_str(prefix_v.scalar_type()));
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  TORCH_CHECK(D == 64 || D == 128, op, ": q must have head dim 64 or 128, got ", D);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, op, ": k must have shape (", B, ", Hkv, Lk, ", D,
              "), got ", shape_str(k));
  const int64_t Hkv = k.size(1), Lk = k.size(2);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, op, ": k heads (", Hkv, ") must divide q heads (", Hq, ")");
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have k's shape ", shape_str(k), ", got ",
              shape_str(v));
  const int64_t Bp = prefix_k.size(0), P = prefix_k.size(2);
  TORCH_CHECK((Bp == 1 || Bp == B) && prefix_k.size(1) == Hkv && prefix_k.size(3) == D, op,
              ": prefix_k must have shape (1 or ", B, ", ", Hkv, ", P, ", D, "), got ",
              shape_str(prefix_k));
  TORCH_CHECK(prefix_v.sizes() == prefix_k.sizes(), op, ": prefix_v must have prefix_k's shape ",
              shape_str(prefix_k), ", got ", shape_str(prefix_v));
  if (key_padding_mask.has_value()) {
    const auto& m = *key_padding_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, op, ": key_padding_mask must be bool, got ",
                dtype_str(m.scalar_type()));
    TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == Lk, op,
                ": key_padding_mask must have shape (", B, ", ", Lk, "), got ", shape_str(m));
  }
  TORCH_CHECK(B <= 65535 && Hq <= 65535, op, ": batch and heads must be at most 65535, got B=", B,
              ", Hq=", Hq);
  TORCH_CHECK(Lq < (1LL << 30) && Lk < (1LL << 30) && P < (1LL << 30), op,
              ": sequence lengths must be below 2^30");
  p.B = static_cast<int>(B); p.Hq = static_cast<int>(Hq); p.Hkv = static_cast<int>(Hkv);
  p.Lq = static_cast<int>(Lq); p.Lk = static_cast<int>(Lk); p.P = static_cast<int>(P);
  p.Bp = static_cast<int>(Bp);
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale) * LOG2E;
  if (key_padding_mask.has_value()) {
    p.kpm = reinterpret_cast<const uint8_t*>(key_padding_mask->data_ptr());
    p.kpm_sb = key_padding_mask->stride(0); p.kpm_sl = key_padding_mask->stride(1);
  } else {
    p.kpm = nullptr; p.kpm_sb = 0; p.kpm_sl = 0;
  }
}

// Data pointers and strides of the inputs (after with_aligned_rows).
inline void fill_pointers(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& prefix_k, const at::Tensor& prefix_v, Params& p) {
  p.q = q.data_ptr(); p.q_sb = q.stride(0); p.q_sh = q.stride(1); p.q_sl = q.stride(2);
  p.k = k.data_ptr(); p.k_sb = k.stride(0); p.k_sh = k.stride(1); p.k_sl = k.stride(2);
  p.v = v.data_ptr(); p.v_sb = v.stride(0); p.v_sh = v.stride(1); p.v_sl = v.stride(2);
  p.pk = prefix_k.data_ptr(); p.pk_sb = p.Bp == 1 ? 0 : prefix_k.stride(0);
  p.pk_sh = prefix_k.stride(1); p.pk_sl = prefix_k.stride(2);
  p.pv = prefix_v.data_ptr(); p.pv_sb = p.Bp == 1 ? 0 : prefix_v.stride(0);
  p.pv_sh = prefix_v.stride(1); p.pv_sl = prefix_v.stride(2);
}

}  // namespace attn
}  // namespace lora_kernels
