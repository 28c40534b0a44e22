// Shared helpers of the lora_kernels CUDA extension: argument checks whose messages name the
// op and the argument, dtype dispatch, the launch-error check, and small device utilities.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

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

// After every kernel launch.
#define LK_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()

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

// ---------------------------------------------------------------------------------------------
// Device utilities.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Raise the dynamic shared-memory limit of `kernel` to `bytes` (needed above 48 KiB), after
// checking that the current device allows it.
template <typename Kernel>
inline void set_smem_limit(Kernel kernel, size_t bytes, const char* op) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= static_cast<size_t>(optin), op, ": needs ", bytes,
              " bytes of shared memory per block, this GPU allows ", optin);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}

}  // namespace lora_kernels
