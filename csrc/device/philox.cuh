// Philox4x32-10 counter-based generator (Salmon et al., SC'11) and the LoRA dropout mask built
// on it. The mask is a pure function of (seed, element): forward and backward regenerate the
// same mask without storing it.
//
// Element (t, i) of x (T, in) belongs to the Philox call with counter (i / 4, t_lo, t_hi, 0)
// and key (seed_lo, seed_hi); it is kept iff word i % 4 of that call is >= round(p 2^32). One
// call serves four consecutive elements of a row (all four outputs used).
#pragma once

#include "portable.cuh"

namespace lora_kernels {

__host__ __device__ __forceinline__ uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

struct Philox4 {
  uint32_t x[4];
};

__host__ __device__ __forceinline__ Philox4 philox4x32_10(uint64_t seed, uint32_t c0, uint32_t c1,
                                                         uint32_t c2, uint32_t c3) {
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
  return Philox4{{c0, c1, c2, c3}};
}

// Keep bits of elements (row, 4 c4 .. 4 c4 + 3): bit k set iff element (row, 4 c4 + k) is kept.
__host__ __device__ __forceinline__ uint32_t keep_nibble(uint64_t seed, int64_t row, int64_t c4,
                                                        uint32_t threshold) {
  const Philox4 r = philox4x32_10(seed, static_cast<uint32_t>(c4), static_cast<uint32_t>(row),
                                  static_cast<uint32_t>(static_cast<uint64_t>(row) >> 32), 0u);
  return (r.x[0] >= threshold ? 1u : 0u) | (r.x[1] >= threshold ? 2u : 0u) |
         (r.x[2] >= threshold ? 4u : 0u) | (r.x[3] >= threshold ? 8u : 0u);
}

// round(p 2^32), saturated: an element is dropped with probability p.
inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t + 0.5);
}

}  // namespace lora_kernels
