#pragma once
// Philox blocks drawn side by side in SIMD registers on the CPU: the rounds are philox.h's, only the lane
// arithmetic is per ISA (compilers do not turn the 32x32->64 multiplies into vpmuludq by themselves).
// draw_philox_words(first_group, ...) fills r[4 * g + j] with word j of group first_group + g, exactly
// as philox4x32_10 does one group at a time (tests compare all variants with a reference).
#include <cstdint>

#include "common/philox.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

// __m512i / __m256i carry vector attributes that a template argument drops; harmless for these
// specialisations, which only pass the registers to intrinsics.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"

namespace danlu {

#if defined(__AVX512F__)
using PhiloxVec = __m512i;

template <> struct PhiloxLanes<__m512i> {
  static void mul_hi_lo(uint32_t m, __m512i c, __m512i& hi, __m512i& lo) {
    const __m512i mv = _mm512_set1_epi32(int(m));
    // vpmuludq multiplies the even 32-bit lanes into 64-bit products; swapping neighbours (CDAB) brings
    // the odd lanes there, and swaps the halves of the products back where a masked shuffle needs them.
    const __m512i even = _mm512_mul_epu32(c, mv);
    const __m512i odd = _mm512_mul_epu32(_mm512_shuffle_epi32(c, _MM_PERM_CDAB), mv);
    lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CDAB);
    hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_CDAB);
  }
  static __m512i xor3(__m512i a, __m512i b, uint32_t key) {
    return _mm512_ternarylogic_epi32(a, b, _mm512_set1_epi32(int(key)), 0x96);
  }
};

inline __m512i philox_broadcast(uint32_t v) { return _mm512_set1_epi32(int(v)); }
inline __m512i philox_consecutive(uint32_t first) {
  return _mm512_add_epi32(_mm512_set1_epi32(int(first)),
                          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}

// Words c0..c3 of 16 groups (one group per lane) to r in group order: a 4 x 16 transpose.
inline void store_interleaved(__m512i c0, __m512i c1, __m512i c2, __m512i c3, uint32_t* r) {
  const __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
  const __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
  // 128-bit lane k of u_m holds the four words of group 4k + m.
  const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
  const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
  const __m512i v0 = _mm512_shuffle_i32x4(u0, u1, 0x44), v1 = _mm512_shuffle_i32x4(u2, u3, 0x44);
  const __m512i v2 = _mm512_shuffle_i32x4(u0, u1, 0xEE), v3 = _mm512_shuffle_i32x4(u2, u3, 0xEE);
  _mm512_storeu_si512(r, _mm512_shuffle_i32x4(v0, v1, 0x88));
  _mm512_storeu_si512(r + 16, _mm512_shuffle_i32x4(v0, v1, 0xDD));
  _mm512_storeu_si512(r + 32, _mm512_shuffle_i32x4(v2, v3, 0x88));
  _mm512_storeu_si512(r + 48, _mm512_shuffle_i32x4(v2, v3, 0xDD));
}
constexpr int kPhiloxLanes = 16;

#elif defined(__AVX2__)
using PhiloxVec = __m256i;

template <> struct PhiloxLanes<__m256i> {
  static void mul_hi_lo(uint32_t m, __m256i c, __m256i& hi, __m256i& lo) {
    const __m256i mv = _mm256_set1_epi32(int(m));
    const __m256i even = _mm256_mul_epu32(c, mv);
    const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), mv);
    lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
    hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  }
  static __m256i xor3(__m256i a, __m256i b, uint32_t key) {
    return _mm256_xor_si256(_mm256_xor_si256(a, b), _mm256_set1_epi32(int(key)));
  }
};

inline __m256i philox_broadcast(uint32_t v) { return _mm256_set1_epi32(int(v)); }
inline __m256i philox_consecutive(uint32_t first) {
  return _mm256_add_epi32(_mm256_set1_epi32(int(first)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Words c0..c3 of 8 groups to r in group order: a 4 x 8 transpose.
inline void store_interleaved(__m256i c0, __m256i c1, __m256i c2, __m256i c3, uint32_t* r) {
  const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
  const __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
  // 128-bit lane k of u_m holds the four words of group 4k + m.
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(r), _mm256_permute2x128_si256(u0, u1, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(r + 8), _mm256_permute2x128_si256(u2, u3, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(r + 16), _mm256_permute2x128_si256(u0, u1, 0x31));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(r + 24), _mm256_permute2x128_si256(u2, u3, 0x31));
}
constexpr int kPhiloxLanes = 8;
#endif

// r[4 * g + j] = word j of group first_group + g, for g < groups; both multiples of 16.
inline void draw_philox_words(uint64_t first_group, int groups, uint64_t offset, uint64_t seed, uint32_t* r) {
#if defined(__AVX512F__) || defined(__AVX2__)
  for (int g = 0; g < groups; g += kPhiloxLanes) {
    // first_group is a multiple of 16, so the lanes' low words never carry into the high word.
    const uint64_t group = first_group + uint64_t(g);
    PhiloxVec c0 = philox_consecutive(uint32_t(group));
    PhiloxVec c1 = philox_broadcast(uint32_t(group >> 32));
    PhiloxVec c2 = philox_broadcast(uint32_t(offset)), c3 = philox_broadcast(uint32_t(offset >> 32));
    philox4x32_10_rounds(c0, c1, c2, c3, uint32_t(seed), uint32_t(seed >> 32));
    store_interleaved(c0, c1, c2, c3, r + 4 * g);
  }
#else
  for (int g = 0; g < groups; ++g) {
    const Philox4 p = philox4x32_10(first_group + uint64_t(g), offset, seed);
    for (int j = 0; j < 4; ++j) r[4 * g + j] = p.w[j];
  }
#endif
}

}  // namespace danlu

#pragma GCC diagnostic pop
