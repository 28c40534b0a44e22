// Host-side helpers of the lora_kernels CUDA extension (the ATen entry points): argument checks
// whose messages name the op and the argument, and the dtype dispatch. The device side
// (device/portable.cuh, included here) does not depend on ATen.
#pragma once

#include "device/portable.cuh"

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <string>

namespace lora_kernels {

// ---------------------------------------------------------------------------------------------
// Argument checks. Every message reads "<op>: <argument> ...", so a failure names what was
// expected and what came. Shape and dtype checks run before the device check, so they can be
// exercised on CPU tensors too (the ops are registered for CPU only to raise these messages).
// ---------------------------------------------------------------------------------------------

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    s += std::to_string(t.size(i));
    if (i + 1 < t.dim()) s += ", ";
  }
  if (t.dim() == 1) s += ",";
  return s + ")";
}

inline std::string dtype_str(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kBool: return "bool";
    default: return std::string(c10::toString(t));
  }
}

#define LK_CHECK_DIM(op, name, t, n)                                                       \
  TORCH_CHECK((t).dim() == (n), op ": " name " must be a ", n, "-D tensor, got shape ", \
              ::lora_kernels::shape_str(t))

#define LK_CHECK_SIZE(op, name, t, d, want, what)                                         \
  TORCH_CHECK((t).size(d) == (want), op ": " name " must have ", what, " = ", (want),     \
              " (dim ", d, "), got shape ", ::lora_kernels::shape_str(t))

#define LK_CHECK_FLOAT(op, name, t)                                                             \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||              \
                  (t).scalar_type() == at::kBFloat16,                                           \
              op ": " name " must be float32, float16 or bfloat16, got ",                      \
              ::lora_kernels::dtype_str((t).scalar_type()))

#define LK_CHECK_HALF(op, name, t)                                                              \
  TORCH_CHECK((t).scalar_type() == at::kHalf || (t).scalar_type() == at::kBFloat16,            \
              op ": " name " must be float16 or bfloat16, got ",                               \
              ::lora_kernels::dtype_str((t).scalar_type()))

#define LK_CHECK_DTYPE(op, name, t, want)                                                       \
  TORCH_CHECK((t).scalar_type() == (want), op ": " name " must be ",                           \
              ::lora_kernels::dtype_str(want), ", got ", ::lora_kernels::dtype_str((t).scalar_type()))

#define LK_CHECK_CUDA(op, name, t)                                                              \
  TORCH_CHECK((t).is_cuda(), op ": " name " must be a CUDA tensor, got a tensor on ",          \
              (t).device().str())

#define LK_CHECK_SAME_DEVICE(op, name, t, ref)                                                  \
  TORCH_CHECK((t).device() == (ref).device(), op ": " name " must be on ", (ref).device().str(), \
              " like the first argument, got ", (t).device().str())

// ---------------------------------------------------------------------------------------------
// Dtype dispatch: maps at::ScalarType to the CUDA scalar type (float, __half, __nv_bfloat16).
// ---------------------------------------------------------------------------------------------

#define LK_DISPATCH_FLOAT(stype, T, op, ...)                                                   \
  [&] {                                                                                          \
    switch (stype) {                                                                             \
      case at::kFloat: { using T = float; return __VA_ARGS__(); }                               \
      case at::kHalf: { using T = __half; return __VA_ARGS__(); }                               \
      case at::kBFloat16: { using T = __nv_bfloat16; return __VA_ARGS__(); }                    \
      default: TORCH_CHECK(false, op, ": unsupported dtype ", ::lora_kernels::dtype_str(stype)); \
    }                                                                                            \
  }()

#define LK_DISPATCH_HALF(stype, T, op, ...)                                                    \
  [&] {                                                                                          \
    switch (stype) {                                                                             \
      case at::kHalf: { using T = __half; return __VA_ARGS__(); }                               \
      case at::kBFloat16: { using T = __nv_bfloat16; return __VA_ARGS__(); }                    \
      default: TORCH_CHECK(false, op, ": unsupported dtype ", ::lora_kernels::dtype_str(stype)); \
    }                                                                                            \
  }()

// Multiprocessors of the current device (for grid sizing).
inline int sm_count() {
  int device = 0, sms = 1;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

}  // namespace lora_kernels
