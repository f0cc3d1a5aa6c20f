#pragma once
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), host and device.
// danlu keys every random draw by (seed, offset, element index) and never by thread or block, so the
// CPU loops and every GPU produce the same numbers (docs/design.md principle 4):
//   key     = (seed low 32 bits, seed high 32 bits)
//   counter = (group low, group high, offset low, offset high), group = element index / 4
//   element index i gets word i % 4 of the block of its group.
// Only 32x32->64 multiplies, xors and adds: exact integer math, so every ISA gives the same bits.
#include <cstdint>

#include "common/macros.h"

namespace danlu {

struct Philox4 {
  uint32_t w[4];
};

// Lane arithmetic of the rounds: uint32_t here (host and device), SIMD registers in the CPU kernels,
// which specialise this for their vector types. Integer math only, so every lane type gives the same bits.
template <class U> struct PhiloxLanes;

template <> struct PhiloxLanes<uint32_t> {
  static DANLU_HD void mul_hi_lo(uint32_t m, uint32_t c, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
    hi = __umulhi(m, c);
#else
    hi = uint32_t((uint64_t(m) * c) >> 32);
#endif
    lo = m * c;
  }
  static DANLU_HD uint32_t xor3(uint32_t a, uint32_t b, uint32_t key) { return a ^ b ^ key; }
};

// The ten rounds on counter words c (one counter per lane) under key (k0, k1).
template <class U> DANLU_HD void philox4x32_10_rounds(U& c0, U& c1, U& c2, U& c3, uint32_t k0, uint32_t k1) {
  using L = PhiloxLanes<U>;
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;  // round multipliers
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key schedule increments
  DANLU_UNROLL
  for (int round = 0; round < 10; ++round) {
    U hi0, lo0, hi1, lo1;
    L::mul_hi_lo(kMul0, c0, hi0, lo0);
    L::mul_hi_lo(kMul1, c2, hi1, lo1);
    c0 = L::xor3(hi1, c1, k0);
    c1 = lo1;
    c2 = L::xor3(hi0, c3, k1);
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
}

DANLU_HD Philox4 philox4x32_10(uint64_t group, uint64_t offset, uint64_t seed) {
  uint32_t c0 = uint32_t(group), c1 = uint32_t(group >> 32), c2 = uint32_t(offset), c3 = uint32_t(offset >> 32);
  philox4x32_10_rounds(c0, c1, c2, c3, uint32_t(seed), uint32_t(seed >> 32));
  return {{c0, c1, c2, c3}};
}

}  // namespace danlu
