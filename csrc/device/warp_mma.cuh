// Warp-level tensor-core and copy primitives (inline PTX, sm_80+), and the helpers that build
// their operands. Fragment layouts of mma.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"),
// with g = lane / 4 and t = lane % 4:
//
//   A 16x16 (4 regs of 2 elements): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B 16x8  (2 regs, k x n):        b0 (k 2t..2t+1, n g), b1 (k 2t+8..2t+9, n g)
//   C 16x8  (4 floats):             c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1)
//
// A register holds two 16-bit elements, the lower column (or k) index in the low half.
// ldmatrix.x4 loads four 8x8 matrices of 16-bit elements: lanes 8i..8i+7 give the row addresses
// (32-bit shared-memory addresses, smem_addr) of matrix i; lane l receives in register i the
// elements (l / 4, 2 (l % 4) .. +1) of matrix i, or with .trans the elements (2 (l % 4) .. +1, l / 4).
//
// In the CPU emulator (LK_CPU_EMULATION) the same functions are defined by emulator.h.
#pragma once

#include "portable.cuh"

namespace lora_kernels {

#ifndef LK_CPU_EMULATION

// D += A B, bf16 or fp16 inputs (T), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// The shared-memory (32-bit) address of a pointer into shared memory.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 matrices; `row` is this lane's row address (16-byte aligned, shared memory).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row)
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(row)
               : "memory");
}

// Asynchronous global -> shared copy of 16 bytes, of which the first `src_bytes` (0 or 16) are
// read and the rest zero-filled.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
}

// The same for 4 bytes (src_bytes 0 or 4).
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

#endif  // !LK_CPU_EMULATION

// Two floats rounded to one register of T (lo in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Split (lo, hi) into N bf16 pairs whose sums reproduce them: term i holds what terms 0..i-1
// missed, so N = 1 rounds to bf16, N = 2 keeps 16 significant bits, N = 3 is exact for fp32
// values in the normal range (and for any fp16/bf16 value with N >= 2 / 1).
template <int N>
__device__ __forceinline__ void split_bf16(float lo, float hi, uint32_t (&terms)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    terms[i] = *reinterpret_cast<uint32_t*>(&v);
    if (i + 1 < N) {
      lo -= __low2float(v);
      hi -= __high2float(v);
    }
  }
}

}  // namespace lora_kernels
