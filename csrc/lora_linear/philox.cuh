// Philox4x32-10 counter-based generator (Salmon et al., SC'11), written out so the dropout mask
// is a pure function of (seed, element index): forward and backward regenerate the same mask
// without storing it.
#pragma once

#include <cstdint>

namespace lora_kernels {

__host__ __device__ __forceinline__ uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// First 32-bit word of Philox4x32-10 with counter (idx_lo, idx_hi, 0, 0) and key (seed_lo, seed_hi).
__host__ __device__ __forceinline__ uint32_t philox_u32(uint64_t seed, uint64_t idx) {
  uint32_t c0 = static_cast<uint32_t>(idx), c1 = static_cast<uint32_t>(idx >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t lo0 = 0xD2511F53u * c0, hi0 = mulhi32(0xD2511F53u, c0);
    const uint32_t lo1 = 0xCD9E8D57u * c2, hi1 = mulhi32(0xCD9E8D57u, c2);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Element `idx` is kept iff its 32-bit draw is >= threshold = round(p * 2^32): probability 1 - p.
__host__ __device__ __forceinline__ bool dropout_keep(uint64_t seed, uint64_t idx, uint32_t threshold) {
  return philox_u32(seed, idx) >= threshold;
}

inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

}  // namespace lora_kernels
