// The device-side basics every kernel of the extension uses, written so that the same kernel
// source compiles for the GPU (nvcc) and for the CPU emulator used by the tests
// (g++ -DLK_CPU_EMULATION, see csrc/emulator/emulator.h):
//
// * LK_DYNAMIC_SMEM(name): the block's dynamic shared memory as `unsigned char* name`;
// * launch(kernel, grid, block, smem_bytes, stream, args...): raises the shared-memory limit
//   when needed and launches (nvcc), or runs the grid on the CPU (emulator);
// * conversions between float and the storage types, small integer helpers.
//
// Nothing here depends on ATen, so the kernels (`*.cuh`) can be compiled without torch.
#pragma once

#ifdef LK_CPU_EMULATION
#include "../emulator/emulator.h"
#else
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstddef>
#include <cstdint>
#include <utility>

#ifdef LK_CPU_EMULATION
#define LK_DYNAMIC_SMEM(name) unsigned char* name = ::lk_emu::dynamic_smem()
#else
#define LK_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

namespace lora_kernels {

__host__ __device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }
__host__ __device__ __forceinline__ int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int ceil_div(int64_t a, int64_t b) {
  return static_cast<int>((a + b - 1) / b);
}

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

#ifndef LK_CPU_EMULATION
// Launch `kernel` on `stream`, after raising its dynamic shared-memory limit when it needs more
// than the default 48 KiB (checked against what the current device allows).
template <typename... KernelArgs, typename... Args>
inline void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes,
                   cudaStream_t stream, Args&&... args) {
  if (smem_bytes > 48 * 1024) {
    int device = 0, optin = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK(smem_bytes <= static_cast<size_t>(optin), "lora_kernels: a kernel needs ",
                smem_bytes, " bytes of shared memory per block, this GPU allows ", optin);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes)));
  }
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#else
template <typename... KernelArgs, typename... Args>
inline void launch(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes,
                   cudaStream_t, Args&&... args) {
  ::lk_emu::run_grid(grid, block, smem_bytes, [&] { kernel(args...); });
}
#endif

}  // namespace lora_kernels
